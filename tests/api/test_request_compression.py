"""Request bodies with Content-Encoding gzip or deflate, on every POST route,
and the bounds that keep a decompression bomb from taking memory."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.compression import (
    MAX_RATIO,
    RATIO_FREE_BYTES,
    InflatedBodyTooLargeError,
    inflate,
)
from tests.api.conftest import ClientFactory
from tests.support.bundles import SETOSA, VIRGINICA
from tests.support.v2 import INFER, ROWS, binary_request, json_request

LIMIT = 64 * 1024


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


CODINGS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    # RFC 9110's deflate is the zlib format (tritonclient's); some clients send it raw.
    "deflate": ("deflate", zlib.compress),
    "raw deflate": ("deflate", _raw_deflate),
}


@pytest.fixture
def limited(make_client: ClientFactory) -> Iterator[TestClient]:
    with make_client(max_request_bytes=LIMIT) as client:
        yield client


def _post(client: TestClient, path: str, body: bytes, encoding: str) -> tuple[int, Any]:
    response = client.post(
        path,
        content=body,
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    return response.status_code, response.json()


@pytest.mark.parametrize("coding", CODINGS)
def test_every_post_route_takes_a_compressed_body(limited: TestClient, coding: str) -> None:
    encoding, compress = CODINGS[coding]
    plain = limited.post("/predict", json=SETOSA).json()
    status, answer = _post(limited, "/predict", compress(json.dumps(SETOSA).encode()), encoding)
    assert (status, answer) == (200, plain)
    batch = json.dumps({"instances": [SETOSA, VIRGINICA]}).encode()
    status, answer = _post(limited, "/predict/batch", compress(batch), encoding)
    assert status == 200
    assert [p["predicted_class_name"] for p in answer["predictions"]] == ["setosa", "virginica"]
    v2 = json.dumps(json_request(ROWS)).encode()
    status, answer = _post(limited, INFER, compress(v2), encoding)
    assert status == 200
    assert answer["outputs"][1]["data"] == ["setosa", "virginica"]


def test_a_compressed_binary_tensor_body_keeps_its_header(limited: TestClient) -> None:
    body, headers = binary_request(ROWS)
    response = limited.post(
        INFER,
        content=gzip.compress(body),
        headers={
            **headers,
            "content-type": "application/octet-stream",
            "content-encoding": "gzip",
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][1]["data"] == ["setosa", "virginica"]


def test_identity_is_no_coding_at_all(limited: TestClient) -> None:
    status, answer = _post(limited, "/predict", json.dumps(SETOSA).encode(), "identity")
    assert status == 200
    assert answer["predicted_class_name"] == "setosa"


@pytest.mark.parametrize("path", ["/predict", INFER])
@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip", "compress"])
def test_an_unknown_coding_is_415_naming_the_supported_ones(
    limited: TestClient, path: str, encoding: str
) -> None:
    status, answer = _post(limited, path, b"{}", encoding)
    assert status == 415
    message = str(answer.get("detail") or answer.get("error"))
    assert "gzip, deflate or identity" in message
    # Each protocol's own error shape.
    assert set(answer) == ({"error"} if path == INFER else {"detail", "request_id"})


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(b"not gzip at all", "not valid gzip data", id="not gzip"),
        # Named, not shown: the bytes would be the test's id (pytest-xdist's
        # workers must collect the same ids).
        pytest.param(
            gzip.compress(json.dumps(SETOSA).encode(), mtime=0)[:-12], "ends early", id="cut short"
        ),
        pytest.param(b"", "ends early", id="empty"),
    ],
)
def test_a_body_that_does_not_inflate_is_400(
    limited: TestClient, body: bytes, fragment: str
) -> None:
    status, answer = _post(limited, "/predict", body, "gzip")
    assert status == 400
    assert fragment in str(answer["detail"])


def test_trailing_bytes_after_a_deflate_stream_are_400(limited: TestClient) -> None:
    status, answer = _post(limited, INFER, zlib.compress(b"{}") + b"junk", "deflate")
    assert status == 400
    assert "after its deflate stream" in str(answer["error"])


def test_gzip_members_one_after_another_are_one_body(limited: TestClient) -> None:
    text = json.dumps(SETOSA).encode()
    body = gzip.compress(text[:10]) + gzip.compress(text[10:])
    status, answer = _post(limited, "/predict", body, "gzip")
    assert (status, answer["predicted_class_name"]) == (200, "setosa")


def test_a_body_that_inflates_past_the_limit_is_413(limited: TestClient) -> None:
    # A valid JSON body, a little over the limit once inflated, at a modest ratio.
    padded = json.dumps({"instances": [SETOSA] * (LIMIT // 60)}).encode()
    assert len(padded) > LIMIT
    body = gzip.compress(padded)
    status, answer = _post(limited, "/predict/batch", body, "gzip")
    assert status == 413
    assert f"inflates past the limit of {LIMIT} bytes" in str(answer["detail"])


def test_a_decompression_bomb_is_413(limited: TestClient) -> None:
    # 16 MiB of zeros in about 16 KB: 256 times the limit.
    bomb = gzip.compress(bytes(16 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < LIMIT
    status, answer = _post(limited, INFER, bomb, "gzip")
    assert status == 413
    assert f"inflates past the limit of {LIMIT} bytes" in str(answer["error"])


def test_past_a_mebibyte_a_body_may_not_inflate_more_than_the_ratio() -> None:
    bomb = zlib.compress(bytes(8 * 1024 * 1024), 9)
    assert MAX_RATIO * len(bomb) > RATIO_FREE_BYTES
    with pytest.raises(InflatedBodyTooLargeError, match="decompression bomb"):
        inflate(bomb, "deflate", max_bytes=1024 * 1024 * 1024)
    # A batch of identical rows compresses past the ratio, and is taken up to a mebibyte.
    rows = json.dumps({"instances": [SETOSA] * 8000}).encode()
    assert RATIO_FREE_BYTES > len(rows) > MAX_RATIO * len(gzip.compress(rows))
    assert inflate(gzip.compress(rows), "gzip", max_bytes=RATIO_FREE_BYTES) == rows


def test_inflate_never_writes_more_than_it_is_allowed() -> None:
    with pytest.raises(InflatedBodyTooLargeError, match="past the limit of 1000 bytes"):
        inflate(zlib.compress(bytes(range(256)) * 8), "deflate", max_bytes=1000)
    assert inflate(zlib.compress(b"x" * 1000), "deflate", max_bytes=1000) == b"x" * 1000


def test_a_chunked_compressed_body_is_counted_on_the_wire_too(limited: TestClient) -> None:
    # Without Content-Length the body limit counts the compressed bytes as they arrive.
    noise = bytes(range(256)) * (2 * LIMIT // 256)
    body = zlib.compress(noise, 0)  # stored: larger than the limit on the wire

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = limited.post("/predict", content=chunks(), headers={"content-encoding": "deflate"})
    assert response.status_code == 413


def test_an_octet_stream_without_its_header_is_400_naming_the_header(
    limited: TestClient,
) -> None:
    body, headers = binary_request(ROWS)
    response = limited.post(
        INFER, content=body, headers={"content-type": "application/octet-stream"}
    )
    assert response.status_code == 400
    assert "Inference-Header-Content-Length" in response.json()["error"]
    # With the header the same body is answered.
    response = limited.post(
        INFER,
        content=body,
        headers={"content-type": "application/octet-stream", **headers},
    )
    assert response.status_code == 200, response.text
