"""The cluster rehearsal (``loadtests/rehearsal.py``): three replicas configured as the rendered
manifests configure a pod, behind HAProxy health-checking ``/readyz`` as the readinessProbe does,
a real Prometheus, locust through the balancer; a rolling update (surge replica up, then SIGTERM)
and a crash (SIGKILL) mid-run; the KEDA trigger's own query evaluated under load and at rest.
One run (~3 minutes); each test checks one part of its report, which it prints."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loadtests.rehearsal import rehearse, shipped, summary


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("rehearsal")
    result = rehearse(
        folder, users=128, warm_s=12.0, after_term_s=3.0, after_kill_s=5.0, burst_s=25.0
    )
    print("\n" + summary(result))
    (folder / "report.json").write_text(json.dumps(result, indent=2))
    return result


def test_it_runs_the_shipped_configuration(report: dict[str, Any]) -> None:
    ship = shipped()
    for key, value in ship.env.items():
        if key not in ("VIT_WORKERS", "VIT_TORCH_THREADS", "VIT_ACCESS_LOG"):  # 4 pods, 2 cores
            assert report["config"][key] == value
    assert report["readiness_probe"]["httpGet"]["path"] == "/readyz"
    assert report["keda"]["query"] == ship.query


def test_every_replica_served_and_counted_exactly(report: dict[str, Any]) -> None:
    rows = report["per_replica"]
    assert report["requests"]["ok"] > 1000
    for name, row in rows.items():
        assert row["balancer_2xx"] > 0, name  # the surge replica too, once ready
        assert row["balancer_5xx"] == 0, name
        assert row["balancer_log_200"] == row["balancer_2xx"], name
    # Each live or drained replica's own counter matches what the balancer got from it; the
    # killed one's last scrape may precede its last answers.
    for name in ("r0", "r2", "surge"):
        assert rows[name]["own_metrics_200"] == rows[name]["balancer_2xx"], name
    assert 0 < rows["r1"]["own_metrics_200"] <= rows["r1"]["balancer_2xx"]


def test_a_rolling_update_fails_no_request(report: dict[str, Any]) -> None:
    sigterm, ship = report["sigterm"], shipped()
    assert sigterm["exit_status"] == 0
    assert sigterm["failed_requests"] == 0
    # Out of the balancer while it still admitted (the drain delay: longer than a probe period
    # plus its timeout), gone within the grace period.
    probe = report["readiness_probe"]
    noticed_s = probe["periodSeconds"] + probe["timeoutSeconds"]
    assert noticed_s < float(ship.env["VIT_DRAIN_DELAY_S"])
    assert sigterm["balancer_marked_down_after_s"] <= noticed_s
    assert sigterm["exited_after_s"] < ship.grace_s


def test_a_crash_fails_only_what_was_in_flight_and_is_routed_around(
    report: dict[str, Any],
) -> None:
    kill = report["sigkill"]
    # Lost: only requests around the kill (none before, none once the balancer had marked it
    # down); connections it refused were resent elsewhere. How many, against what the replica
    # held, is printed, not asserted: the balancer's sampled sessions undercount what it held,
    # and some clients lose a request the balancer never logged (see loadtests/rehearsal.py).
    assert kill["failures_outside_kill"] == 0
    assert report["requests"]["failed"] == kill["failed_requests"]
    assert kill["failed_requests"] <= report["users"]  # at most one per client
    probe = report["readiness_probe"]
    detect_s = probe["periodSeconds"] * probe.get("failureThreshold", 3)
    assert kill["balancer_marked_down_after_s"] <= detect_s + 0.5
    if kill["last_failure_after_s"] is not None:
        assert kill["last_failure_after_s"] <= kill["balancer_marked_down_after_s"]


def test_overload_is_refused_not_failed(report: dict[str, Any]) -> None:
    burst = report["burst"]
    assert burst["ok"] > 0
    assert burst["failed"] == 0  # past the admission limit: 503 overloaded, nothing else
    assert burst["main_users_refused_before_burst"] == 0  # no refusal before the burst


def test_the_keda_query_rises_under_load_and_falls_at_rest(report: dict[str, Any]) -> None:
    scaling, keda = report["scaling"], report["keda"]
    assert scaling["at_rest_before"] <= keda["activation"]
    assert scaling["under_load_peak"] > keda["threshold"]
    assert scaling["at_rest_after"] <= keda["activation"]
    assert scaling["replicas_at_rest_after"] == keda["min"]
