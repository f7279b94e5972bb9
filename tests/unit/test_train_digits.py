"""A two-epoch run of ``models.train_digits`` writes a folder plain timm can load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from models.digits import POLARITIES, load_split, render_digit
from models.synth import MASK_FILL, TRAIN_FONTS, font_masks
from models.train_digits import RECIPES, augment_batch, main, render_batch

__all__: list[str] = []

EPOCH_KEYS = {
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_acc",
    "val_loss",
    "val_acc_synthetic",
    "ood_acc",
    "seconds",
}
# Augmentation that changes nothing but what a test asks for.
PLAIN = {
    **RECIPES["mixed"]["augment"],
    "p_native": 0.0,
    "rotate_deg": 0.0,
    "shear_deg": 0.0,
    "stretch": (1.0, 1.0),
    "slack": 0.0,
    "p_thin": 0.0,
    "p_thick": 0.0,
    "p_marker": 0.0,
    "p_blur": 0.0,
    "background": (0.0, 0.0),
    "ink": (1.0, 1.0),
    "p_colour": 0.0,
    "p_gradient": 0.0,
    "p_invert": 0.0,
    "noise_std": (0.0, 0.0),
}


def test_two_epoch_run_writes_a_timm_hub_folder(tmp_path: Path) -> None:
    out = tmp_path / "vit"
    threads = torch.get_num_threads()
    main(["--out", str(out), "--epochs", "2", "--subset", "128", "--steps-per-epoch", "3"])
    # Training must not leave its deterministic, two-thread setup on for the rest of the session.
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads

    files = ("config.json", "model.safetensors", "training.json", "training.png")
    for name in (*files, "confusion.png", "misclassified.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["patch_size"] == 8
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["interpolation"] == "bilinear"
    assert config["label_names"] == [str(d) for d in range(10)]

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    record = json.loads((out / "training.json").read_text())
    assert record["n_train"] == 128
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    for epoch in record["epochs"]:
        keys = EPOCH_KEYS | {f"val_acc_{name}" for name in POLARITIES}
        assert keys <= epoch.keys()
    assert set(record["test_accuracy"]["32"]) == set(POLARITIES)
    assert record["recipe"] == "mixed"
    assert record["steps_per_epoch"] == 3
    evaluation = record["evaluation"]
    assert set(evaluation["ood"]) == set(POLARITIES)
    assert evaluation["ood_count"] == {"fonts": 540, "strokes": 400}


def test_augmentation_is_reproducible_and_in_range() -> None:
    X = torch.tensor(load_split().X_train[:64], dtype=torch.float32)
    masks = render_batch(X, size=64)
    fill, native = torch.ones(64), torch.zeros(64, dtype=torch.bool)
    aug = RECIPES["mixed"]["augment"]
    a = augment_batch(masks, fill, native, torch.Generator().manual_seed(3), aug)
    b = augment_batch(masks, fill, native, torch.Generator().manual_seed(3), aug)
    assert a.shape == (64, 3, 32, 32)
    assert torch.equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_native_sklearn_digits_are_drawn_as_the_held_out_split() -> None:
    X = torch.tensor(load_split().X_test[:32], dtype=torch.float32)
    native = torch.ones(32, dtype=torch.bool)
    out = augment_batch(render_batch(X, size=64), torch.ones(32), native, torch.Generator(), PLAIN)
    # 8 -> 64 -> 32 bilinear equals 8 -> 32 wherever the interpolation is linear.
    expected = render_batch(X).expand(-1, 3, -1, -1)
    assert (out - expected).abs().mean() < 0.01
    assert (out - expected).abs().max() < 0.1


@pytest.mark.parametrize("height", [0.33, 0.6, 1.0])
def test_digit_height_is_the_fraction_of_the_frame_asked_for(height: float) -> None:
    masks, _ = font_masks(TRAIN_FONTS["DejaVu Sans"][:1])
    n = len(masks)
    aug = {**PLAIN, "height": (height, height)}
    out = augment_batch(masks, torch.full((n,), MASK_FILL), torch.zeros(n, dtype=torch.bool),
                        torch.Generator().manual_seed(0), aug)[:, 0]  # fmt: skip
    for img in out:
        rows = torch.nonzero(img.amax(1) > 0.5).flatten()
        assert rows[-1] - rows[0] + 1 == pytest.approx(height * 32, abs=1.5)


def test_batched_render_matches_render_digit() -> None:
    X = load_split().X_test[:20]
    for invert in (False, True):
        batched = render_batch(torch.tensor(X, dtype=torch.float32), invert)[:, 0].numpy()
        drawn = np.stack([np.asarray(render_digit(x, 32, invert))[..., 0] for x in X]) / 255.0
        # ``render_digit`` rounds to 8 bits once; the interpolation itself is the same.
        np.testing.assert_allclose(batched, drawn, atol=0.5 / 255 + 1e-6)
