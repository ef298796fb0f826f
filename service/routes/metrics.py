from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from service.metrics.exposition import METRICS_CONTENT_TYPE, render_metrics
from service.routes.public import PublicRoute

# Open whatever the keys: Prometheus scrapes it on the internal network (the
# proxy answers it 403).
router = APIRouter(tags=["metrics"], route_class=PublicRoute)


@router.get(
    "/metrics",
    summary="Prometheus metrics of every worker, aggregated",
    operation_id="get_metrics",
    response_class=Response,
    responses={
        200: {
            "description": "The Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics() -> Response:
    return Response(render_metrics(), media_type=METRICS_CONTENT_TYPE)
