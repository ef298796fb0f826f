"""Every environment variable ml-api reads, in one place.

`ServiceSettings` configures the application inside each worker;
`ServerSettings` configures Gunicorn (read by gunicorn.conf.py in the master).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.auth import follower_heartbeat
from service.auth.keyfile import DEFAULT_KEYS_FILE
from service.manifest import SEMVER_PATTERN, SEMVER_RE, SHA256_PATTERN

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
MIB = 1024 * 1024
# Internal: set by the Gunicorn master for the workers it forks, never by operators.
PINNED_BUNDLE_VARIABLE = "ML_API_PINNED_BUNDLE"
SHADOW_BUNDLE_VARIABLE = "ML_API_SHADOW_BUNDLE"
_SHA256 = re.compile(SHA256_PATTERN)


class PinnedBundle(BaseModel):
    """The exact bundle the master proved servable: every worker loads this one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    version: str = Field(pattern=SEMVER_PATTERN)
    manifest_sha256: str = Field(pattern=SHA256_PATTERN)


def _digest_lines(text: str) -> list[str]:
    """Digests from `sha256sum` output or bare lines; `#` starts a comment."""
    digests = []
    for line in text.splitlines():
        token = line.split("#", 1)[0].strip().split(" ", 1)[0].lower()
        if token:
            digests.append(token)
    return digests


class _EnvSettings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="ignore",
        frozen=True,
        case_sensitive=False,
        protected_namespaces=(),
        validate_by_name=True,
        validate_by_alias=True,
    )

    @field_validator("log_level", mode="before", check_fields=False)
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


AuthMode = Literal["keys", "off"]


class _AuthSettings(_EnvSettings):
    """Whether the API needs keys: decided once, at start, from configuration,
    never from what the keys file holds later (an emptied or cut file must not
    turn authentication off). Read by the master too, which pins the answer
    for every worker it starts. And where the keys come from: the file, or a
    copy of API_KEYS_URL's that the master keeps current and the workers
    check is still kept current."""

    auth: AuthMode | None = Field(
        default=None,
        description="`keys`: every route but health (and public docs) needs a key from "
        "`API_KEYS_FILE`, and a file with no key refuses everyone. `off`: open to all. "
        "Unset: `keys` when `API_KEYS_FILE` is set or the file exists, else `off`. Decided "
        "once, at start: a keys file that breaks or empties later never opens the service.",
    )
    api_keys_file: Path = Field(
        default=DEFAULT_KEYS_FILE,
        description="Key ids and SHA-256 digests (`make api-key`), re-read while running; "
        "a missing, empty or broken file keeps the keys last loaded. In compose, the host "
        "file mounted as a secret.",
    )
    api_keys_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Where the master copies the keys file from, every "
        "`API_KEYS_POLL_INTERVAL` seconds, into `API_KEYS_FILE` (the Swarm stack's `keys` "
        "service: a secret there cannot change in place). Only a complete file replaces "
        "the copy. Unset: `API_KEYS_FILE` is read as it is. A worker whose copy nobody "
        "keeps current (the follower gone) is not ready.",
    )
    api_keys_poll_interval: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds between copies from `API_KEYS_URL`. A copy not stamped by its "
        f"follower for `{follower_heartbeat.MISSED_BEATS} * API_KEYS_POLL_INTERVAL + "
        f"{follower_heartbeat.MARGIN_SECONDS:g}` seconds makes the workers not ready.",
    )

    @field_validator("auth", mode="before")
    @classmethod
    def _blank_auth_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def auth_mode(self) -> AuthMode:
        if self.auth is not None:
            return self.auth
        configured = "api_keys_file" in self.model_fields_set or self.api_keys_file.exists()
        return "keys" if configured else "off"


class ServiceSettings(_AuthSettings):
    """The application inside each worker: which model, how requests are bounded,
    batched and authenticated."""

    model_dir: Path = Field(
        default=Path("artifacts"),
        description="Where bundles live: `MODEL_DIR/<name>/<version>/`.",
    )
    model_name: str = Field(default="iris", description="Which model to serve.")
    # None: serve the highest semantic version present, so a SIGHUP after
    # copying a new bundle in rolls it out.
    model_version: str | None = Field(
        default=None,
        description="Pin a semantic version. Unset: the master picks the highest version "
        "present at start and on SIGHUP (workers never choose).",
    )
    shadow_model_version: str | None = Field(
        default=None,
        description="A candidate version of the same model to score in every worker on the "
        "rows the served version answers, after each answer is sent (never on the client's "
        "time): the master proves and pins it as it does a rollout. Unset: no shadow. "
        "`make shadow`, `make shadow-off` and `make promote` change it on a running server.",
    )
    shadow_queue_rows: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Rows a worker holds for the shadow to score; beyond them rows are "
        "dropped (counted in `model_shadow_dropped_rows_total`), never waited for.",
    )
    shadow_timeout: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Seconds one shadow call may take; a shadow that takes longer (or "
        "raises) is switched off in that worker, with a log line and a count.",
    )
    shadow_min_agreement: float = Field(
        default=0.95,
        ge=0,
        le=1,
        description="The agreement rate below which `MlApiShadowDisagreement` fires: workers "
        "export it as `model_shadow_agreement_min`, which the alert compares with.",
    )
    rollout_request_file: Path | None = Field(
        default=None,
        description="Where `make shadow`, `make shadow-off` and `make promote` leave their "
        "request for the master's next SIGHUP (`make serve` sets it). Unset: a SIGHUP only "
        "rolls out `MODEL_VERSION` (or the newest version) as before.",
    )
    backend: Literal["onnx", "sklearn"] | None = Field(
        default=None,
        description="Unset: `onnx` if the bundle has one. `sklearn` serves the native model, "
        "whose digest must be pinned (see `TRUSTED_MODEL_SHA256`).",
    )
    max_batch_size: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Rows per `/predict/batch` and per V2 inference request.",
    )
    max_request_bytes: int = Field(
        default=MIB,
        ge=1024,
        le=1024 * MIB,
        description="Larger bodies get 413, refused before they are read whole.",
    )
    # A worker answers ~2,000-10,000 single rows/s on this project's 2-core
    # bench machine, so 512 ahead is 0.05-0.25 s of queue. Under wrk -c1000
    # against two workers (500 connections each) it sheds almost nothing and
    # p99 stays ~0.1 s; at 256 it refused ~half of what the workers could
    # answer within 0.15 s.
    max_concurrency: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Requests in progress per worker; a request arriving behind this many "
        "gets 503 with `Retry-After: 1` at once (health routes and `/metrics` are always "
        "answered).",
    )
    log_level: LogLevel = Field(default="INFO", description="Above `INFO`, no access log.")
    # Off only to measure what metrics cost (make bench); /metrics then 404s.
    metrics_enabled: bool = Field(
        default=True,
        description="`false` removes `/metrics` and all instrumentation (for measuring its cost).",
    )
    # Micro-batching of concurrent single-row requests. Unset: on for the
    # sklearn backend (milliseconds per call), off for ONNX (microseconds).
    micro_batching: bool | None = Field(
        default=None,
        description="Gather concurrent single-row requests into one backend call. "
        "Unset: on for `sklearn`, off for `onnx`.",
    )
    batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        description="How long a micro-batch waits to fill "
        "(it never exceeds `MAX_BATCH_SIZE` rows).",
    )
    batch_queue_size: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Requests waiting for a micro-batch; beyond it, 503 with `Retry-After`.",
    )
    # A native (pickled) model is loaded only when its SHA-256 is pinned here
    # or in TRUSTED_DIGESTS_FILE: both live outside MODEL_DIR, so whoever can
    # write bundles cannot also vouch for them.
    trusted_model_sha256: str = Field(
        default="",
        description="Comma-separated SHA-256 digests of `model.joblib` files that may be "
        "unpickled (see [the threat model](security.md#threat-model)).",
    )
    trusted_digests_file: Path | None = Field(
        default=None,
        description="A `sha256sum`-style file of such digests "
        "(`/etc/ml-api/trusted-model-sha256` in the image); refused if it lies "
        "inside `MODEL_DIR`.",
    )
    rollout_trial_timeout: float = Field(
        default=120,
        gt=0,
        le=3600,
        description="Seconds the master gives a candidate bundle's trial (load, warm up, predict).",
    )
    pinned_bundle: PinnedBundle | None = Field(
        default=None,
        alias=PINNED_BUNDLE_VARIABLE,
        description="Internal: the bundle the master proved (path, version, manifest "
        "SHA-256), inherited by the workers it forks. Never set it yourself.",
    )
    shadow_bundle: PinnedBundle | None = Field(
        default=None,
        alias=SHADOW_BUNDLE_VARIABLE,
        description="Internal: the shadow candidate the master proved, inherited by the "
        "workers it forks. Never set it yourself.",
    )
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        description="The server's setting of the same name (gunicorn.conf.py exports it "
        "to the workers): where they read the master's rollout record.",
    )
    # The API description (/docs, /redoc, /openapi.json): open to all, behind
    # the API keys like the rest, or not served.
    docs: Literal["public", "protected", "off"] = Field(
        default="public",
        description="`/docs`, `/redoc`, `/openapi.json`: open to all, behind the API keys "
        "(`protected`), or not served (`off`).",
    )

    # Payload capture (service.capture): off unless both are set.
    payload_log_dir: Path | None = Field(
        default=None,
        description="Where sampled requests and their answers are written, as CloudEvents "
        "JSON lines (`payloads-<host>-<pid>-<n>.jsonl`, one file open per worker). "
        "Needed when `PAYLOAD_SAMPLE` is above 0.",
    )
    payload_sample: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of prediction requests captured (`/predict`, each row of "
        "`/predict/batch` and of V2 inference); `0`: capture off.",
    )
    payload_log_max_mb: float = Field(
        default=100,
        gt=0,
        le=1024 * 1024,
        description="A worker starts its next payload file once the current one would "
        "pass this size.",
    )
    payload_log_files: int = Field(
        default=10,
        ge=0,
        le=100_000,
        description="Finished payload files kept per host (besides each live worker's "
        "open one); the oldest are deleted at each rotation.",
    )

    @field_validator(
        "model_version",
        "shadow_model_version",
        "backend",
        "micro_batching",
        "payload_log_dir",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose files pass `MODEL_VERSION=` for "unset".
        return None if value == "" else value

    @field_validator("model_version", "shadow_model_version")
    @classmethod
    def _semver(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not SEMVER_RE.match(value):
            name = (info.field_name or "").upper()
            raise ValueError(f"{name} {value!r} is not a semantic version")
        return value

    @field_validator("trusted_model_sha256")
    @classmethod
    def _digests(cls, value: str) -> str:
        for digest in value.replace(",", " ").split():
            if not _SHA256.fullmatch(digest.lower()):
                raise ValueError(f"TRUSTED_MODEL_SHA256: {digest!r} is not a SHA-256 hex digest")
        return value

    @field_validator("trusted_digests_file", "rollout_request_file", mode="before")
    @classmethod
    def _blank_file_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _digests_outside_model_dir(self) -> Self:
        if self.trusted_digests_file is not None:
            digests = self.trusted_digests_file.resolve()
            if digests.is_relative_to(self.model_dir.resolve()):
                raise ValueError(
                    f"TRUSTED_DIGESTS_FILE {self.trusted_digests_file} is inside MODEL_DIR: "
                    "whoever writes bundles could vouch for them"
                )
        return self

    @model_validator(mode="after")
    def _payload_log_needs_a_directory(self) -> Self:
        if self.payload_sample > 0 and self.payload_log_dir is None:
            raise ValueError("PAYLOAD_SAMPLE is above 0 but PAYLOAD_LOG_DIR is not set")
        return self

    def trusted_model_digests(self) -> frozenset[str]:
        """Read on every model load, so an operator can add a digest before a SIGHUP."""
        digests = {d.lower() for d in self.trusted_model_sha256.replace(",", " ").split()}
        if self.trusted_digests_file is not None:
            try:
                text = self.trusted_digests_file.read_text()
            except OSError:
                text = ""  # the loader's refusal names the file
            digests.update(d for d in _digest_lines(text) if _SHA256.fullmatch(d))
        return frozenset(digests)


class ServerSettings(_AuthSettings):
    """Gunicorn, read by gunicorn.conf.py in the master: workers, binding, timeouts,
    recycling."""

    web_concurrency: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        le=256,
        description="Gunicorn workers.",
        json_schema_extra={"documented_default": "the CPU count"},
    )
    bind: str | None = Field(
        default=None,
        description="`host:port` to listen on; wins over `PORT`. Unset: `0.0.0.0:$PORT` "
        "(`make serve`: `127.0.0.1:8000`).",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="The port when `BIND` is unset.")
    timeout: int = Field(
        default=30, ge=1, description="Seconds of silence before Gunicorn kills a worker."
    )
    graceful_timeout: int = Field(
        default=30,
        ge=1,
        description="Seconds a stopping worker gets to finish its requests.",
    )
    keepalive: int = Field(
        default=5,
        ge=0,
        description="Seconds an idle keep-alive connection stays open; a stopping worker "
        "waits up to this long (at most half of `GRACEFUL_TIMEOUT`) for its connections "
        "to end.",
    )
    # Recycling bounds slow leaks; the jitter keeps workers from restarting
    # together. A million: a worker at full speed (~4,000 req/s on 2 cores)
    # restarts every few minutes, not every ~25 s (each restart is a boot and
    # a reshuffle of its keep-alive connections); at ordinary load, hours.
    max_requests: int = Field(
        default=1_000_000,
        ge=0,
        description="Recycle a worker after this many requests "
        "(a guard against slow leaks; `0`: never).",
    )
    max_requests_jitter: int = Field(
        default=100_000,
        ge=0,
        description="Up to this many more, at random, so workers do not restart together.",
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        description="Proxies whose `X-Forwarded-*` headers are trusted.",
    )
    prometheus_multiproc_dir: Path = Field(
        default=Path("/tmp/ml-api-metrics"),
        description="Per-worker metric files; emptied when Gunicorn starts, "
        "so give each server its own.",
    )
    log_level: LogLevel = Field(
        default="INFO", description="Gunicorn's log level (the service's setting of the same name)."
    )
    # Bounds on what a client connected straight to a worker can hold (nginx
    # bounds the proxied path; probes, Prometheus and BIND=0.0.0.0 do not go
    # through it).
    max_request_head_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        le=MIB,
        description="A larger request head (request line and headers) is answered 431 and "
        "the connection closed.",
    )
    request_head_timeout: float = Field(
        default=10,
        gt=0,
        le=3600,
        description="Seconds for a request head to arrive, from the connection or from the "
        "previous answer; past it, 408 and close (a connection that sent nothing is closed "
        "silently). A trickled head gains nothing.",
    )
    request_body_timeout: float = Field(
        default=30,
        gt=0,
        le=3600,
        description="Seconds for a request body to arrive in full once its head has; past "
        "it, 408 and close.",
    )
    max_connections_per_worker: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Open client connections per worker (always kept below its file "
        "descriptor limit); at the cap a new connection closes the longest-idle one, or is "
        "closed at once when none is idle. Counted in "
        "`ml_api_connections_closed_total{reason}`.",
    )

    @property
    def bind_address(self) -> str:
        return self.bind or f"0.0.0.0:{self.port}"
