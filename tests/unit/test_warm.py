"""Ready means warm: what a worker and an engine do before they take their first request.
How much it saves is measured by ``python -m loadtests.first_answer``, not asserted here."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import prometheus_client
import pytest

from service.metrics import create_metrics
from service.model import imaging
from service.model.engine import WARM_RUNS, Engine
from service.model.loading import load_model
from service.runtime.settings import ATTENTION_MODES, Settings
from service.web import pipeline as pipeline_module
from service.web.pipeline import Pipeline
from tests.conftest import DEFAULT_MODEL_DIR


def test_a_worker_decodes_every_format_on_every_decode_thread_before_it_listens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, str]] = []
    real = imaging.decode_image

    def counting(data: bytes, **kwargs: Any) -> Any:
        image = real(data, **kwargs)
        seen.append((threading.current_thread().name, image.format))
        return image

    monkeypatch.setattr(pipeline_module, "decode_image", counting)
    metrics = create_metrics(8, prometheus_client.CollectorRegistry())
    pipeline = Pipeline(Settings(), metrics, decode_threads=3)
    try:
        pipeline.warm()
        threads = {name for name, _ in seen}
        here = threading.current_thread().name
        assert len(threads - {here}) == 3  # every decode thread was started and used
        assert all(name.startswith("vit-decode") for name in threads - {here})
        for name in threads:  # each decoded every accepted format
            assert sorted(f for n, f in seen if n == name) == sorted(imaging.ALLOWED_FORMATS)
    finally:
        pipeline.close()


def test_warm_up_runs_each_pass_at_batch_1_more_than_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TorchScript's executor profiles a graph's first run and optimizes it on its second: a
    lone request after ready must find both done."""
    engine = Engine(load_model(f"local-dir:{DEFAULT_MODEL_DIR}", device="cpu", dtype="float32"),
                    script=True)  # fmt: skip
    calls: list[tuple[int, str]] = []
    real = engine.run

    def recording(images: Any, modes: Any) -> Any:
        calls.extend((len(images), mode) for mode in set(modes))
        return real(images, modes)

    monkeypatch.setattr(engine, "run", recording)
    engine.warmup(4)
    assert WARM_RUNS >= 2
    for mode in ATTENTION_MODES:
        assert calls.count((1, mode)) == WARM_RUNS, mode
    assert (4, "rollout") in calls  # and the largest batch, every block capturing
    probs = engine.run([np.zeros((28, 28, 3), np.uint8)], ["cls"]).items[0].probs
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_a_loaded_runner_has_run_every_mode_on_its_model_thread_unrecorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batcher's model thread is started and has run the batcher's own path (``prepare``
    and ``finish``) in every attention mode before ready; nothing of it is counted."""
    from service.model.engine import Engine as EngineClass
    from service.model.runner import ModelRunner

    ran: list[tuple[str, str]] = []
    real = EngineClass.finish

    def recording(self: Any, prepared: Any) -> Any:
        ran.extend((threading.current_thread().name, mode) for mode in prepared.modes)
        return real(self, prepared)

    monkeypatch.setattr(EngineClass, "finish", recording)
    registry = prometheus_client.CollectorRegistry()
    settings = Settings(model=f"local-dir:{DEFAULT_MODEL_DIR}", device="cpu", dtype="float32")
    runner = ModelRunner(settings, create_metrics(8, registry), device="cpu", threads=1)
    runner.load()
    try:
        on_model_thread = {mode for name, mode in ran if name.startswith("vit-model")}
        assert on_model_thread == set(ATTENTION_MODES)
        # Unrecorded: no batch counted, and the stages a batch writes exist at 0 (made before
        # ready: a histogram's first series costs the first request ~0.5 ms each).
        assert registry.get_sample_value("vit_batch_size_count") == 0
        for stage in ("queue", "preprocess", "forward", "attention"):
            assert (
                registry.get_sample_value("vit_stage_duration_seconds_count", {"stage": stage}) == 0
            ), stage
        assert (
            registry.get_sample_value(
                "vit_stage_duration_seconds_count", {"stage": "device_decode"}
            )
            is None
        )  # a stage this process never runs gets no series
    finally:
        import asyncio

        asyncio.run(runner.aclose())


def test_a_prepared_versions_batch_thread_is_warm_and_not_at_the_loaders_priority() -> None:
    """A version loads on a thread at nice 19 (serving keeps its cores); its batch thread must
    not be born there: a thread inherits its creator's niceness for good."""
    import asyncio
    import os

    from service.model.runner import LOAD_NICENESS, ModelRunner

    settings = Settings(model=f"local-dir:{DEFAULT_MODEL_DIR}", device="cpu", dtype="float32")
    metrics = create_metrics(8, prometheus_client.CollectorRegistry())
    runner = ModelRunner(settings, metrics, device="cpu", threads=1)
    runner.load()

    def niceness() -> tuple[str, int]:
        me = threading.current_thread()
        return me.name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def prepare_and_ask() -> tuple[str, int]:
        await runner.prepare(settings.model, "2")
        assert runner._next is not None
        return runner._next[1].on_model_thread(niceness)

    try:
        name, nice = asyncio.run(prepare_and_ask())
        assert name.startswith("vit-model")
        assert nice == os.getpriority(os.PRIO_PROCESS, os.getpid()) != LOAD_NICENESS
    finally:
        runner.drop()
        asyncio.run(runner.aclose())
