"""Request bodies sent with `Content-Encoding: gzip` or `deflate`, inflated
before the fast path sees them.

Pure ASGI middleware behind the body limit, which has already bounded the
bytes on the wire; here the same limit bounds the inflated bytes, and so does
a ratio to the compressed size. zlib never writes more than it is allowed
(`max_length`), so a decompression bomb costs at most the limit in memory and
the CPU to write that much, then gets 413.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ClientError, UnsupportedMediaTypeError, send_exception
from service.fastpath import ClientDisconnectedError, read_body

# Content codings this server inflates (x-gzip: RFC 9110 asks recipients to
# take it as gzip). "deflate" is the zlib format; a raw deflate stream, which
# some clients send instead, is taken too.
CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
SUPPORTED = "gzip, deflate or identity"
# Apache's mod_deflate refuses request bodies that inflate more than 200
# times their size (DeflateInflateRatioLimit). Past RATIO_FREE_BYTES only: a
# batch of identical rows compresses that well, and up to the default body
# limit the limit alone bounds memory; a server configured with a far larger
# limit does not let a few kilobytes become that much.
MAX_RATIO = 200
RATIO_FREE_BYTES = 1024 * 1024
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_ZLIB_HEADER_METHOD = 8  # CM of a zlib header: deflate


class UndecodableBodyError(ClientError):
    """A body that is not the compressed data its Content-Encoding names (400)."""


class InflatedBodyTooLargeError(ClientError):
    status = 413


def unsupported(coding: str) -> UnsupportedMediaTypeError:
    return UnsupportedMediaTypeError(
        f"Content-Encoding {coding!r} is not supported: send {SUPPORTED}"
    )


def content_coding(value: bytes) -> str | None:
    """The one coding to undo, None for identity; raises 415 for any other
    (or for codings stacked on each other, which no client sends)."""
    codings = [
        token.strip()
        for token in value.decode("latin-1").lower().split(",")
        if token.strip() not in ("", "identity")
    ]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in CODINGS:
        raise unsupported(", ".join(codings))
    return CODINGS[codings[0]]


def _window_bits(coding: str, data: bytes) -> int:
    if coding == "gzip":
        return 16 + zlib.MAX_WBITS
    zlib_header = (
        len(data) >= 2
        and data[0] & 0x0F == _ZLIB_HEADER_METHOD
        and (data[0] << 8 | data[1]) % 31 == 0
    )
    return zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS


def inflate(body: bytes, coding: str, max_bytes: int) -> bytes:
    """`body` decompressed, never more than `max_bytes`, nor past RATIO_FREE_BYTES
    more than MAX_RATIO times its size."""
    allowed = min(max_bytes, max(RATIO_FREE_BYTES, MAX_RATIO * len(body)))
    parts: list[bytes] = []
    size = 0
    data = body
    while True:
        decompressor = zlib.decompressobj(_window_bits(coding, data))
        try:
            part = decompressor.decompress(data, allowed - size + 1)
        except zlib.error as exc:
            raise UndecodableBodyError(f"request body is not valid {coding} data: {exc}") from None
        size += len(part)
        if size > allowed:
            raise InflatedBodyTooLargeError(
                f"request body inflates past the limit of {max_bytes} bytes"
                if allowed == max_bytes
                else f"request body inflates more than {MAX_RATIO} times its {len(body)} "
                "bytes: refused as a decompression bomb"
            )
        parts.append(part)
        if not decompressor.eof:
            raise UndecodableBodyError(f"request body is not valid {coding} data: it ends early")
        data = decompressor.unused_data
        if not data:
            return b"".join(parts)
        # gzip allows members one after another; a deflate stream is one.
        if coding != "gzip":
            raise UndecodableBodyError(f"request body has data after its {coding} stream")


class RequestDecompressionMiddleware:
    """Inflates a gzip or deflate request body (bounded by `max_bytes`) and
    hands it on without its Content-Encoding; 415 for any other coding, 400
    for data that does not inflate, 413 for a body that inflates too far."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine function: an uncompressed request costs one header
        # lookup and no extra frame.
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return self.app(scope, receive, send)
        encoding = dict(scope["headers"]).get(b"content-encoding")
        if encoding is None:
            return self.app(scope, receive, send)
        return self._inflated(scope, receive, send, encoding)

    async def _inflated(self, scope: Scope, receive: Receive, send: Send, encoding: bytes) -> None:
        try:
            coding = content_coding(encoding)
            body = await read_body(receive)
            if coding is not None:
                body = inflate(body, coding, self.max_bytes)
        except ClientDisconnectedError:
            return
        except Exception as exc:
            await send_exception(send, scope, exc)
            return
        # In place: the layers outside read what the fast path sets in this scope.
        scope["headers"] = [
            *(
                (name, value)
                for name, value in scope["headers"]
                if name not in (b"content-encoding", b"content-length")
            ),
            (b"content-length", b"%d" % len(body)),
        ]
        delivered = False

        async def receive_inflated() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive_inflated, send)
