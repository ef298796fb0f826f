"""`make drift-report`: payloads captured by the real app, one feature shifted,
compared with the reference CSV in Evidently's own virtualenv; the summary
names the shifted feature alone, and the HTML renders every feature's name in
headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.bundles import REPO
from tests.support.capture import capturing_settings
from training.datasets import load_builtin

pytestmark = pytest.mark.process

SHIFTED = "petal_length"


def monitoring_python() -> Path:
    default = REPO / ".tools" / "monitoring" / "bin" / "python"
    path = Path(os.environ.get("MONITORING_PYTHON", default))
    if not path.is_file():
        pytest.fail("Evidently's virtualenv is missing: `make monitoring-tools` builds it")
    return path


def reference_frame() -> pd.DataFrame:
    iris = load_builtin("iris")
    frame = pd.DataFrame(iris.X, columns=[f.name for f in iris.features])
    assert iris.y is not None
    assert iris.class_names is not None
    return frame.assign(species=[iris.class_names[i] for i in iris.y])


def capture_shifted_traffic(model_dir: Path, payloads: Path) -> list[str]:
    """300 rows drawn from the reference, except SHIFTED: only its top third."""
    reference = reference_frame().drop(columns="species")
    rng = np.random.default_rng(7)
    rows = reference.sample(300, replace=True, random_state=rng).reset_index(drop=True)
    high = reference[SHIFTED][reference[SHIFTED] > reference[SHIFTED].quantile(2 / 3)]
    rows[SHIFTED] = rng.choice(high.to_numpy(), size=len(rows))
    settings = capturing_settings(model_dir, payloads)
    with TestClient(create_app(settings)) as client:
        for start in range(0, len(rows), 100):
            instances = rows[start : start + 100].to_dict(orient="records")
            response = client.post("/predict/batch", json={"instances": instances})
            assert response.status_code == 200, response.text
    return list(reference.columns)


def rendered_text(html: Path) -> str:
    """What Chromium shows once the report's scripts have run (the scripts and
    the data they carry left out: only what was rendered into the page)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make system-deps` installs it")
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={html.parent / 'chromium-profile'}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    return re.sub(r"<script\b.*?</script>", "", dom, flags=re.DOTALL)


def test_the_report_flags_the_shifted_feature_and_renders_every_feature(
    model_dir: Path, tmp_path: Path
) -> None:
    payloads = tmp_path / "payloads"
    features = capture_shifted_traffic(model_dir, payloads)
    reference_csv = tmp_path / "ref.csv"
    reference_frame().to_csv(reference_csv, index=False)
    report = tmp_path / "report" / "drift.html"
    python = monitoring_python()
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "drift-report",
            f"REFERENCE_DATA={reference_csv}",
            f"PAYLOADS={payloads}",
            f"REPORT={report}",
            f"TOOLS={python.parents[2]}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == features
    verdicts = {line.split(":", 1)[0]: line.split(":", 1)[1].split()[0] for line in lines}
    assert verdicts == {name: "DRIFT" if name == SHIFTED else "ok" for name in features}
    assert "300 captured rows" in result.stderr
    text = rendered_text(report)
    for name in features:
        assert re.search(rf">\s*{name}\s*<", text), f"{name} not rendered"


def test_without_payloads_the_report_says_so(tmp_path: Path) -> None:
    (tmp_path / "payloads").mkdir()
    reference_csv = tmp_path / "ref.csv"
    reference_frame().to_csv(reference_csv, index=False)
    result = subprocess.run(
        [
            str(monitoring_python()),
            "-m",
            "service.monitoring.drift_report",
            "--reference",
            str(reference_csv),
            "--payloads",
            str(tmp_path / "payloads"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "no ml-api.prediction events" in result.stderr
