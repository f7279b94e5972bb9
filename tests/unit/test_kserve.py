"""ViT Serve behind KServe (``deploy/kubernetes/kserve``), validated offline.

The folder renders with ``kubectl kustomize``. Its objects are walked against KServe's own API
types (the ``kserve`` SDK's generated models, and the Kubernetes client's below them: the same
Go types KServe's CRDs are generated from) in ``.venv/kserve`` by ``harness/kserve_types.py``:
unknown fields, wrong JSON types, missing required fields and values outside an enumeration are
refused, and the test shows each is caught. Then what the objects must say about this service:
the Open Inference Protocol over REST and over gRPC, on the ports and with the settings the
service reads, probed on its readiness, unprivileged.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.model.loading import parse_source
from service.runtime.settings import DEFAULT_MODEL, Settings
from tests.conftest import REPO
from tests.unit.test_kubernetes import KUBERNETES, _named, render

KSERVE_PYTHON = REPO / ".venv" / "kserve" / "bin" / "python"
SDK_VERSION = "0.21.0"


def validate(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """``harness.kserve_types`` over ``objects``, in the KServe venv."""
    assert KSERVE_PYTHON.is_file(), "no .venv/kserve: `make install` creates it"
    done = subprocess.run(
        [str(KSERVE_PYTHON), "-m", "harness.kserve_types"],
        input=json.dumps(objects), cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render("kserve")


def test_every_object_validates_against_kserves_types(objects: list[dict[str, Any]]) -> None:
    result = validate(objects)
    assert result["versions"]["kserve"] == SDK_VERSION
    assert result["checked"] == len(objects) == 3
    assert result["problems"] == []


def test_what_the_validation_refuses(objects: list[dict[str, Any]]) -> None:
    """Each kind of mistake, made once in a copy of the rendered objects, is named."""
    broken = copy.deepcopy(objects)
    isvc = _named(broken, "InferenceService", "vit-digits")
    isvc["spec"]["predictor"]["minReplica"] = 2  # misspelt
    isvc["spec"]["predictor"]["model"]["protocolVersion"] = 2  # not a string
    runtime = _named(broken, "ServingRuntime", "vit-serve")
    del runtime["spec"]["containers"][0]["name"]  # required
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "3000"  # not an integer
    problems = "\n".join(validate(broken)["problems"])
    assert "spec.predictor.minReplica: unknown field" in problems
    assert "spec.predictor.model.protocolVersion: str expected" in problems
    assert "spec.containers[0]: V1Container" in problems and "name" in problems
    assert "spec.containers[0].ports[0].containerPort: int expected" in problems


def test_both_protocols_reach_the_ports_the_service_serves(objects: list[dict[str, Any]]) -> None:
    defaults = Settings()
    runtime = _named(objects, "ServingRuntime", "vit-serve")
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == "vit-classifier:latest"  # the base's image name
    env = {item["name"]: item["value"] for item in container["env"]}
    assert int(env["VIT_GRPC_PORT"]) == defaults.grpc_port
    # Knative names a predictor's one port by its protocol: http1 or h2c.
    assert container["ports"] == [{"name": "http1", "containerPort": 3000, "protocol": "TCP"}]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}

    rest = _named(objects, "InferenceService", "vit-digits")["spec"]["predictor"]["model"]
    grpc = _named(objects, "InferenceService", "vit-digits-grpc")["spec"]["predictor"]["model"]
    for model in (rest, grpc):
        assert model["runtime"] == runtime["metadata"]["name"]
        assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert rest["protocolVersion"] == "v2" and "ports" not in rest
    assert rest["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 3000}
    assert grpc["protocolVersion"] == "grpc-v2"
    assert grpc["ports"] == [
        {"name": "h2c", "containerPort": defaults.grpc_port, "protocol": "TCP"}
    ]
    # grpc.health.v1 answers NOT_SERVING until the model is warm and from SIGTERM on.
    assert grpc["readinessProbe"]["grpc"] == {"port": defaults.grpc_port}


def test_the_model_name_is_the_one_the_service_reports(objects: list[dict[str, Any]]) -> None:
    """KServe's REST URL names the InferenceService; the protocol's path names the model, as
    ``GET /model`` reports it (a local folder's name): for the default model both are the same."""
    kind, location, _arch = parse_source(DEFAULT_MODEL)
    assert kind == "local-dir"
    assert _named(objects, "InferenceService", Path(location).name)


def test_the_runtime_runs_unprivileged_and_drains(objects: list[dict[str, Any]]) -> None:
    runtime = _named(objects, "ServingRuntime", "vit-serve")
    (container,) = runtime["spec"]["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 1034
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["BENTOML_HOME"].startswith("/tmp/")
    fields = {k.removeprefix("VIT_").lower(): v for k, v in env.items() if k.startswith("VIT_")}
    settings = Settings(**fields)  # every VIT_ name is a setting, every value valid
    assert settings.request_timeout_s < settings.grace_period_s
    assert settings.on_load_failure == "exit"
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests["cpu"] == limits["cpu"]  # the service plans its processes from the quota


def test_the_folder_is_validated_beside_the_overlays() -> None:
    assert (KUBERNETES / "kserve" / "kustomization.yaml").is_file()
