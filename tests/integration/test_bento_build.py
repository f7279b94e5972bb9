"""`bentoml build` packages what the image needs: the service imports and serves its page from the
built Bento alone, and the default model loads from it.

The container itself is built and run by ``tests/integration/test_container.py``; this test needs
no container engine, so a Bento that would crash the image at start fails here in seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.serving import build_bento
from tests.conftest import REPO

OFFLINE_BENTOFILE = REPO / "deploy" / "container" / "bentofile.yaml"
BASE_IMAGE = "localhost/vit-serve-base:bookworm"

# Run inside the Bento's src/ with nothing of the repo on sys.path: what the image's
# `bentoml serve` imports. Prints what it found as JSON.
_IMPORT_FROM_BENTO = """
import json, sys
src = sys.argv[1]
sys.path.insert(0, src)
from starlette.testclient import TestClient
import service.service as module
import service.web.routes as routes
from service.model.loading import load_model
from service.runtime.settings import DEFAULT_MODEL
client = TestClient(module.FRONT.app)
page = client.get("/ui/")
loaded = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
print(json.dumps({
    "module": module.__file__,
    "ui_dir": str(routes.UI_DIR),
    "default_model": DEFAULT_MODEL,
    "ui_status": page.status_code,
    "ui_body": page.text,
    "num_classes": loaded.info.num_classes,
    "labels": list(loaded.info.label_names),
}))
"""


def _build(home: Path, bentofile: Path | None = None) -> Path:
    tag, bento = build_bento(home, bentofile)
    assert tag.startswith("vit-classifier:")
    return bento


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("bentoml-home"))


def _files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def test_bento_holds_the_service_the_page_and_the_model(bento: Path) -> None:
    src = bento / "src"
    assert (src / "service" / "service.py").is_file()
    for name in ("config.json", "model.safetensors"):
        packed = src / "models" / "vit-digits" / name
        assert packed.is_file(), f"the Bento lacks the default model's {name}"
    ui = _files(REPO / "service" / "web" / "ui")
    assert "index.html" in ui
    assert ui <= _files(src / "service" / "web" / "ui"), "the Bento lacks files of service/web/ui/"
    assert not (src / "tests").exists() and not (src / "loadtests").exists()
    assert not (src / "deploy").exists()


def test_service_imports_and_serves_from_the_bento_alone(bento: Path) -> None:
    """What crashed the image at start: importing the service from the Bento's src/."""
    src = bento / "src"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # -P: the current directory is not put on sys.path; the script puts src/ there itself.
    result = subprocess.run(
        [sys.executable, "-P", "-c", _IMPORT_FROM_BENTO, str(src)],
        cwd=src, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["module"] == str(src / "service" / "service.py")
    assert found["ui_dir"] == str(src / "service" / "web" / "ui")
    assert found["default_model"] == f"local-dir:{src / 'models' / 'vit-digits'}"
    assert found["ui_status"] == 200
    assert found["ui_body"] == (src / "service" / "web" / "ui" / "index.html").read_text()
    assert found["num_classes"] == len(found["labels"]) == 10


def test_bento_manifest_and_requirements(bento: Path) -> None:
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "service.service:VitClassifier"
    envs = {item["name"]: item["value"] for item in manifest["envs"]}
    assert envs["VIT_DEVICE"] == "auto"
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.14.1" in requirements and "bentoml==1.4.40" in requirements
    assert "pytest" not in requirements  # dev tools stay out of the image
    # With a registry, the image builds on the normal Python image.
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, flags=re.MULTILINE), dockerfile[:500]
    assert "EXPOSE 3000" in dockerfile
    # The gRPC port is served from the Bento's settings (BentoML's Dockerfile exposes 3000
    # only; the offline base image declares 3001: test_the_offline_base_exposes_the_grpc_port).
    assert envs["VIT_GRPC_PORT"] == "3001"


def test_offline_bentofile_differs_only_in_the_base_image() -> None:
    """deploy/container/bentofile.yaml is bentofile.yaml with docker.base_image set to the image
    deploy/container/base-images.sh makes: nothing else may drift between the two."""
    main = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    offline = yaml.safe_load(OFFLINE_BENTOFILE.read_text())
    assert {k: v for k, v in offline.items() if k != "docker"} == {
        k: v for k, v in main.items() if k != "docker"
    }
    assert "base_image" not in main["docker"]
    assert offline["docker"]["base_image"] == BASE_IMAGE
    assert offline["docker"]["python_version"] == main["docker"]["python_version"]
    script = (REPO / "deploy" / "container" / "base-images.sh").read_text()
    assert f"BASE_IMAGE={BASE_IMAGE}" in script


def test_offline_bento_builds_from_the_local_base(tmp_path: Path) -> None:
    bento = _build(tmp_path / "home", OFFLINE_BENTOFILE)
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(BASE_IMAGE)}\b", dockerfile, flags=re.MULTILINE)
    assert (bento / "src" / "service" / "web" / "ui" / "index.html").is_file()
    assert (bento / "src" / "models" / "vit-digits" / "model.safetensors").is_file()


def test_a_split_build_lists_both_services(tmp_path: Path) -> None:
    """The HTTP service depends on the model service when the plan is ``split`` (as on a GPU
    host), so the Bento records both; the default plan on this CPU is one replica per core."""
    _tag, bento = build_bento(tmp_path / "home", env={"VIT_TOPOLOGY": "split"})
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    services = {svc["name"]: svc for svc in manifest["services"]}
    assert set(services) == {"vit-classifier", "vit-model"}
    assert services["vit-classifier"]["dependencies"]
    assert services["vit-model"]["config"]["workers"] == 1  # one model process per device
    envs = {env["name"]: env["value"] for env in manifest["envs"]}
    assert envs["VIT_WORKERS"] == "0" and envs["VIT_TOPOLOGY"] == "auto"


def test_the_offline_base_exposes_the_grpc_port() -> None:
    """Images built on the offline base inherit its EXPOSE 3001 (the Open Inference Protocol's
    gRPC port, the Bento's VIT_GRPC_PORT); the container check reads it off the built image."""
    containerfile = (REPO / "deploy" / "container" / "base.Containerfile").read_text()
    assert re.search(r"^EXPOSE 3001$", containerfile, flags=re.MULTILINE)
    main = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    envs = {item["name"]: item["value"] for item in main["envs"]}
    assert envs["VIT_GRPC_PORT"] == "3001"
