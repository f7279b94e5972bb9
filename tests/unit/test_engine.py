"""The engine: device preprocessing matches timm's, attention matches a reference, no cross-talk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from service.model.engine import Engine, rollout
from service.model.geometry import crop_window
from service.model.loading import LoadedModel, load_model
from tests.conftest import REPO
from tests.utils import assert_same_items, make_tiny_dir

RNG = np.random.default_rng(0)


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour picture (gradients + a blob): what photos look like to a resampler."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    blob = np.exp(-(((yy - cy) / (0.2 * h)) ** 2 + ((xx - cx) / (0.2 * w)) ** 2))
    r = 255 * xx / w
    g = 255 * yy / h
    b = 255 * blob
    return np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("tiny") / "m"
    make_tiny_dir(folder, depth=3)
    return load_model(f"local-dir:{folder}", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(tiny: LoadedModel) -> Engine:
    return Engine(tiny)


def _timm_input(loaded: LoadedModel, image: np.ndarray) -> torch.Tensor:
    transform = create_transform(**resolve_model_data_config(loaded.model))
    return transform(Image.fromarray(image)).unsqueeze(0)


# --- preprocessing ---------------------------------------------------------------------------


def test_preprocess_is_exact_at_input_size(tiny: LoadedModel, engine: Engine) -> None:
    image = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = engine.preprocess([image])
    torch.testing.assert_close(batch, _timm_input(tiny, image), rtol=0, atol=1e-5)
    assert crop_window(32, 32, tiny.info) == (0.0, 0.0, 32.0, 32.0)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (48, 60), (60, 40), (33, 47)])
def test_preprocess_matches_timm_on_pictures(
    tiny: LoadedModel, engine: Engine, h: int, w: int
) -> None:
    """Batched grid_sample on the device vs timm's PIL resize+crop: close on real-looking images."""
    image = _smooth(h, w)
    ours = engine.preprocess([image])
    theirs = _timm_input(tiny, image)
    # Values are normalized to [-1, 1]; resamplers differ by a fraction of a grey level.
    assert (ours - theirs).abs().mean().item() < 0.02


def test_a_batch_of_one_size_is_stacked_as_each_image_alone(engine: Engine) -> None:
    images = [_smooth(48, 60, seed) for seed in range(4)]
    together = engine.preprocess(images)
    for i, image in enumerate(images):
        torch.testing.assert_close(together[i : i + 1], engine.preprocess([image]), rtol=0, atol=0)


def test_device_decode_reduces_a_batch_by_size_as_one_by_one(engine: Engine) -> None:
    """JPEGs of one size are box-reduced as one stack; the result is each image's own."""
    from service.model.engine import _reduce_on_device
    from tests.utils import encode

    sizes = [(96, 80), (96, 80), (70, 100), (96, 80), (64, 64), (33, 47)]
    jpegs = [encode(_smooth(h, w, i), "JPEG", quality=95) for i, (h, w) in enumerate(sizes)]
    decoded = engine._decode_on_device(jpegs)
    from torchvision.io import ImageReadMode, decode_jpeg

    for data, got in zip(jpegs, decoded, strict=True):
        chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                          mode=ImageReadMode.RGB)  # fmt: skip
        want = _reduce_on_device(chw, engine.info.resize_size)
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    assert [tuple(d.shape) for d in decoded if isinstance(d, torch.Tensor)][:2] == [(48, 40, 3)] * 2


def test_preprocess_pads_each_image_independently(engine: Engine) -> None:
    """Mixed sizes share one canvas, yet each image's input equals its own single-image input."""
    images = [_smooth(64, 40, 1), _smooth(40, 64, 2), _smooth(32, 32, 3), _smooth(50, 50, 4)]
    together = engine.preprocess(images)
    for i, image in enumerate(images):
        alone = engine.preprocess([image])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-4)


# crop window: (height, width, crop_pct, expected x0, y0, x1, y1) for a 32 px square input
CROPS = [
    (32, 32, 1.0, (0, 0, 32, 32)),
    (64, 128, 1.0, (32, 0, 96, 64)),  # landscape: centered square of the shorter side
    (128, 64, 1.0, (0, 32, 64, 96)),  # portrait
    (80, 80, 0.8, (8, 8, 72, 72)),  # resize to 40, crop 32: 80 % of the side
]


@pytest.mark.parametrize(("h", "w", "crop_pct", "expected"), CROPS)
def test_crop_window(
    tiny: LoadedModel, h: int, w: int, crop_pct: float, expected: tuple[float, ...]
) -> None:
    from dataclasses import replace

    info = replace(tiny.info, crop_pct=crop_pct)
    assert crop_window(h, w, info) == pytest.approx(expected)


# --- attention ------------------------------------------------------------------------------


def _reference_attention(model: Any, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's softmax attention (B, H, N, N), recomputed from its inputs by hand."""
    inputs: list[torch.Tensor] = []
    hooks = [
        block.norm1.register_forward_hook(lambda _m, _i, out: inputs.append(out))
        for block in model.blocks
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for block, tokens in zip(model.blocks, inputs, strict=True):
        attn = block.attn
        b, n, c = tokens.shape
        qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        maps.append(torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1))
    return maps


def _reference_rollout(maps: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """Abnar & Zuidema, literally: average heads, add I, renormalize, multiply all layers."""
    result = None
    for attn in maps:
        a = attn.mean(dim=1)
        a = a + torch.eye(a.shape[-1])
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    assert result is not None
    weights = result[:, 0, prefix:]
    return weights / weights.sum(dim=-1, keepdim=True)


def test_cls_and_rollout_match_reference(tiny: LoadedModel, engine: Engine) -> None:
    images = [_smooth(32, 32, s) for s in range(3)]
    batch = engine.preprocess(images)
    maps = _reference_attention(tiny.model, batch)
    cls_ref = maps[-1].mean(dim=1)[:, 0, 1:]
    cls_ref = cls_ref / cls_ref.sum(dim=-1, keepdim=True)
    roll_ref = _reference_rollout(maps, prefix=1)

    cls = engine.run(images, ["cls"] * 3).items
    roll = engine.run(images, ["rollout"] * 3).items
    for i in range(3):
        np.testing.assert_allclose(cls[i].attention.reshape(-1), cls_ref[i].numpy(), atol=1e-5)  # type: ignore[union-attr]
        np.testing.assert_allclose(roll[i].attention.reshape(-1), roll_ref[i].numpy(), atol=1e-5)  # type: ignore[union-attr]


def test_rollout_function_matches_matrix_product() -> None:
    torch.manual_seed(0)
    layers = [torch.softmax(torch.randn(2, 5, 5), dim=-1) for _ in range(4)]
    query = torch.zeros(2, 5)
    query[:, 0] = 1
    full = None
    for a in layers:
        a = (a + torch.eye(5)) / (a + torch.eye(5)).sum(-1, keepdim=True)
        full = a if full is None else a @ full
    assert full is not None
    torch.testing.assert_close(rollout(layers, query), full[:, 0])


def test_attention_properties_and_modes_mix(tiny: LoadedModel, engine: Engine) -> None:
    images = [_smooth(40 + 8 * i, 48, i) for i in range(3)]
    items = engine.run(images, ["none", "cls", "rollout"]).items
    assert items[0].attention is None
    for item in items[1:]:
        w = item.attention
        assert w is not None
        assert w.shape == tiny.info.grid
        assert np.isfinite(w).all() and (w >= 0).all()
        assert w.sum() == pytest.approx(1.0, abs=1e-5)
    for item in items:
        assert item.probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_no_cross_talk(engine: Engine) -> None:
    """An image's answer does not depend on what else rides in its batch."""
    images = [_smooth(32 + 5 * i, 64 - 3 * i, i) for i in range(6)]
    together = engine.run(images, ["rollout"] * 6).items
    for i, image in enumerate(images):
        alone = engine.run([image], ["rollout"]).items[0]
        np.testing.assert_allclose(together[i].probs, alone.probs, atol=1e-5)
        np.testing.assert_allclose(together[i].attention, alone.attention, atol=1e-5)  # type: ignore[arg-type]


def test_unneeded_blocks_keep_the_fused_kernel(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm.layers.attention as timm_attention

    calls = []
    real = timm_attention.F.scaled_dot_product_attention

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(timm_attention.F, "scaled_dot_product_attention", counting)
    depth = len(engine.model.blocks)
    image = [_smooth(32, 32)]
    for mode, fused_calls in (("none", depth), ("cls", depth - 1), ("rollout", 0)):
        calls.clear()
        engine.run(image, [mode])
        assert len(calls) == fused_calls, mode
    assert all(block.attn.fused_attn for block in engine.model.blocks)


def test_registers_are_left_out(tmp_path: Path) -> None:
    make_tiny_dir(
        tmp_path / "m", architecture="vit_small_patch14_reg4_dinov2", img_size=28, patch_size=14
    )
    loaded = load_model(f"local-dir:{tmp_path / 'm'}", device="cpu", dtype="float32")
    assert loaded.info.num_prefix_tokens == 5
    engine = Engine(loaded)
    items = engine.run([_smooth(40, 40)], ["rollout"]).items
    assert items[0].attention is not None
    assert items[0].attention.shape == (2, 2)
    assert items[0].attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_out_of_memory_splits_the_batch(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine._run
    sizes = []

    def small_device(images: Any, modes: Any) -> Any:
        sizes.append(len(images))
        if len(images) > 2:
            raise torch.OutOfMemoryError("pretend")
        return real(images, modes)

    monkeypatch.setattr(engine, "_run", small_device)
    images = [_smooth(32, 32, s) for s in range(5)]
    result = engine.run(images, ["cls"] * 5)
    assert len(result.items) == 5
    # 5 fails, its halves 2 (runs) and 3 (fails), then 3's halves 1 and 2 run.
    assert sizes == [5, 2, 3, 1, 2]
    expected = real(images, ["cls"] * 5).items
    for got, want in zip(result.items, expected, strict=True):
        np.testing.assert_allclose(got.probs, want.probs, atol=1e-5)


# --- TorchScript ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_model_engines() -> tuple[Engine, Engine]:
    source = f"local-dir:{REPO / 'models' / 'vit-digits'}"
    eager = Engine(load_model(source, device="cpu", dtype="float32"))
    scripted = Engine(load_model(source, device="cpu", dtype="float32"), script=True)
    return eager, scripted


@pytest.mark.parametrize("size", [1, 5, 16])
def test_torchscript_answers_as_the_eager_model(
    default_model_engines: tuple[Engine, Engine], size: int
) -> None:
    eager, scripted = default_model_engines
    rng = np.random.default_rng(size)
    images = [
        rng.integers(0, 256, (20 + 7 * i, 30 + 3 * i, 3), dtype=np.uint8) for i in range(size)
    ]
    for modes in (
        ["none"] * size,
        ["cls"] * size,
        [("none", "cls", "rollout")[i % 3] for i in range(size)],
    ):
        want = eager.run(images, modes).items  # type: ignore[arg-type]
        got = scripted.run(images, modes).items  # type: ignore[arg-type]
        assert_same_items(want, got)
    # One graph per set of captured blocks: none, the last one, all of them.
    depth = len(scripted.model.blocks)  # type: ignore[arg-type]
    assert set(scripted._graphs) <= {(), (depth - 1,), tuple(range(depth))}
    assert () in scripted._graphs and (depth - 1,) in scripted._graphs


def test_a_model_torchscript_cannot_take_runs_eagerly(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    scripted = Engine(tiny, script=True)
    image = np.full((40, 40, 3), 128, dtype=np.uint8)
    with caplog.at_level("WARNING"):
        result = scripted.run([image], ["cls"]).items[0]
    assert "running it eagerly" in caplog.text
    assert result.attention is not None and not scripted._graphs
    np.testing.assert_allclose(
        result.probs, Engine(tiny).run([image], ["cls"]).items[0].probs, atol=1e-6
    )


def test_only_a_float32_cpu_model_is_scripted(tiny: LoadedModel) -> None:
    bf16 = load_model(f"local-dir:{REPO / 'models' / 'vit-digits'}", device="cpu", dtype="bfloat16")
    assert not Engine(bf16, script=True)._script
    assert Engine(tiny, script=True)._script
