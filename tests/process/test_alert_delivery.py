"""Alerts reach someone: a real Prometheus evaluates the shipped alerts.yml against a
real Gunicorn and sends what fires to a real Alertmanager running the shipped
alertmanager.yml, whose webhook is a receiver in this test that records every POST.

Only durations are changed for the test (every `for:` divided by 30, the group
waits shortened); routing, grouping and inhibition are the shipped ones.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.prometheus import running_alertmanager, running_prometheus
from tests.support.servers import free_port, running_gunicorn, wait_for

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
ALERTMANAGER_CONFIG = ROOT / "docker" / "alertmanager" / "alertmanager.yml"
SPEED_UP = 30


@dataclass
class Receiver:
    url: str
    notifications: list[dict[str, Any]] = field(default_factory=list)

    def alertnames(self) -> list[str]:
        return [n["groupLabels"]["alertname"] for n in self.notifications]


@contextmanager
def _webhook_receiver() -> Iterator[Receiver]:
    receiver = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            receiver.notifications.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def _faster_alerts(path: Path) -> Path:
    """The shipped rules with every `for:` divided by SPEED_UP (their order kept:
    a dead service's MlApiNoReadyInstance still fires before MlApiInstanceDown)."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{max(1, _seconds(rule['for']) // SPEED_UP)}s"
    path.write_text(yaml.safe_dump(rules))
    return path


def _alertmanager_config(path: Path, receiver: Receiver) -> Path:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    config["route"] |= {"group_wait": "1s", "group_interval": "2s"}
    (webhook,) = config["receivers"][0]["webhook_configs"]
    webhook["url"] = receiver.url
    path.write_text(yaml.safe_dump(config))
    return path


def _prometheus_config(directory: Path, api_port: int, alertmanager: str, rules: Path) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [alertmanager.removeprefix("http://")]}]}
            ]
        },
        "scrape_configs": [
            {"job_name": "anything", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]}
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _alertmanager_alerts(url: str) -> dict[str, dict[str, Any]]:
    return {a["labels"]["alertname"]: a for a in httpx.get(f"{url}/api/v2/alerts").json()}


def test_a_dead_service_pages_once_and_its_instance_alert_is_inhibited(
    model_dir: Path, tmp_path: Path
) -> None:
    alerts = _faster_alerts(tmp_path / "alerts.yml")
    with (
        _webhook_receiver() as receiver,
        running_alertmanager(
            _alertmanager_config(tmp_path / "alertmanager.yml", receiver),
            tmp_path / "alertmanager",
            free_port(),
        ) as alertmanager,
        running_gunicorn(model_dir, tmp_path / "gunicorn", workers=1) as api,
        running_prometheus(
            _prometheus_config(tmp_path, api.port, alertmanager, alerts),
            tmp_path / "tsdb",
            free_port(),
        ) as prometheus,
    ):
        wait_for(lambda: prometheus.query("model_info == 1"), 30, 0.2, "a scrape of the api")
        api.stop()

        # The service is gone: both alerts fire, and the instance's own is held
        # back by the shipped inhibition while no instance is ready.
        def instance_down_suppressed() -> bool:
            alert = _alertmanager_alerts(alertmanager).get("MlApiInstanceDown")
            return alert is not None and alert["status"]["state"] == "suppressed"

        wait_for(instance_down_suppressed, 60, 0.2, "MlApiInstanceDown, inhibited")
        wait_for(lambda: receiver.notifications, 30, 0.2, "a notification")
        # Two more group intervals: an inhibited alert or a repeat would arrive now.
        threading.Event().wait(5)
    assert receiver.alertnames() == ["MlApiNoReadyInstance"]
    (notification,) = receiver.notifications
    assert notification["status"] == "firing"
    assert [a["labels"]["severity"] for a in notification["alerts"]] == ["critical"]
