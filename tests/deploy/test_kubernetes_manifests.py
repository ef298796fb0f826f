"""deploy/kubernetes, validated offline: every kustomization renders, the
output is valid for a current Kubernetes, checkov finds nothing unjustified,
and the rendered objects have the properties a zero-loss, locked-down
deployment of ml-api depends on."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from service.app import create_app
from service.metrics.instruments import HTTP_IN_PROGRESS
from service.settings import ServerSettings, ServiceSettings
from tests.deploy.kubernetes import (
    KEYS_FILE_NAME,
    KUBERNETES_DIR,
    Rendered,
    checkov,
    copy_with_keys,
    ingress_routes,
    kubectl,
    kustomizations,
    parse,
    render,
)

pytestmark = pytest.mark.skipif(
    kubectl() is None,
    reason="kubectl (with its built-in kustomize) is not installed: nothing renders the manifests",
)

KUSTOMIZATIONS = kustomizations()
OPERATOR_OVERLAYS = ("overlays/prometheus-operator", "overlays/inflight-autoscaling")
# Kinds outside the Kubernetes API: kubernetes-validate has no schema for them.
CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
ALERT_RULES = Path(__file__).resolve().parents[2] / "docker" / "prometheus" / "alerts.yml"
# The preStop sleep action is on by default from 1.30 (deploy/kubernetes/README.md).
OLDEST_SUPPORTED = "1.30"
# Settings that another branch adds to service/settings.py (issue 10, API keys).
SETTINGS_PENDING = {"API_KEYS_FILE"}
# Every checkov check the manifests skip; the reason is in the skip annotation itself.
JUSTIFIED_SKIPS = {"CKV_K8S_43", "CKV_K8S_15"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_with_keys(tmp_path_factory.mktemp("deploy") / "kubernetes")


@pytest.fixture(scope="module")
def renders(tree: Path) -> dict[str, Rendered]:
    rendered = {}
    for name in KUSTOMIZATIONS:
        result = render(tree / name)
        assert result.returncode == 0, f"kubectl kustomize {name}:\n{result.stderr}"
        rendered[name] = parse(name, result.stdout)
    return rendered


@pytest.fixture(params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest, renders: dict[str, Rendered]) -> Rendered:
    return renders[request.param]


# --------------------------------------------------------------- render ----


def test_base_and_every_overlay_are_found() -> None:
    assert {"base", *OPERATOR_OVERLAYS} <= set(KUSTOMIZATIONS)


def test_every_kustomization_renders_the_whole_service(rendered: Rendered) -> None:
    kinds = {manifest["kind"] for manifest in rendered.manifests}
    assert {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Ingress",
    } <= kinds
    namespace = rendered.one("Namespace")["metadata"]["name"]
    for manifest in rendered.manifests:
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"].get("namespace") == namespace, manifest["metadata"]


def test_rendering_without_a_keys_file_fails_instead_of_deploying_an_open_service(
    tmp_path: Path,
) -> None:
    tree = copy_with_keys(tmp_path / "kubernetes")
    (tree / "base" / KEYS_FILE_NAME).unlink()
    result = render(tree / "base")
    assert result.returncode != 0
    assert KEYS_FILE_NAME in result.stderr


def test_no_keys_file_is_committed() -> None:
    listing = subprocess.run(
        ["git", "ls-files", str(KUBERNETES_DIR)],
        capture_output=True,
        text=True,
        check=False,
        cwd=KUBERNETES_DIR,
    )
    if listing.returncode != 0:
        pytest.skip(f"not a git checkout: {listing.stderr.strip()}")
    tracked = listing.stdout.split()
    assert tracked, "deploy/kubernetes is not tracked"
    assert not [path for path in tracked if Path(path).name == KEYS_FILE_NAME]


# ----------------------------------------------------------- validation ----


@pytest.mark.parametrize("version", [OLDEST_SUPPORTED, kubernetes_validate.latest_version()])
def test_every_object_is_valid_for_the_oldest_supported_and_the_newest_release(
    rendered: Rendered, version: str
) -> None:
    assert Version(kubernetes_validate.latest_version()) >= Version("1.37")
    custom: set[tuple[str, str]] = set()
    invalid: list[str] = []
    for manifest in rendered.manifests:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom.add((manifest["apiVersion"], manifest["kind"]))
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(item) for item in error.path)
            name = f"{manifest['kind']}/{manifest['metadata']['name']}"
            invalid.append(f"{name} at {path}: {error.message}")
    assert not invalid, "\n".join(invalid)
    assert custom <= CUSTOM_RESOURCES


def test_checkov_reports_no_failed_check_and_only_justified_skips(
    renders: dict[str, Rendered], tmp_path: Path
) -> None:
    binary = checkov()
    if binary is None:
        pytest.fail("checkov is not installed: `make checkov` builds it in .tools/checkov")
    for name, rendered in renders.items():
        (tmp_path / f"{name.replace('/', '-')}.yaml").write_text(rendered.text)
    environment = {
        **os.environ,
        # Offline: no Prisma Cloud mappings, no PyPI version check; a file it
        # cannot parse fails the run instead of being left out.
        "BC_SKIP_MAPPING": "TRUE",
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
        "CKV_PARSE_ERROR_FAIL": "true",
    }
    result = subprocess.run(
        [binary, "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=environment,
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [
        f"{check['check_id']} {check['check_name']} ({check['resource']}, {check['file_path']})"
        for check in report["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 0
    assert summary["resource_count"] >= len(renders) * 10
    skipped = report["results"]["skipped_checks"]
    assert {check["check_id"] for check in skipped} <= JUSTIFIED_SKIPS
    assert all(len(check["check_result"]["suppress_comment"]) > 40 for check in skipped)


# ----------------------------------------------------------- the pod -------


def test_the_grace_period_outlasts_the_prestop_sleep_plus_gunicorns_drain(
    rendered: Rendered,
) -> None:
    sleep = rendered.container["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = int(
        rendered.settings.get(
            "GRACEFUL_TIMEOUT", ServerSettings.model_fields["graceful_timeout"].default
        )
    )
    assert sleep >= 5, "endpoint removal needs a few seconds to reach the ingress controller"
    assert rendered.pod["terminationGracePeriodSeconds"] > sleep + graceful


def test_probes_ask_readiness_and_liveness_on_the_port_gunicorn_binds(rendered: Rendered) -> None:
    container = rendered.container
    port = int(rendered.settings["PORT"])
    assert "BIND" not in rendered.settings, "BIND would override PORT"
    expected = {
        "startupProbe": "/health/ready",
        "readinessProbe": "/health/ready",
        "livenessProbe": "/health/live",
    }
    for probe, path in expected.items():
        action = container[probe]["httpGet"]
        assert action["path"] == path
        assert rendered.container_port(action["port"]) == port
    # The startup probe alone waits for the model: liveness never kills a loading pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_rolling_updates_never_take_a_serving_replica_away_first(rendered: Rendered) -> None:
    spec = rendered.deployment["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in spec, "the HorizontalPodAutoscaler owns the replica count"


def test_the_pod_runs_locked_down(rendered: Rendered) -> None:
    pod, container = rendered.pod, rendered.container
    security = {**pod["securityContext"], **container["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001 == security["runAsGroup"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "add" not in container["securityContext"]["capabilities"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    account = rendered.one("ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host_namespace)
    labels = rendered.one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_resources_are_requested_and_limited_with_a_worker_per_core(rendered: Rendered) -> None:
    resources = rendered.container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind])
    workers = int(rendered.settings["WEB_CONCURRENCY"])
    assert workers == int(resources["limits"]["cpu"])


def test_writable_paths_are_emptydirs_and_the_metrics_directory_is_in_memory(
    rendered: Rendered,
) -> None:
    metrics_dir = rendered.settings["PROMETHEUS_MULTIPROC_DIR"]
    mount, volume = rendered.mount_of(metrics_dir)
    assert mount["mountPath"] == metrics_dir
    assert volume["emptyDir"]["medium"] == "Memory"
    assert "sizeLimit" in volume["emptyDir"]
    mount, volume = rendered.mount_of("/tmp")
    assert not mount.get("readOnly")
    assert "emptyDir" in volume


def test_api_keys_come_read_only_from_the_secret_and_follow_its_updates(
    rendered: Rendered,
) -> None:
    keys_file = rendered.settings["API_KEYS_FILE"]
    mount, volume = rendered.mount_of(keys_file)
    assert mount["readOnly"] is True
    # A subPath mount is a copy taken at start: revoked keys would stay valid.
    assert "subPath" not in mount
    secret = rendered.one("Secret", volume["secret"]["secretName"])
    relative = keys_file[len(mount["mountPath"]) :].lstrip("/")
    assert relative in secret["data"]
    # Readable by the service's group (fsGroup), by nobody else.
    assert volume["secret"]["defaultMode"] & 0o007 == 0
    assert rendered.pod["securityContext"]["fsGroup"] == 10001
    environment = rendered.container.get("env", [])
    assert not [v for v in environment if "secretKeyRef" in v.get("valueFrom", {})]


def test_every_setting_is_one_the_service_reads_and_is_valid(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = {
        name.upper() for model in (ServerSettings, ServiceSettings) for name in model.model_fields
    }
    unknown = set(rendered.settings) - known - SETTINGS_PENDING
    assert not unknown, f"settings no part of ml-api reads: {sorted(unknown)}"
    for name, value in rendered.settings.items():
        monkeypatch.setenv(name, value)
    server = ServerSettings()
    ServiceSettings()
    assert server.bind_address == f"0.0.0.0:{rendered.container['ports'][0]['containerPort']}"


# ------------------------------------------------------- around the pod ----


def _selects_the_pods(rendered: Rendered, match_labels: dict[str, str]) -> bool:
    labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    return bool(match_labels) and match_labels.items() <= labels.items()


def test_the_service_reaches_the_pods_on_the_http_port(rendered: Rendered) -> None:
    service = rendered.one("Service", "ml-api")
    assert _selects_the_pods(rendered, service["spec"]["selector"])
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"
    assert rendered.container_port(port["targetPort"]) == int(rendered.settings["PORT"])


def _served_paths() -> set[str]:
    """Every path the application answers: its OpenAPI paths and the documentation routes."""
    api = create_app(ServiceSettings()).api
    documented = set(api.openapi()["paths"])
    # Routers included with include_router are not flat routes in FastAPI >= 0.130;
    # the OpenAPI document lists theirs, with any prefix applied.
    flat = {path for route in api.routes if isinstance(path := getattr(route, "path", None), str)}
    return documented | flat


def test_the_ingress_routes_every_public_route_and_never_metrics(rendered: Rendered) -> None:
    ingresses = rendered.all("Ingress")
    assert ingresses
    assert not [ingress for ingress in ingresses if "defaultBackend" in ingress["spec"]]
    service = rendered.one("Service", "ml-api")
    port_names = {port["name"] for port in service["spec"]["ports"]}
    paths = [
        path
        for ingress in ingresses
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    for path in paths:
        assert path["backend"]["service"]["name"] == "ml-api"
        assert path["backend"]["service"]["port"]["name"] in port_names

    def routed(request_path: str) -> bool:
        return any(ingress_routes(p["path"], p["pathType"], request_path) for p in paths)

    app_routes = _served_paths()
    assert "/metrics" in app_routes
    assert {path for path in app_routes if not routed(path)} == {"/metrics"}
    for private in ("/metrics", "/metrics/", "/metrics/anything"):
        assert not routed(private), private
    for public in ("/predict", "/predict/batch", "/health/ready", "/v2/models/iris/infer"):
        assert routed(public), public


def test_the_ingress_caps_bodies_at_the_services_limit(rendered: Rendered) -> None:
    annotations = rendered.one("Ingress", "ml-api")["metadata"]["annotations"]
    body_size = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body_size.endswith("m")
    assert int(body_size[:-1]) * 1024 * 1024 == int(rendered.settings["MAX_REQUEST_BYTES"])


def test_the_ingress_retries_a_post_only_within_a_timeout_shorter_than_a_read(
    rendered: Rendered,
) -> None:
    annotations = rendered.one("Ingress", "ml-api")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    if "non_idempotent" in annotations.get(prefix + "proxy-next-upstream", ""):
        retry_window = int(annotations[prefix + "proxy-next-upstream-timeout"])
        assert 0 < retry_window < int(annotations[prefix + "proxy-read-timeout"])


def test_forwarded_headers_are_trusted_from_a_network_never_from_everyone(
    rendered: Rendered,
) -> None:
    import ipaddress

    allowed = rendered.settings["FORWARDED_ALLOW_IPS"]
    assert "*" not in allowed
    for network in allowed.split(","):
        assert not ipaddress.ip_network(network.strip()).is_global, network


def test_the_network_policy_admits_only_the_ingress_controller_and_prometheus(
    rendered: Rendered,
) -> None:
    policy = rendered.one("NetworkPolicy", "ml-api")["spec"]
    assert _selects_the_pods(rendered, policy["podSelector"]["matchLabels"])
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"] == []
    admitted = []
    for rule in policy["ingress"]:
        assert [rendered.container_port(port["port"]) for port in rule["ports"]] == [
            int(rendered.settings["PORT"])
        ]
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            # Both selectors in one peer: that pod in that namespace. Apart, they
            # would admit the whole namespace or that label in any namespace.
            assert peer["namespaceSelector"]["matchLabels"]
            assert peer["podSelector"]["matchLabels"]
            admitted.append(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
    assert sorted(admitted) == ["ingress-nginx", "prometheus"]


def test_disruptions_and_autoscaling_keep_replicas_serving(rendered: Rendered) -> None:
    budget = rendered.one("PodDisruptionBudget", "ml-api")["spec"]
    assert _selects_the_pods(rendered, budget["selector"]["matchLabels"])
    autoscaler = rendered.one("HorizontalPodAutoscaler", "ml-api")["spec"]
    target = autoscaler["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "ml-api")
    assert autoscaler["minReplicas"] - budget["maxUnavailable"] >= 2
    assert autoscaler["maxReplicas"] > autoscaler["minReplicas"]
    metrics = {metric["type"]: metric for metric in autoscaler["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert "requests" in rendered.container["resources"]  # utilisation is relative to them


def test_base_prometheus_scrapes_pods_through_annotations(renders: dict[str, Rendered]) -> None:
    rendered = renders["base"]
    annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert rendered.container_port(int(annotations["prometheus.io/port"])) == int(
        rendered.settings["PORT"]
    )
    assert not rendered.all("ServiceMonitor")


@pytest.mark.parametrize("name", OPERATOR_OVERLAYS)
def test_operator_overlays_scrape_through_a_service_monitor_only(
    renders: dict[str, Rendered], name: str
) -> None:
    rendered = renders[name]
    annotations = rendered.deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert not [key for key in annotations if key.startswith("prometheus.io/")]
    monitor = rendered.one("ServiceMonitor", "ml-api")["spec"]
    service = rendered.one("Service", "ml-api")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("name", OPERATOR_OVERLAYS)
def test_operator_overlays_carry_the_alert_rules_and_the_drift_rules(
    renders: dict[str, Rendered], name: str, tmp_path: Path
) -> None:
    rendered = renders[name]
    alerts = rendered.one("PrometheusRule", "ml-api")
    assert alerts["spec"] == yaml.safe_load(ALERT_RULES.read_text()), (
        "prometheusrule.yaml must carry docker/prometheus/alerts.yml's groups unchanged"
    )
    drift = rendered.one("PrometheusRule", "ml-api-drift-iris")
    for rule in (alerts, drift):
        assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        path = tmp_path / f"{rule['metadata']['name']}.yml"
        path.write_text(yaml.safe_dump(rule["spec"]))
        check = subprocess.run(
            ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
    records = {r.get("record") for g in drift["spec"]["groups"] for r in g["rules"]}
    assert {"ml_api:feature_psi:1h", "ml_api:feature_psi:24h"} <= records
    assert {"ml_api:prediction_psi:1h", "ml_api:prediction_psi:24h"} <= records


def test_inflight_overlay_scales_on_the_metric_the_adapter_serves_from_the_services_gauge(
    renders: dict[str, Rendered],
) -> None:
    rendered = renders["overlays/inflight-autoscaling"]
    metrics = rendered.one("HorizontalPodAutoscaler", "ml-api")["spec"]["metrics"]
    (pods,) = [metric["pods"] for metric in metrics if metric["type"] == "Pods"]
    assert pods["target"]["type"] == "AverageValue"
    assert any(metric["type"] == "Resource" for metric in metrics), "CPU stays as a floor"

    overlay = KUBERNETES_DIR / "overlays" / "inflight-autoscaling"
    values = yaml.safe_load((overlay / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    rule = served[pods["metric"]["name"]]
    (exported,) = [metric.name for metric in HTTP_IN_PROGRESS.describe()]
    assert rule["seriesQuery"].startswith(exported + "{")
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    assert "<<.GroupBy>>" in rule["metricsQuery"]
