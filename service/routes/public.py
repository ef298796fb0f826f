"""Which routes need no API key, as their own declarations say.

A fast-path route says `public=True` on its FastRoute; a FastAPI route is
declared on a router whose route_class is PublicRoute. The API description
FastAPI serves itself (Swagger UI, ReDoc, the OpenAPI document) is public
when DOCS=public. The API-key middleware and the OpenAPI document's security
requirements both read the open set built here, so an open route is declared
in one file, the one that declares the route.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from service.fastpath import FastRoute, path_parameters, template_regex

# Matches no path: the open set may have no templated path.
_NOTHING = re.compile(r"(?!)")


class PublicRoute(APIRoute):
    """A FastAPI route that needs no API key: a router's route_class."""


class OpenPaths:
    """Paths that need no API key: exact ones, and templates whose parameters
    each match one path segment. A path is open only as declared: no
    trailing slash, no dot segments."""

    def __init__(self, paths: Iterable[str]) -> None:
        paths = set(paths)
        templates = sorted(path for path in paths if path_parameters(path))
        self.paths = frozenset(paths)
        self._exact = frozenset(paths.difference(templates))
        # Most paths start with none of the templates' literal prefixes and
        # are turned away without running the regex.
        self._prefixes = tuple(sorted({path[: path.index("{")] for path in templates}))
        self._templates = (
            re.compile("|".join(template_regex(path, named=False) for path in templates))
            if templates
            else _NOTHING
        )

    def __contains__(self, path: str) -> bool:
        return path in self._exact or (
            path.startswith(self._prefixes) and self._templates.fullmatch(path) is not None
        )


def _docs_paths(api: FastAPI) -> set[str]:
    # The routes FastAPI declares itself for the API description, if it has them.
    declared = {api.openapi_url, api.docs_url, api.redoc_url, api.swagger_ui_oauth2_redirect_url}
    return {
        route.path
        for route in api.routes
        if isinstance(route, Route) and not isinstance(route, APIRoute) and route.path in declared
    }


def open_paths(
    api: FastAPI,
    routers: Iterable[APIRouter],
    fast_routes: Iterable[FastRoute],
    *,
    docs_public: bool,
) -> OpenPaths:
    """The open set of `api`, which serves `fast_routes` in front of it and
    includes `routers` (without a prefix)."""
    paths = {route.path for route in fast_routes if route.public}
    for router in routers:
        paths.update(route.path for route in router.routes if isinstance(route, PublicRoute))
    if docs_public:
        paths.update(_docs_paths(api))
    return OpenPaths(paths)
