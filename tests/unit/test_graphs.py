"""Batches padded to buckets (what CUDA graphs need) answer as unpadded ones; on the CPU the
padding runs eagerly (``capture=False``), the graphs themselves are checked in test_gpu.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from service.model.engine import Engine
from service.model.graphs import BucketedForward, buckets_for
from service.model.loading import load_model
from tests.conftest import DEFAULT_MODEL_DIR
from tests.utils import assert_same_items

MODES = ("none", "cls", "rollout")


@pytest.mark.parametrize(
    ("largest", "buckets"),
    [
        (1, (1,)),
        (2, (1, 2)),
        (8, (1, 2, 4, 8)),
        (24, (1, 2, 4, 8, 16, 24)),
        (32, (1, 2, 4, 8, 16, 32)),
    ],
)
def test_buckets_are_powers_of_two_and_the_largest_batch(
    largest: int, buckets: tuple[int, ...]
) -> None:
    assert buckets_for(largest) == buckets


def _bucketed(buckets: tuple[int, ...], capture: bool = False) -> BucketedForward:
    def make(key: object) -> object:
        return lambda x: (x.sum(dim=(1, 2, 3)), x * 2)

    return BucketedForward(make, sample_shape=(1, 2, 2), dtype=torch.float32,  # type: ignore[arg-type]
                           device=torch.device("cpu"), buckets=buckets, capture=capture)  # fmt: skip


def test_a_batch_runs_in_the_smallest_bucket_that_holds_it() -> None:
    forward = _bucketed((1, 2, 4, 8))
    assert [forward.bucket(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        forward.bucket(9)
    batch = torch.arange(12, dtype=torch.float32).reshape(3, 1, 2, 2)
    total, doubled = forward("k", batch)
    assert total.tolist() == [6.0, 22.0, 38.0]  # three rows back, not the bucket's four
    torch.testing.assert_close(doubled, batch * 2)


def test_cuda_graphs_need_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        _bucketed((1, 2), capture=True)


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    """The default model twice: as served on the CPU, and padded to buckets up to 8."""
    source = f"local-dir:{DEFAULT_MODEL_DIR}"
    plain = Engine(load_model(source, device="cpu", dtype="float32"))
    padded = Engine(load_model(source, device="cpu", dtype="float32"))
    padded.bucketed = BucketedForward(
        padded._pass, sample_shape=padded.info.input_size, dtype=padded.dtype,
        device=padded.device, buckets=buckets_for(8), capture=False,
    )  # fmt: skip
    return plain, padded


def _digits(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (20 + 3 * i, 28 + 2 * i, 3), dtype=np.uint8) for i in range(count)]


@pytest.mark.parametrize("size", [1, 3, 5, 7, 8])
def test_padding_to_a_bucket_changes_no_answer(engines: tuple[Engine, Engine], size: int) -> None:
    plain, padded = engines
    assert padded.bucketed is not None
    # What earlier, larger batches left in the bucket's rows must not reach this one's: fill
    # every bucket with NaN first.
    for bucket in padded.bucketed.buckets:
        padded.bucketed._input(bucket).fill_(float("nan"))
    images = _digits(size, seed=size)
    for modes in ([MODES[(i + size) % 3] for i in range(size)], ["cls"] * size):
        want = plain.run(images, modes).items  # type: ignore[arg-type]
        got = padded.run(images, modes).items  # type: ignore[arg-type]
        assert_same_items(want, got)


def test_an_image_answers_the_same_in_every_bucket(engines: tuple[Engine, Engine]) -> None:
    """Mixed batch sizes: one image beside 0 to 7 others, its answer never moves."""
    _, padded = engines
    image, *others = _digits(8, seed=99)
    alone = padded.run([image], ["rollout"]).items[0]
    for count in range(1, 8):
        item = padded.run([image, *others[:count]], ["rollout"] * (count + 1)).items[0]
        np.testing.assert_allclose(item.probs, alone.probs, atol=1e-5)
        np.testing.assert_allclose(item.attention, alone.attention, atol=1e-5)  # type: ignore[arg-type]


# --- the runner with preparation beside the forward pass (what a GPU model runs) ------------


def test_a_runner_that_overlaps_answers_as_one_that_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The two-stage batcher over ``Engine.prepare`` / ``Engine.finish`` (forced on here; a GPU
    engine overlaps by itself): the same answers for concurrent requests, bad device decodes
    answered per image, and each batch's stages on their own threads."""
    import asyncio

    import prometheus_client

    from service.errors import ApiError
    from service.metrics import create_metrics
    from service.model.runner import ModelRunner, Work
    from service.runtime.settings import Settings
    from tests.utils import encode

    def runner() -> ModelRunner:
        metrics = create_metrics(8, prometheus_client.CollectorRegistry())
        settings = Settings(model=f"local-dir:{DEFAULT_MODEL_DIR}", max_batch_size=8,
                            max_wait_ms=0, device_decode="on")  # fmt: skip
        built = ModelRunner(settings, metrics, device="cpu", threads=1)
        built.load()
        return built

    images = _digits(24, seed=5)
    works = [Work(MODES[i % 3], pixels=image) for i, image in enumerate(images)]
    works[4] = Work("cls", jpeg=encode(images[4], "JPEG"))  # decoded in ``prepare``
    works[9] = Work("cls", jpeg=b"\xff\xd8 not a jpeg")

    async def answers(built: ModelRunner) -> list[Any]:
        try:
            return await asyncio.gather(*(built.infer([w]) for w in works))
        finally:
            await built.aclose()

    want = asyncio.run(answers(runner()))
    monkeypatch.setattr(Engine, "overlaps", property(lambda self: True))
    overlapped = runner()
    assert overlapped._batcher is not None and overlapped._batcher._preparer is not None
    got = asyncio.run(answers(overlapped))
    for (a,), (b,) in zip(want, got, strict=True):
        if isinstance(a, ApiError):
            assert isinstance(b, ApiError) and (b.status, b.code) == (a.status, a.code)
        else:
            assert_same_items([a], [b])
    assert isinstance(got[9][0], ApiError) and got[9][0].code == "unsupported_media_type"
