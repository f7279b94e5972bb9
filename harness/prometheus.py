"""A throwaway Prometheus on a loopback port, for the deployment tests and the benchmarks.

``run_prometheus`` starts Debian's ``prometheus`` scraping one target with the repo's rules,
waits for it, and stops it (checking it stopped cleanly); ``Prometheus`` queries it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from harness.serving import REPO, free_port, wait_ready

__all__ = ["JOB", "Labels", "Prometheus", "run_prometheus"]

JOB = "vit-classifier"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus: its base URL, process and log."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """The whole answer of an instant query (``status`` with ``data`` or ``error``)."""
        form = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        answer: dict[str, Any] = httpx.post(
            f"{self.url}/api/v1/query", data=form, timeout=30
        ).json()
        return answer

    def vector(self, expr: str, at: float | None = None) -> dict[Labels, float]:
        """An instant vector as {sorted label pairs: value}; raises on a query error."""
        answer = self.query(expr, at)
        if answer.get("status") != "success":
            raise RuntimeError(f"query failed: {expr}: {answer.get('error')}")
        return {
            tuple(sorted(item["metric"].items())): float(item["value"][1])
            for item in answer["data"]["result"]
        }

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        """The single value of a one-series vector, or None when it is empty."""
        values = list(self.vector(expr, at).values())
        if len(values) > 1:
            raise RuntimeError(f"{expr} returned {len(values)} series")
        return values[0] if values else None

    def last_scrape(self, job: str = JOB) -> float | None:
        """When the latest scrape of ``job`` started (Unix seconds)."""
        # timestamp() of a raw selector is the sample's time; of an expression, the query time.
        return self.scalar(f'timestamp(up{{job="{job}"}})')

    def wait_for_scrape_after(self, moment: float, job: str = JOB, timeout_s: float = 30) -> float:
        """Wait for a successful scrape of ``job`` that started after ``moment``; its time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            scraped_at = self.last_scrape(job)
            if scraped_at is not None and scraped_at > moment + 0.05:
                if self.scalar(f'up{{job="{job}"}}', scraped_at) != 1:
                    raise RuntimeError(f"the scrape of {job} at {scraped_at:.3f} failed")
                return scraped_at
            time.sleep(0.2)
        raise TimeoutError(f"no scrape of {job} after {moment:.3f} within {timeout_s} s")


@contextlib.contextmanager
def run_prometheus(
    target: str | Sequence[str],
    folder: Path,
    *,
    job: str = JOB,
    interval_s: float = 1.0,
    rule_files: Sequence[Path] = (RULES,),
    ready_timeout_s: float = 60.0,
    labels: dict[str, str] | None = None,
) -> Iterator[Prometheus]:
    """Run ``prometheus`` on a free loopback port scraping ``target`` (host:port, or several)
    every ``interval_s``, each series labelled with ``labels`` too (as a ServiceMonitor adds
    ``service``), with its TSDB in ``folder``; stop it at the end and check it stopped cleanly.
    """
    exe = shutil.which("prometheus")
    if exe is None:
        raise RuntimeError("prometheus is not installed: apt-get install -y prometheus")
    port = free_port()
    every = f"{interval_s:g}s"
    static: dict[str, Any] = {"targets": [target] if isinstance(target, str) else list(target)}
    if labels:
        static["labels"] = labels
    config = {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [static]}],
    }
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = folder / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [exe, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(process, f"{prom.url}/-/ready", log, ready_timeout_s, "prometheus")
        yield prom
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code: int | None = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            code = None
    text = log.read_text(errors="replace")
    if code != 0 or "See you next time" not in text:
        raise RuntimeError(f"prometheus did not stop cleanly (exit {code}):\n{text[-3000:]}")
