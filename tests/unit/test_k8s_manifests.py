"""deploy/k8s: every manifest validates against the Kubernetes API schemas (kubernetes-validate,
bundled schemas, offline, strict: unknown fields are errors), the kustomization renders, and the
manifests agree with the product and with each other: ports and probe port, GATEWAY_* names
that are real settings, the drain inside the termination grace period, a GPU per replica, the
shared repository on one ReadWriteMany volume, operator state in the Redis they run, Service selectors and ports, and an
autoscaler on per-pod metrics the gateway exports, mapped by the Prometheus adapter rules."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from gateway.cli import build_parser
from gateway.config import Settings, from_environment

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ADAPTER = K8S / "prometheus-adapter-values.yaml"
# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA from 1.27),
# and the newest the validator knows.
OLDEST = "1.27.0"


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def resources(kustomization) -> list[dict]:
    return [doc for name in kustomization["resources"] for doc in load(K8S / name)]


def one(resources, kind: str, name: str | None = None) -> dict:
    found = [r for r in resources if r["kind"] == kind
             and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment(resources) -> dict:
    return one(resources, "Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gateway")


@pytest.fixture(scope="module")
def env(container) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def port(container, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


# ---- schemas and the kustomization ----------------------------------------------------------------

def test_kustomization_lists_every_manifest(kustomization):
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", ADAPTER.name}
    assert listed == on_disk, f"not listed: {on_disk - listed}; missing: {listed - on_disk}"


@pytest.mark.parametrize("version", [OLDEST, "latest"])
def test_manifests_validate_against_the_kubernetes_schemas(resources, version):
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate not installed (the test extra has it)")
    from kubernetes_validate.utils import latest_version

    target = latest_version() if version == "latest" else version
    for resource in resources:
        try:
            kv.validate(resource, target, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} against "
                        f"Kubernetes {target}: {path}: {exc.message}")


def test_the_validator_rejects_what_it_should(deployment):
    """The schema check has teeth: a misspelt field and a wrongly typed port both fail."""
    kv = pytest.importorskip("kubernetes_validate")
    import copy

    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8001"
    for bad in (typo, wrong):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, OLDEST, strict=True)


def kubectl() -> str | None:
    return shutil.which("kubectl")


@pytest.mark.skipif(kubectl() is None, reason="kubectl not installed (its kustomize renders)")
def test_kustomize_renders_the_same_resources_with_the_image_set(resources):
    done = subprocess.run([kubectl(), "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    key = lambda r: (r["kind"], r["metadata"]["name"])
    assert sorted(map(key, rendered)) == sorted(map(key, resources))
    deployment = next(r for r in rendered if r["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "model-serving-gateway:gpu"
    assert all(r["metadata"]["labels"]["app.kubernetes.io/part-of"] == "model-serving-gateway"
               for r in rendered)


# ---- agreement with the product ----------------------------------------------------------------------

def test_env_names_are_settings_and_their_values_parse(env):
    names = {"GATEWAY_" + f.name.upper() for f in fields(Settings)}
    gateway_env = {k: v for k, v in env.items() if k.startswith("GATEWAY_")}
    unknown = set(gateway_env) - names
    assert not unknown, f"not settings of gateway/config.py: {unknown}"
    settings = from_environment(gateway_env)  # converts every value, or raises
    assert settings.control_mode == "poll"


def test_args_are_a_valid_command_line(container):
    args = build_parser().parse_args(container.get("command", []) + container["args"])
    assert args.command == "serve"
    flags = [a for a in container["args"] if a.startswith("--")]
    assert not flags, f"flags win over GATEWAY_* variables; set {flags} in env instead"


def test_ports_and_probes_use_the_gateways_ports(container, env):
    settings = from_environment(env)
    assert port(container, "grpc") == settings.grpc_port == 8001
    assert port(container, "metrics") == settings.metrics_port == 8002
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert spec["grpc"]["port"] == settings.grpc_port, probe
        assert spec["grpc"].get("service", "") == "", f"{probe}: '' is the server's service"
    # a slow model load must not get the pod killed: startup allows minutes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_the_drain_fits_in_the_termination_grace_period(deployment, container, env):
    spec = deployment["spec"]["template"]["spec"]
    drain = from_environment(env).drain_seconds
    assert drain == 30
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = spec["terminationGracePeriodSeconds"]
    assert 0 < pre_stop < drain
    assert grace > pre_stop + drain, f"grace {grace}s <= preStop {pre_stop}s + drain {drain}s"


def test_one_gpu_per_replica(container):
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1  # must equal the limit if set


def test_the_repository_is_one_readwritemany_volume(resources, deployment, container, env):
    pvc = one(resources, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    settings = from_environment(env)
    mount = mounts[str(settings.model_repository)]
    assert not mount.get("readOnly", False), "publishing writes versions onto it"
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == \
        pvc["metadata"]["name"]


def test_operator_state_is_in_the_redis_the_manifests_run(resources, container, env):
    """Replicas share splits and rollouts through Redis, not a lock file on a shared volume."""
    url = env["GATEWAY_STATE_URL"]
    match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", url)
    assert match, url
    service = one(resources, "Service", match.group(1))
    assert any(p["port"] == int(match.group(2)) for p in service["spec"]["ports"])
    store = one(resources, "StatefulSet", match.group(1))
    labels = store["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    redis = store["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly yes" in " ".join(redis["command"]), "a restart must keep the state"
    claim = store["spec"]["volumeClaimTemplates"][0]
    assert {m["name"] for m in redis["volumeMounts"]} == {claim["metadata"]["name"]}
    secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
              if "valueFrom" in e}
    assert secret["GATEWAY_STATE_PASSWORD"]["name"] == "gateway-redis"
    assert "GATEWAY_STATE_DIR" not in env


def test_the_pod_runs_as_the_images_user(deployment):
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile.gpu").read_text(), re.MULTILINE).group(1)
    assert security["runAsUser"] == int(user)


def test_services_select_the_pods_and_name_real_ports(resources, deployment, container):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = {s["metadata"]["name"]: s for s in resources if s["kind"] == "Service"
                and s["spec"]["selector"].get("app.kubernetes.io/component") ==
                labels.get("app.kubernetes.io/component")}  # not the state store's
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]
        for p in service["spec"]["ports"]:
            target = p["targetPort"]
            assert target in named or target in named.values(), (service["metadata"], p)
    grpc_ports = [p for s in services.values() for p in s["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_ports and all(p["port"] == 8001 for p in grpc_ports)
    headless = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
    assert headless, "a headless Service for client-side gRPC balancing"


def test_the_metrics_service_is_annotated_for_prometheus(resources, container):
    metrics = [s for s in resources if s["kind"] == "Service"
               and s["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"]
    assert len(metrics) == 1
    annotations = metrics[0]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port(container, "metrics")
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def exported(tmp_path) -> set[str]:
    """Names a populated gateway exports (the helper of the monitoring deploy tests)."""
    from test_monitoring_deploy import exported_names  # sibling test module

    return exported_names(tmp_path)


def test_the_autoscaler_scales_the_deployment_on_exported_per_pod_metrics(resources, deployment,
                                                                          tmp_path):
    hpa = one(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert "gateway_inflight_requests" in names or "gateway_queue_depth" in names, names
    missing = names - exported(tmp_path)
    assert not missing, f"the HPA scales on metrics the gateway does not export: {missing}"
    # ... and the Prometheus adapter exposes each one under that name, per pod.
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    exposed = {}
    for rule in rules:
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert re.search(rule["name"]["matches"], series), rule
        exposed[rule["name"].get("as", series)] = rule
    for name in names:
        rule = exposed.get(name)
        assert rule is not None, f"no adapter rule exposes {name}"
        assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
        assert "<<.GroupBy>>" in rule["metricsQuery"]


def test_the_disruption_budget_leaves_replicas_serving(resources, deployment):
    pdb = one(resources, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(resources, "HorizontalPodAutoscaler")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
