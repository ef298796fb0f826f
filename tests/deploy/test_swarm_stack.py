"""deploy/swarm/stack.yaml against the files the containers read, offline.

The proxy's entrypoint renders nginx.conf with render.sh and loads
api_keys.js: on swarm each must be a config of the proxy (no bind mount of
docker/nginx as under compose) and part of stack.sh's config digest, or an
edit would not roll out. Both services read the keys from the same secret.
Prometheus, Alertmanager and Grafana publish no port (swarm would bind every
interface): stack.sh's loopback-only door publishes them, and refuses to deploy
Grafana with its default password. Alertmanager runs as under compose.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SWARM = ROOT / "deploy" / "swarm"
NGINX = ROOT / "docker" / "nginx"


def _stack() -> dict[str, Any]:
    stack: dict[str, Any] = yaml.safe_load((SWARM / "stack.yaml").read_text())
    return stack


def _key_sync_modules() -> set[str]:
    """key_sync.py and every module of service.auth it imports, transitively:
    what the proxy's python3 needs beside it."""
    found: set[str] = set()
    pending = ["key_sync"]
    while pending:
        module = pending.pop()
        found.add(module)
        tree = ast.parse((ROOT / "service" / "auth" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, (module, "a relative import")
            if isinstance(node, ast.ImportFrom) and node.module == "service.auth":
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.removeprefix("service.auth.")]
                if node.module.split(".")[0] not in sys.stdlib_module_names | {"__future__"}:
                    assert node.module.startswith("service.auth."), (module, node.module)
            elif isinstance(node, ast.Import):
                names = []
                for alias in node.names:
                    assert alias.name.split(".")[0] in sys.stdlib_module_names, (module, alias)
            else:
                continue
            pending += [
                name
                for name in names
                if name not in found and (ROOT / "service/auth" / f"{name}.py").exists()
            ]
    return found


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


# The one config whose directory the operator chooses, as under compose.
ALERTMANAGER_CONFIG = "${ALERTMANAGER_CONFIG_DIR:-../../docker/alertmanager}/alertmanager.yml"


def test_every_config_file_is_in_the_config_digest() -> None:
    stack_sh = (SWARM / "stack.sh").read_text()
    digest = _function(stack_sh, "config_tag")
    for config in _stack()["configs"].values():
        if config["file"] == ALERTMANAGER_CONFIG:
            # stack.sh resolves the directory (compose's by default) and
            # exports it absolute, for the stack file and the digest alike.
            assert '"$ALERTMANAGER_CONFIG_DIR/alertmanager.yml"' in digest
            chosen = _function(stack_sh, "alertmanager_config")
            assert 'dir="${ALERTMANAGER_CONFIG_DIR:-$ROOT/docker/alertmanager}"' in chosen
            continue
        if config["file"] == "${DRIFT_RULES_FILE:?stack.sh sets DRIFT_RULES_FILE}":
            # From the image, named by its own digest (DRIFT_TAG), not CONFIG_TAG.
            assert "${DRIFT_TAG:-0}" in config["name"]
            continue
        relative = (SWARM / config["file"]).resolve().relative_to(ROOT)
        assert str(relative) in digest, relative


def test_alertmanager_runs_as_under_compose_and_prometheus_sends_to_it() -> None:
    """The same configuration (compose's file, or ALERTMANAGER_CONFIG_DIR's),
    command and rules; its data in a volume of the stack's own."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    ours = _stack()["services"]["alertmanager"]
    theirs = compose["services"]["alertmanager"]
    assert ours["image"] == theirs["image"]
    assert ours["command"] == theirs["command"]
    [config] = ours["configs"]
    assert config["target"] == "/etc/alertmanager/alertmanager.yml"
    assert _stack()["configs"][config["source"]]["file"] == ALERTMANAGER_CONFIG
    assert ours["volumes"] == ["swarm-alertmanager-data:/alertmanager"]
    assert ours["networks"] == ["edge"]
    swarm_prometheus = yaml.safe_load((SWARM / "prometheus.yml").read_text())
    compose_prometheus = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    assert swarm_prometheus["alerting"] == compose_prometheus["alerting"]
    assert "alerts.yml" in swarm_prometheus["rule_files"]
    targets = {c["target"]: c["source"] for c in _stack()["services"]["prometheus"]["configs"]}
    alerts = _stack()["configs"][targets["/etc/prometheus/alerts.yml"]]["file"]
    assert (SWARM / alerts).resolve() == ROOT / "docker/prometheus/alerts.yml"


def test_only_the_keys_service_mounts_the_keys_secret_and_the_others_copy_it() -> None:
    """A rotation replaces the `keys` task alone: the api tasks and the proxy
    copy its file in place (service/auth/key_sync.py), never restarted."""
    stack = _stack()
    services = stack["services"]
    assert set(stack["secrets"]) == {"api-keys"}
    assert [name for name, service in services.items() if service.get("secrets")] == ["keys"]
    assert services["keys"]["secrets"][0]["target"] == "api-keys"
    command = services["keys"]["command"]
    assert command[command.index("--file") + 1] == "/run/secrets/api-keys"
    url = f"http://keys:{command[command.index('--port') + 1]}/api-keys"
    assert services["keys"]["deploy"]["endpoint_mode"] == "dnsrr"
    api_env = services["api"]["environment"]
    assert api_env["API_KEYS_URL"] == url
    assert api_env["API_KEYS_FILE"] == "/tmp/api-keys"
    proxy = services["proxy"]
    assert proxy["environment"]["KEYS_URL"] == url
    assert proxy["environment"]["API_KEYS_FILE"].startswith("/tmp/nginx-conf/")
    # The proxy runs the api's own copier, from the same source files.
    mounted = {
        entry["target"]: (SWARM / stack["configs"][entry["source"]]["file"]).resolve()
        for entry in proxy["configs"]
    }
    modules = _key_sync_modules()
    assert {"key_sync", "keyfile", "follower_heartbeat"} <= modules
    for module in modules:
        target = f"/etc/nginx/keysync/service/auth/{module}.py"
        assert mounted[target] == ROOT / "service" / "auth" / f"{module}.py"
    assert "PYTHONPATH=/etc/nginx/keysync" in (NGINX / "entrypoint.sh").read_text()


def test_stack_keys_pushes_the_rotation_where_the_keys_task_serves_it_from() -> None:
    """stack.sh keys hands the running `keys` task the new file (docker exec, so
    on this manager) at the path it serves pushes from, on its writable tmpfs."""
    keys = _stack()["services"]["keys"]
    command = keys["command"]
    pushed = command[command.index("--pushed") + 1]
    tmpfs = [volume["target"] for volume in keys["volumes"] if volume["type"] == "tmpfs"]
    assert [target for target in tmpfs if pushed.startswith(f"{target}/")], (pushed, tmpfs)
    assert keys["read_only"] is True
    assert keys["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    script = (SWARM / "stack.sh").read_text()
    assert f"python -m service.auth.key_sync push --file {pushed}" in script
    # It asks the keys tasks which copier holds what, on their port.
    assert f"\nKEYS_PORT={command[command.index('--port') + 1]}\n" in script


def test_monitoring_publishes_no_port_on_the_swarm() -> None:
    """Swarm publishes on every interface of a node; Prometheus and
    Alertmanager have no authentication. Only the proxy publishes; the others
    resolve to their task (dnsrr: this kernel has no IPVS for a VIP)."""
    services = _stack()["services"]
    assert [name for name, service in services.items() if service.get("ports")] == ["proxy"]
    for name in ("prometheus", "alertmanager", "grafana"):
        assert services[name]["deploy"]["endpoint_mode"] == "dnsrr", name
    # The loopback door attaches to the edge network as a plain container.
    assert _stack()["networks"]["edge"]["attachable"] is True


def _function(script: str, name: str) -> str:
    body = script[script.index(f"{name}() {{") :]
    return body[: body.index("\n}\n")]


def test_the_monitoring_door_publishes_on_the_managers_loopback_only() -> None:
    door = _function((SWARM / "stack.sh").read_text(), "start_monitoring_door")
    published = re.findall(r'-p "([^"]+)"', door)
    assert published == [
        "127.0.0.1:${PROMETHEUS_PORT:-9090}:9090",
        "127.0.0.1:${ALERTMANAGER_PORT:-9093}:9093",
        "127.0.0.1:${GRAFANA_PORT:-3000}:3000",
    ]
    assert "source=$HERE/monitoring-door.conf" in door
    conf = (SWARM / "monitoring-door.conf").read_text()
    for port, name in (("9090", "prometheus"), ("9093", "alertmanager"), ("3000", "grafana")):
        assert re.search(rf"^\s*{port} {name}:{port};$", conf, re.MULTILINE), name
        assert re.search(rf"^\s*listen {port};$", conf, re.MULTILINE), name


def _stack_sh(verb: str, **env: str) -> subprocess.CompletedProcess[str]:
    # An image that does not exist: were the refusal to let `up` through, it
    # would stop at `docker image inspect`, before any deploy.
    return subprocess.run(
        ["bash", str(SWARM / "stack.sh"), verb],
        env={
            "PATH": os.environ["PATH"],
            "STACK_NAME": "ml-api-preflight-test",
            "IMAGE_NAME": "ml-api-preflight-test-no-such-image",
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_stack_up_refuses_grafana_with_no_or_the_default_password() -> None:
    grafana = _stack()["services"]["grafana"]["environment"]
    # No default in the stack file: `docker stack deploy` by hand refuses too.
    assert ":?" in grafana["GF_SECURITY_ADMIN_PASSWORD"]
    for env in ({}, {"GRAFANA_ADMIN_PASSWORD": "admin"}, {"GRAFANA_ADMIN_PASSWORD": ""}):
        refused = _stack_sh("up", **env)
        assert refused.returncode == 1, (env, refused.stderr)
        # One line, naming what to set.
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "set GRAFANA_ADMIN_PASSWORD" in refused.stderr, refused.stderr


def test_preflight_passes_with_a_password_or_without_grafana() -> None:
    assert _stack_sh("preflight", GRAFANA_ADMIN_PASSWORD="a long passphrase").returncode == 0
    assert _stack_sh("preflight", GRAFANA_REPLICAS="0").returncode == 0


def test_the_canary_is_the_api_at_zero_replicas() -> None:
    """One definition: a canary differs from the primary only in its image
    (stack.sh canary sets it) and its replicas."""
    services = _stack()["services"]
    api, canary = services["api"], services["canary"]
    assert canary["deploy"]["replicas"] == 0
    assert {**canary, "deploy": None} == {**api, "deploy": None}
    assert {**canary["deploy"], "replicas": None} == {**api["deploy"], "replicas": None}
    assert services["proxy"]["environment"]["CANARY_HOST"] == "canary"
    scrape = yaml.safe_load((SWARM / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["dns_sd_configs"][0]["names"] == ["tasks.api", "tasks.canary"]


def _canary_share(tmp_path: Path, percent: str, sticky: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(NGINX / "canary.sh"), "share", str(tmp_path), percent, sticky],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=False,
    )


def test_canary_share_is_written_whole_and_checked(tmp_path: Path) -> None:
    for percent, sticky in (("0", "0"), ("10", "0"), ("50", "1")):
        assert _canary_share(tmp_path, percent, sticky).returncode == 0
        assert (tmp_path / "canary.share").read_text() == f"{percent} {sticky}\n"
    for percent, sticky_value in (("101", "0"), ("-1", "0"), ("ten", "0"), ("5", "2")):
        refused = _canary_share(tmp_path, percent, sticky_value)
        assert refused.returncode == 2, (percent, sticky_value)
    # A refused value leaves the last good file.
    assert (tmp_path / "canary.share").read_text() == "50 1\n"


def test_the_proxy_picks_the_upstream_and_its_replicas_in_lua_without_a_reload() -> None:
    conf = (NGINX / "nginx.conf").read_text()
    assert re.findall(r"proxy_pass [^;]+;", conf) == ["proxy_pass http://$ml_api_upstream;"]
    assert 'set_by_lua_block $ml_api_upstream { return require("upstreams").side() }' in conf
    balancers = re.findall(r"balancer_by_lua_block \{ ([^}]+) \}", conf)
    assert balancers == [
        'require("upstreams").balance("api")',
        'require("upstreams").balance("canary")',
    ]
    render = (NGINX / "render.sh").read_text()
    assert 'sh "$SRC/canary.sh" share "$OUT" 0 0' in render
    # The watcher never reloads nginx: a reload closes idle client connections.
    assert "reload" not in re.sub(r"#.*", "", (NGINX / "entrypoint.sh").read_text())


def test_the_stack_keeps_its_monitoring_data_apart_from_compose() -> None:
    # A stack and a compose project of the same name on one host: volumes are
    # named <project>_<key>, so the keys must differ.
    swarm = set(yaml.safe_load((ROOT / "deploy/swarm/stack.yaml").read_text())["volumes"])
    compose = set(yaml.safe_load((ROOT / "compose.yaml").read_text())["volumes"])
    assert not swarm & compose, swarm & compose
