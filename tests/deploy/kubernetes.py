"""Render deploy/kubernetes offline and read the result.

Kubernetes cannot run on this machine; `kubectl kustomize` (kustomize built
into kubectl) renders every kustomization exactly as `kubectl apply -k` would
send it, and the tests judge that output.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_DIR = REPO / "deploy" / "kubernetes"
KEYS_FILE_NAME = "api-keys"
CHECKOV_LOCK = REPO / "tests" / "deploy" / "checkov.lock"

Manifest = dict[str, Any]


def kustomizations(root: Path = KUBERNETES_DIR) -> list[str]:
    """Every renderable kustomization (base and overlays; not components), relative to root."""
    found = []
    for file in sorted(root.rglob("kustomization.yaml")):
        if yaml.safe_load(file.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(str(file.parent.relative_to(root)))
    return found


def kubectl() -> str | None:
    return shutil.which("kubectl")


def checkov() -> Path | None:
    """The checkov of the tool virtualenv `make checkov` builds from tests/deploy/checkov.lock."""
    candidate = Path(os.environ.get("CHECKOV", REPO / ".tools" / "checkov" / "bin" / "checkov"))
    return candidate if candidate.is_file() else None


def copy_with_keys(destination: Path) -> Path:
    """deploy/kubernetes copied, with a keys file like `make api-key` writes (a digest, no key)."""
    shutil.copytree(KUBERNETES_DIR, destination)
    digest = hashlib.sha256(secrets.token_urlsafe(32).encode()).hexdigest()
    header = "# ml-api API keys: one '<key id> <sha256 hex of the key>' per line.\n"
    (destination / "base" / KEYS_FILE_NAME).write_text(f"{header}test-client {digest}\n")
    return destination


def render(directory: Path) -> subprocess.CompletedProcess[str]:
    binary = kubectl()
    assert binary is not None
    return subprocess.run(
        [binary, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass(frozen=True)
class Rendered:
    """One kustomization's output: the YAML text and its objects."""

    name: str
    text: str
    manifests: list[Manifest]

    def all(self, kind: str) -> list[Manifest]:
        return [manifest for manifest in self.manifests if manifest["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Manifest:
        matches = [m for m in self.all(kind) if name is None or m["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.name}: {len(matches)} {kind} named {name or 'any'}"
        return matches[0]

    @property
    def deployment(self) -> Manifest:
        return self.one("Deployment", "ml-api")

    @property
    def pod(self) -> Manifest:
        spec: Manifest = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> Manifest:
        containers = self.pod["containers"]
        assert len(containers) == 1
        container: Manifest = containers[0]
        return container

    @property
    def settings(self) -> dict[str, str]:
        """The environment the container gets: its ConfigMaps and literal env entries."""
        environment: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            config_map = self.one("ConfigMap", source["configMapRef"]["name"])
            environment.update(config_map.get("data", {}))
        for variable in self.container.get("env", []):
            if "value" in variable:
                environment[variable["name"]] = variable["value"]
        return environment

    def container_port(self, port: int | str) -> int:
        """A probe's or Service's port (number or name) as the container port number."""
        for declared in self.container["ports"]:
            if port in (declared["containerPort"], declared.get("name")):
                number: int = declared["containerPort"]
                return number
        raise AssertionError(f"{self.name}: port {port!r} is not a container port")

    def mount_of(self, path: str) -> tuple[Manifest, Manifest]:
        """The (volumeMount, volume) whose mount contains path."""
        mounts = [
            mount
            for mount in self.container.get("volumeMounts", [])
            if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/")
        ]
        assert mounts, f"{self.name}: nothing is mounted at {path}"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        volumes = [v for v in self.pod.get("volumes", []) if v["name"] == mount["name"]]
        assert len(volumes) == 1
        return mount, volumes[0]


def parse(name: str, text: str) -> Rendered:
    return Rendered(name, text, [doc for doc in yaml.safe_load_all(text) if doc])


def ingress_routes(rule_path: str, path_type: str, request_path: str) -> bool:
    """Whether an Ingress path matches a request path, as the Ingress API defines it.

    Exact: the whole path, case-sensitive. Prefix: element by element on `/`,
    so `/predict` matches `/predict/batch` but not `/predictions`.
    """
    if path_type == "Exact":
        return request_path == rule_path
    assert path_type == "Prefix", f"pathType {path_type} has controller-specific semantics"
    rule = [element for element in rule_path.split("/") if element]
    request = [element for element in request_path.split("/") if element]
    return request[: len(rule)] == rule
