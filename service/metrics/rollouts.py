"""model_rollouts_total{result}: the master's rollout decisions, exported by the
worker that answers the scrape (the master itself never imports prometheus_client)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from service.server.rollout_record import RESULTS, read_record


class RolloutCollector(Collector):
    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterator[CounterMetricFamily]:
        record = read_record(self._directory)
        if record is None:
            return  # not under Gunicorn: no master, no rollouts
        family = CounterMetricFamily(
            "model_rollouts", "Model rollouts the master attempted, by result.", labels=["result"]
        )
        for result in RESULTS:
            family.add_metric([result], record.counts.get(result, 0))
        yield family
