"""The concurrency bound: 503 with Retry-After past it, health routes exempt."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from service.routes.public import OpenPaths
from service.shedding import REQUESTS_AHEAD, LoadSheddingMiddleware

EXEMPT = OpenPaths({"/health/live"})


class HeldApp:
    """Answers 200 once released: requests pile up inside it."""

    def __init__(self, expected: int = 0) -> None:
        self.release = asyncio.Event()
        self.expected = expected
        self.all_inside = asyncio.Event()
        self.inside = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.inside += 1
        if self.inside == self.expected:
            self.all_inside.set()
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _scope(path: str = "/predict", ahead: int | None = None) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "path": path,
        "method": "POST",
        "headers": [],
        "state": {},
    }
    if ahead is not None:
        scope[REQUESTS_AHEAD] = ahead
    return scope


async def _call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _status(sent: list[dict[str, Any]]) -> int:
    return int(sent[0]["status"])


def test_past_the_bound_requests_get_503_with_retry_after_and_health_still_passes() -> None:
    async def run() -> None:
        inner = HeldApp(expected=2)
        app = LoadSheddingMiddleware(inner, max_concurrency=2, exempt_paths=EXEMPT)
        held = [asyncio.create_task(_call(app, _scope())) for _ in range(2)]
        await inner.all_inside.wait()
        refused = await _call(app, _scope())
        assert _status(refused) == 503
        assert (b"retry-after", b"1") in refused[0]["headers"]
        detail = json.loads(refused[1]["body"])["detail"]
        assert detail.startswith("server busy: 2 requests in progress, the limit is 2")
        health = asyncio.create_task(_call(app, _scope("/health/live")))
        inner.release.set()
        assert _status(await health) == 200
        assert [_status(await task) for task in held] == [200, 200]
        # The bound frees as requests finish.
        assert _status(await _call(app, _scope())) == 200

    asyncio.run(run())


def test_a_v2_refusal_has_the_open_inference_protocol_error_shape() -> None:
    async def run() -> None:
        app = LoadSheddingMiddleware(HeldApp(), max_concurrency=1, exempt_paths=EXEMPT)
        sent = await _call(app, _scope("/v2/models/iris/infer", ahead=1))
        assert _status(sent) == 503
        assert json.loads(sent[1]["body"])["error"].startswith("server busy:")

    asyncio.run(run())


def test_the_servers_count_at_arrival_decides_when_it_gives_one() -> None:
    # Under the worker, every request that arrived in one event-loop turn is
    # judged by the requests ahead of it then, not by who is inside the app.
    async def run() -> None:
        inner = HeldApp()
        inner.release.set()
        shed: list[None] = []
        app = LoadSheddingMiddleware(
            inner, max_concurrency=3, exempt_paths=EXEMPT, on_shed=lambda: shed.append(None)
        )
        assert _status(await _call(app, _scope(ahead=2))) == 200
        assert _status(await _call(app, _scope(ahead=3))) == 503
        exempt = _scope("/health/live", ahead=1000)
        assert _status(await _call(app, exempt)) == 200
        # Each refusal counted once (ml_api_requests_shed_total), nothing else.
        assert len(shed) == 1

    asyncio.run(run())
