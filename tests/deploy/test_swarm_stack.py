"""deploy/swarm/stack.yaml against the files the containers read, offline.

The proxy's entrypoint renders nginx.conf with render.sh and loads
api_keys.js: on swarm each must be a config of the proxy (no bind mount of
docker/nginx as under compose) and part of stack.sh's config digest, or an
edit would not roll out. Both services read the keys from the same secret.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SWARM = ROOT / "deploy" / "swarm"
NGINX = ROOT / "docker" / "nginx"


def _stack() -> dict[str, Any]:
    stack: dict[str, Any] = yaml.safe_load((SWARM / "stack.yaml").read_text())
    return stack


def _files_the_proxy_reads() -> set[str]:
    entrypoint = (NGINX / "entrypoint.sh").read_text()
    render = (NGINX / "render.sh").read_text()
    conf = (NGINX / "nginx.conf").read_text()
    read = {"entrypoint.sh", "nginx.conf"}
    read |= set(re.findall(r"/etc/nginx/([\w.]+\.sh)", entrypoint))
    read |= set(re.findall(r"\$SRC/([\w.]+)", render))
    read |= set(re.findall(r"js_import \w+ from ([\w.]+);", conf))
    return read


def test_proxy_gets_every_file_its_entrypoint_reads_as_a_config() -> None:
    stack = _stack()
    mounted = {
        Path(entry["target"]).name: stack["configs"][entry["source"]]["file"]
        for entry in stack["services"]["proxy"]["configs"]
    }
    needed = _files_the_proxy_reads()
    assert needed >= {"render.sh", "api_keys.js"}
    assert set(mounted) >= needed
    for name in needed:
        assert (SWARM / mounted[name]).resolve() == NGINX / name


def test_every_config_file_is_in_the_config_digest() -> None:
    stack_sh = (SWARM / "stack.sh").read_text()
    digest = stack_sh[stack_sh.index("config_tag() {") :]
    digest = digest[: digest.index("\n}\n")]
    for config in _stack()["configs"].values():
        relative = (SWARM / config["file"]).resolve().relative_to(ROOT)
        assert str(relative) in digest, relative


def test_api_and_proxy_read_the_keys_from_the_api_keys_secret() -> None:
    stack = _stack()
    assert set(stack["secrets"]) == {"api-keys"}
    for name in ("api", "proxy"):
        service = stack["services"][name]
        targets = {s["source"]: s["target"] for s in service["secrets"]}
        assert targets == {"api-keys": "api-keys"}
        assert service["environment"]["API_KEYS_FILE"] == "/run/secrets/api-keys"
