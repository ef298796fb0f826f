"""Past its concurrency bound a worker answers 503 with Retry-After at once,
keeps accepting new connections, and answers health checks throughout."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tests.support.raw_http import LIVE, PREDICT, Answer, exchange, read_answer
from tests.support.servers import running_gunicorn

pytestmark = pytest.mark.process

CONNECTIONS = 200
ROUNDS = 5
# Low enough that 200 requests arriving together at two workers overflow it.
MAX_CONCURRENCY = 4
# Generous: an answer this late would be a client timeout, the failure this
# test is about; a slow shared machine stays far below it.
CLIENT_TIMEOUT_SECONDS = 60


async def _keep_alive_rounds(port: int) -> list[Answer]:
    """CONNECTIONS keep-alive connections, each sending one prediction a round,
    all at once."""
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
    answers: list[Answer] = []
    try:
        for _ in range(ROUNDS):
            for _, writer in streams:
                writer.write(PREDICT)
            answered = await asyncio.gather(*(read_answer(reader) for reader, _ in streams))
            answers += answered
            for index, answer in enumerate(answered):
                # A worker rebalancing asks some connections to reconnect.
                if answer.headers.get("connection") == "close":
                    streams[index][1].close()
                    streams[index] = await asyncio.open_connection("127.0.0.1", port)
    finally:
        for _, writer in streams:
            writer.close()
    return answers


async def _health_checks(port: int, load: asyncio.Task[list[Answer]]) -> list[Answer]:
    """A new connection per /health/live, as a probe makes them, while the load runs."""
    answers = [await exchange(port, LIVE)]
    while not load.done():
        answers.append(await exchange(port, LIVE))
        await asyncio.sleep(0.02)
    return answers


async def _overload(port: int) -> tuple[list[Answer], list[Answer]]:
    async with asyncio.timeout(CLIENT_TIMEOUT_SECONDS * ROUNDS):
        load = asyncio.create_task(_keep_alive_rounds(port))
        health = await _health_checks(port, load)
        return await load, health


def test_overload_gets_503_with_retry_after_and_health_checks_still_answer(
    model_dir: Path, tmp_path: Path
) -> None:
    env = {"MAX_CONCURRENCY": str(MAX_CONCURRENCY)}
    with running_gunicorn(model_dir, tmp_path / "logs", env=env) as server:
        predictions, health = asyncio.run(_overload(server.port))

    statuses = Counter(answer.status for answer in predictions)
    assert len(predictions) == CONNECTIONS * ROUNDS
    assert set(statuses) == {200, 503}, statuses
    for answer in predictions:
        if answer.status == 503:
            assert answer.headers["retry-after"] == "1"
            detail = answer.json()["detail"]  # type: ignore[index]
            assert detail.startswith("server busy:"), detail
            assert f"the limit is {MAX_CONCURRENCY}" in detail
    assert {answer.status for answer in health} == {200}
    assert len(health) >= 1
