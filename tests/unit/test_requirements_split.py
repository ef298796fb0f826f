"""The lean ONNX image's lock (requirements-serve.lock) against the full one.

The ONNX-serving image installs requirements-serve.lock only; these tests pin
that it pins exactly what requirements.lock pins, carries nothing for
scikit-learn or training, and covers every third-party module the service
imports outside the sklearn backend.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Only the sklearn backend may import these; the ONNX image does not have them.
SKLEARN_ONLY_MODULES = {ROOT / "service" / "backends" / "sklearn.py"}
NOT_IN_ONNX_IMAGE = {"scikit-learn", "scipy", "skl2onnx", "onnx", "joblib", "threadpoolctl"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: Path) -> dict[tuple[str, str], str]:
    """(package, environment marker) -> version."""
    pins: dict[tuple[str, str], str] = {}
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, marker = line.partition(";")
        name, _, version = requirement.strip().partition("==")
        assert version, f"{lock.name}: not pinned: {raw!r}"
        pins[(_canonical(name), marker.strip())] = version
    return pins


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


def test_serve_lock_pins_the_same_versions_as_the_full_lock() -> None:
    serve = _pins(ROOT / "requirements-serve.lock")
    full = _pins(ROOT / "requirements.lock")
    assert serve, "requirements-serve.lock is empty"
    different = {
        key: (version, full.get(key)) for key, version in serve.items() if full.get(key) != version
    }
    assert not different, f"pinned differently from requirements.lock: {different}"


def test_serve_lock_has_nothing_for_scikit_learn_or_training() -> None:
    names = {name for name, _ in _pins(ROOT / "requirements-serve.lock")}
    assert not names & NOT_IN_ONNX_IMAGE, names & NOT_IN_ONNX_IMAGE


def test_serve_lock_covers_every_import_of_the_onnx_serving_path() -> None:
    sources = [ROOT / "gunicorn.conf.py", ROOT / "docker" / "healthcheck.py"]
    sources += [p for p in (ROOT / "service").rglob("*.py") if p not in SKLEARN_ONLY_MODULES]
    imported = _third_party_imports(sources)
    distributions = metadata.packages_distributions()
    missing_dist = sorted(m for m in imported if m not in distributions)
    assert not missing_dist, f"imported but not installed in the dev venv: {missing_dist}"
    needed = {_canonical(d) for m in imported for d in distributions[m]}
    locked = {name for name, _ in _pins(ROOT / "requirements-serve.lock")}
    assert needed <= locked, (
        f"imported by the service, missing from the serve lock: {needed - locked}"
    )
