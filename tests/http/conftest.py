"""The service's ASGI app in-process: built from explicit settings as a worker builds it, served
by Starlette's TestClient, with a tiny model, so a whole request path runs in milliseconds.

What a worker does (``_bentoml_impl/worker/service.py``): ``VitClassifier.to_asgi()``, then
uvicorn serves that app wrapped by the front door (``WorkerServer``: ``Front.wrap``); the app's
lifespan creates the service instance, which starts loading the model. Here ``build`` makes the
services from the test's settings and plan, with what a worker would own made private to the
app:

- the metrics: prometheus_client's global registry would refuse a second service instance's
  metrics (duplicated timeseries), and BentoML's ``/metrics`` reads a multiprocess directory
  that only ``bentoml serve`` sets up. Each app gets one private ``CollectorRegistry`` for the
  service's metrics and BentoML's traffic metrics, and ``/metrics`` renders that registry;
- the replicas' ready marks go to a folder of the test's own, not ``/tmp/vit-serve-<ppid>``;
- torch's thread count and the garbage collector's frozen heap (``settle_heap``) are restored.

The apps use ``VIT_ON_LOAD_FAILURE=serve`` (no arbiter to stop) and hold a model's load with
``VIT_TEST_GATE`` where a test needs it still loading.
"""

from __future__ import annotations

import contextlib
import gc
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import prometheus_client
import pytest
import torch
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.server.metrics.prometheus import PrometheusClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from service.model.engine import Engine
from service.model.imaging import decode_image
from service.model.loading import load_model
from service.runtime.plan import make_plan
from service.runtime.settings import Settings
from service.service import build
from service.web.routes import Front
from service.web.schemas import ErrorResponse
from tests.utils import encode, make_tiny_dir

TINY_LABELS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")

# Small limits, so each refusal takes a few kilobytes; defaults unlike the code's own (5, cls),
# so a test can tell that an answer took them from the settings.
LIMITS: dict[str, Any] = {
    "max_body_bytes": 64 * 1024,
    "max_images_per_request": 3,
    "max_pixels": 1_000_000,
    "min_side": 8,
    "max_aspect_ratio": 20.0,
    "default_top_k": 3,
    "default_attention": "rollout",
}


class _PrivateRegistryMetrics(PrometheusClient):
    """BentoML's metrics client on one plain registry: no multiprocess directory needed."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        super().__init__(multiproc=False)
        self._registry = registry

    def generate_latest(self) -> bytes:
        return self.prometheus_client.generate_latest(self._registry)


@dataclass
class InProcessApp:
    """A running app and the client that talks to it."""

    client: TestClient

    def samples(self, *names: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The samples named ``names`` in ``GET /metrics``, by name and labels."""
        response = self.client.get("/metrics")
        assert response.status_code == 200, response.text
        return {
            (sample.name, frozenset(sample.labels.items())): float(sample.value)
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
            if sample.name in names
        }

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``GET /metrics`` (0 when the series does not exist yet)."""
        return self.samples(name).get((name, frozenset(labels.items())), 0.0)


def settings_for(model_dir: Path | str, **overrides: Any) -> Settings:
    """Settings for an in-process app: the model, CPU float32, the small ``LIMITS``."""
    source = model_dir if isinstance(model_dir, str) else f"local-dir:{model_dir}"
    values = {
        "model": source,
        "device": "cpu",
        "dtype": "float32",
        "topology": "replicas",
        "workers": 1,
        "max_batch_size": 4,
        "access_log": False,
        # Not the default 'exit': a worker that cannot load would ask its parent to stop.
        "on_load_failure": "serve",
        # The tests count what reaches the model: no response cache unless a test asks.
        "cache_bytes": 0,
        **LIMITS,
        **overrides,
    }
    return Settings(**values)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s} s")
        time.sleep(0.02)


@contextlib.contextmanager
def serve_in_process(settings: Settings, run_folder: Path) -> Iterator[InProcessApp]:
    """Build the app as a worker does, run its lifespan and yield it; restore everything after.

    The model loads in the background (as in a worker): wait for ``/readyz`` when it matters.
    """
    registry = prometheus_client.CollectorRegistry()
    threads = torch.get_num_threads()
    run_folder.mkdir(parents=True, exist_ok=True)
    # One replica on one core: what a worker of a 1-CPU host runs.
    plan = make_plan(settings, cpus=1, cuda_devices=0, model_bytes=0)
    front = Front(settings)
    _model, classifier = build(settings, plan, front, registry=registry, run_folder=run_folder)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            BentoMLContainer.metrics_client.patch(_PrivateRegistryMetrics(registry))
        )
        stack.callback(torch.set_num_threads, threads)
        stack.callback(gc.unfreeze)
        app = front.wrap(classifier.to_asgi())
        with TestClient(app, base_url="http://vit.test") as client:
            yield InProcessApp(client)


def wait_until_ready(app: InProcessApp) -> None:
    """Wait for ``/readyz`` 200 (the model loaded and warmed up)."""
    wait_for(lambda: app.client.get("/readyz").status_code == 200, "ready")


@pytest.fixture(scope="package")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm hub folder of the tiny ViT: 32 px input, 8 px patches (a 4x4 grid), 7 classes."""
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_dir(folder, label_names=TINY_LABELS)
    return folder


@pytest.fixture(scope="package")
def app(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessApp]:
    """The tiny model's app, ready; shared by the package's tests (counters only grow)."""
    with serve_in_process(settings_for(tiny_dir), tmp_path_factory.mktemp("run")) as running:
        wait_until_ready(running)
        yield running


@pytest.fixture
def client(app: InProcessApp) -> TestClient:
    return app.client


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> str:
    """The documented error answer; returns its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert REQUEST_ID.match(response.headers["x-request-id"])
    body = response.json()
    ErrorResponse.model_validate(body)
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"]
    assert body["error"]["code"] == code
    message: str = body["error"]["message"]
    for fragment in fragments:
        assert fragment in message
    return message


def png(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    """A noisy RGB PNG of the given size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(pixels)


@pytest.fixture(scope="package")
def v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's architecture and labels with other weights: its answers differ (a second
    version, or a second model)."""
    folder = tmp_path_factory.mktemp("tiny-v2")
    make_tiny_dir(folder, seed=1, label_names=TINY_LABELS)
    return folder


def offline_probs(model_dir: Path, image: bytes) -> np.ndarray:
    """What the model in ``model_dir`` answers for ``image`` outside the server (CLS pass)."""
    engine = Engine(load_model(f"local-dir:{model_dir}", device="cpu", dtype="float32"))
    pixels = decode_image(image, min_short_side=engine.info.resize_size).pixels
    return engine.run([pixels], ["cls"]).items[0].probs


def scores(answer: dict[str, Any]) -> list[float]:
    """An answer's scores by class index (every class: ``top_k`` = the class count)."""
    by_index = {p["index"]: p["score"] for p in answer["predictions"]}
    return [by_index[i] for i in range(len(TINY_LABELS))]
