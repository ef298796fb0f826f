"""Routes say whether they are open where they are declared: the open set the
API-key check and the OpenAPI document use is derived from those declarations."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI

from service.app import create_app
from service.fastpath import FastRequest, FastResponse, FastRoute
from service.routes.public import OpenPaths, PublicRoute, open_paths
from service.settings import ServiceSettings

PROBES = {
    "/health",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{model_name}/ready",
    "/v2/models/{model_name}/versions/{model_version}/ready",
}
DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def _open_set(tmp_path: Path, *, docs: str = "protected", metrics: bool = True) -> OpenPaths:
    settings = ServiceSettings(
        model_dir=tmp_path,
        api_keys_file=tmp_path / "no-api-keys",
        docs=docs,
        metrics_enabled=metrics,
    )
    return create_app(settings).open_paths


@pytest.mark.parametrize(
    ("docs", "documented"), [("protected", set()), ("off", set()), ("public", DOCS)]
)
def test_the_open_set_is_the_probes_and_the_docs_only_when_public(
    tmp_path: Path, docs: str, documented: set[str]
) -> None:
    assert _open_set(tmp_path, docs=docs).paths == PROBES | documented


def test_a_route_the_app_does_not_serve_is_not_open(tmp_path: Path) -> None:
    assert _open_set(tmp_path, metrics=False).paths == PROBES - {"/metrics"}


def test_open_paths_are_exact_apart_from_a_segment_per_template_parameter(
    tmp_path: Path,
) -> None:
    opened = _open_set(tmp_path)
    for path in (
        "/health",
        "/health/ready",
        "/v2/health/live",
        "/v2/models/iris/ready",
        "/v2/models/iris/versions/1.0.0/ready",
    ):
        assert path in opened, path
    for path in (
        "/health/",
        "/health/../model-info",
        "/v2",
        "/v2/",
        "/v2/health/live/",
        "/v2/models/iris",
        "/v2/models/iris/infer",
        "/v2/models/iris/ready/",
        "/v2/models/a/b/ready",
        "/v2/models//ready",
        "/v2/models/iris/versions/ready",
        "/predict",
        "/model-info",
        "/docs",
    ):
        assert path not in opened, path


async def _answer(request: FastRequest) -> FastResponse:
    return FastResponse(b"{}")


def test_declaring_a_route_public_is_all_it_takes_to_open_it() -> None:
    api = FastAPI()
    public = APIRouter(route_class=PublicRoute)
    public.add_api_route("/status", lambda: {})
    private = APIRouter()
    private.add_api_route("/private", lambda: {})
    routers = [public, private]
    fast = [
        FastRoute(
            "GET", "/jobs/{job}/state", _answer, "", (), lambda c, p: {}, "job_state", public=True
        ),
        FastRoute("POST", "/jobs/{job}", _answer, "", (), lambda c, p: {}, "post_job"),
    ]
    opened = open_paths(api, routers, fast, docs_public=False)
    assert opened.paths == {"/status", "/jobs/{job}/state"}
    assert "/status" in opened
    assert "/jobs/7/state" in opened
    assert "/jobs/7" not in opened
    assert "/private" not in opened
    assert "/docs" not in opened  # FastAPI's own docs, not public unless asked
    assert "/docs" in open_paths(api, routers, fast, docs_public=True)


def test_an_open_set_without_templates_opens_no_templated_path() -> None:
    opened = OpenPaths({"/a"})
    assert "/a" in opened
    assert "/a/b" not in opened
    assert "" not in opened
