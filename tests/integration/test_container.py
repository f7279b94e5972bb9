"""The service image, built with podman from Debian packages and run for real: ``make
container-test`` (``loadtests/container_check.py``) under pytest.

Needs root and Debian's ``podman``, ``runc`` and ``mmdebstrap`` (``.ci/run`` installs them), a
Debian mirror and PyPI for the first build, and ~8 GB of disk for the images, which stay cached:
a cold run takes ~5 minutes, a warm one under a minute. Without podman this test fails and says
what to install.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CPUS = 1
IMAGES = 100
GRACE_S = 30


@pytest.mark.timeout(2400)
def test_container_builds_serves_and_stops(tmp_path: Path) -> None:
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is not installed: apt-get install -y podman runc mmdebstrap")
    out = tmp_path / "container-test.json"
    command = [sys.executable, "-m", "loadtests.container_check", "--out", str(out),
               "--cpus", str(CPUS), "--images", str(IMAGES), "--grace", str(GRACE_S)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=2300)
    print(result.stdout)
    assert out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    facts = report["facts"]
    assert result.returncode == 0 and not report["problems"], "\n".join(report["problems"])

    # The same findings, spelled out (the script's checks are not taken on trust).
    assert "models/vit-digits/model.safetensors" in facts["image_files"]
    assert "service/web/ui/index.html" in facts["image_files"]
    assert facts["offline_ready_s"] is not None
    assert facts["digits_sent"] == IMAGES and facts["accuracy"] >= 0.95
    assert facts["prometheus_images_total"] == facts["images_sent"] > IMAGES
    assert facts["runtime"]["cpus"] == facts["runtime"]["torch_threads"] == CPUS
    assert facts["uid"] != 0 and facts["pid1_uid"] != 0
    assert facts["exit_code"] == 0 and facts["stop_s"] < GRACE_S
    assert all(facts["ui_files_served"].values())
    assert facts["image_size_bytes"] > 0
