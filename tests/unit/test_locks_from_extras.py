"""The lock files are compiled from pyproject.toml's extras (`make locks`).

Each lock's direct requirements (uv marks them `ml-api (pyproject.toml)`) are
exactly the extras it is compiled from, each pinned at a version its extra
admits; the serve and dev locks pin what requirements.lock pins; the ONNX
image's lock carries nothing of `train` that serving does not itself pull in,
and covers every third-party module the service imports outside the sklearn
backend.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "ml-api"
# lock file -> the extras `make locks` compiles it from
LOCKS = {
    "requirements.lock": ("serve", "train"),
    "requirements-serve.lock": ("serve",),
    "requirements-dev.lock": ("dev",),
    "requirements-monitoring.lock": ("monitoring",),
}
# Only the sklearn backend may import these; the ONNX image does not have them.
SKLEARN_ONLY_MODULES = {ROOT / "service" / "backends" / "sklearn.py"}
# Run in the monitoring tools' own virtualenv (make drift-report), never served.
MONITORING_ONLY_MODULES = {ROOT / "service" / "monitoring" / "drift_report.py"}
NOT_IN_ONNX_IMAGE = {"scikit-learn", "scipy", "skl2onnx", "onnx", "joblib", "threadpoolctl"}


@dataclass(frozen=True)
class Pin:
    version: str
    marker: str
    # What uv's `# via` annotation says asked for it.
    wanted_by: frozenset[str]

    @property
    def direct(self) -> bool:
        return f"{PROJECT} (pyproject.toml)" in self.wanted_by


def _pins(lock: str) -> dict[str, list[Pin]]:
    """package -> its pins (one per environment marker)."""
    pins: dict[str, list[Pin]] = {}
    for raw in (ROOT / lock).read_text().splitlines():
        line, _, comment = raw.partition("#")
        if not line.strip():
            continue
        requirement, _, marker = line.partition(";")
        name, _, version = requirement.strip().partition("==")
        assert version, f"{lock}: not pinned: {raw!r}"
        via = comment.strip().removeprefix("via ")
        wanted_by = frozenset(part.strip() for part in via.split(","))
        pins.setdefault(canonicalize_name(name), []).append(Pin(version, marker.strip(), wanted_by))
    return pins


def _extra_requirements(extras: tuple[str, ...]) -> dict[str, Requirement]:
    """The requirements of these extras, with the project's own extras they name expanded."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    table: dict[str, list[str]] = declared["optional-dependencies"]
    found: dict[str, Requirement] = {}
    pending = list(extras)
    while pending:
        for text in table[pending.pop()]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == PROJECT:
                pending.extend(requirement.extras)
            else:
                found[canonicalize_name(requirement.name)] = requirement
    return found


@pytest.mark.parametrize(("lock", "extras"), LOCKS.items())
def test_a_locks_direct_requirements_are_exactly_its_extras(
    lock: str, extras: tuple[str, ...]
) -> None:
    direct = {name for name, pins in _pins(lock).items() if any(p.direct for p in pins)}
    assert direct == set(_extra_requirements(extras))


@pytest.mark.parametrize(("lock", "extras"), LOCKS.items())
def test_every_requirement_of_the_extras_is_pinned_at_a_version_it_admits(
    lock: str, extras: tuple[str, ...]
) -> None:
    pins = _pins(lock)
    for name, requirement in _extra_requirements(extras).items():
        assert name in pins, f"{lock}: {name} not pinned"
        for pin in pins[name]:
            assert requirement.specifier.contains(pin.version, prereleases=True), (
                f"{lock}: {name}=={pin.version} outside {requirement.specifier}"
            )


@pytest.mark.parametrize("lock", ["requirements-serve.lock", "requirements-dev.lock"])
def test_constrained_locks_pin_the_same_versions_as_the_full_lock(lock: str) -> None:
    full = _pins("requirements.lock")
    different = {
        name: ([p.version for p in pins], [p.version for p in full[name]])
        for name, pins in _pins(lock).items()
        if name in full
        and {(p.version, p.marker) for p in pins} != {(p.version, p.marker) for p in full[name]}
    }
    assert not different, f"{lock} pinned differently from requirements.lock: {different}"


def test_serve_lock_has_nothing_for_scikit_learn_or_training() -> None:
    serve = _pins("requirements-serve.lock")
    assert not set(serve) & NOT_IN_ONNX_IMAGE, set(serve) & NOT_IN_ONNX_IMAGE
    # protobuf is in `train` and also what onnxruntime needs: there for serving.
    train_only = set(_extra_requirements(("train",))) - set(_extra_requirements(("serve",)))
    from_train = {
        name: sorted(pins[0].wanted_by)
        for name, pins in serve.items()
        if name in train_only and pins[0].direct
    }
    assert not from_train, f"in the serve lock for training: {from_train}"


def _third_party_imports(paths: list[Path]) -> set[str]:
    modules: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    local = {"service", "gunicorn_conf"}
    return {m for m in modules if m not in sys.stdlib_module_names and m not in local}


def test_serve_lock_covers_every_import_of_the_onnx_serving_path() -> None:
    sources = [ROOT / "gunicorn.conf.py", ROOT / "docker" / "healthcheck.py"]
    sources += [
        p
        for p in (ROOT / "service").rglob("*.py")
        if p not in SKLEARN_ONLY_MODULES | MONITORING_ONLY_MODULES
    ]
    imported = _third_party_imports(sources)
    distributions = metadata.packages_distributions()
    missing_dist = sorted(m for m in imported if m not in distributions)
    assert not missing_dist, f"imported but not installed in the dev venv: {missing_dist}"
    needed = {canonicalize_name(d) for m in imported for d in distributions[m]}
    locked = set(_pins("requirements-serve.lock"))
    assert needed <= locked, (
        f"imported by the service, missing from the serve lock: {needed - locked}"
    )
