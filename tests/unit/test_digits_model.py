"""The committed default checkpoint ``models/vit-digits``: loads with plain timm, is accurate on
the held-out digits and on the out-of-distribution set (held-out font families and pen templates)
in both polarities, through plain timm and through the service's own preprocessing, and has the
patch geometry the service reports."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import timm
import torch
from timm.data import create_transform, resolve_model_data_config

from models.digits import POLARITIES, load_split, render_digit
from models.evaluate_digits import evaluate, service_predictor, timm_predictor
from models.synth import OodSet, build_ood_set
from tests.conftest import DEFAULT_MODEL_DIR

__all__: list[str] = []

MIN_TEST_ACCURACY = 0.97
MIN_OOD_ACCURACY = 0.90


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return timm.create_model(f"local-dir:{DEFAULT_MODEL_DIR}", pretrained=True).eval()


@pytest.mark.parametrize("invert", [False, True], ids=["light_on_dark", "dark_on_light"])
def test_held_out_accuracy_per_polarity(model: torch.nn.Module, invert: bool) -> None:
    split = load_split()
    transform = create_transform(**resolve_model_data_config(model))
    batch = torch.stack([transform(render_digit(x, 32, invert)) for x in split.X_test])
    with torch.no_grad():
        pred = model(batch).argmax(1).numpy()
    accuracy = float(np.mean(pred == split.y_test))
    assert len(split.y_test) == 360
    assert accuracy >= MIN_TEST_ACCURACY, f"test accuracy {accuracy:.4f} (invert={invert})"


@pytest.fixture(scope="module")
def ood() -> OodSet:
    return build_ood_set()


@pytest.fixture(scope="module")
def plain(model: torch.nn.Module, ood: OodSet) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Held-out and OOD predictions through plain timm and its eval transform."""
    return evaluate(timm_predictor(model), ood)


@pytest.mark.parametrize("name", list(POLARITIES))
def test_out_of_distribution_accuracy_per_polarity(
    plain: tuple[dict[str, Any], dict[str, np.ndarray]], ood: OodSet, name: str
) -> None:
    pred = plain[1][f"ood/{name}"]
    accuracy = float(np.mean(pred == ood.labels))
    assert len(ood.labels) == len(pred) == 940
    assert accuracy >= MIN_OOD_ACCURACY, f"OOD accuracy {accuracy:.4f} ({name})"


def test_accuracy_through_the_service_preprocessing_matches_plain_timm(
    plain: tuple[dict[str, Any], dict[str, np.ndarray]], ood: OodSet
) -> None:
    # PNG bytes -> service.model.imaging -> service.model.engine's batched resize/crop, as /classify does.
    served, served_pred = evaluate(service_predictor(f"local-dir:{DEFAULT_MODEL_DIR}"), ood)
    plain_pred = plain[1]
    for name in POLARITIES:
        assert served["held_out"][name] >= MIN_TEST_ACCURACY, (name, served["held_out"])
        assert served["ood"][name] >= MIN_OOD_ACCURACY, (name, served["ood"])
        # Two resize implementations (PIL antialias vs grid_sample) may flip a borderline few.
        agree = np.mean(served_pred[f"ood/{name}"] == plain_pred[f"ood/{name}"])
        assert agree >= 0.97, (name, agree)


def test_patch_embedding_is_a_linear_map_of_unfolded_patches(model: torch.nn.Module) -> None:
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    proj = model.patch_embed.proj
    with torch.no_grad():
        embedded = model.patch_embed(x)
        # (B, C, 4, 4, 8, 8) -> (B, 4, 4, C, 8, 8): patches in row-major grid order, each
        # flattened as C, row, column like the conv weight.
        patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(8, 16, -1)
        manual = patches @ proj.weight.reshape(64, -1).T + proj.bias
    assert model.patch_embed.num_patches == 16
    assert patches.shape == (8, 16, 3 * 8 * 8) == (8, 16, 192)
    assert embedded.shape == (8, 16, 64)
    torch.testing.assert_close(manual, embedded, atol=1e-5, rtol=1e-5)


def test_class_token_and_position_embedding(model: torch.nn.Module) -> None:
    assert model.cls_token is not None
    assert model.cls_token.shape == (1, 1, 64)
    assert model.pos_embed.shape == (1, 17, 64)


def test_weights_file_is_under_one_megabyte() -> None:
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 1_000_000
