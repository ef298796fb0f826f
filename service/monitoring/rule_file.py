"""Rule files as text: YAML for Prometheus, or a prometheus-operator PrometheusRule."""

from __future__ import annotations

import json
from typing import Any

from service.manifest import Manifest


def _yaml(value: Any, indent: int) -> list[str]:
    """YAML for the rule file's plain shapes (dicts, lists, strings), by hand: the
    image's build environment has no YAML library. Strings are JSON-quoted (valid
    YAML), expressions are block scalars so they read as written."""
    pad = " " * indent
    lines: list[str] = []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        head = f"{pad}{key}:" if isinstance(value, dict) else f"{pad}-"
        if isinstance(item, str) and key == "expr":
            lines.append(f"{head} |-")
            lines += [f"{pad}  {line}" for line in item.splitlines()]
        elif isinstance(item, str):
            lines.append(f"{head} {json.dumps(item)}")
        elif isinstance(value, list):
            nested = _yaml(item, indent + 2)
            lines.append(f"{head} {nested[0].lstrip()}")
            lines += nested[1:]
        else:
            lines.append(head)
            lines += _yaml(item, indent + 2)
    return lines


def prometheus_rule(rules: dict[str, Any], manifest: Manifest) -> dict[str, Any]:
    """The same rules as a prometheus-operator PrometheusRule resource."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": f"ml-api-drift-{manifest.name}",
            "labels": {
                "app.kubernetes.io/name": "ml-api",
                "app.kubernetes.io/part-of": "ml-api",
                # kube-prometheus-stack selects rules by its release label by default.
                "release": "kube-prometheus-stack",
            },
        },
        "spec": rules,
    }


def render(rules: dict[str, Any], manifest: Manifest) -> str:
    header = [
        f"# Drift rules for {manifest.name} {manifest.version}, generated from its manifest by",
        "# `make rules` (python -m service.monitoring.rules). Do not edit: regenerate.",
    ]
    return "\n".join(header + _yaml(rules, 0)) + "\n"
