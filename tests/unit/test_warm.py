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
