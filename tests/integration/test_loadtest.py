"""The load test itself: a short real locust run passes, and its thresholds can fail it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.serving import REPO, Server


def _run(server: Server, results: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "loadtests.loadtest", "--host", server.url,
               "--users", "8", "--spawn-rate", "8", "--photos", "off",
               "--results", str(results), *extra]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)


def test_short_locust_run_passes_and_nothing_is_lost(server: Server, tmp_path: Path) -> None:
    run = _run(server, tmp_path, "--duration", "15", "--max-p95-ms", "10000", "--bad-share", "0.1")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "$ " in output and "locustfile.py --headless" in output  # the command is shown
    assert "service counted" in output and "batch-size distribution" in output
    assert "LOADTEST FAILED" not in output
    stats = (tmp_path / "loadtest_stats.csv").read_text()
    assert "/classify [bad upload]" in stats or "/classify [digit" in stats
    assert "/classify_batch [2-16 images]" in stats
    assert (tmp_path / "loadtest.html").stat().st_size > 10_000


def test_p95_threshold_fails_the_run(server: Server, tmp_path: Path) -> None:
    run = _run(server, tmp_path, "--duration", "5", "--max-p95-ms", "0.001")
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "LOADTEST FAILED: p95" in output
