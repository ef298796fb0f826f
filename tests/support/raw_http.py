"""HTTP/1.1 over asyncio streams, byte for byte what the test writes: for
tests that hold many connections at once, send partial requests or need to
see exactly when the server answers or closes."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from tests.support.bundles import SETOSA


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def request(method: str, path: str, body: bytes = b"", *, close: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


PREDICT = request("POST", "/predict", json.dumps(SETOSA).encode())
LIVE = request("GET", "/health/live")


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response; asyncio.IncompleteReadError if the server closes first."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split(" ")[1]), headers, body)


async def exchange(port: int, raw: bytes) -> Answer:
    """A new connection, one request, its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await read_answer(reader)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := await reader.read(65536):
        received += chunk
    return received
