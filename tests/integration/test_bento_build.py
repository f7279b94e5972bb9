"""`bentoml build` packages the service and its default model, as the container build needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def test_bentoml_build(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("vit-classifier:")
    bento = tmp_path / "home" / "bentos" / "vit-classifier" / tag.split(":", 1)[1]
    src = bento / "src"
    assert (src / "service" / "service.py").is_file()
    assert (src / "models" / "vit-digits" / "model.safetensors").is_file()
    assert not (src / "tests").exists() and not (src / "loadtests").exists()
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "service.service:VitClassifier"
    envs = {item["name"]: item["value"] for item in manifest["envs"]}
    assert envs["VIT_DEVICE"] == "auto"
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.14.1" in requirements and "bentoml==1.4.40" in requirements
    assert "pytest" not in requirements  # dev tools stay out of the image
