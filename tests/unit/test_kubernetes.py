"""The Kubernetes manifests (``deploy/kubernetes``), validated offline.

Every overlay renders with ``kubectl kustomize``; built-in kinds validate in strict mode (unknown
fields refused) against Kubernetes' own schemas (``kubernetes-validate``); the custom resources
(KEDA's ScaledObject, the Prometheus operator's ServiceMonitor) validate against the CRD schemas
kept in ``deploy/kubernetes/crds`` with unknown fields refused too. Then what the manifests must
say about this service: probes on our endpoints, a grace period that covers the drain, non-root
with a read-only root, the GPU overlay's split topology, the queue metric KEDA scales on, and
the split overlay's two tiers: a CPU front and GPU model pods that find each other by name, each
scaled on its own signal.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.runtime.plan import make_plan
from service.runtime.settings import Settings
from tests.conftest import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
# Every overlay there is, so that a new one is validated without being listed here.
OVERLAYS = [
    "base",
    *sorted(
        f"overlays/{folder.name}"
        for folder in (KUBERNETES / "overlays").iterdir()
        if (folder / "kustomization.yaml").is_file()
    ),
]
KUBERNETES_VERSION = "1.37.0"


def render(overlay: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of one overlay: its objects."""
    done = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [obj for obj in objects if obj["kind"] == kind]
    assert len(matches) == 1, [obj["kind"] for obj in objects]
    return matches[0]


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from the CRDs kept in the repository."""
    schemas = {}
    for path in sorted((KUBERNETES / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            schemas[(f"{group}/{version['name']}", kind)] = _closed(schema)
    return schemas


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with unknown properties refused wherever it lists properties (the API server
    would silently prune them: a typo would vanish instead of failing)."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    # metadata is the API server's (ObjectMeta), not described by the CRD.
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return schema


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str) -> None:
    crds = _crd_schemas()
    objects = render(overlay)
    assert objects
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in crds:
            jsonschema.validate(obj, crds[key])
            continue
        # A built-in kind whose schema is missing (a WARN on the command line) fails here.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_is_caught_in_both_kinds_of_schema() -> None:
    """The validation can fail: an unknown field in a Deployment and in a ScaledObject."""
    objects = render("overlays/autoscale")
    deployment = copy.deepcopy(_by_kind(objects, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = copy.deepcopy(_by_kind(objects, "ScaledObject"))
    scaled["spec"]["minReplicas"] = 2  # ScaledObject's field is minReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, _crd_schemas()[("keda.sh/v1alpha1", "ScaledObject")])


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = _by_kind(objects, "ConfigMap")["data"]
    return data


def test_the_base_probes_drains_and_runs_unprivileged() -> None:
    objects = render("base")
    pod = _by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    container = _container(objects)
    config = _config(objects)
    # Every VIT_* name in the ConfigMap is a real setting (a typo would be ignored silently).
    assert {name.removeprefix("VIT_").lower() for name in config} <= set(Settings.model_fields)
    fields: dict[str, Any] = {name.removeprefix("VIT_").lower(): v for name, v in config.items()}
    settings = Settings(**fields)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert (
        container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"]
        >= 300
    )  # minutes for a large model to load
    # The drain fits: a request in flight at the end of the drain delay still finishes, and the
    # kubelet's SIGKILL comes after our own grace period.
    assert settings.drain_delay_s + settings.request_timeout_s <= settings.grace_period_s
    assert pod["terminationGracePeriodSeconds"] > settings.grace_period_s
    assert pod["terminationGracePeriodSeconds"] > settings.request_timeout_s
    assert settings.on_load_failure == "exit"  # a broken model is a CrashLoopBackOff, visible
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # BentoML's home and the run folder need a writable /tmp.
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["BENTOML_HOME"].startswith("/tmp/")
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]  # the CPU plan sees it
    service = _by_kind(objects, "Service")
    deployment_labels = _by_kind(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == deployment_labels
    assert _by_kind(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == (
        deployment_labels
    )
    rolling = _by_kind(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def test_the_base_serves_the_open_inference_protocol_over_grpc_too() -> None:
    """The container's gRPC port is the service's default ``VIT_GRPC_PORT``, and the Service
    routes it as HTTP/2 cleartext."""
    objects = render("base")
    ports = {p["name"]: p["containerPort"] for p in _container(objects)["ports"]}
    assert ports == {"http": 3000, "grpc": Settings().grpc_port}
    assert "VIT_GRPC_PORT" not in _config(objects)  # the image's default
    service = {p["name"]: p for p in _by_kind(objects, "Service")["spec"]["ports"]}
    assert service["grpc"]["targetPort"] == "grpc"
    assert service["grpc"]["appProtocol"] == "kubernetes.io/h2c"


def test_the_gpu_overlay_splits_and_asks_for_a_gpu() -> None:
    objects = render("overlays/gpu")
    container = _container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert _config(objects)["VIT_TOPOLOGY"] == "split"
    pod = _by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_keda_scales_on_our_queue_and_the_hpa_alternative_on_cpu() -> None:
    objects = render("overlays/autoscale")
    scaled = _by_kind(objects, "ScaledObject")
    deployment = _by_kind(objects, "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    queue, in_flight = scaled["spec"]["triggers"]
    assert queue["type"] == in_flight["type"] == "prometheus"
    assert "vit_queue_images" in queue["metadata"]["query"]
    assert "vit_inflight_requests" in in_flight["metadata"]["query"]
    monitor = _by_kind(objects, "ServiceMonitor")
    service = _by_kind(objects, "Service")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    hpa = _by_kind(render("overlays/autoscale-cpu"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_the_known_overlays_are_among_those_validated() -> None:
    assert {"overlays/gpu", "overlays/autoscale", "overlays/autoscale-cpu", "overlays/split"} <= (
        set(OVERLAYS)
    )


def test_the_settings_named_in_the_manifests_exist() -> None:
    for overlay in OVERLAYS:
        config = _config(render(overlay))
        unknown = {n for n in config if n.removeprefix("VIT_").lower() not in Settings.model_fields}
        assert not unknown, (overlay, unknown)


def test_crd_sources_are_noted() -> None:
    sources = (KUBERNETES / "crds" / "SOURCES.md").read_text()
    for path in (KUBERNETES / "crds").glob("*.yaml"):
        assert path.name in sources


def test_render_needs_no_cluster(tmp_path: Path) -> None:
    """kubectl kustomize reads files only: it renders with no kubeconfig at all."""
    done = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / "base")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- the split overlay: a CPU front, GPU model pods ------------------------------------------
def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(workload)["containers"]
    result: dict[str, Any] = container
    return result


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _settings(objects: list[dict[str, Any]], container: dict[str, Any]) -> Settings:
    """The settings the container runs with: the ConfigMap, overridden by its own env."""
    assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == [
        _by_kind(objects, "ConfigMap")["metadata"]["name"]
    ]
    values = {**_config(objects), **_env(container)}
    fields: dict[str, Any] = {
        k.removeprefix("VIT_").lower(): v for k, v in values.items() if k.startswith("VIT_")
    }
    assert set(fields) <= set(Settings.model_fields), fields
    return Settings(**fields)


def _selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return selector.items() <= labels.items()


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (match,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return match


def test_the_split_overlay_runs_a_cpu_front_and_gpu_model_pods() -> None:
    objects = render("overlays/split")
    front, model = _by_kind(objects, "Deployment"), _by_kind(objects, "StatefulSet")
    front_box, model_box = _only_container(front), _only_container(model)
    # The front serves the bento's HTTP service; the model pods the model service, on a GPU.
    assert "args" not in front_box and "command" not in front_box
    assert model_box["args"][:3] == ["bentoml", "serve", "service.service:VitModel"]
    for resources in (front_box["resources"], model_box["resources"]):
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert not any("nvidia.com/gpu" in r for r in front_box["resources"].values())
    assert "tolerations" not in _pod(front) and "nodeSelector" not in _pod(front)
    assert model_box["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert model_box["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in _pod(model)["tolerations"])
    front_settings, model_settings = _settings(objects, front_box), _settings(objects, model_box)
    assert front_settings.topology == model_settings.topology == "split"
    assert front_settings.model_endpoints and not front_settings.model_bind
    assert model_settings.model_bind and not model_settings.model_endpoints
    # Each tier plans for a pod of its own: all the front's CPUs decode, the model has its GPU.
    cpus = int(front_box["resources"]["limits"]["cpu"])
    front_plan = make_plan(front_settings, cpus=cpus, cuda_devices=0, model_bytes=None)
    assert front_plan.http_workers == cpus
    model_plan = make_plan(model_settings, cpus=4, cuda_devices=1, model_bytes=None)
    assert model_plan.devices == ("cuda:0",)


def test_the_fronts_list_every_model_pod_the_statefulset_can_create() -> None:
    """ZeroMQ keeps its connections, so a ClusterIP would pin each front to one model pod: the
    fronts connect to every model pod by its own DNS name (``<pod>.<headless service>``), and
    the list covers every pod the ScaledObject may scale to."""
    objects = render("overlays/split")
    model = _by_kind(objects, "StatefulSet")
    model_box = _only_container(model)
    service = _named(objects, "Service", model["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names, no balancing
    assert service["spec"]["publishNotReadyAddresses"] is True  # the socket is the readiness
    assert _selects(service["spec"]["selector"], model)
    bind = urlsplit(_env(model_box)["VIT_MODEL_BIND"])
    assert bind.scheme == "tcp" and bind.hostname == "0.0.0.0"
    (zmq_port,) = [p for p in model_box["ports"] if p["containerPort"] == bind.port]
    (service_port,) = [p for p in service["spec"]["ports"] if p["targetPort"] == zmq_port["name"]]
    scaled = _named(objects, "ScaledObject", "vit-model")
    names = [f"{model['metadata']['name']}-{i}" for i in range(scaled["spec"]["maxReplicaCount"])]
    expected = [
        f"tcp://{name}.{service['metadata']['name']}:{service_port['port']}" for name in names
    ]
    endpoints = _env(_only_container(_by_kind(objects, "Deployment")))["VIT_MODEL_ENDPOINTS"]
    assert endpoints.split(",") == expected
    assert model["spec"]["replicas"] <= len(expected)
    assert model["spec"]["podManagementPolicy"] == "Parallel"  # a scale-up loads all at once
    # Only the fronts may send batches (ZeroMQ's port has no authentication).
    policy = _named(objects, "NetworkPolicy", "vit-model")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], model)
    (zmq_rule,) = [r for r in policy["spec"]["ingress"] if r.get("from")]
    assert zmq_rule["ports"] == [{"port": zmq_port["name"]}]
    (source,) = zmq_rule["from"]
    assert _selects(source["podSelector"]["matchLabels"], _by_kind(objects, "Deployment"))


def test_each_split_tier_has_its_own_service_budget_and_scaler() -> None:
    objects = render("overlays/split")
    front, model = _by_kind(objects, "Deployment"), _by_kind(objects, "StatefulSet")
    tiers = {"Deployment": front, "StatefulSet": model}
    for name, workload in (("vit-serve", front), ("vit-model", model)):
        other = model if workload is front else front
        selector = _named(objects, "Service", name)["spec"]["selector"]
        assert _selects(selector, workload) and not _selects(selector, other)
        budget = _named(objects, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"]
        assert _selects(budget, workload) and not _selects(budget, other)
    # The front on CPU (an HPA), the model tier on its queue (KEDA), never the same target.
    hpa = _by_kind(objects, "HorizontalPodAutoscaler")["spec"]
    assert tiers[hpa["scaleTargetRef"]["kind"]] is front
    assert hpa["scaleTargetRef"]["name"] == front["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    scaled = _by_kind(objects, "ScaledObject")["spec"]
    target = scaled["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "StatefulSet")
    assert target["name"] == model["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == 'sum(vit_queue_images{service="vit-model"})'
    assert scaled["minReplicaCount"] >= 2  # one serves while another rolls or is lost
    # Prometheus scrapes both tiers' /metrics, so the model pods' series carry service=vit-model.
    monitor = _by_kind(objects, "ServiceMonitor")["spec"]
    for name in ("vit-serve", "vit-model"):
        service = _named(objects, "Service", name)
        assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_both_split_tiers_probe_drain_and_run_unprivileged_like_the_base() -> None:
    objects = render("overlays/split")
    base_pod = _pod(_by_kind(render("base"), "Deployment"))
    for workload in (_by_kind(objects, "Deployment"), _by_kind(objects, "StatefulSet")):
        pod, container = _pod(workload), _only_container(workload)
        settings = _settings(objects, container)
        assert pod["securityContext"] == base_pod["securityContext"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert _env(container)["BENTOML_HOME"].startswith("/tmp/")
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
        assert pod["volumes"] == base_pod["volumes"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert (
            container["startupProbe"]
            == _only_container(_by_kind(render("base"), "Deployment"))["startupProbe"]
        )
        assert pod["terminationGracePeriodSeconds"] > settings.grace_period_s
        assert settings.drain_delay_s + settings.request_timeout_s <= settings.grace_period_s
        assert settings.on_load_failure == "exit"
