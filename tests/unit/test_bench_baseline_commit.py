"""`make bench BENCH_ARGS=--baseline-commit REV`: REV's code served as one more
server, under ml-api-production's settings, in the same run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import run


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with two commits of service/version.txt: old, then new."""
    repo = tmp_path / "repo"
    (repo / "service").mkdir(parents=True)
    _git(repo, "init", "-q")
    for text in ("old", "new"):
        (repo / "service" / "version.txt").write_text(text)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", text)
    return repo


def test_the_baseline_is_the_named_commits_tree_under_production_settings(
    repo: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    specs = run.with_baseline([run.ML_API, run.PRODUCTION], "HEAD~1", work, repo)
    baseline = specs[f"{run.PRODUCTION}@HEAD~1"]
    assert list(specs) == [run.ML_API, run.PRODUCTION, f"{run.PRODUCTION}@HEAD~1"]
    assert (baseline.source / "service" / "version.txt").read_text() == "old"
    assert baseline.source.parent == work
    assert (baseline.app, baseline.env, baseline.api_key) == (None, {}, True)
    assert specs[run.PRODUCTION].source == run.REPO
    # Only read: the repository has no worktree and no change for it.
    assert _git(repo, "worktree", "list").count("\n") == 0
    assert _git(repo, "status", "--porcelain") == ""


def test_without_the_option_no_baseline_runs(tmp_path: Path) -> None:
    assert list(run.with_baseline([run.PRODUCTION], None, tmp_path)) == [run.PRODUCTION]


def test_an_unknown_revision_stops_the_bench_before_any_server(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        run.with_baseline([run.PRODUCTION], "no-such-rev", tmp_path, repo)


def test_the_baseline_server_starts_in_its_own_tree_with_productions_environment(
    repo: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # launch() reads only the pickle's digest and the bundle's place.
    bundle = tmp_path / "models" / "iris" / "1.0.0"
    bundle.mkdir(parents=True)
    (bundle / "model.joblib").write_bytes(b"model")
    _git(repo, "tag", "release/old", "HEAD~1")
    name = f"{run.PRODUCTION}@release/old"
    spec = run.with_baseline([], "release/old", work, repo)[name]
    production = run.launch(run.PRODUCTION, run.SERVERS[run.PRODUCTION], work, bundle, 2, 8001)
    baseline = run.launch(name, spec, work, bundle, 2, 8002)
    assert (production.cwd, baseline.cwd) == (run.REPO, spec.source)
    assert (spec.source / "service" / "version.txt").read_text() == "old"
    assert baseline.command == production.command
    assert set(baseline.headers) == set(production.headers) == {"Authorization"}
    own = {"API_KEYS_FILE", "BIND", "PROMETHEUS_MULTIPROC_DIR"}
    assert {k: v for k, v in baseline.env.items() if k not in own} == {
        k: v for k, v in production.env.items() if k not in own
    }
    assert baseline.env["BIND"] == "127.0.0.1:8002"
    # The revision's slash does not make a directory of its own.
    assert Path(baseline.env["API_KEYS_FILE"]).parent == work


def test_the_bench_takes_the_option_and_refuses_it_with_only_v2() -> None:
    assert run.parse_args(["--baseline-commit", "HEAD~3"]).baseline_commit == "HEAD~3"
    with pytest.raises(SystemExit):
        run.parse_args(["--baseline-commit", "HEAD~3", "--only-v2"])


def test_a_baseline_serves_a_bundle_its_own_training_code_wrote(tmp_path: Path) -> None:
    # An older commit validates manifests with its own schema (a newer manifest's
    # fields are "extra inputs" to it), so its bundle comes from its own tree.
    source = tmp_path / "source-old"
    (source / "training").mkdir(parents=True)
    (source / "training" / "__main__.py").write_text(
        "import pathlib, sys\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--output-dir') + 1]) / 'iris' / 'old'\n"
        "print(out)\n"
    )
    work = tmp_path / "work"
    bundle = run.train(work, source)
    assert bundle == work / "models-source-old" / "iris" / "old"
