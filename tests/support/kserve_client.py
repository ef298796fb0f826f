"""KServe's InferenceRESTClient against a server, run with the Python of the
KServe SDK's own virtualenv (`make kserve-sdk`: its pins clash with the
project's). Usage: python kserve_client.py BASE_URL ROWS_JSON

Prints one JSON object: each case's outputs (as lists) or its error (status
and message), for the test to compare with /predict/batch. The SDK has no
request compression of its own: a gzip or deflate case compresses the body in
an httpx transport, as an application would add it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

COMPRESS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "deflate": zlib.compress}


class CompressingTransport(httpx.AsyncBaseTransport):
    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.inner = httpx.AsyncHTTPTransport()
        self.compressed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = COMPRESS[self.coding](await request.aread())
            headers = [
                (name, value)
                for name, value in request.headers.raw
                if name.lower() not in (b"content-length", b"content-encoding")
            ]
            headers += [
                (b"content-encoding", self.coding.encode()),
                (b"content-length", str(len(body)).encode()),
            ]
            request = httpx.Request(request.method, request.url, headers=headers, content=body)
            self.compressed += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _request(rows: np.ndarray[Any, Any], binary: bool, model: str = "iris") -> InferRequest:
    tensor = InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    outputs = [
        RequestedOutput(name, parameters={"binary_data": binary})
        for name in ("predicted_class", "predicted_class_name", "probabilities")
    ]
    return InferRequest(model, [tensor], request_id="kserve-1", request_outputs=outputs)


def _outputs(response: Any) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    for output in response.outputs:
        values = output.as_numpy()
        outputs[output.name] = [
            v.decode() if isinstance(v, bytes) else v for v in values.ravel().tolist()
        ]
    return {"id": response.id, "model_version": response.model_version, "outputs": outputs}


async def _case(client: InferenceRESTClient, base_url: str, request: InferRequest) -> Any:
    try:
        return _outputs(await client.infer(base_url, request, model_name=request.model_name))
    except httpx.HTTPStatusError as exc:
        return {"status": exc.response.status_code, "message": str(exc)}


async def main(base_url: str, rows: np.ndarray[Any, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for coding in (None, "gzip", "deflate"):
        transport = CompressingTransport(coding) if coding else None
        config = RESTConfig(protocol="v2", transport=transport, retries=0)
        client = InferenceRESTClient(config)
        try:
            if coding is None:
                results["live"] = await client.is_server_live(base_url)
                results["ready"] = await client.is_server_ready(base_url)
                results["model_ready"] = await client.is_model_ready(base_url, "iris")
                results["unknown_model_ready"] = await client.is_model_ready(base_url, "wine")
            for binary in (False, True):
                name = f"{coding or 'plain'}-{'binary' if binary else 'json'}"
                results[name] = await _case(client, base_url, _request(rows, binary))
            results[f"{coding or 'plain'}-unknown-model"] = await _case(
                client, base_url, _request(rows, True, model="wine")
            )
            results[f"{coding or 'plain'}-three-columns"] = await _case(
                client, base_url, _request(np.ascontiguousarray(rows[:, :3]), True)
            )
        finally:
            await client.close()
        if transport is not None:
            results[f"{coding}-requests-compressed"] = transport.compressed
    return results


if __name__ == "__main__":
    matrix = np.array(json.loads(sys.argv[2]), dtype=np.float32)
    print(json.dumps(asyncio.run(main(sys.argv[1], matrix))))
