"""Numbers in headers longer than Python's int() takes (4,300 digits), sent to a
real Gunicorn: a 4xx saying what is wrong, never a 500 with a traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import Gunicorn, running_gunicorn
from tests.support.v2 import HEADER_LENGTH, ROWS, binary_request

pytestmark = pytest.mark.process

DIGITS = "9" * 4301


@pytest.fixture(scope="module")
def server(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    logs = tmp_path_factory.mktemp("headers")
    with running_gunicorn(trained_bundle.parents[1], logs, workers=1) as running:
        yield running


def _exchange(server: Gunicorn, head: str, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_an_inference_header_length_of_4301_digits_is_a_400(server: Gunicorn) -> None:
    body, _ = binary_request(ROWS)
    answer = _exchange(
        server,
        "POST /v2/models/iris/infer HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: application/octet-stream\r\n{HEADER_LENGTH}: {DIGITS}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n",
        body,
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Inference-Header-Content-Length '99999" in answer
    assert len(answer) < 1000  # error bodies are bounded: the value is not echoed whole
    assert b"Traceback" not in server.stderr().encode()


def test_a_content_length_of_4301_digits_is_refused_with_a_4xx(server: Gunicorn) -> None:
    answer = _exchange(
        server,
        "POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {DIGITS}\r\nConnection: close\r\n\r\n",
        b"{}",
    )
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert b"Traceback" not in server.stderr().encode()
