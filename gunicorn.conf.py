"""Gunicorn settings for ml-api: the master chooses the bundle, Uvicorn workers load it.

Every value comes from environment variables through service.settings; this
file only maps them onto Gunicorn's names and adds the lifecycle hooks.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

from service.settings import ServerSettings

_server = ServerSettings()
METRICS_DIR = _server.prometheus_multiproc_dir
# Set in the master, before any worker exists: workers inherit it, and
# prometheus_client chooses its multiprocess storage when first imported.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(METRICS_DIR)
# Whether the API needs keys is decided here, once: a worker started later
# (a recycle, a crash) must not decide again from a keys file that changed.
os.environ["AUTH"] = _server.auth_mode

# Pure-Python framework libraries (not the app, not the bundle) are imported
# once in the master and inherited by every forked worker, which halves a
# worker's boot: what a SIGHUP rollout or a max_requests recycle waits for.
# numpy (OpenBLAS) and onnxruntime start threads when imported, and a fork
# after that can deadlock the child, so each worker imports those itself.
for _library in ("fastapi", "pydantic", "pydantic_settings", "orjson", "uvloop", "httptools"):
    importlib.import_module(_library)

# A factory: importing service.app configures nothing and reads no file.
wsgi_app = "service.app:create_app()"
worker_class = "service.server.worker.DrainingUvicornWorker"
workers = _server.web_concurrency
bind = [_server.bind_address]
# Heartbeat files on tmpfs: a worker blocked on a slow disk must not look dead.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
timeout = _server.timeout
graceful_timeout = _server.graceful_timeout
keepalive = _server.keepalive
max_requests = _server.max_requests
max_requests_jitter = _server.max_requests_jitter
forwarded_allow_ips = _server.forwarded_allow_ips
# No preload: the master never loads a model (it would unpickle in the
# process that must never die); it proves a candidate in a throwaway
# subprocess and pins it, and each worker loads and verifies that pin itself.
preload_app = False
# The application writes its own JSON access line per request (service.logs).
accesslog = None
errorlog = "-"
loglevel = _server.log_level.lower()
proc_name = "ml-api"
# Gunicorn 25+ opens an unauthenticated control socket under $HOME by default:
# a surprise on a read-only root and a clash between servers on one machine.
control_socket_disable = True


# The workers' shared connection counts (service.server.acceptor), on tmpfs
# when there is one, in a private directory the master creates at start.
LEDGER_PARENT = Path(worker_tmp_dir or tempfile.gettempdir())
CONNECTION_LEDGER: list[Path] = []


def on_starting(server: Any) -> None:
    from service.metrics.store import prepare_directory
    from service.server.acceptor import LEDGER_ENV, create_ledger
    from service.server.key_follower import KEY_FOLLOWER
    from service.server.rollout import ROLLOUTS

    prepare_directory(METRICS_DIR)
    # Before any worker: they start with the keys of API_KEYS_URL, if set.
    KEY_FOLLOWER.start(_server, server.log)
    # Exits non-zero with one line when nothing at all can be served.
    ROLLOUTS.start(METRICS_DIR, server.log)
    ledger = create_ledger(LEDGER_PARENT)
    CONNECTION_LEDGER.append(ledger)
    os.environ[LEDGER_ENV] = str(ledger)
    server.log.info("connection ledger %s", ledger)


def on_exit(server: Any) -> None:
    from service.server.acceptor import remove_ledger
    from service.server.key_follower import KEY_FOLLOWER

    KEY_FOLLOWER.stop()
    for ledger in CONNECTION_LEDGER:
        remove_ledger(ledger)


def on_reload(server: Any) -> None:
    # Runs in the master after SIGHUP, before the new workers are spawned:
    # they inherit the pin, the new version's or, if refused, the old one.
    from service.server.rollout import ROLLOUTS

    ROLLOUTS.reload(METRICS_DIR, server.log)


def child_exit(server: Any, worker: Any) -> None:
    # Runs in the master for every exit: graceful, crashed, SIGKILLed or recycled.
    from service.metrics.store import fold_dead_worker
    from service.server.acceptor import clear_slot

    fold_dead_worker(METRICS_DIR, worker.pid)
    for ledger in CONNECTION_LEDGER:
        clear_slot(ledger, worker.pid)
