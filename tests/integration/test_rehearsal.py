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
        folder, users=128, warm_s=12.0, after_term_s=3.0, after_kill_s=5.0, burst_s=20.0
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
    assert [t["query"] for t in report["keda"]["triggers"]] == [t.query for t in ship.triggers]


def test_every_replica_served_and_counted_exactly(report: dict[str, Any]) -> None:
    rows = report["per_replica"]
    assert report["requests"]["ok"] > 1000
    for name, row in rows.items():
        assert row["balancer_2xx"] > 0, name  # the surge replica too, once ready
        assert row["balancer_log_200"] <= row["balancer_2xx"], name
    # The balancer's log has every 200 its counters have, but for lines it says it dropped.
    unlogged = sum(row["balancer_2xx"] - row["balancer_log_200"] for row in rows.values())
    assert unlogged <= report["balancer_dropped_log_lines"]
    # Its only 5xx: the burst's refusals (503 overloaded), each one a client was told.
    refused = report["requests"]["refused_overloaded"] + report["burst"]["refused_overloaded"]
    assert sum(row["balancer_5xx"] for row in rows.values()) == refused
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
    # Lost: only requests the replica held as it died (in flight at the kill, or accepted by its
    # still-open socket while the kernel tore it down), by the balancer's counters for it; none
    # before the kill, none elsewhere; connections it refused were resent elsewhere.
    assert kill["failures_outside_kill"] == 0
    assert report["requests"]["failed"] == kill["failed_requests"]
    assert kill["failed_requests"] <= kill["held"]
    # Each request the balancer saw go unanswered on it failed at its client (some the
    # balancer never logged: see loadtests/rehearsal.py); a client can also lose one whose
    # answer the replica had begun to send as it died.
    assert kill["lost_per_balancer"] <= kill["failed_requests"]
    probe = report["readiness_probe"]
    detect_s = probe["periodSeconds"] * probe.get("failureThreshold", 3)
    assert kill["balancer_marked_down_after_s"] <= detect_s + 0.5
    # Routed around: no request sent once the balancer has marked it down fails. (When the held
    # ones fail is not the test: the kernel closes a killed process's sockets only once it has
    # torn the process down, which can come after the health check has marked it down. In one
    # CI run 20 requests sent 0.19-0.30 s before the kill failed 0.158-0.161 s after it, the
    # mark-down seen at 0.12 s.)
    if kill["last_failed_sent_after_s"] is not None:
        assert kill["last_failed_sent_after_s"] <= kill["balancer_marked_down_after_s"]


def test_overload_is_refused_not_failed(report: dict[str, Any]) -> None:
    burst = report["burst"]
    assert burst["ok"] > 0
    assert burst["failed"] == 0  # past the admission limit: 503 overloaded, nothing else
    assert burst["main_users_refused_before_burst"] == 0  # no refusal before the burst


def test_the_keda_queries_rise_under_load_and_fall_at_rest(report: dict[str, Any]) -> None:
    scaling, keda = report["scaling"], report["keda"]
    triggers = keda["triggers"]
    for key in ("at_rest_before", "at_rest_after"):
        assert all(v <= t["activation"] for v, t in zip(scaling[key], triggers, strict=True)), key
    # Under the load one signal at least is past its target. (How many replicas KEDA then asks
    # for is printed: locust shares the two cores, and cannot load two replicas much past it.)
    assert any(
        v > t["threshold"] for v, t in zip(scaling["under_load_peak"], triggers, strict=True)
    )
    assert scaling["replicas_at_rest_after"] == keda["min"]
