"""A policy scan (checkov) of the rendered Kubernetes manifests (``deploy/kubernetes``).

The base and every overlay (found when the tests are collected, so a new overlay is scanned with no
change here) render with ``kubectl kustomize``; checkov scans each rendering on its own with
``deploy/kubernetes/policy/checkov.yaml``, and no check may fail. Every skip in that file gives its
reason and still fails somewhere without the skip, so the list cannot rot. The image and namespace
skips pass in an overlay that pins the image by digest and names a namespace, as a deployment's
does. A privileged, root, unbounded Deployment fails the scan: it can fail. Checkov runs offline from
its own venv, ``.venv/checkov`` (``requirements-checkov.txt``); without it these tests fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
CONFIG = KUBERNETES / "policy" / "checkov.yaml"
CHECKOV = REPO / ".venv" / "checkov" / "bin" / "checkov"
CHECKOV_REQUIREMENTS = REPO / "requirements-checkov.txt"
_KUSTOMIZATIONS = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# The skipped checks that a deployment's own overlay passes: the image pinned by digest (tag,
# digest, pull policy) and a namespace named.
_PASS_IN_A_DEPLOYMENT_OVERLAY = {"CKV_K8S_14", "CKV_K8S_15", "CKV_K8S_21", "CKV_K8S_43"}
_DIGEST = "sha256:" + "0" * 64


def _targets() -> list[str]:
    """The base and every overlay with a kustomization, relative to deploy/kubernetes."""
    overlays = sorted(
        folder.relative_to(KUBERNETES).as_posix()
        for folder in (KUBERNETES / "overlays").iterdir()
        if any((folder / name).is_file() for name in _KUSTOMIZATIONS)
    )
    return ["base", *overlays]


TARGETS = _targets()


def _render(target: Path, out: Path) -> Path:
    """``kubectl kustomize TARGET`` written to ``out``."""
    done = subprocess.run(
        ["kubectl", "kustomize", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out.write_text(done.stdout)
    return out


def _pinned_version() -> str:
    match = re.search(r"^checkov==(\S+)$", CHECKOV_REQUIREMENTS.read_text(), re.MULTILINE)
    assert match, f"{CHECKOV_REQUIREMENTS.name} pins no checkov"
    return match.group(1)


def _scan(rendered: list[Path], config: Path, *args: str) -> dict[str, Any]:
    """Checkov's JSON report on the rendered files. It runs offline (skip-download in the config,
    no PyPI version check) and sees none of the caller's CKV_* variables or ~/.checkov.yaml."""
    home = rendered[0].parent
    files = [arg for path in rendered for arg in ("-f", str(path))]
    done = subprocess.run(
        [str(CHECKOV), "--config-file", str(config), *files, "-o", "json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=home,
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "TMPDIR": str(home),
            "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
        },
    )
    # 0: nothing failed, 1: something did; anything else is checkov itself failing.
    assert done.returncode in (0, 1), done.stderr[-4000:]
    report: dict[str, Any] = json.loads(done.stdout)
    assert "results" in report, f"checkov found nothing to check: {report}"
    assert report["summary"]["parsing_errors"] == 0, done.stdout
    assert report["summary"]["checkov_version"] == _pinned_version(), "reinstall: make install"
    assert (done.returncode == 1) == bool(_failed(report)), done.stderr[-4000:]
    return report


def _failed(report: dict[str, Any]) -> list[dict[str, Any]]:
    failed: list[dict[str, Any]] = report["results"].get("failed_checks", [])
    return failed


def _passed_ids(report: dict[str, Any]) -> set[str]:
    return {check["check_id"] for check in report["results"].get("passed_checks", [])}


def _reasons() -> dict[str, str]:
    """Each skipped check id in checkov.yaml -> the comment lines right above it, joined."""
    lines = CONFIG.read_text().splitlines()
    reasons = {}
    for check_id in yaml.safe_load(CONFIG.read_text())["skip-check"]:
        at = [
            n
            for n, line in enumerate(lines)
            if re.fullmatch(rf"\s*- {re.escape(check_id)}\s*", line)
        ]
        assert len(at) == 1, f"{check_id} is listed {len(at)} times"
        above: list[str] = []
        for line in reversed(lines[: at[0]]):
            if not line.lstrip().startswith("#"):
                break
            above.insert(0, line.lstrip().removeprefix("#").strip())
        reasons[check_id] = " ".join(above)
    return reasons


def _config_without_skips(folder: Path) -> Path:
    settings = yaml.safe_load(CONFIG.read_text())
    del settings["skip-check"]
    path = folder / "checkov-without-skips.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@dataclass(frozen=True)
class _Scans:
    """One target's reports: with checkov.yaml as it is, and with its skips removed."""

    configured: dict[str, Any]
    unskipped: dict[str, Any]


@pytest.fixture(scope="module")
def checkov() -> Path:
    if not CHECKOV.is_file():
        pytest.fail(
            f"checkov is not installed at {CHECKOV.relative_to(REPO)}: `make install` installs it "
            f"(python3.11 -m venv .venv/checkov && .venv/checkov/bin/pip install -r "
            f"{CHECKOV_REQUIREMENTS.name})",
            pytrace=False,
        )
    return CHECKOV


@pytest.fixture(scope="module")
def scans(
    checkov: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[_Scans]]]:
    """Every target rendered and scanned twice, the targets in parallel (checkov takes seconds to
    start). Each target is scanned alone: checkov links objects across the files of one run, so a
    NetworkPolicy in one overlay would count for the pods of another."""
    without_skips = _config_without_skips(tmp_path_factory.mktemp("config"))

    def scan(target: str) -> _Scans:
        folder = tmp_path_factory.mktemp(target.replace("/", "-"))
        rendered = _render(KUBERNETES / target, folder / "rendered.yaml")
        return _Scans(_scan([rendered], CONFIG), _scan([rendered], without_skips))

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        yield {target: pool.submit(scan, target) for target in TARGETS}


def test_every_skip_is_a_check_id_with_a_reason() -> None:
    settings = yaml.safe_load(CONFIG.read_text())
    assert settings["skip-download"] is True  # offline: no platform metadata, no suppressions
    assert settings["framework"] == ["kubernetes"]
    for check_id, reason in _reasons().items():
        # An id, not a severity or a wildcard, which would skip checks that nobody looked at.
        assert re.fullmatch(r"CKV2?_K8S_\d+", check_id), check_id
        assert len(reason.split()) >= 12, f"{check_id} needs a reason in the lines above it"


@pytest.mark.parametrize("target", TARGETS)
def test_no_check_fails(target: str, scans: dict[str, Future[_Scans]]) -> None:
    report = scans[target].result().configured
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in _failed(report)]
    assert not failed, "\n".join(failed)
    assert report["summary"]["passed"] > 0


def test_every_skip_fails_somewhere_without_it(scans: dict[str, Future[_Scans]]) -> None:
    failing = {
        check["check_id"]
        for future in scans.values()
        for check in _failed(future.result().unskipped)
    }
    stale = set(_reasons()) - failing
    assert not stale, (
        f"{sorted(stale)} fail nowhere without the skip (or are no check): drop them from "
        f"{CONFIG.name}"
    )


@pytest.mark.usefixtures("checkov")
def test_a_deployments_overlay_passes_the_image_and_namespace_checks(tmp_path: Path) -> None:
    """The skipped image and namespace checks pass once an overlay pins the image by digest and
    names a namespace, as a deployment's own overlay does (base/kustomization.yaml says how)."""
    assert set(_reasons()) >= _PASS_IN_A_DEPLOYMENT_OVERLAY
    rendered = []
    for target in TARGETS:
        folder = tmp_path / target.replace("/", "-")
        folder.mkdir()
        kustomization = {
            "resources": [os.path.relpath(KUBERNETES / target, folder)],
            "namespace": "vit-serve",
            "images": [
                {
                    "name": "vit-classifier",
                    "newName": "registry.example.com/vit-classifier",
                    "digest": _DIGEST,
                }
            ],
        }
        (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        rendered.append(_render(folder, tmp_path / f"{folder.name}.yaml"))
    # These four checks look at one object at a time, so one run may hold every target.
    checks = ",".join(sorted(_PASS_IN_A_DEPLOYMENT_OVERLAY))
    report = _scan(rendered, _config_without_skips(tmp_path), "--check", checks)
    assert not _failed(report), [(c["check_id"], c["resource"]) for c in _failed(report)]
    assert _passed_ids(report) == _PASS_IN_A_DEPLOYMENT_OVERLAY


@pytest.mark.usefixtures("checkov")
def test_a_privileged_root_unbounded_deployment_fails(tmp_path: Path) -> None:
    """The scan can fail: the base's Deployment made privileged, root, able to escalate and
    without resources fails the checks for each, with checkov.yaml's skips in place."""
    base = _render(KUBERNETES / "base", tmp_path / "base.yaml")
    objects = [doc for doc in yaml.safe_load_all(base.read_text()) if doc]
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    pod["securityContext"].update(runAsNonRoot=False, runAsUser=0)
    container = pod["containers"][0]
    container["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)
    del container["resources"]
    rendered = tmp_path / "bad.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    failed = {check["check_id"] for check in _failed(_scan([rendered], CONFIG))}
    assert {
        "CKV_K8S_16",  # privileged
        "CKV_K8S_20",  # allowPrivilegeEscalation
        "CKV_K8S_23",  # root containers admitted
        "CKV_K8S_10",  # no CPU request
        "CKV_K8S_11",  # no CPU limit
        "CKV_K8S_12",  # no memory request
        "CKV_K8S_13",  # no memory limit
    } <= failed, sorted(failed)
