"""A two-epoch run of ``models.train_digits`` writes a folder plain timm can load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import timm
import torch

from models.digits import load_split, render_digit
from models.train_digits import POLARITIES, main, render_batch

__all__: list[str] = []

EPOCH_KEYS = {"epoch", "lr", "train_loss", "train_acc", "val_acc", "val_loss", "seconds"}


def test_two_epoch_run_writes_a_timm_hub_folder(tmp_path: Path) -> None:
    out = tmp_path / "vit"
    threads = torch.get_num_threads()
    main(["--out", str(out), "--epochs", "2", "--subset", "128", "--seed", "0"])
    # Training must not leave its deterministic, two-thread setup on for the rest of the session.
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads

    for name in ("config.json", "model.safetensors", "training.json", "training.png"):
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


def test_batched_render_matches_render_digit() -> None:
    X = load_split().X_test[:20]
    for invert in (False, True):
        batched = render_batch(torch.tensor(X, dtype=torch.float32), invert)[:, 0].numpy()
        drawn = np.stack([np.asarray(render_digit(x, 32, invert))[..., 0] for x in X]) / 255.0
        # ``render_digit`` rounds to 8 bits once; the interpolation itself is the same.
        np.testing.assert_allclose(batched, drawn, atol=0.5 / 255 + 1e-6)
