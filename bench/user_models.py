"""Per model type: backend chosen, parity figures, agreement on rows with missing
values, and single-row latency in process.

    .venv/bin/python -m bench.user_models

Each model of tests/support/user_models.py is packaged from its reference data
(missing values kept, so the parity gate compares rows with them), then one
row is answered many times through the real prediction pipeline (validation →
features → backend → response bytes), on every backend the bundle supports.
Latency is the median of in-process calls: no HTTP, no server; `make bench`
measures the served throughput. Each backend also answers the reference rows
with their missing values (NaN, as the model saw them) and is compared with
the model's own predict/predict_proba.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from service.app import start_serving
from service.backends import load_backend
from service.bundle import verify_bundle
from service.predict_codec import predict_codec
from service.settings import ServiceSettings
from tests.support.bundles import pinned_digests
from tests.support.user_models import BUILDERS, UserModel, backend_rows, package_user_model

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


# Reference rows each backend answers, missing values included.
MISSING_ROWS = 200


def _missing_rows_diff(user: UserModel, path: Path, backend: str, trusted: str) -> float:
    """The largest difference between the backend and the model itself on the
    reference rows with their missing values."""
    bundle = verify_bundle(path)
    frame = user.x.head(MISSING_ROWS)
    served = load_backend(bundle, backend, frozenset(trusted.split(","))).predict(  # type: ignore[arg-type]
        backend_rows(bundle.manifest, frame)
    )
    rows = frame.to_numpy() if user.features is not None else frame
    method = user.model.predict_proba if bundle.manifest.task == "classification" else None
    expected = method(rows) if method else user.model.predict(rows)
    return float(np.max(np.abs(np.asarray(served, dtype=np.float64) - expected)))


def measure(key: str, work: Path) -> dict[str, Any]:
    # From reference data that keeps its missing values, as a user's CSV would:
    # the parity gate compares rows with them (reference rows, and random rows
    # with every nullable feature missing at random).
    user, path = package_user_model(key, work, keep_missing=True)
    name = path.parent.name
    manifest = json.loads((path / "manifest.json").read_text())
    # The timed request: a complete row.
    first = user.x.dropna().iloc[0]
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in first.items()}
    body = orjson.dumps(row)
    latency: dict[str, float] = {}
    missing: dict[str, float] = {}
    trusted = pinned_digests(work / "models")
    backends = ["onnx", "sklearn"] if manifest["backend"] == "onnx" else ["sklearn"]
    for backend in backends:
        settings = ServiceSettings(
            model_dir=work / "models",
            model_name=name,
            backend=backend,
            # The native model is loaded only when pinned, as an operator would pin it.
            trusted_model_sha256=trusted,
            metrics_enabled=False,
            micro_batching=False,
        )
        latency[backend] = asyncio.run(_median_us(settings, body))
        missing[backend] = _missing_rows_diff(user, path, backend, trusted)
    return {
        "model": key,
        "task": manifest["task"],
        "parity": manifest["parity"],
        "nan_rows": int(user.x.head(MISSING_ROWS).isna().any(axis=1).sum()),
        "missing": missing,
        **latency,
    }


def main() -> None:
    print(
        "| model | task | backend | parity (rows: data + random) | max diff "
        "| rows with NaN: max diff onnx / sklearn | µs/row onnx | µs/row sklearn |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for key in BUILDERS:
            work = Path(tmp) / key
            work.mkdir()
            try:
                r = measure(key, work)
            except pytest.skip.Exception as skipped:  # a library this model needs is absent
                print(f"| {key} | not measured: {skipped.msg} |", flush=True)
                continue
            p = r["parity"]
            diff = p["max_abs_diff"] if r["task"] == "classification" else p["max_rel_diff"]
            kind = "abs. prob." if r["task"] == "classification" else "rel."
            figures = f"{diff:.1e} {kind}" if diff is not None else "-"
            ran = p["test_rows"] + p["random_rows"] > 0
            outcome = "passed" if p["passed"] else "failed" if ran else "not run"
            if not p["passed"]:
                outcome += f": {p['reason']}"
            onnx = f"{r['onnx']:.0f}" if "onnx" in r else "-"
            nan_diffs = " / ".join(
                f"{r['missing'][b]:.1e}" if b in r["missing"] else "-" for b in ("onnx", "sklearn")
            )
            print(
                f"| {key} | {r['task']} | {'onnx' if p['passed'] else 'sklearn'} | "
                f"{outcome} ({p['test_rows']} + {p['random_rows']}) | {figures} | "
                f"{r['nan_rows']}: {nan_diffs} | {onnx} | {r['sklearn']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
