"""The micro-batcher: lone requests go at once, concurrent ones share batches, overload is bounded."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

from service.model.batching import BatchStats, MicroBatcher, Overloaded


class FakeModel:
    """Doubles its inputs, taking ``delay`` seconds per batch; records batch sizes."""

    def __init__(self, delay: float = 0.02, fail_on: int | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("model exploded")
        return [2 * i for i in items]


def _batcher(model: FakeModel, **kwargs: float) -> MicroBatcher[int, int]:
    params = {"max_batch_size": 8, "max_wait_s": 0.05, "max_queue": 64, **kwargs}
    return MicroBatcher(
        model,
        max_batch_size=int(params["max_batch_size"]),
        max_wait_s=params["max_wait_s"],
        max_queue=int(params["max_queue"]),
    )


def test_lone_request_does_not_wait() -> None:
    async def scenario() -> float:
        batcher = _batcher(FakeModel(delay=0.0), max_wait_s=0.5)
        try:
            ((out, wait),) = await batcher.submit([21])
            assert out == 42
            return wait
        finally:
            await batcher.aclose()

    # max_wait is 500 ms, but nobody else is arriving: it must leave at once.
    assert asyncio.run(scenario()) < 0.05


def test_concurrent_requests_share_batches_and_answers_stay_paired() -> None:
    model = FakeModel(delay=0.02)

    async def scenario() -> list[list[tuple[int, float]]]:
        batcher = _batcher(model)
        try:
            return await asyncio.gather(*(batcher.submit([i]) for i in range(40)))
        finally:
            await batcher.aclose()

    results = asyncio.run(scenario())
    assert [r[0][0] for r in results] == [2 * i for i in range(40)]
    assert max(len(b) for b in model.batches) > 1
    assert all(len(b) <= 8 for b in model.batches)
    assert sorted(i for b in model.batches for i in b) == list(range(40))
    assert len(model.threads) == 1  # one model thread, never the event loop


def test_waits_for_requests_still_arriving() -> None:
    """While a request is announced as decoding, an idle model waits (bounded) to batch it."""
    model = FakeModel(delay=0.0)

    async def scenario() -> None:
        batcher = _batcher(model, max_wait_s=0.5)

        async def slow_decode_then_submit() -> list[tuple[int, float]]:
            with batcher.arriving():
                await asyncio.sleep(0.05)
            return await batcher.submit([2])

        try:
            second = asyncio.create_task(slow_decode_then_submit())
            await asyncio.sleep(0)  # let it announce itself
            first = await batcher.submit([1])
            await second
            assert first[0][0] == 2
        finally:
            await batcher.aclose()

    asyncio.run(scenario())
    assert model.batches == [[1, 2]]


def test_wait_is_bounded_by_max_wait() -> None:
    model = FakeModel(delay=0.0)

    async def scenario() -> float:
        batcher = _batcher(model, max_wait_s=0.03)

        async def never_submits() -> None:
            with batcher.arriving():
                await asyncio.sleep(0.5)

        try:
            straggler = asyncio.create_task(never_submits())
            await asyncio.sleep(0)
            ((_, wait),) = await batcher.submit([1])
            straggler.cancel()
            return wait
        finally:
            await batcher.aclose()

    wait = asyncio.run(scenario())
    assert 0.02 < wait < 0.3


def test_overload_raises_instead_of_queueing_forever() -> None:
    model = FakeModel(delay=0.05)

    async def scenario() -> tuple[int, int]:
        batcher = _batcher(model, max_batch_size=4, max_queue=8)
        try:
            outcomes = await asyncio.gather(
                *(batcher.submit([i]) for i in range(30)), return_exceptions=True
            )
        finally:
            await batcher.aclose()
        shed = [o for o in outcomes if isinstance(o, Overloaded)]
        assert all(o.retry_after_s >= 1 for o in shed)
        return len(shed), sum(1 for o in outcomes if isinstance(o, list))

    shed, served = asyncio.run(scenario())
    assert shed > 0 and served > 0 and shed + served == 30


def test_a_failing_batch_fails_only_its_own_callers() -> None:
    model = FakeModel(delay=0.01, fail_on=13)

    async def scenario() -> list[object]:
        batcher = _batcher(model, max_batch_size=2)
        try:
            return await asyncio.gather(
                *(batcher.submit([i]) for i in range(10, 20)), return_exceptions=True
            )
        finally:
            await batcher.aclose()

    outcomes = asyncio.run(scenario())
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert 1 <= len(failed) <= 2  # 13 and at most its batch-mate
    assert sum(1 for o in outcomes if isinstance(o, list)) == 10 - len(failed)


def test_stats_callback_and_multi_item_submit() -> None:
    model = FakeModel(delay=0.0)
    seen: list[BatchStats] = []

    async def scenario() -> list[tuple[int, float]]:
        batcher = MicroBatcher(
            model, max_batch_size=4, max_wait_s=0, max_queue=16, on_batch=seen.append
        )
        try:
            return await batcher.submit([1, 2, 3, 4, 5, 6])
        finally:
            await batcher.aclose()

    out = asyncio.run(scenario())
    assert [o for o, _ in out] == [2, 4, 6, 8, 10, 12]
    assert [s.size for s in seen] == [4, 2]


def test_rejects_inconsistent_limits() -> None:
    with pytest.raises(ValueError, match="max_queue >= max_batch_size"):
        MicroBatcher(FakeModel(), max_batch_size=8, max_wait_s=0, max_queue=4)


# --- two stages: a batch prepared while the one before runs ----------------------------------


class TwoStageModel:
    """``prepare`` tags a batch, ``run`` doubles it; both take their time and log when they ran
    (and on which thread), so overlap and order can be read back."""

    def __init__(self, prepare_s: float, run_s: float, fail_prepare: int | None = None,
                 fail_run: int | None = None) -> None:  # fmt: skip
        self.prepare_s, self.run_s = prepare_s, run_s
        self.fail_prepare, self.fail_run = fail_prepare, fail_run
        self.spans: list[tuple[str, float, float, tuple[int, ...]]] = []
        self.threads: dict[str, set[str]] = {"prepare": set(), "run": set()}

    def prepare(self, items: list[int]) -> tuple[int, ...]:
        started = time.perf_counter()
        self.threads["prepare"].add(threading.current_thread().name)
        time.sleep(self.prepare_s)
        if self.fail_prepare in items:
            raise RuntimeError("decode exploded")
        self.spans.append(("prepare", started, time.perf_counter(), tuple(items)))
        return tuple(items)

    def run(self, prepared: tuple[int, ...]) -> list[int]:
        started = time.perf_counter()
        self.threads["run"].add(threading.current_thread().name)
        time.sleep(self.run_s)
        if self.fail_run in prepared:
            raise RuntimeError("model exploded")
        self.spans.append(("run", started, time.perf_counter(), prepared))
        return [2 * i for i in prepared]


def _two_stage(model: TwoStageModel, **kwargs: int) -> MicroBatcher[int, int]:
    return MicroBatcher(model.run, prepare=model.prepare, max_wait_s=0.0, max_queue=256,
                        max_batch_size=kwargs.get("max_batch_size", 8))  # fmt: skip


def test_two_stages_overlap_and_answers_stay_paired() -> None:
    model = TwoStageModel(prepare_s=0.03, run_s=0.03)

    async def scenario() -> list[list[tuple[int, float]]]:
        batcher = _two_stage(model)
        try:
            return await asyncio.gather(*(batcher.submit([i]) for i in range(64)))
        finally:
            await batcher.aclose()

    results = asyncio.run(scenario())
    assert [r[0][0] for r in results] == [2 * i for i in range(64)]
    runs = [s for s in model.spans if s[0] == "run"]
    prepares = {s[3]: s for s in model.spans if s[0] == "prepare"}
    assert sorted(i for r in runs for i in r[3]) == list(range(64))
    # Each batch ran after its own preparation, one at a time on one model thread...
    for _, started, _, items in runs:
        assert prepares[items][2] <= started
    assert all(a[2] <= b[1] for a, b in itertools.pairwise(runs))
    # ...and some batch was being prepared while another ran.
    assert any(
        p[1] < r[2] and r[1] < p[2] and p[3] != r[3] for r in runs for p in prepares.values()
    )
    assert len(model.threads["run"]) == 1 and len(model.threads["prepare"]) == 1
    assert model.threads["run"].isdisjoint(model.threads["prepare"])


def test_two_stages_take_the_next_batch_late_enough_to_fill_it() -> None:
    """Requests arriving while a batch runs go out together, not one by one: the next batch is
    taken only when its preparation would end as the running one does."""
    model = TwoStageModel(prepare_s=0.005, run_s=0.3)

    async def scenario() -> None:
        batcher = _two_stage(model, max_batch_size=32)
        try:
            await batcher.submit([-1])  # both stages timed once
            first = asyncio.ensure_future(batcher.submit([0]))
            await asyncio.sleep(0.02)  # batch [0] is running now
            trickle = []
            for i in range(1, 9):  # 8 arrive one by one while it runs
                trickle.append(asyncio.ensure_future(batcher.submit([i])))
                await asyncio.sleep(0.005)
            await asyncio.gather(first, *trickle)
        finally:
            await batcher.aclose()

    asyncio.run(scenario())
    runs = [s[3] for s in model.spans if s[0] == "run"]
    assert runs == [(-1,), (0,), tuple(range(1, 9))]  # the trickle rode together


def test_two_stages_a_failure_fails_only_its_batch() -> None:
    model = TwoStageModel(prepare_s=0.005, run_s=0.005, fail_prepare=13, fail_run=17)

    async def scenario() -> list[object]:
        batcher = _two_stage(model, max_batch_size=1)
        try:
            return await asyncio.gather(
                *(batcher.submit([i]) for i in range(10, 20)), return_exceptions=True
            )
        finally:
            await batcher.aclose()

    outcomes = asyncio.run(scenario())
    failed = {10 + i: str(o) for i, o in enumerate(outcomes) if isinstance(o, Exception)}
    assert failed == {13: "decode exploded", 17: "model exploded"}
    assert [o[0][0] for o in outcomes if isinstance(o, list)] == [
        2 * i for i in range(10, 20) if i not in failed
    ]


def test_close_cancels_the_running_batch_and_what_waits() -> None:
    model = TwoStageModel(prepare_s=0.01, run_s=0.2)

    async def scenario() -> list[object]:
        batcher = _two_stage(model, max_batch_size=2)
        calls = [asyncio.ensure_future(batcher.submit([i])) for i in range(6)]
        await asyncio.sleep(0.05)
        await batcher.aclose()
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, (asyncio.CancelledError, list)) for o in outcomes)
    assert any(isinstance(o, asyncio.CancelledError) for o in outcomes)
