"""`make bench`: ml-api against in-run baselines, under the same Gunicorn settings.

Every server runs `gunicorn -c gunicorn.conf.py` with 2 workers on 127.0.0.1;
wrk drives them in interleaved rounds (so drift on a shared machine hits all
of them alike) and the table reports medians with ratios to the baselines.

`--baseline-commit REV` adds REV's code as one more server, with the settings
of ml-api-production (named ml-api-production@REV), so a change is measured
against the code before it in the same interleaved run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import overload, stages

REPO = Path(__file__).resolve().parents[1]
SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
ARTICLE, NOOP, BARE = "article", "fastapi-noop", "bare-asgi"
# The bare callable on the stock worker: the yardstick the production server
# is held to (issue 21: at least 0.6x of it in the same run).
BARE_STOCK = "bare-asgi-stock-worker"
STOCK_WORKER = {"GUNICORN_CMD_ARGS": "--worker-class uvicorn_worker.UvicornWorker"}
ML_API, METRICS_OFF, SKLEARN = "ml-api", "ml-api-metrics-off", "ml-api-sklearn"
# The production configuration (metrics and API keys on) and the same server
# with both off: the hot-path budget compares these two.
PRODUCTION, BOTH_OFF = "ml-api-production", "ml-api-auth-metrics-off"
AUTH_ONLY = "ml-api-auth-only"  # attributes the difference between the two
# Production with an ONNX shadow candidate (a model retrained with another seed)
# scored in every worker: what shadow scoring costs the served version.
SHADOW = "ml-api-production-shadow"
SHADOW_VERSION = "1.0.1"
# Production with payload capture on: every request, and one in a hundred.
CAPTURE_ALL, CAPTURE_1PCT = "ml-api-capture-all", "ml-api-capture-1pct"


@dataclass(frozen=True)
class ServerSpec:
    # The app to serve instead of gunicorn.conf.py's.
    app: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    api_key: bool = False
    # The source tree gunicorn runs in: this checkout, or an older commit's.
    source: Path = REPO
    # Serve the bench's bundle with a retrained candidate in its shadow.
    shadow: bool = False
    # PAYLOAD_SAMPLE, into a directory of the bench's work tree; None: capture off.
    payload_sample: float | None = None


SERVERS: dict[str, ServerSpec] = {
    ML_API: ServerSpec(),
    ARTICLE: ServerSpec("bench.baselines:article_app"),
    NOOP: ServerSpec("bench.baselines:noop_app"),
    BARE: ServerSpec("bench.baselines:bare_app"),
    BARE_STOCK: ServerSpec("bench.baselines:bare_app", env=STOCK_WORKER),
    METRICS_OFF: ServerSpec(env={"METRICS_ENABLED": "false"}),
    SKLEARN: ServerSpec(env={"BACKEND": "sklearn"}),
    PRODUCTION: ServerSpec(api_key=True),
    BOTH_OFF: ServerSpec(env={"METRICS_ENABLED": "false"}),
    AUTH_ONLY: ServerSpec(env={"METRICS_ENABLED": "false"}, api_key=True),
    SHADOW: ServerSpec(api_key=True, shadow=True),
    CAPTURE_ALL: ServerSpec(api_key=True, payload_sample=1.0),
    CAPTURE_1PCT: ServerSpec(api_key=True, payload_sample=0.01),
}
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # Headers every request to this server carries (its API key).
    headers: dict[str, str] = field(default_factory=dict)
    log: Path | None = None

    def log_tail(self, lines: int = 5) -> str:
        """Why a server that exited early did (its log is removed with the work directory)."""
        if self.log is None or not self.log.exists():
            return "no log"
        return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return sorted(int(pid) for pid in out.stdout.split())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk from Debian's archive", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return shutil.which("wrk") or "wrk"


def train(work: Path, source: Path = REPO) -> Path:
    """A bundle trained by SOURCE's own code: an older commit validates manifests with
    its own schema, so it serves what its own training wrote."""
    models = work / ("models" if source == REPO else f"models-{source.name}")
    out = subprocess.run(
        [sys.executable, "-m", "training", "--output-dir", str(models)],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def shadow_models(work: Path, bundle: Path) -> Path:
    """A model directory holding the bench's bundle and, as SHADOW_VERSION, the same
    model retrained with another seed (ONNX too): the shadow server's MODEL_DIR."""
    models = work / "models-shadow"
    if not models.exists():
        shutil.copytree(bundle, models / bundle.parent.name / bundle.name)
        subprocess.run(
            [
                *(sys.executable, "-m", "training", "--output-dir", str(models)),
                *("--version", SHADOW_VERSION, "--random-state", "1"),
            ],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
    return models


def file_name(server: str) -> str:
    """A server's name as a file name (a baseline's revision may hold a slash)."""
    return re.sub(r"[^\w.@~^-]", "_", server)


def api_keys_file(work: Path, name: str, with_key: bool) -> tuple[Path, dict[str, str]]:
    """A keys file holding one key (or none) and the headers that present it."""
    path = work / f"{file_name(name)}-api-keys"
    if not with_key:
        return path, {}
    from service.auth import keyfile

    key = keyfile.mint_key()
    keyfile.update(path, add=keyfile.StoredKey("bench", keyfile.digest_of(key)))
    return path, {"Authorization": f"Bearer {key}"}


def metrics_dir(work: Path, name: str) -> Path:
    """Where a server's per-worker metric files go: on tmpfs when the machine has
    one, as in every deployment (compose, Swarm and Kubernetes mount memory
    there), since each request writes to them."""
    shm = Path("/dev/shm")
    root = shm / work.name if shm.is_dir() else work
    return root / f"{file_name(name)}-metrics"


def remove_work(work: Path) -> None:
    shutil.rmtree(metrics_dir(work, "any").parent, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


def checkout(rev: str, work: Path, repo: Path = REPO) -> Path:
    """REV's tracked files, exported into the bench's work directory (the repository
    itself is only read: no worktree is registered, nothing to clean up in it)."""
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = work / f"source-{sha[:12]}"
    tree.mkdir()
    archive = subprocess.Popen(
        ["git", "-C", str(repo), "archive", "--format=tar", sha], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {rev} failed")
    return tree


def with_baseline(
    names: list[str], rev: str | None, work: Path, repo: Path = REPO
) -> dict[str, ServerSpec]:
    """The servers to run: the named ones, and REV's code under production's settings."""
    specs = {name: SERVERS[name] for name in names}
    if rev is not None:
        tree = checkout(rev, work, repo)
        specs[f"{PRODUCTION}@{rev}"] = replace(SERVERS[PRODUCTION], source=tree)
    return specs


def payload_env(work: Path, name: str, sample: float | None) -> dict[str, str]:
    """Capture on disk, as a deployment's volume would be, bounded to 4 x 16 MB
    finished files a server (at full speed every request fills them in minutes)."""
    if sample is None:
        return {"PAYLOAD_SAMPLE": "0"}
    return {
        "PAYLOAD_SAMPLE": str(sample),
        "PAYLOAD_LOG_DIR": str(work / f"{file_name(name)}-payloads"),
        "PAYLOAD_LOG_MAX_MB": "16",
        "PAYLOAD_LOG_FILES": "4",
    }


@dataclass(frozen=True)
class Launch:
    command: list[str]
    cwd: Path
    env: dict[str, str]
    headers: dict[str, str]


def launch(
    name: str, spec: ServerSpec, work: Path, bundle: Path, workers: int, port: int
) -> Launch:
    keys_path, headers = api_keys_file(work, name, spec.api_key)
    env = {
        "API_KEYS_FILE": str(keys_path),
        **os.environ,
        # Decided by configuration, not by whether the file holds a key.
        "AUTH": "keys" if spec.api_key else "off",
        "MODEL_DIR": str(bundle.parents[1]),
        "BENCH_BUNDLE": str(bundle),
        "WEB_CONCURRENCY": str(workers),
        "BIND": f"127.0.0.1:{port}",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir(work, name)),
        # The bench's own bundle: its pickle may load (the sklearn server needs it).
        "TRUSTED_MODEL_SHA256": hashlib.sha256((bundle / "model.joblib").read_bytes()).hexdigest(),
        **payload_env(work, name, spec.payload_sample),
        **spec.env,
    }
    if spec.shadow:
        env.update(
            MODEL_DIR=str(shadow_models(work, bundle)),
            MODEL_VERSION=bundle.name,
            SHADOW_MODEL_VERSION=SHADOW_VERSION,
        )
    app = [spec.app] if spec.app else []
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *app]
    return Launch(command, spec.source, env, headers)


def start(name: str, spec: ServerSpec, work: Path, bundle: Path, workers: int) -> Server:
    port = free_port()
    if spec.source != REPO:
        bundle = train(work, spec.source)
    how = launch(name, spec, work, bundle, workers, port)
    log_path = work / f"{file_name(name)}.log"
    log = log_path.open("wb")
    # `python -m` puts the working directory first on sys.path: the source
    # tree's own service/ is the one imported.
    process = subprocess.Popen(
        how.command,
        cwd=how.cwd,
        env=how.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return Server(name, port, process, headers=how.headers, log=log_path)


def first_answer_seconds(server: Server, started: float, timeout: float = 60) -> float:
    deadline = started + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited {server.process.returncode}: {server.log_tail()}"
            )
        try:
            answer = httpx.post(
                f"{server.url}/predict", json=SETOSA, headers=server.headers, timeout=2
            )
            if answer.status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{server.name} did not answer within {timeout}s")


def wait_all_workers(server: Server, workers: int) -> None:
    # Readiness of one worker is not enough: the split check needs all of them.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(server.workers()) < workers:
        time.sleep(0.1)
    time.sleep(1.0)


def lua_string(data: bytes) -> str:
    """Any bytes as a Lua string literal (binary tensors included)."""
    printable = {c for c in range(32, 127)} - {ord('"'), ord("\\")}
    return '"' + "".join(chr(b) if b in printable else f"\\{b:03d}" for b in data) + '"'


def wrk_script(work: Path, path: str, body: bytes, headers: dict[str, str] | None = None) -> Path:
    headers = {"Content-Type": "application/json", **(headers or {})}
    script = work / f"wrk-{abs(hash((path, body, tuple(headers.items()))))}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {lua_string(body)}\n"
        + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
    )
    return script


V2_INFER = "/v2/models/iris/infer"


def v2_bodies(rows: int) -> dict[str, tuple[bytes, dict[str, str]]]:
    """V2 infer requests for `rows` rows as one FP32 tensor: JSON data, and binary in and out."""
    values = [float(v) for v in SETOSA.values()] * rows
    tensor = {"name": "features", "shape": [rows, len(SETOSA)], "datatype": "FP32"}
    json_body = json.dumps({"inputs": [{**tensor, "data": values}]}).encode()
    raw = np.asarray(values, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return {
        "json": (json_body, {"Content-Type": "application/json"}),
        "binary": (
            header + raw,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        ),
    }


def check_v2_request(server: Server, body: bytes, headers: dict[str, str]) -> None:
    response = httpx.post(server.url + V2_INFER, content=body, headers=headers, timeout=10)
    if response.status_code != 200:
        raise RuntimeError(f"V2 request refused: {response.status_code} {response.text[:300]}")


def measure_v2(
    wrk: str, server: Server, work: Path, seconds: int, connections: int, repeats: int = 3
) -> dict[str, float]:
    """V2 against ml-api's own routes on the same server, interleaved: rows/s
    for 1,000-row batches (V2 JSON, V2 binary, /predict/batch) and req/s for
    single rows (V2 JSON, /predict)."""
    batch_body = json.dumps({"instances": [SETOSA] * 1000}).encode()
    scripts: dict[str, tuple[str, Path, int, int]] = {
        "predict_batch_1000": (
            "/predict/batch",
            wrk_script(work, "/predict/batch", batch_body),
            8,
            1000,
        ),
        "predict_single": (
            "/predict",
            wrk_script(work, "/predict", json.dumps(SETOSA).encode()),
            connections,
            1,
        ),
    }
    for kind, (body, headers) in v2_bodies(1000).items():
        check_v2_request(server, body, headers)
        scripts[f"v2_{kind}_1000"] = (V2_INFER, wrk_script(work, V2_INFER, body, headers), 8, 1000)
    single, single_headers = v2_bodies(1)["json"]
    check_v2_request(server, single, single_headers)
    scripts["v2_single"] = (
        V2_INFER,
        wrk_script(work, V2_INFER, single, single_headers),
        connections,
        1,
    )
    runs: dict[str, list[float]] = {name: [] for name in scripts}
    for _ in range(repeats):
        for name, (path, script, conns, rows) in scripts.items():
            result = run_wrk(wrk, server, script, path, seconds, conns)
            if result["non_2xx"]:
                raise RuntimeError(f"{name}: {result['non_2xx']} non-2xx answers")
            runs[name].append(result["rps"] * rows)
    return {name: statistics.median(values) for name, values in runs.items()}


def v2_targets(v2: dict[str, float]) -> dict[str, list[Any]]:
    batch = v2["predict_batch_1000"]
    return {
        "V2 JSON 1000x4 >= 500k rows/s": [round(v2["v2_json_1000"]), v2["v2_json_1000"] >= 5e5],
        "V2 binary 1000x4 >= 700k rows/s": [
            round(v2["v2_binary_1000"]),
            v2["v2_binary_1000"] >= 7e5,
        ],
        "V2 JSON >= 2.5x /predict/batch (1000 rows)": [
            round(v2["v2_json_1000"] / batch, 2),
            v2["v2_json_1000"] >= 2.5 * batch,
        ],
        "V2 binary >= 2.5x /predict/batch (1000 rows)": [
            round(v2["v2_binary_1000"] / batch, 2),
            v2["v2_binary_1000"] >= 2.5 * batch,
        ],
        "V2 single row >= 0.9x /predict": [
            round(v2["v2_single"] / v2["predict_single"], 2),
            v2["v2_single"] >= 0.9 * v2["predict_single"],
        ],
    }


def print_v2(v2: dict[str, float]) -> None:
    print(
        "V2 (same server, interleaved): "
        f"JSON 1000x4 {v2['v2_json_1000']:,.0f} rows/s, "
        f"binary 1000x4 {v2['v2_binary_1000']:,.0f} rows/s, "
        f"/predict/batch 1000 {v2['predict_batch_1000']:,.0f} rows/s; "
        f"single row V2 {v2['v2_single']:,.0f} req/s vs /predict {v2['predict_single']:,.0f} req/s"
    )


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * UNITS[match.group(2)]


def connection_split(server: Server) -> dict[int, int]:
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{server.port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    split: dict[int, int] = dict.fromkeys(server.workers(), 0)
    for pid in re.findall(r"pid=(\d+)", out):
        split[int(pid)] = split.get(int(pid), 0) + 1
    return split


def wrk_command(
    wrk: str, server: Server, script: Path, path: str, seconds: int, connections: int
) -> list[str]:
    return [
        wrk,
        "-t2",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(script),
        server.url + path,
    ]


def run_wrk(
    wrk: str, server: Server, script: Path, path: str, seconds: int, connections: int
) -> dict[str, Any]:
    command = wrk_command(wrk, server, script, path, seconds, connections)
    workers = server.workers()
    cpu_before = cpu_seconds(workers)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    time.sleep(seconds / 2)
    split = connection_split(server)
    out, _ = process.communicate(timeout=seconds + 30)
    cpu_used = cpu_seconds(workers) - cpu_before
    # A worker recycled (MAX_REQUESTS) in the round: while its replacement
    # boots, its sibling necessarily holds every connection.
    replaced = server.workers() != workers
    served = re.search(r"(\d+) requests in", out)
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk against {server.name} printed no rate:\n{out}")
    rps = float(found.group(1))
    latency = dict(re.findall(r"^\s*(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    if set(latency) != {"50", "99"}:
        raise RuntimeError(f"wrk against {server.name} printed no latency percentiles:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)$", out, re.MULTILINE)
    return {
        "rps": rps,
        "p50_ms": _ms(latency["50"]),
        "p99_ms": _ms(latency["99"]),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else None,
        "split": sorted(split.values(), reverse=True),
        "worker_replaced": replaced,
        # Worker CPU per request: less sensitive than req/s to other load on
        # a shared machine, so it shows what a feature costs when req/s is noisy.
        "cpu_us_per_request": cpu_used / int(served.group(1)) * 1e6 if served else None,
    }


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def maps_sklearn(pid: int) -> bool:
    return "/sklearn/" in Path(f"/proc/{pid}/maps").read_text()


def scrape_seconds(work: Path, bundle: Path, workers: int) -> dict[str, float]:
    """Median /metrics time with many workers, each having served traffic."""
    server = start(ML_API, SERVERS[ML_API], work, bundle, workers)
    try:
        first_answer_seconds(server, time.monotonic())
        wait_all_workers(server, workers)
        with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            for _ in range(50 * workers):
                c.post(f"{server.url}/predict", json=SETOSA)
            times = []
            for _ in range(40):
                began = time.perf_counter()
                c.get(f"{server.url}/metrics").raise_for_status()
                times.append(time.perf_counter() - began)
        files = len(list(metrics_dir(work, ML_API).glob("*.db")))
        return {
            "workers": workers,
            "median_ms": statistics.median(times) * 1000,
            "max_ms": max(times) * 1000,
            "metric_files": files,
        }
    finally:
        server.stop()


def summarize(server: Server) -> dict[str, Any]:
    rps = [r["rps"] for r in server.rounds]
    median = statistics.median(rps)
    return {
        "rps": median,
        "p50_ms": statistics.median(r["p50_ms"] for r in server.rounds),
        "p99_ms": statistics.median(r["p99_ms"] for r in server.rounds),
        "lowest_round_vs_median": min(rps) / median,
        "non_2xx": sum(r["non_2xx"] for r in server.rounds),
        "cpu_us_per_request": statistics.median(
            r["cpu_us_per_request"] or 0.0 for r in server.rounds
        ),
        "splits": [r["split"] for r in server.rounds],
        "worker_replaced": [r["worker_replaced"] for r in server.rounds],
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    base = {name: results[name]["rps"] for name in (ARTICLE, NOOP, BARE, BARE_STOCK)}
    width = max(map(len, results)) + 2
    lines = [
        f"{'server':<{width}}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x article':>10}{'x noop':>8}"
        f"{'x bare':>8}{'x stock':>8}{'low/med':>9}  connections per worker, by round",
    ]
    replaced_any = False
    for name, r in results.items():
        marks = ["*" if replaced else "" for replaced in r["worker_replaced"]]
        replaced_any = replaced_any or any(marks)
        splits = " ".join(
            "/".join(map(str, s)) + mark for s, mark in zip(r["splits"], marks, strict=True)
        )
        lines.append(
            f"{name:<{width}}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['rps'] / base[ARTICLE]:>10.1f}{r['rps'] / base[NOOP]:>8.2f}"
            f"{r['rps'] / base[BARE]:>8.2f}{r['rps'] / base[BARE_STOCK]:>8.2f}"
            f"{r['lowest_round_vs_median']:>9.2f}  {splits}"
        )
    if replaced_any:
        lines.append(
            "* a worker reached MAX_REQUESTS in this round and was replaced; the split"
            " was sampled while the replacement was starting or had just started"
        )
    return "\n".join(lines)


def stage_budget(wrk: str, server: Server, script: Path, seconds: int) -> dict[str, float]:
    """Per-stage CPU per single-row request, py-spy on every worker under wrk load."""
    recorded: list[stages.Profile] = []

    def sample() -> None:
        time.sleep(1)  # let wrk connect first
        recorded.append(stages.record(server.workers(), seconds))

    sampler = threading.Thread(target=sample)
    sampler.start()
    load = run_wrk(wrk, server, script, "/predict", seconds + 2, 32)
    sampler.join()
    return recorded[0].budget(load["rps"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO / ".bench" / "results.json")
    parser.add_argument(
        "--profile-seconds", type=int, default=6, help="py-spy window for the per-stage budget"
    )
    parser.add_argument(
        "--servers",
        type=lambda text: text.split(","),
        default=list(SERVERS),
        help="comma-separated subset for a focused A/B: single-row rounds only, ratios to the"
        f" first named (default: all of {', '.join(SERVERS)})",
    )
    parser.add_argument("--overload-seconds", type=int, default=20)
    parser.add_argument("--overload-connections", type=int, default=1000)
    parser.add_argument(
        "--only-overload",
        action="store_true",
        help="only the overload scenario (ml-api's worker and the stock worker)",
    )
    parser.add_argument(
        "--only-v2",
        action="store_true",
        help="only the Open Inference Protocol measurements (one ml-api server)",
    )
    parser.add_argument(
        "--baseline-commit",
        metavar="REV",
        help=f"also serve REV's code (any git revision) as {PRODUCTION}@REV, with the settings"
        f" of {PRODUCTION}, in the same interleaved rounds",
    )
    args = parser.parse_args(argv)
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {list(SERVERS)}")
    if (args.only_v2 or args.only_overload) and args.baseline_commit:
        parser.error(
            "--baseline-commit measures single-row rounds; --only-v2 and --only-overload have none"
        )
    return args


def main() -> int:
    args = parse_args()
    if set(args.servers) != set(SERVERS):
        return focused(args)
    return full(args)


def start_all(
    specs: dict[str, ServerSpec], work: Path, bundle: Path, workers: int
) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    try:
        for name, spec in specs.items():
            servers[name] = start(name, spec, work, bundle, workers)
        for server in servers.values():
            first_answer_seconds(server, time.monotonic())
            wait_all_workers(server, workers)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def single_row_rounds(
    wrk: str, work: Path, servers: dict[str, Server], rounds: int, seconds: int, connections: int
) -> dict[str, dict[str, Any]]:
    body = json.dumps(SETOSA).encode()
    scripts = {name: wrk_script(work, "/predict", body, s.headers) for name, s in servers.items()}
    for round_number in range(rounds):
        for name, server in servers.items():
            server.rounds.append(
                run_wrk(wrk, server, scripts[name], "/predict", seconds, connections)
            )
        print(f"round {round_number + 1}/{rounds} done", file=sys.stderr)
    return {name: summarize(server) for name, server in servers.items()}


def focused(args: argparse.Namespace) -> int:
    """A short A/B of a few servers (say, --servers ml-api-auth-metrics-off,ml-api-production)."""
    wrk = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="ml-api-bench-"))
    servers: dict[str, Server] = {}
    try:
        specs = with_baseline(args.servers, args.baseline_commit, work)
        servers = start_all(specs, work, train(work), args.workers)
        results = single_row_rounds(wrk, work, servers, args.rounds, args.seconds, args.connections)
    finally:
        for server in servers.values():
            server.stop()
        remove_work(work)
    first = results[args.servers[0]]
    width = max(map(len, results)) + 2
    print(
        f"{'server':<{width}}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x first':>9}{'non-2xx':>9}"
        f"{'cpu us/req':>12}{'x first by cpu':>16}"
    )
    for name, r in results.items():
        print(
            f"{name:<{width}}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['rps'] / first['rps']:>9.3f}{r['non_2xx']:>9}{r['cpu_us_per_request']:>12.1f}"
            f"{first['cpu_us_per_request'] / r['cpu_us_per_request']:>16.3f}"
        )
    print(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "servers": results}))
    return 0


def full(args: argparse.Namespace) -> int:
    wrk = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="ml-api-bench-"))
    bundle = train(work)
    if args.only_v2:
        return only_v2(wrk, work, bundle, args)
    if args.only_overload:
        return only_overload(wrk, work, bundle, args)
    servers: dict[str, Server] = {}
    report: dict[str, Any] = {"settings": vars(args) | {"output": str(args.output)}}
    try:
        startup: dict[str, float] = {}
        for name, spec in with_baseline(list(SERVERS), args.baseline_commit, work).items():
            began = time.monotonic()
            servers[name] = start(name, spec, work, bundle, args.workers)
            startup[name] = first_answer_seconds(servers[name], began)
        for server in servers.values():
            wait_all_workers(server, args.workers)
        report["start_to_first_answer_seconds"] = startup

        results = single_row_rounds(wrk, work, servers, args.rounds, args.seconds, args.connections)
        production = servers[PRODUCTION]
        report["stage_budget_us"] = stage_budget(
            wrk,
            production,
            wrk_script(work, "/predict", json.dumps(SETOSA).encode(), production.headers),
            args.profile_seconds,
        )

        batch: dict[str, float] = {}
        for rows in (100, 1000):
            body = json.dumps({"instances": [SETOSA] * rows}).encode()
            script = wrk_script(work, "/predict/batch", body)
            runs = [
                run_wrk(wrk, servers[ML_API], script, "/predict/batch", args.seconds, 8)
                for _ in range(3)
            ]
            batch[f"{rows}_rows_per_request"] = statistics.median(r["rps"] for r in runs) * rows
        v2 = measure_v2(wrk, servers[ML_API], work, args.seconds, args.connections)
        ml_workers = servers[ML_API].workers()
        rss = {name: [round(rss_mib(p), 1) for p in s.workers()] for name, s in servers.items()}
        maps_sklearn_now = any(maps_sklearn(pid) for pid in ml_workers)
        for server in servers.values():
            server.stop()
        report["scrape_8_workers"] = scrape_seconds(work, bundle, 8)
        report["overload"] = overload.compare(
            wrk, work, bundle, args.workers, args.overload_seconds, args.overload_connections
        )
        report.update(
            servers=results,
            batch_rows_per_second=batch,
            open_inference_protocol=v2,
            worker_rss_mib=rss,
            onnx_worker_maps_sklearn=maps_sklearn_now,
        )
    finally:
        for server in servers.values():
            server.stop()
        remove_work(work)

    ml, article, noop = (results[n]["rps"] for n in (ML_API, ARTICLE, NOOP))
    report["targets"] = {
        "ml-api >= 25x article": [round(ml / article, 1), ml / article >= 25],
        "ml-api >= 1.0x fastapi-noop": [round(ml / noop, 2), ml / noop >= 1.0],
        "ml-api p99 <= 15 ms": [results[ML_API]["p99_ms"], results[ML_API]["p99_ms"] <= 15],
        "ml-api lowest round >= 0.8x median": [
            round(results[ML_API]["lowest_round_vs_median"], 2),
            results[ML_API]["lowest_round_vs_median"] >= 0.8,
        ],
        "batch 1000 rows >= 300k rows/s": [
            round(batch["1000_rows_per_request"]),
            batch["1000_rows_per_request"] >= 300_000,
        ],
        "metrics cost <= 10% of req/s": [
            round(1 - ml / results[METRICS_OFF]["rps"], 3),
            ml >= 0.9 * results[METRICS_OFF]["rps"],
        ],
        "production with an ONNX shadow >= 0.85x production": [
            round(results[SHADOW]["rps"] / results[PRODUCTION]["rps"], 3),
            results[SHADOW]["rps"] >= 0.85 * results[PRODUCTION]["rps"],
        ],
        "production with an ONNX shadow p99 <= 10 ms": [
            results[SHADOW]["p99_ms"],
            results[SHADOW]["p99_ms"] <= 10,
        ],
        "production (metrics + API keys) >= 0.6x bare ASGI on the stock worker": [
            round(results[PRODUCTION]["rps"] / results[BARE_STOCK]["rps"], 3),
            results[PRODUCTION]["rps"] >= 0.6 * results[BARE_STOCK]["rps"],
        ],
        "production p99 <= 10 ms": [
            results[PRODUCTION]["p99_ms"],
            results[PRODUCTION]["p99_ms"] <= 10,
        ],
        "production (metrics + API keys) >= 0.9x both off": [
            round(results[PRODUCTION]["rps"] / results[BOTH_OFF]["rps"], 3),
            results[PRODUCTION]["rps"] >= 0.9 * results[BOTH_OFF]["rps"],
        ],
        "payload capture at 1% costs <= 5% of req/s": [
            round(1 - results[CAPTURE_1PCT]["rps"] / results[PRODUCTION]["rps"], 3),
            results[CAPTURE_1PCT]["rps"] >= 0.95 * results[PRODUCTION]["rps"],
        ],
        "sklearn (micro-batched) >= 10x article": [
            round(results[SKLEARN]["rps"] / article, 1),
            results[SKLEARN]["rps"] >= 10 * article,
        ],
        "onnx worker does not import sklearn": [None, not report["onnx_worker_maps_sklearn"]],
        **v2_targets(v2),
        **baseline_target(results, args.baseline_commit),
        **overload.targets(report["overload"]),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(
        "\n/predict/batch rows/s: "
        + ", ".join(f"{k.split('_')[0]} rows: {v:,.0f}" for k, v in batch.items())
    )
    print_v2(v2)
    print("worker RSS MiB: " + ", ".join(f"{k} {v}" for k, v in report["worker_rss_mib"].items()))
    print(
        "start to first answer s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["start_to_first_answer_seconds"].items())
    )
    scrape = report["scrape_8_workers"]
    print(
        f"/metrics with 8 workers: median {scrape['median_ms']:.1f} ms, "
        f"max {scrape['max_ms']:.1f} ms, {scrape['metric_files']} metric files"
    )
    print("\n" + overload.table(report["overload"], args.overload_connections))
    print(f"\nper-stage CPU of one single-row /predict on {PRODUCTION} (py-spy + /proc):")
    print(stages.budget_table(report["stage_budget_us"]))
    print("\ntargets:")
    for target, (value, met) in report["targets"].items():
        print(f"  {'MET ' if met else 'MISS'} {target}: {value}")
    print(f"\nJSON: {args.output}")
    print(json.dumps(report))
    return 0


def baseline_target(results: dict[str, dict[str, Any]], rev: str | None) -> dict[str, list[Any]]:
    """No regression against the code before the change (--baseline-commit)."""
    if rev is None:
        return {}
    ratio = results[PRODUCTION]["rps"] / results[f"{PRODUCTION}@{rev}"]["rps"]
    return {f"{PRODUCTION} >= 0.95x {PRODUCTION}@{rev}": [round(ratio, 3), ratio >= 0.95]}


def only_overload(wrk: str, work: Path, bundle: Path, args: argparse.Namespace) -> int:
    try:
        results = overload.compare(
            wrk, work, bundle, args.workers, args.overload_seconds, args.overload_connections
        )
    finally:
        remove_work(work)
    print(overload.table(results, args.overload_connections))
    print("\ntargets:")
    for target, (value, met) in overload.targets(results).items():
        print(f"  {'MET ' if met else 'MISS'} {target}: {value}")
    print(json.dumps({"overload": results}))
    return 0


def only_v2(wrk: str, work: Path, bundle: Path, args: argparse.Namespace) -> int:
    server = start(ML_API, SERVERS[ML_API], work, bundle, args.workers)
    try:
        first_answer_seconds(server, time.monotonic())
        wait_all_workers(server, args.workers)
        v2 = measure_v2(wrk, server, work, args.seconds, args.connections, repeats=args.rounds)
    finally:
        server.stop()
        remove_work(work)
    print_v2(v2)
    print("\ntargets:")
    for target, (value, met) in v2_targets(v2).items():
        print(f"  {'MET ' if met else 'MISS'} {target}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
