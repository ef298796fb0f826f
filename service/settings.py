"""Every environment variable ml-api reads, in one place.

`ServiceSettings` configures the application inside each worker;
`ServerSettings` configures Gunicorn (read by gunicorn.conf.py in the master).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.auth.keyfile import DEFAULT_KEYS_FILE
from service.manifest import SEMVER_PATTERN, SEMVER_RE, SHA256_PATTERN

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
MIB = 1024 * 1024
# Internal: set by the Gunicorn master for the workers it forks, never by operators.
PINNED_BUNDLE_VARIABLE = "ML_API_PINNED_BUNDLE"
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
    for every worker it starts."""

    # keys: every route but health (and public docs) needs a key in
    # API_KEYS_FILE; a file with no key refuses everyone. off: open to all.
    # Unset: keys when API_KEYS_FILE is set or the file exists, else off.
    auth: AuthMode | None = None
    # API keys (service.auth.keyfile format).
    api_keys_file: Path = DEFAULT_KEYS_FILE

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
    model_dir: Path = Path("artifacts")
    model_name: str = "iris"
    # None: serve the highest semantic version present, so a SIGHUP after
    # copying a new bundle in rolls it out.
    model_version: str | None = None
    backend: Literal["onnx", "sklearn"] | None = None
    max_batch_size: int = Field(default=1000, ge=1, le=100_000)
    max_request_bytes: int = Field(default=MIB, ge=1024, le=1024 * MIB)
    log_level: LogLevel = "INFO"
    # Off only to measure what metrics cost (make bench); /metrics then 404s.
    metrics_enabled: bool = True
    # Micro-batching of concurrent single-row requests. Unset: on for the
    # sklearn backend (milliseconds per call), off for ONNX (microseconds).
    micro_batching: bool | None = None
    batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    batch_queue_size: int = Field(default=1024, ge=1, le=1_000_000)
    # A native (pickled) model is loaded only when its SHA-256 is pinned here
    # or in TRUSTED_DIGESTS_FILE: both live outside MODEL_DIR, so whoever can
    # write bundles cannot also vouch for them.
    trusted_model_sha256: str = ""
    trusted_digests_file: Path | None = None
    # Seconds the master gives a candidate bundle's trial (load, warm up, predict).
    rollout_trial_timeout: float = Field(default=120, gt=0, le=3600)
    pinned_bundle: PinnedBundle | None = Field(default=None, alias=PINNED_BUNDLE_VARIABLE)
    # Where the master records rollout attempts (the multiprocess metrics directory).
    prometheus_multiproc_dir: Path | None = None
    # The API description (/docs, /redoc, /openapi.json): open to all, behind
    # the API keys like the rest, or not served.
    docs: Literal["public", "protected", "off"] = "public"

    @field_validator("model_version", "backend", "micro_batching", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose files pass `MODEL_VERSION=` for "unset".
        return None if value == "" else value

    @field_validator("model_version")
    @classmethod
    def _semver(cls, value: str | None) -> str | None:
        if value is not None and not SEMVER_RE.match(value):
            raise ValueError(f"MODEL_VERSION {value!r} is not a semantic version")
        return value

    @field_validator("trusted_model_sha256")
    @classmethod
    def _digests(cls, value: str) -> str:
        for digest in value.replace(",", " ").split():
            if not _SHA256.fullmatch(digest.lower()):
                raise ValueError(f"TRUSTED_MODEL_SHA256: {digest!r} is not a SHA-256 hex digest")
        return value

    @field_validator("trusted_digests_file", mode="before")
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
    web_concurrency: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    bind: str | None = None
    port: int = Field(default=8000, ge=0, le=65535)
    timeout: int = Field(default=30, ge=1)
    graceful_timeout: int = Field(default=30, ge=1)
    keepalive: int = Field(default=5, ge=0)
    # Recycling bounds slow leaks; the jitter keeps workers from restarting
    # together. A million: a worker at full speed (~4,000 req/s on 2 cores)
    # restarts every few minutes, not every ~25 s (each restart is a boot and
    # a reshuffle of its keep-alive connections); at ordinary load, hours.
    max_requests: int = Field(default=1_000_000, ge=0)
    max_requests_jitter: int = Field(default=100_000, ge=0)
    forwarded_allow_ips: str = "127.0.0.1"
    prometheus_multiproc_dir: Path = Path("/tmp/ml-api-metrics")
    log_level: LogLevel = "INFO"

    @property
    def bind_address(self) -> str:
        return self.bind or f"0.0.0.0:{self.port}"
