"""The deployment: compose files, Prometheus config and rules, the Grafana dashboard, and a real
Prometheus scraping a real two-worker ``bentoml serve``.

Needs Debian's ``prometheus`` (``prometheus`` and ``promtool``) and ``docker-compose`` packages;
without them these tests fail and say what to install (no Docker engine is needed).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from harness.prometheus import JOB, Prometheus, run_prometheus
from harness.serving import Server, scrape, serve
from models.digits import load_split, render_digit
from service.metrics import DEVICE_STAGES, STAGES
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES_YML = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vit-serve.json"
COMPOSE = "docker-compose.yml"
COMPOSE_GPU = "docker-compose.gpu.yml"

# Two HTTP workers and a model process: every vit_* metric is written by several processes.
SERVE_ENV = {"VIT_TOPOLOGY": "split", "VIT_WORKERS": "2", "VIT_ACCESS_LOG": "false"}
ALERTS = {"VitServiceDown", "VitHighLatencyP95", "VitHighErrorRatio", "VitNoTraffic"}


def _tool(name: str, package: str) -> str:
    """The path of a command-line tool, or a test failure saying which package provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: install the Debian package with "
            f"`apt-get install -y {package}` (see .ci/run)"
        )
    return path


# --- docker compose ---------------------------------------------------------------------------


def _compose_config(
    tmp_path: Path, *files: str, password: str | None = "s3cret"
) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` on the given files, isolated from the caller's environment."""
    exe = _tool("docker-compose", "docker-compose")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GRAFANA_", "VIT_", "LOCUST_", "COMPOSE_", "DOCKER_"))
    }
    if password is not None:
        env["GRAFANA_ADMIN_PASSWORD"] = password
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    command = [exe, "--project-directory", str(REPO), "--env-file", str(empty_env_file)]
    for file in files:
        command += ["-f", str(REPO / file)]
    command += ["--profile", "loadtest", "config"]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _parsed_config(tmp_path: Path, *files: str) -> dict[str, Any]:
    result = _compose_config(tmp_path, *files)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def _published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host ip, published port) of each port; short strings (compose 1.x) or long form (v2)."""
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append((str(entry.get("host_ip", "")), str(entry.get("published", ""))))
        else:
            parts = str(entry).split("/")[0].split(":")
            ports.append((parts[0] if len(parts) == 3 else "", parts[-2] if len(parts) > 1 else ""))
    return ports


def test_compose_config_is_valid_and_hardened(tmp_path: Path) -> None:
    config = _parsed_config(tmp_path, COMPOSE)
    services = config["services"]
    assert set(services) == {"vit-classifier", "prometheus", "grafana", "locust"}

    expected_ports = {
        "vit-classifier": [("127.0.0.1", "3000"), ("127.0.0.1", "3001")],
        "prometheus": [("127.0.0.1", "9090")],
        "grafana": [("127.0.0.1", "3002")],
        "locust": [],
    }
    for name, service in services.items():
        assert _published_ports(service) == expected_ports[name], (name, service.get("ports"))
        if name != "locust":
            assert service.get("restart") == "unless-stopped", name
            test = service.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), (name, test)
        image = service["image"]
        if name != "vit-classifier":
            repo_name, _, tag = image.rpartition(":")
            assert repo_name and tag and tag != "latest", f"{name}: pin the image tag ({image})"

    classifier = services["vit-classifier"]
    assert classifier["image"] == "vit-classifier:latest"
    assert "/readyz" in " ".join(classifier["healthcheck"]["test"])
    assert "urllib" in " ".join(classifier["healthcheck"]["test"])
    assert classifier["environment"]["VIT_DEVICE"] == "auto"

    def condition(service: str, dependency: str) -> str:
        return str(services[service]["depends_on"][dependency]["condition"])

    assert condition("prometheus", "vit-classifier") == "service_healthy"
    assert condition("grafana", "prometheus") == "service_healthy"
    assert condition("locust", "vit-classifier") == "service_healthy"

    prometheus_mounts = " ".join(map(str, services["prometheus"]["volumes"]))
    assert f"{DEPLOY / 'prometheus'}:/etc/prometheus" in prometheus_mounts

    grafana = services["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    grafana_mounts = " ".join(map(str, grafana["volumes"]))
    assert f"{DEPLOY / 'grafana' / 'provisioning'}:/etc/grafana/provisioning" in grafana_mounts
    assert f"{DEPLOY / 'grafana' / 'dashboards'}:/var/lib/grafana/dashboards" in grafana_mounts

    locust = services["locust"]
    assert locust["profiles"] == ["loadtest"]
    command = [str(part) for part in locust["command"]]
    assert "/mnt/loadtests/locustfile.py" in command
    assert "--headless" in command and "--run-time" in command and "--users" in command
    assert "http://vit-classifier:3000" in command
    mounts = " ".join(map(str, locust["volumes"]))
    assert f"{REPO / 'loadtests'}:/mnt/loadtests" in mounts
    # The locustfile imports harness.samples -> models.digits: each package under /mnt.
    assert f"{REPO / 'harness'}:/mnt/harness" in mounts
    assert f"{REPO / 'models'}:/mnt/models" in mounts
    assert locust["environment"]["PYTHONPATH"] == "/mnt"
    assert locust["build"]["context"] == str(DEPLOY / "locust")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


def test_locust_image_matches_the_project_pins() -> None:
    """deploy/locust builds FROM the locust the project pins, adding the same library pins."""
    dockerfile = (DEPLOY / "locust" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert base == f"locustio/locust:{_pins(REPO / 'requirements-dev.txt')['locust']}"
    extra = _pins(DEPLOY / "locust" / "requirements.txt")
    assert {"httpx", "numpy", "pillow", "scikit-learn"} <= set(extra)
    constraints = _pins(REPO / "constraints.txt")
    assert {name: constraints.get(name) for name in extra} == extra


def test_compose_gpu_override_reserves_a_gpu(tmp_path: Path) -> None:
    classifier = _parsed_config(tmp_path, COMPOSE, COMPOSE_GPU)["services"]["vit-classifier"]
    devices = classifier["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device.get("capabilities", []) for device in devices), devices
    assert classifier["environment"]["VIT_DEVICE"] == "cuda"
    assert classifier["ports"], "the override must keep the base service's settings"


def test_compose_refuses_to_start_without_grafana_password(tmp_path: Path) -> None:
    result = _compose_config(tmp_path, COMPOSE, password=None)
    assert result.returncode != 0, "config must fail when GRAFANA_ADMIN_PASSWORD is unset"
    assert "set GRAFANA_ADMIN_PASSWORD" in result.stdout + result.stderr


# --- Prometheus config and rules --------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES_YML.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = _tool("promtool", "prometheus")
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[JOB]["static_configs"][0]["targets"] == ["vit-classifier:3000"]
    # docker-compose.yml mounts deploy/prometheus at /etc/prometheus.
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    config["rule_files"] = [str(RULES_YML)]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_pass_promtool_and_alerts_are_complete() -> None:
    promtool = _tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES_YML)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rules = _rules()
    records = {rule["record"] for rule in rules if "record" in rule}
    assert {"vit:images:rate1m", "vit:stage_duration_seconds:p95_1m"} <= records
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert set(alerts) >= ALERTS
    assert "up{" in alerts["VitServiceDown"]["expr"] and "== 0" in alerts["VitServiceDown"]["expr"]
    for name, rule in alerts.items():
        assert rule.get("for"), f"{name}: needs a `for:`"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        assert rule.get("annotations", {}).get("summary"), name
        assert rule.get("annotations", {}).get("description"), name


_RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="vit-classifier", instance="vit-classifier:3000"}}'
        values: '1 1 1 0x20'
      - series: 'vit_images_total{{outcome="ok"}}'
        values: '0+60x30'
      - series: 'vit_images_total{{outcome="server_error"}}'
        values: '0+10x30'
      - series: 'vit_image_errors_total{{code="overloaded"}}'
        values: '0+10x30'
      - series: 'vit_request_duration_seconds_bucket{{endpoint="classify", le="0.5"}}'
        values: '0+0x30'
      - series: 'vit_request_duration_seconds_bucket{{endpoint="classify", le="1.0"}}'
        values: '0+60x30'
      - series: 'vit_request_duration_seconds_bucket{{endpoint="classify", le="+Inf"}}'
        values: '0+60x30'
    promql_expr_test:
      - expr: 'count by (alertname) (ALERTS{{alertstate="firing"}})'
        eval_time: 20m
        exp_samples:
          - labels: '{{alertname="VitServiceDown"}}'
            value: 1
          - labels: '{{alertname="VitHighErrorRatio"}}'
            value: 1
          - labels: '{{alertname="VitOverloaded"}}'
            value: 1
          - labels: '{{alertname="VitHighLatencyP95"}}'
            value: 1
  - interval: 1m
    input_series:
      - series: 'up{{job="vit-classifier", instance="vit-classifier:3000"}}'
        values: '1x30'
    promql_expr_test:
      - expr: 'count by (alertname) (ALERTS{{alertstate="firing"}})'
        eval_time: 20m
        exp_samples:
          - labels: '{{alertname="VitNoTraffic"}}'
            value: 1
"""


def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires on the situation it describes."""
    promtool = _tool("promtool", "prometheus")
    spec = tmp_path / "rules_test.yml"
    spec.write_text(_RULE_TESTS.format(rules=json.dumps(str(RULES_YML))))
    result = subprocess.run(
        [promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ----------------------------------------------------------------------------------


def _panels() -> list[dict[str, Any]]:
    """Every non-row panel, rows' collapsed panels included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return panels


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]


def test_dashboard_is_complete() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = _panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel.get("gridPos"), panel["title"]
        assert panel.get("targets"), f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            source = target.get("datasource") or panel.get("datasource") or {}
            assert source == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
            assert target.get("expr", "").strip(), panel["title"]

    exprs = [expr for _title, expr in _dashboard_exprs()]

    def has(*needles: str) -> bool:
        return any(all(needle in expr for needle in needles) for expr in exprs)

    needed = {
        "throughput by outcome": has("rate(vit_images_total[", "outcome"),
        "request latency quantiles": has("histogram_quantile(0.95", "vit_request_duration"),
        "batch size mean": has("vit_batch_size_sum", "vit_batch_size_count"),
        "batch size distribution": has("vit_batch_size_bucket"),
        "batch fill ratio": has("vit_batch_fill_ratio"),
        "errors by code": has("vit_image_errors_total", "by (code)"),
        "in-flight requests": has("vit_inflight_requests"),
        "queue depth": has("vit_queue_images"),
        "GPU memory": has("vit_gpu_memory_bytes"),
        "model info": has("vit_model_info"),
    }
    for quantile in ("0.5", "0.95", "0.99"):
        needed[f"stage p{quantile}"] = has(
            f"histogram_quantile({quantile},", "vit_stage_duration_seconds_bucket", "stage"
        )
    assert not [name for name, ok in needed.items() if not ok], needed

    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = datasource["datasources"]
    assert source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text()
    )
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# --- a real Prometheus scraping a real two-worker service -----------------------------------


@dataclass(frozen=True)
class Live:
    server: Server
    prom: Prometheus
    bentoml_home: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Its own two-worker server (counts must not be disturbed by other tests) + Prometheus.

    A BentoML home of its own (as ``serve`` gives by default), named here so the test can read
    the multiprocess metrics files directly.
    """
    folder = tmp_path_factory.mktemp("deploy")
    home = folder / "bentoml-home"
    env = {**SERVE_ENV, "BENTOML_HOME": str(home)}
    _tool("prometheus", "prometheus")
    with (
        serve(env, folder) as server,
        run_prometheus(server.url.removeprefix("http://"), folder) as prom,
    ):
        _wait_for_all_workers(server, 1)  # one model process holds the model
        yield Live(server, prom, home)


def _wait_for_all_workers(server: Server, workers: int, timeout_s: float = 120.0) -> None:
    """/readyz answers for whichever worker takes the connection; wait until every worker has
    loaded its model (each sets its own vit_model_info just before it turns ready)."""
    deadline = time.monotonic() + timeout_s
    while True:
        loaded = [key for key in _series(server.url) if key.startswith("vit_model_info{")]
        if len(loaded) == workers:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{len(loaded)} of {workers} workers ready after {timeout_s} s")
        time.sleep(0.5)


def _png(index: int, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    render_digit(load_split().X_test[index], size).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Sent:
    ok: int
    client_error: int
    codes: dict[str, int]
    classify_requests: int
    batch_requests: int

    @property
    def images(self) -> int:
        return self.ok + self.client_error


async def _post_all(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """POST each (path, httpx kwargs) with 8 concurrent connections."""
    semaphore = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(path: str, kwargs: dict[str, Any]) -> httpx.Response:
            async with semaphore:
                return await client.post(path, **kwargs)

        return list(await asyncio.gather(*(one(path, kw) for path, kw in requests)))


@pytest.fixture(scope="module")
def traffic(live: Live) -> Sent:
    """Known traffic in two phases (so every series has a sample before and after it grows)."""
    good = [_png(i) for i in range(60)]
    png = _png(99)
    bad = {"junk": (b"this is not an image", 415), "truncated": (png[: len(png) // 2], 400)}
    ok = client_error = classify = batches = 0
    codes: dict[str, int] = {}
    for phase in range(2):
        requests: list[tuple[str, dict[str, Any]]] = []
        expected: list[int] = []
        for data in good[phase * 30 : (phase + 1) * 30]:
            requests.append(("/classify", {"files": {"image": ("d.png", data)}}))
            expected.append(200)
        for kind, (data, status) in bad.items():
            for _ in range(phase + 1):
                requests.append(("/classify", {"files": {"image": (f"{kind}.png", data)}}))
                expected.append(status)
        # Two batches of 5: one all good, one with a junk image in the middle.
        for with_bad in (False, True):
            files = [("images", (f"b{i}.png", _png(100 + i))) for i in range(5)]
            if with_bad:
                files[2] = ("images", ("junk.png", bad["junk"][0]))
            requests.append(("/classify_batch", {"files": files, "data": {"top_k": "2"}}))
            expected.append(200)
        responses = asyncio.run(_post_all(live.server.url, requests))
        assert [r.status_code for r in responses] == expected, [r.text[:200] for r in responses]
        for (path, _kw), response in zip(requests, responses, strict=True):
            items = response.json() if path == "/classify_batch" else [response.json()]
            classify += path == "/classify"
            batches += path == "/classify_batch"
            for item in items:
                if "error" in item:
                    client_error += 1
                    codes[item["error"]["code"]] = codes.get(item["error"]["code"], 0) + 1
                else:
                    ok += 1
        live.prom.wait_for_scrape_after(time.time())
    # One more scrape so rate() windows hold the final values twice.
    live.prom.wait_for_scrape_after(time.time())
    assert ok == 60 + 4 * 5 - 2 and client_error == 8
    return Sent(ok, client_error, codes, classify, batches)


def test_prometheus_counts_every_image_across_workers(live: Live, traffic: Sent) -> None:
    prom = live.prom
    assert prom.scalar(f'up{{job="{JOB}"}}') == 1
    assert prom.scalar("count(vit_model_info)") == 1, "one model process holds the model"
    assert prom.scalar("sum(vit_images_total)") == traffic.images
    by_outcome = {dict(k)["outcome"]: v for k, v in prom.vector(
        "sum by (outcome) (vit_images_total)").items()}  # fmt: skip
    assert by_outcome == {"ok": traffic.ok, "client_error": traffic.client_error}
    by_code = {dict(k)["code"]: v for k, v in prom.vector(
        "sum by (code) (vit_image_errors_total)").items()}  # fmt: skip
    assert by_code == traffic.codes
    # Every good image went through exactly one forward pass.
    assert prom.scalar("sum(vit_batch_size_sum)") == traffic.ok
    # Requests per route, merged over the HTTP workers too.
    by_route = {dict(k)["endpoint"]: v for k, v in prom.vector(
        "sum by (endpoint) (vit_requests_total)").items()}  # fmt: skip
    assert by_route == {
        "classify": traffic.classify_requests,
        "classify_batch": traffic.batch_requests,
    }


def test_request_durations_are_exported(live: Live, traffic: Sent) -> None:
    by_endpoint = {dict(k)["endpoint"]: v for k, v in live.prom.vector(
        "sum by (endpoint) (vit_request_duration_seconds_count)").items()}  # fmt: skip
    assert by_endpoint == {
        "classify": traffic.classify_requests,
        "classify_batch": traffic.batch_requests,
        # Made at 0 before ready (ready means warm), both protocol doors open, none asked.
        "oip_infer": 0,
        "oip_grpc_infer": 0,
    }, "vit_request_duration_seconds is missing or wrong on /metrics (dropped by __metrics__?)"


def _substitute(expr: str) -> str:
    """Grafana's variables -> values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
    expr = re.sub(r"\$\{?__(interval|range)\}?", "30s", expr)
    return re.sub(r"\$\{?\w+(:\w+)?\}?", ".*", expr)


def test_every_dashboard_and_rule_expression_evaluates(live: Live, traffic: Sent) -> None:
    cases: list[tuple[str, str, bool]] = []  # (where, expr, must be non-empty)
    for title, expr in _dashboard_exprs():
        cases.append((f"panel {title!r}", _substitute(expr), "vit_gpu_memory_bytes" not in expr))
    for rule in _rules():
        if "record" in rule:
            cases.append((f"record {rule['record']}", rule["expr"], True))
        else:
            cases.append((f"alert {rule['alert']}", rule["expr"], False))
    problems = []
    for where, expr, non_empty in cases:
        answer = live.prom.query(expr)
        if answer.get("status") != "success":
            problems.append(f"{where}: {answer.get('error')} in {expr}")
        elif non_empty and not answer["data"]["result"]:
            problems.append(f"{where}: empty result for {expr}")
    assert not problems, "\n".join(problems)


def test_recording_rules_are_loaded_and_evaluated(live: Live, traffic: Sent) -> None:
    groups = httpx.get(f"{live.prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(_rules())
    records = [rule["record"] for rule in _rules() if "record" in rule]
    deadline = time.monotonic() + 20
    missing = records
    while missing and time.monotonic() < deadline:
        missing = [name for name in records if not live.prom.vector(name)]
        time.sleep(0.5)
    assert not missing, f"recorded series never appeared: {missing}"
    groups = httpx.get(f"{live.prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    unhealthy = [
        (rule["name"], rule.get("lastError"))
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert not unhealthy


def test_stage_quantiles_cover_every_stage(live: Live, traffic: Sent) -> None:
    p50 = live.prom.vector(
        "histogram_quantile(0.5, sum by (le, stage) (rate(vit_stage_duration_seconds_bucket[1m])))"
    )
    by_stage = {dict(labels)["stage"]: value for labels, value in p50.items()}
    # This server decodes with Pillow on the CPU: no device-decode stage.
    assert set(by_stage) == set(STAGES) - DEVICE_STAGES
    assert all(math.isfinite(value) and value >= 0 for value in by_stage.values()), by_stage


# --- what must not change the metrics ---------------------------------------------------------


def _series(url: str) -> dict[str, float]:
    return scrape(url)


def test_health_probes_do_not_count_as_requests(live: Live, traffic: Sent) -> None:
    url = live.server.url

    def counts() -> tuple[float, float]:
        series = _series(url)
        images = sum(v for k, v in series.items() if k.startswith("vit_images_total{"))
        durations = [
            v for k, v in series.items() if k.startswith("vit_request_duration_seconds_count")
        ]
        assert durations, "vit_request_duration_seconds_count is missing from /metrics"
        return images, sum(durations)

    before = counts()
    assert before[0] >= traffic.images
    with httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/healthz", "/readyz", "/livez"):
            assert {client.get(path).status_code for _ in range(50)} == {200}, path
    assert counts() == before


@dataclass(frozen=True)
class Scan:
    """/metrics before and after 500 GETs of random unknown paths."""

    before: dict[str, float]
    after: dict[str, float]
    statuses: set[int]
    render_ms: tuple[float, float]


def _render_ms(url: str) -> float:
    """How long one render of /metrics takes, in ms."""
    started = time.perf_counter()
    httpx.get(f"{url}/metrics", timeout=60).raise_for_status()
    return (time.perf_counter() - started) * 1e3


@pytest.fixture(scope="module")
def scan(live: Live, traffic: Sent) -> Scan:
    url = live.server.url
    with httpx.Client(base_url=url, timeout=60) as client:
        # Let every worker serve a 404 once, so per-worker series that exist anyway are there
        # (a new connection each time: the kernel spreads connections over the workers).
        for _ in range(20):
            httpx.get(f"{url}/nope/{uuid.uuid4()}", timeout=60)
        before, render_before = _series(url), _render_ms(url)
        statuses = {client.get(f"/nope/{uuid.uuid4()}").status_code for _ in range(500)}
    return Scan(before, _series(url), statuses, (render_before, _render_ms(url)))


def test_unknown_paths_add_no_series(scan: Scan) -> None:
    assert scan.statuses == {404}
    added = sorted(set(scan.after) - set(scan.before))
    assert not added, f"{len(added)} new series after 500 unknown paths, e.g. {added[:5]}"
    assert len(scan.after) == len(scan.before)


def test_unknown_paths_add_nothing_to_metric_storage(live: Live, scan: Scan) -> None:
    """Hiding per-path series in ``__metrics__`` is not enough: BentoML still writes them into
    its multiprocess files, which grow without bound and make every /metrics render (and so
    every scrape) slower, until scrapes time out."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(live.bentoml_home / "prometheus_multiproc_dir"))
    stored = [
        sample
        for family in registry.collect()
        for sample in family.samples
        if sample.labels.get("endpoint", "").startswith("/nope/")
    ]
    before_ms, after_ms = scan.render_ms
    assert not stored, (
        f"{len(stored)} samples for unknown paths stored in the multiprocess files after 520 "
        f"GETs (e.g. {stored[0].name}{{endpoint={stored[0].labels['endpoint']!r}}}); "
        f"/metrics took {before_ms:.0f} ms before the 500 and {after_ms:.0f} ms after"
    )
