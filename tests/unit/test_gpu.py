"""CUDA path: the same answers as the CPU, bf16 picked automatically. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.digits import load_split, render_digit
from service.model.engine import Engine
from service.model.loading import load_model
from tests.conftest import DEFAULT_MODEL_DIR
from tests.utils import assert_same_items

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SOURCE = f"local-dir:{DEFAULT_MODEL_DIR}"


def _images(count: int = 64) -> list[np.ndarray]:
    split = load_split()
    sizes = (32, 48, 64, 100)
    return [
        np.asarray(render_digit(split.X_test[i], sizes[i % 4], invert=bool(i % 2)))
        for i in range(count)
    ]


def test_auto_picks_cuda_and_bf16() -> None:
    info = load_model(SOURCE).info
    assert info.device.startswith("cuda")
    assert info.dtype == "bfloat16"


def test_cuda_fp32_matches_cpu() -> None:
    images = _images()
    modes = ["none", "cls", "rollout", "cls"] * 16
    cpu = Engine(load_model(SOURCE, device="cpu", dtype="float32")).run(images, modes).items
    gpu = Engine(load_model(SOURCE, device="cuda", dtype="float32")).run(images, modes).items
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=2e-3)
        if a.attention is not None:
            np.testing.assert_allclose(a.attention, b.attention, atol=2e-3)  # type: ignore[arg-type]


def test_cuda_preprocess_matches_cpu() -> None:
    images = _images(16)
    cpu = Engine(load_model(SOURCE, device="cpu", dtype="float32")).preprocess(images)
    gpu = Engine(load_model(SOURCE, device="cuda", dtype="float32")).preprocess(images)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)


def test_cuda_bf16_top1_agrees_with_fp32() -> None:
    split = load_split()
    images = [
        np.asarray(render_digit(x, 32, invert=bool(i % 2))) for i, x in enumerate(split.X_test)
    ]
    fp32 = Engine(load_model(SOURCE, device="cuda", dtype="float32"))
    bf16 = Engine(load_model(SOURCE, device="cuda", dtype="bfloat16"))
    a = np.stack([it.probs for it in fp32.run(images, ["cls"] * len(images)).items]).argmax(1)
    b = np.stack([it.probs for it in bf16.run(images, ["cls"] * len(images)).items]).argmax(1)
    assert (a == b).mean() >= 0.99


# --- CUDA graphs per batch-size bucket ---------------------------------------------------------
# Tolerances: fp32 graphs vs fp32 eager within 1e-3 (cuDNN runs the patch embedding in TF32,
# with kernels picked per batch size, and a padded batch is larger); bf16 within
# 1e-2 on probabilities and 2e-3 on attention maps (each sums to 1): a padded batch may pick
# other GEMM kernels than the unpadded one, which round differently in bf16 (2^-8 relative).


def _pair(source: str, dtype: str, max_batch: int = 32) -> tuple[Engine, Engine]:
    eager = Engine(load_model(source, device="cuda", dtype=dtype), max_batch_size=max_batch)
    graphed = Engine(load_model(source, device="cuda", dtype=dtype), graphs=True,
                     max_batch_size=max_batch)  # fmt: skip
    graphed.warmup(max_batch)
    assert graphed.forward_kind == "cuda-graphs" and eager.forward_kind == "eager"
    return eager, graphed


def _compare(eager: Engine, graphed: Engine, images: list[np.ndarray], atol_p: float,
             atol_a: float, margin: float = 0.0) -> None:  # fmt: skip
    modes = ["none", "cls", "rollout", "cls"] * (len(images) // 4)
    for start in range(0, len(images), 32):
        chunk, chunk_modes = images[start : start + 32], modes[start : start + 32]
        want = eager.run(chunk, chunk_modes).items  # type: ignore[arg-type]
        got = graphed.run(chunk, chunk_modes).items  # type: ignore[arg-type]
        assert_same_items(want, got, atol=atol_p, atol_attention=atol_a)
        for a, b in zip(want, got, strict=True):
            top2 = np.sort(a.probs)[-2:]
            if top2[1] - top2[0] > margin:  # a near tie may flip within the tolerance
                assert a.probs.argmax() == b.probs.argmax()


@pytest.mark.parametrize(("dtype", "atol_p", "atol_a"), [("float32", 1e-3, 1e-3),
                                                         ("bfloat16", 1e-2, 2e-3)])  # fmt: skip
def test_cuda_graphs_answer_as_eager_on_the_held_out_digits(
    dtype: str, atol_p: float, atol_a: float
) -> None:
    split = load_split()
    images = [
        np.asarray(render_digit(x, 32, invert=bool(i % 2))) for i, x in enumerate(split.X_test)
    ]
    images = images[: len(images) // 4 * 4]
    eager, graphed = _pair(SOURCE, dtype)
    _compare(eager, graphed, images, atol_p, atol_a, margin=2 * atol_p)


def test_cuda_graphs_answer_as_eager_on_vit_base(tmp_path: Path) -> None:
    from loadtests.bench import random_checkpoint

    source = random_checkpoint("vit_base_patch16_224", tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (240 + 8 * i, 320 - 4 * i, 3), dtype=np.uint8)
              for i in range(40)]  # fmt: skip
    for dtype, atol_p, atol_a in (("float32", 1e-3, 1e-3), ("bfloat16", 1e-2, 2e-3)):
        eager, graphed = _pair(source, dtype)
        _compare(eager, graphed, images, atol_p, atol_a, margin=2 * atol_p)


def test_cuda_graph_answers_never_depend_on_the_bucket() -> None:
    """One image beside 0 to 31 others: every batch size (so every bucket and padding)."""
    _, graphed = _pair(SOURCE, "float32")
    image, *others = _images(32)
    alone = graphed.run([image], ["rollout"]).items[0]
    for count in range(1, 32):
        item = graphed.run([image, *others[:count]], ["rollout"] * (count + 1)).items[0]
        np.testing.assert_allclose(item.probs, alone.probs, atol=1e-3)
        np.testing.assert_allclose(item.attention, alone.attention, atol=1e-3)  # type: ignore[arg-type]


def test_cuda_prepare_on_its_own_stream_then_finish() -> None:
    """``prepare`` (its own stream) then ``finish`` from another thread, as the batcher runs
    them: the same answers as ``run``."""
    from concurrent.futures import ThreadPoolExecutor

    from service.model.engine import Work

    eager, graphed = _pair(SOURCE, "float32", max_batch=8)
    assert graphed.overlaps
    images = _images(24)
    works = [Work(("none", "cls", "rollout")[i % 3], pixels=img) for i, img in enumerate(images)]
    with ThreadPoolExecutor(1) as prep, ThreadPoolExecutor(1) as launch:
        prepared = [prep.submit(graphed.prepare, works[i : i + 8]) for i in range(0, 24, 8)]
        outcomes = [launch.submit(graphed.finish, p.result()).result() for p in prepared]
    got = [o for batch in outcomes for o in batch]
    want = eager.run(images, [w.mode for w in works]).items
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b.probs, a.probs, atol=1e-3)  # type: ignore[union-attr]
