"""Per model type: backend chosen, parity figures, and single-row latency in process.

    .venv/bin/python -m bench.user_models

Each model of tests/support/user_models.py is packaged from its reference data,
then one row is answered many times through the real prediction pipeline
(validation → features → backend → response bytes), on every backend the
bundle supports. Latency is the median of in-process calls: no HTTP, no
server; `make bench` measures the served throughput.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from service.app import start_serving
from service.predict_codec import predict_codec
from service.settings import ServiceSettings
from tests.support.bundles import pinned_digests
from tests.support.user_models import BUILDERS, package_user_model

CALLS = 2000


async def _median_us(settings: ServiceSettings, body: bytes) -> float:
    pipeline = await start_serving(settings)
    codec = predict_codec(pipeline)

    async def predict() -> bytes:
        # What POST /predict runs: decode, predict, encode.
        return codec.encode_one(await pipeline.run_row(codec.decode_one(body)))

    try:
        for _ in range(50):
            await predict()
        samples = []
        for _ in range(CALLS):
            start = time.perf_counter()
            await predict()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e6
    finally:
        if pipeline.predictor.batcher is not None:
            await pipeline.predictor.batcher.stop()


def measure(key: str, work: Path) -> dict[str, Any]:
    user, path = package_user_model(key, work)
    name = path.parent.name
    manifest = json.loads((path / "manifest.json").read_text())
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in user.x.iloc[0].items()}
    body = orjson.dumps(row)
    latency: dict[str, float] = {}
    backends = ["onnx", "sklearn"] if manifest["backend"] == "onnx" else ["sklearn"]
    for backend in backends:
        settings = ServiceSettings(
            model_dir=work / "models",
            model_name=name,
            backend=backend,
            # The native model is loaded only when pinned, as an operator would pin it.
            trusted_model_sha256=pinned_digests(work / "models"),
            metrics_enabled=False,
            micro_batching=False,
        )
        latency[backend] = asyncio.run(_median_us(settings, body))
    return {"model": key, "task": manifest["task"], "parity": manifest["parity"], **latency}


def main() -> None:
    print(
        "| model | task | backend | parity (rows: data + random) | max diff "
        "| µs/row onnx | µs/row sklearn |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for key in BUILDERS:
            work = Path(tmp) / key
            work.mkdir()
            r = measure(key, work)
            p = r["parity"]
            diff = p["max_abs_diff"] if r["task"] == "classification" else p["max_rel_diff"]
            kind = "abs. prob." if r["task"] == "classification" else "rel."
            figures = f"{diff:.1e} {kind}" if diff is not None else "-"
            outcome = "passed" if p["passed"] else f"failed: {p['reason'][:60]}"
            onnx = f"{r['onnx']:.0f}" if "onnx" in r else "-"
            print(
                f"| {key} | {r['task']} | {'onnx' if p['passed'] else 'sklearn'} | "
                f"{outcome} ({p['test_rows']} + {p['random_rows']}) | {figures} | "
                f"{onnx} | {r['sklearn']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
