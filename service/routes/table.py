"""Every route the fast path answers, declared once: it dispatches from this
table, the OpenAPI document and the metrics' handler labels are built from it."""

from __future__ import annotations

from service.fastpath import FastRoute
from service.routes import predict
from service.v2 import routes as v2

FAST_ROUTES: tuple[FastRoute, ...] = (*predict.ROUTES, *v2.ROUTES)
