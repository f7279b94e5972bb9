"""The crash's accounting in the cluster rehearsal (``loadtests/rehearsal.py``), from HAProxy's
counters for the killed server: what it held, and what it never answered."""

from __future__ import annotations

from loadtests.rehearsal import _held


def _row(**counts: int) -> dict[str, str]:
    return {key: str(value) for key, value in counts.items()}


def test_a_session_answered_but_not_closed_at_the_snapshot_is_not_lost() -> None:
    # Before the kill: 100 sessions taken, 99 answered, 2 open; one of the two open ones has
    # had its answer counted and closes a moment later. After: 3 more taken, 1 answered, 2
    # refused and resent elsewhere, and nothing open. So the lost ones: the open one without
    # an answer, and 2 of the 3 taken after; the answered-but-open one is not lost.
    before = _row(stot=100, hrsp_2xx=99, scur=2)
    after = _row(stot=105, wredis=2, hrsp_2xx=100, scur=0)
    assert _held(before, after) == {
        "in_flight_at_kill": 2,
        "accepted_after_kill": 3,
        "held": 5,
        "lost_per_balancer": 3,
    }


def test_refused_retried_and_given_up_connections_were_never_held() -> None:
    before = _row(stot=10, hrsp_2xx=8, hrsp_4xx=1, scur=1)
    after = _row(stot=20, econ=1, wretr=2, wredis=3, hrsp_2xx=11, hrsp_4xx=1, hrsp_5xx=1, scur=0)
    held = _held(before, after)
    assert held["accepted_after_kill"] == 4  # 10 attempts, of which 6 never reached it
    assert held["lost_per_balancer"] == 14 - 13  # taken over its life less answered
