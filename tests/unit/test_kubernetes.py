"""The Kubernetes manifests (``deploy/kubernetes``), validated offline.

Every overlay renders with ``kubectl kustomize``; built-in kinds validate in strict mode (unknown
fields refused) against Kubernetes' own schemas (``kubernetes-validate``); the custom resources
(KEDA's ScaledObject, the Prometheus operator's ServiceMonitor) validate against the CRD schemas
kept in ``deploy/kubernetes/crds`` with unknown fields refused too. Then what the manifests must
say about this service: probes on our endpoints, a grace period that covers the drain, non-root
with a read-only root, the GPU overlay's split topology, the queue metric KEDA scales on.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from tests.conftest import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ["base", "overlays/gpu", "overlays/autoscale", "overlays/autoscale-cpu"]
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
    settings = Settings(**{name.removeprefix("VIT_").lower(): v for name, v in config.items()})
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
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "vit_queue_images" in trigger["metadata"]["query"]
    monitor = _by_kind(objects, "ServiceMonitor")
    service = _by_kind(objects, "Service")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    hpa = _by_kind(render("overlays/autoscale-cpu"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


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
