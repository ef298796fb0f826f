"""Where one request's CPU goes: py-spy samples of loaded workers, by pipeline stage.

The workers' real CPU time over the window (from /proc) divided by the requests
answered in it gives microseconds per request; py-spy's samples of the same
window split that figure by stage. Each sampled stack is attributed to the
stage of its innermost frame that a rule below recognises, so C work (pydantic-
core, orjson, ONNX Runtime) counts toward the Python call that started it.
Server frames (uvicorn, asyncio) and everything no rule claims (httptools,
uvloop, the event loop itself) are the ASGI/HTTP layer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HTTP_LAYER = "ASGI/HTTP/event loop"
# (stage, pattern on "function (path:line)"), tried on each frame from the leaf up.
STAGE_RULES: list[tuple[str, re.Pattern[str]]] = [
    (
        "parse + validation",
        re.compile(r"(^|\.)(model_validate_json|parse_body|validation_errors) \("),
    ),
    (
        "feature matrix",
        re.compile(r"^(PredictCodec\.(features|decode_one|decode_batch)|<lambda>) \(service/"),
    ),
    (
        "model (backend call)",
        re.compile(
            r"\((service/backends/|onnxruntime/|service/predictor\.py)"
            r"|^PredictionPipeline\.(run|run_row|run_row_inline|run_row_matrix) "
        ),
    ),
    ("metrics", re.compile(r"\((service/metrics/|prometheus_client/)")),
    ("access log", re.compile(r"\(service/logs\.py")),
    # The open-set check (service/routes/public.py) is part of the key check.
    ("auth", re.compile(r"\(service/auth|^OpenPaths\.")),
    (
        "response encoding",
        re.compile(
            r"^PredictCodec\.(encode_one|encode_batch|class_prediction|class_predictions"
            r"|_numpy_class_predictions|regression_predictions) "
        ),
    ),
    ("request id + context", re.compile(r"^RequestContextMiddleware\.|\(uuid\.py")),
    ("body limit", re.compile(r"^BodySizeLimitMiddleware\.")),
    ("fast-path dispatch", re.compile(r"\(service/fastpath\.py")),
    # Frames of the server itself (uvicorn's send and the worker's protocol
    # write the socket) stop the walk here, before it reaches the middleware
    # that called them.
    (HTTP_LAYER, re.compile(r"\((uvicorn|uvicorn_worker|starlette|asyncio|anyio|service/server)/")),
]
STAGES = list(dict.fromkeys(stage for stage, _ in STAGE_RULES))
_FRAME_SPLIT = re.compile(r";(?=[^;]*\()")


def classify(frames: Sequence[str]) -> str:
    for frame in reversed(frames):
        for stage, pattern in STAGE_RULES:
            if pattern.search(frame):
                return stage
    return HTTP_LAYER


def parse_raw(text: str) -> Counter[str]:
    """py-spy's raw (collapsed) output: `frame;frame;...;leaf count` per line."""
    samples: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[classify(stack.split(";"))] += int(count)
    return samples


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        # Recycled (MAX_REQUESTS) during the window: its time is lost, not fatal.
        return 0.0
    # utime and stime are fields 14 and 15; after the ")" they are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy() -> str:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else "py-spy"


@dataclass
class Profile:
    cpu_seconds: float
    window_seconds: float
    samples: Counter[str]

    def budget(self, requests_per_second: float) -> dict[str, float]:
        """Microseconds of worker CPU per request, by stage."""
        total = sum(self.samples.values())
        if not total:
            raise RuntimeError("py-spy recorded no samples (is ptrace allowed?)")
        per_request_us = self.cpu_seconds / (requests_per_second * self.window_seconds) * 1e6
        return {stage: per_request_us * self.samples[stage] / total for stage in STAGES}


def record(pids: Sequence[int], seconds: int) -> Profile:
    """Sample every worker for `seconds` while load is running."""
    outputs = [Path(tempfile.mkstemp(suffix=".txt")[1]) for _ in pids]
    before = sum(cpu_seconds(pid) for pid in pids)
    began = time.monotonic()
    spies = [
        subprocess.Popen(
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(seconds),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid, out in zip(pids, outputs, strict=True)
    ]
    time.sleep(seconds)
    used = sum(cpu_seconds(pid) for pid in pids) - before
    window = time.monotonic() - began
    samples: Counter[str] = Counter()
    for spy, out in zip(spies, outputs, strict=True):
        spy.wait(timeout=60)
        samples.update(parse_raw(out.read_text()))
        out.unlink()
    return Profile(used, window, samples)


def budget_table(budget: dict[str, float]) -> str:
    total = sum(budget.values())
    lines = [f"{'stage':<24}{'us/request':>11}{'share':>8}"]
    for stage in STAGES:
        lines.append(f"{stage:<24}{budget[stage]:>11.1f}{budget[stage] / total:>8.0%}")
    lines.append(f"{'total':<24}{total:>11.1f}")
    return "\n".join(lines)
