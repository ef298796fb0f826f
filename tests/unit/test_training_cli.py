"""`python -m training` as the Makefile and Dockerfile run it: a real subprocess."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Flags later on a command line win, so tests put FAST first and their own flags after.
FAST = ["--n-estimators", "10", "--parity-random-rows", "500", "--min-accuracy", "0"]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_prints_the_bundle_path_as_the_last_line(tmp_path: Path) -> None:
    result = run(*FAST, "--output-dir", tmp_path, "--version", "2.1.0")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    path = Path(result.stdout.splitlines()[-1])
    assert path == tmp_path / "iris" / "2.1.0"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == "2.1.0"
    assert manifest["backend"] == "onnx"


def test_cli_csv_with_name_and_no_onnx_warns_once_on_stderr(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    rows = ["x,y,label"] + [f"{i},{i % 7},{'a' if i < 20 else 'b'}" for i in range(40)]
    csv_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    result = run(
        *FAST,
        "--csv",
        csv_path,
        "--target",
        "label",
        "--name",
        "toy",
        "--output-dir",
        out,
        "--no-onnx",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(tmp_path / "out" / "toy" / "1.0.0")
    assert result.stderr.splitlines() == [
        "training: warning: writing an sklearn-only bundle (no model.onnx): disabled by --no-onnx"
    ]


def test_cli_failure_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    result = run(*FAST, "--output-dir", tmp_path, "--min-accuracy", "1", "--max-depth", "1")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("training: error: accuracy ")
    assert lines[0].endswith("is below --min-accuracy 1.0000; bundle not written")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_to_overwrite_then_force_replaces(tmp_path: Path) -> None:
    (tmp_path / "iris" / "1.0.0").mkdir(parents=True)
    refused = run(*FAST, "--output-dir", tmp_path)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"training: error: {tmp_path / 'iris' / '1.0.0'} already exists; "
        "pass --force to replace it\n"
    )
    forced = run(*FAST, "--output-dir", tmp_path, "--force")
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in (tmp_path / "iris").iterdir()) == ["1.0.0"]
    assert (tmp_path / "iris" / "1.0.0" / "manifest.json").is_file()


def test_cli_csv_error_names_the_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("a,b,label\n1,2,x\n3,?,y\n")
    result = run("--csv", csv_path, "--target", "label", "--output-dir", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr == "training: error: column 'b' is not numeric: '?' on line 3\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "1.0"], "argument --version: invalid version '1.0'"),
        (["--name", "Bad Name"], "argument --name: invalid model name 'Bad Name'"),
        (["--csv", "x.csv"], "--csv requires --target COLUMN"),
        (["--target", "y"], "--target is only meaningful with --csv"),
        (["--dataset", "iris", "--csv", "x.csv"], "not allowed with argument"),
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--test-size", "1.5"], "argument --test-size: '1.5' is not a number between 0 and 1"),
        (["--n-estimators", "0"], "argument --n-estimators: '0' is not an integer >= 1"),
        (["--parity-tolerance", "nan"], "argument --parity-tolerance: 'nan' is not a finite"),
    ],
)
def test_cli_usage_errors_exit_2_with_the_error_prefix(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("--output-dir", tmp_path, *args)
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith("training: error: ")
    assert message in last
    assert list(tmp_path.iterdir()) == []


def test_training_imports_only_the_manifest_of_the_service_and_defers_onnx_imports() -> None:
    code = (
        "import sys, training.__main__, training.pipeline, training.package\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('service', 'skl2onnx', 'onnxruntime', 'sklearn'))\n"
        "print(bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "['service', 'service.manifest']"


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_manifest_is_the_only_service_module_training_imports() -> None:
    """One definition of the manifest: training validates with the service's model."""
    for path in (ROOT / "training").rglob("*.py"):
        service = {m for m in _imported_modules(path) if m.split(".")[0] == "service"}
        assert service <= {"service.manifest"}, path


def test_the_service_imports_nothing_from_training() -> None:
    for path in (ROOT / "service").rglob("*.py"):
        assert not any(m.split(".")[0] == "training" for m in _imported_modules(path)), path


def test_the_manifest_module_needs_only_pydantic_and_the_standard_library() -> None:
    third_party = {
        m.split(".")[0]
        for m in _imported_modules(ROOT / "service" / "manifest.py")
        if m.split(".")[0] not in sys.stdlib_module_names
    }
    assert third_party == {"pydantic"}
