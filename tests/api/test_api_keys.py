"""API keys in one process: every protected route against every kind of
credential, the open routes, the OpenAPI schemes, the per-key metric and log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import keyfile
from service.auth.middleware import MISSING
from service.settings import ServiceSettings
from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA
from tests.support.scrape import parse_samples, sample
from tests.support.servers import wait_for

RELOAD_BOUND_SECONDS = 5.0


@dataclass
class KeyedApp:
    client: TestClient
    keys_file: Path
    alice: str
    bob: str
    revoked: str


def add_key(path: Path, key_id: str) -> str:
    key = keyfile.mint_key()
    keyfile.update(path, add=keyfile.StoredKey(key_id, keyfile.digest_of(key)))
    return key


@pytest.fixture(scope="module")
def keyed(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedApp]:
    """One app with DOCS=protected and keys alice and bob; carol's key was
    valid when the app started and is revoked while it runs."""
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    alice, bob, carol = (add_key(keys_file, name) for name in ("alice", "bob", "carol"))
    settings = ServiceSettings(
        model_dir=trained_bundle.parents[1], api_keys_file=keys_file, docs="protected"
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        carol_headers = {"X-API-Key": carol}
        assert client.get("/model-info", headers=carol_headers).status_code == 200
        keyfile.update(keys_file, revoke="carol")
        wait_for(
            lambda: client.get("/model-info", headers=carol_headers).status_code == 401,
            RELOAD_BOUND_SECONDS,
            what="the revoked key to be refused",
        )
        yield KeyedApp(client, keys_file, alice, bob, carol)


# (method, path, JSON body): every route that needs a key with DOCS=protected.
PROTECTED = [
    ("POST", "/predict", SETOSA),
    ("POST", "/predict/batch", {"instances": [SETOSA, SETOSA]}),
    ("GET", "/model-info", None),
    ("GET", "/docs", None),
    ("GET", "/redoc", None),
    ("GET", "/openapi.json", None),
]
# /metrics: Prometheus on the internal network; the proxy refuses it (403).
OPEN = ["/health", "/health/live", "/health/ready", "/metrics"]
OPEN_V2 = [
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/iris/ready",
    "/v2/models/iris/versions/1.0.0/ready",
]
REFUSED = ["no key", "malformed header", "wrong key", "revoked key"]
ACCEPTED = ["valid Bearer", "valid X-API-Key"]


def credential_headers(app: KeyedApp, credential: str) -> dict[str, str]:
    return {
        "no key": {},
        # The right key under the wrong scheme is still refused.
        "malformed header": {"Authorization": f"Token {app.alice}"},
        "wrong key": {"Authorization": f"Bearer {keyfile.mint_key()}"},
        "revoked key": {"Authorization": f"Bearer {app.revoked}"},
        "valid Bearer": {"Authorization": f"Bearer {app.alice}"},
        "valid X-API-Key": {"X-API-Key": app.bob},
    }[credential]


def call(client: TestClient, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("credential", REFUSED)
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_protected_route_refuses_request_without_a_valid_key(
    keyed: KeyedApp, method: str, path: str, body: Any, credential: str
) -> None:
    headers = credential_headers(keyed, credential)
    response = call(keyed.client, method, path, body, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    payload = response.json()
    assert set(payload) == {"detail", "request_id"}
    assert payload["request_id"] == response.headers["x-request-id"]
    for value in headers.values():
        token = value.split()[-1]
        assert token not in response.text  # the key never comes back


@pytest.mark.parametrize("credential", ACCEPTED)
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_protected_route_answers_a_valid_key(
    keyed: KeyedApp, method: str, path: str, body: Any, credential: str
) -> None:
    response = call(keyed.client, method, path, body, credential_headers(keyed, credential))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "API key required"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed Authorization"),
        ({"Authorization": "Bearer"}, "malformed Authorization"),
        ({"Authorization": "Bearer "}, "malformed Authorization"),
        ({"Authorization": "Bearer two words"}, "malformed Authorization"),
        ({"X-API-Key": ""}, "malformed X-API-Key"),
        ({"X-API-Key": "two words"}, "malformed X-API-Key"),
        ({"X-API-Key": "mlapi_not-a-key"}, "invalid API key"),
    ],
)
def test_refusals_say_what_is_wrong(keyed: KeyedApp, headers: dict[str, str], detail: str) -> None:
    response = keyed.client.post("/predict", json=SETOSA, headers=headers)
    assert response.status_code == 401
    assert response.json()["detail"].startswith(detail)


def test_bearer_scheme_is_case_insensitive_and_another_scheme_falls_to_x_api_key(
    keyed: KeyedApp,
) -> None:
    lower = keyed.client.get("/model-info", headers={"Authorization": f"bearer {keyed.alice}"})
    assert lower.status_code == 200
    basic_then_key = keyed.client.get(
        "/model-info", headers={"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": keyed.bob}
    )
    assert basic_then_key.status_code == 200


def test_unknown_routes_need_a_key_too(keyed: KeyedApp) -> None:
    # Without a key a client cannot even learn which routes exist.
    assert keyed.client.get("/no/such/route").status_code == 401
    assert keyed.client.get("/health/", headers={}).status_code == 401
    valid = {"X-API-Key": keyed.bob}
    assert keyed.client.get("/no/such/route", headers=valid).status_code == 404


def test_open_inference_protocol_routes_get_its_error_shape(keyed: KeyedApp) -> None:
    for method, path in (("POST", "/v2/models/iris/infer"), ("GET", "/v2")):
        response = keyed.client.request(method, path)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        # As every other V2 error: the protocol's shape and nothing else.
        assert response.json() == {"error": MISSING}


@pytest.mark.parametrize("path", OPEN)
def test_health_routes_stay_open(keyed: KeyedApp, path: str) -> None:
    assert keyed.client.get(path).status_code == 200


@pytest.mark.parametrize("path", OPEN_V2)
def test_open_inference_protocol_health_and_readiness_stay_open(keyed: KeyedApp, path: str) -> None:
    assert keyed.client.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/v2", "/v2/models/iris", "/v2/models/iris/versions/1.0.0"])
def test_open_inference_protocol_metadata_needs_a_key(keyed: KeyedApp, path: str) -> None:
    assert keyed.client.get(path).status_code == 401
    assert keyed.client.get(path, headers={"X-API-Key": keyed.bob}).status_code == 200


def test_health_says_auth_is_enabled(keyed: KeyedApp) -> None:
    assert keyed.client.get("/health").json()["auth"] == "enabled"


def test_access_log_names_the_key_id_and_never_the_key(
    make_client: ClientFactory, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    keys_file = tmp_path / "api-keys"
    alice, wrong = add_key(keys_file, "alice"), keyfile.mint_key()
    # Built inside the test: the access log writes to the stdout it finds at startup.
    with make_client(api_keys_file=keys_file) as client:
        client.post("/predict", json=SETOSA, headers={"Authorization": f"Bearer {alice}"})
        client.post("/predict", json=SETOSA, headers={"X-API-Key": wrong})
    out, err = capfd.readouterr()
    lines = [json.loads(line) for line in out.splitlines() if '"ml_api.access"' in line]
    assert [(line["status"], line["key_id"]) for line in lines] == [(200, "alice"), (401, None)]
    assert alice not in out + err
    assert wrong not in out + err


def test_requests_are_counted_per_key_id_and_status(keyed: KeyedApp) -> None:
    def counts() -> tuple[float, float, float]:
        samples = parse_samples(keyed.client.get("/metrics").text)
        return (
            sample(samples, "api_key_requests_total", key_id="alice", status="200"),
            sample(samples, "api_key_requests_total", key_id="alice", status="422"),
            sample(samples, "api_key_requests_total", key_id="bob", status="200"),
        )

    before = counts()
    alice, bob = {"Authorization": f"Bearer {keyed.alice}"}, {"X-API-Key": keyed.bob}
    for _ in range(3):
        keyed.client.post("/predict", json=SETOSA, headers=alice)
    keyed.client.post("/predict", json={}, headers=alice)
    keyed.client.get("/model-info", headers=bob)
    keyed.client.post("/predict", json=SETOSA)  # no key: not counted per key
    after = counts()
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (3, 1, 1)
    metrics_text = keyed.client.get("/metrics").text
    for key in (keyed.alice, keyed.bob, keyed.revoked):
        assert key not in metrics_text


def test_openapi_declares_both_schemes_and_open_health_routes(keyed: KeyedApp) -> None:
    document = keyed.client.get("/openapi.json", headers={"X-API-Key": keyed.bob}).json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert {k: schemes["apiKeyHeader"][k] for k in ("type", "in", "name")} == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    assert document["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    assert document["paths"]["/health"]["get"]["security"] == []
    assert document["paths"]["/v2/health/ready"]["get"]["security"] == []
    assert document["paths"]["/v2/models/{model_name}/ready"]["get"]["security"] == []
    assert "401" in document["paths"]["/v2/models/{model_name}"]["get"]["responses"]
    predict = document["paths"]["/predict"]["post"]
    assert "security" not in predict  # the document-wide requirement applies
    assert "401" in predict["responses"]


def test_docs_public_by_default_while_predictions_need_a_key(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    keys_file = tmp_path / "api-keys"
    key = add_key(keys_file, "alice")
    with make_client(api_keys_file=keys_file) as client:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert client.get(path).status_code == 200, path
        assert client.post("/predict", json=SETOSA).status_code == 401
        assert client.post("/predict", json=SETOSA, headers={"X-API-Key": key}).status_code == 200


def test_docs_off_serves_no_description(make_client: ClientFactory, tmp_path: Path) -> None:
    with make_client(docs="off") as client:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert client.get(path).status_code == 404, path


def test_without_keys_everything_is_open_and_health_says_so(make_client: ClientFactory) -> None:
    with make_client() as client:
        assert client.post("/predict", json=SETOSA).status_code == 200
        assert client.get("/model-info").status_code == 200
        assert client.get("/health").json()["auth"] == "disabled"


def test_with_keys_required_and_no_key_yet_everyone_is_refused_until_one_is_added(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    keys_file = tmp_path / "api-keys"
    with make_client(api_keys_file=keys_file) as client:
        assert client.get("/model-info").status_code == 401
        assert client.get("/health").json()["auth"] == "enabled"
        key = add_key(keys_file, "first")
        wait_for(
            lambda: client.get("/model-info", headers={"X-API-Key": key}).status_code == 200,
            RELOAD_BOUND_SECONDS,
            what="the new key to be accepted",
        )
        assert client.get("/model-info").status_code == 401


def test_with_auth_off_a_keys_file_changes_nothing(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    keys_file = tmp_path / "api-keys"
    add_key(keys_file, "first")
    with make_client(api_keys_file=keys_file, auth="off") as client:
        assert client.get("/model-info").status_code == 200
        assert client.get("/health").json()["auth"] == "disabled"
        # Declared all the same, with no key (`{}`) satisfying it.
        assert client.get("/openapi.json").json()["security"][-1] == {}


def test_the_document_declares_api_keys_when_keys_are_required(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    with make_client(api_keys_file=tmp_path / "api-keys") as client:
        document = client.get("/openapi.json").json()
        assert document["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]


@pytest.mark.parametrize(
    "break_file",
    [
        lambda path: path.unlink(),
        lambda path: path.write_text(""),
        lambda path: path.write_text("# comments only\n"),
        lambda path: path.write_text(path.read_text()[:40]),
        lambda path: path.write_text(path.read_text() + "half a line"),
    ],
    ids=["removed", "emptied", "comments", "truncated", "broken rewrite"],
)
def test_a_keys_file_that_breaks_while_serving_keeps_the_keys_and_the_gauge_says_so(
    make_client: ClientFactory,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    break_file: Any,
) -> None:
    keys_file = tmp_path / "api-keys"
    key = add_key(keys_file, "alice")
    with make_client(api_keys_file=keys_file) as client:
        assert sample(parse_samples(client.get("/metrics").text), "api_keys_file_ok") == 1
        break_file(keys_file)
        logged: list[str] = []

        def refused() -> bool:
            client.get("/health/live")  # the file is looked at when requests arrive
            logged.append(capfd.readouterr().err)
            return "API keys file unusable" in "".join(logged)

        wait_for(refused, RELOAD_BOUND_SECONDS, interval=0.2, what="the broken file to be read")
        assert '"level":"warning"' in next(
            line for line in "".join(logged).splitlines() if "API keys file unusable" in line
        )
        assert client.post("/predict", json=SETOSA).status_code == 401
        assert client.get("/model-info", headers={"X-API-Key": key}).status_code == 200
        assert client.get("/health").json()["auth"] == "enabled"
        assert sample(parse_samples(client.get("/metrics").text), "api_keys_file_ok") == 0


def test_the_document_is_the_same_with_keys_off_and_on_but_for_the_empty_requirement(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """A client generated against an open server must survive keys being turned
    on: only whether no key (`{}`) satisfies the requirement changes."""
    with make_client(auth="off") as client:
        open_document = client.get("/openapi.json").json()
    assert open_document["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}, {}]
    assert set(open_document["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    keys_file = tmp_path / "api-keys"
    add_key(keys_file, "first")
    with make_client(api_keys_file=keys_file) as client:
        closed_document = client.get("/openapi.json").json()
    assert closed_document["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    assert closed_document["paths"] == open_document["paths"]
    assert closed_document["components"] == open_document["components"]


def test_401s_are_documented_in_each_protocol_s_error_shape(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    with make_client() as client:
        paths = client.get("/openapi.json").json()["paths"]

    def schema(path: str, method: str) -> str:
        ref: str = paths[path][method]["responses"]["401"]["content"]["application/json"]["schema"][
            "$ref"
        ]
        return ref

    assert schema("/predict", "post").endswith("/ErrorResponse")
    assert schema("/model-info", "get").endswith("/ErrorResponse")
    assert schema("/v2/models/{model_name}/infer", "post").endswith("/V2Error")
    assert schema("/v2", "get").endswith("/V2Error")
    assert "401" not in paths["/v2/health/ready"]["get"]["responses"]


def test_an_unusable_keys_file_stops_startup_instead_of_serving_open(
    make_client: ClientFactory, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("alice not-a-digest\n")
    with pytest.raises(Exception), make_client(api_keys_file=keys_file):  # noqa: B017, PT011
        pass
    assert "line 1" in capfd.readouterr().err
