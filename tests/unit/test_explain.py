"""Explain: top-k ordering, patch boxes in original pixels, heatmap rendering, option parsing."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from service.errors import ApiError
from service.model.geometry import patch_box
from service.model.imaging import decode_image
from service.model.loading import ModelInfo, load_model
from service.runtime.settings import Settings
from service.web.answers import top_k, top_patches
from service.web.heatmaps import heatmap_png
from service.web.options import Options, parse_options
from tests.utils import encode, make_tiny_dir


@pytest.fixture(scope="module")
def info(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    folder = tmp_path_factory.mktemp("tiny") / "m"
    make_tiny_dir(folder)
    return load_model(f"local-dir:{folder}", device="cpu", dtype="float32").info


def test_top_k_is_sorted_and_labelled() -> None:
    probs = np.array([0.1, 0.5, 0.05, 0.3, 0.05], dtype=np.float32)
    labels = tuple("abcde")
    assert [p["label"] for p in top_k(probs, 3, labels)] == ["b", "d", "a"]
    assert len(top_k(probs, 99, labels)) == 5


def test_top_k_breaks_ties_by_index_and_keeps_float32_scores() -> None:
    probs = np.array([0.2, 0.3, 0.3, 0.2, 0.3], dtype=np.float32)
    top = top_k(probs, 4, tuple("abcde"))
    assert [p["index"] for p in top] == [1, 2, 4, 0]
    assert [p["score"] for p in top] == [float(probs[i]) for i in (1, 2, 4, 0)]
    assert all(type(p["index"]) is int for p in top)


@pytest.mark.parametrize(
    ("width", "height", "crop_pct", "row", "col", "box"),
    [
        (32, 32, 1.0, 0, 0, [0, 0, 8, 8]),
        (320, 320, 1.0, 3, 3, [240, 240, 320, 320]),
        (400, 200, 1.0, 0, 0, [100, 0, 150, 50]),  # landscape: square crop in the middle
        (400, 200, 1.0, 3, 3, [250, 150, 300, 200]),
        (100, 100, 0.8, 0, 0, [10, 10, 30, 30]),  # crop_pct trims a border
    ],
)
def test_patch_box(
    info: ModelInfo, width: int, height: int, crop_pct: float, row: int, col: int, box: list[float]
) -> None:
    assert patch_box(row, col, replace(info, crop_pct=crop_pct), width, height) == pytest.approx(
        box
    )


def test_boxes_are_clipped_to_the_image(info: ModelInfo) -> None:
    """crop_pct > 1 makes the crop larger than the image; boxes still lie inside it."""
    wide = replace(info, crop_pct=1.25)
    for patch in top_patches(np.full((4, 4), 1 / 16), 16, wide, 50, 50):
        x0, y0, x1, y1 = patch["box"]
        assert 0 <= x0 <= x1 <= 50 and 0 <= y0 <= y1 <= 50


def test_top_patches_order(info: ModelInfo) -> None:
    weights = np.zeros((4, 4), dtype=np.float32)
    weights[2, 1], weights[0, 3] = 0.7, 0.3
    top = top_patches(weights, 2, info, 32, 32)
    assert [(p["row"], p["col"], p["index"]) for p in top] == [(2, 1, 9), (0, 3, 3)]
    assert top[0]["attention"] == pytest.approx(0.7)


def test_heatmap_decodes_to_the_original_size(info: ModelInfo) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (1200, 900, 3), dtype=np.uint8)
    decoded = decode_image(encode(pixels, "JPEG"), min_short_side=info.resize_size)
    assert decoded.pixels.shape[0] < 1200  # the upload was reduced for the model...
    weights = np.random.default_rng(1).dirichlet(np.ones(16)).reshape(4, 4)
    png = Image.open(io.BytesIO(base64.b64decode(heatmap_png(decoded, weights, info))))
    assert png.format == "PNG"
    assert png.size == (900, 1200)  # ...but the heatmap is at the original size


def test_heatmap_is_brightest_where_attention_is(info: ModelInfo) -> None:
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    decoded = decode_image(encode(grey), min_short_side=info.resize_size)
    weights = np.zeros((4, 4))
    weights[0, 0] = 1.0
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(heatmap_png(decoded, weights, info)))))
    hot, cold = png[:16, :16].mean(), png[48:, 48:].mean()
    assert hot > cold + 30


SETTINGS = Settings(model="local-dir:/unused")


def _parse(fields: dict[str, str], num_classes: int) -> Options:
    return parse_options(
        fields,
        num_classes,
        default_top_k=SETTINGS.default_top_k,
        default_attention=SETTINGS.default_attention,
    )


OPTIONS = [
    # (fields, expected top_k, attention, heatmap) — or the error code
    ({}, 5, "cls", False),
    ({"top_k": "1", "attention": "rollout", "heatmap": "true"}, 1, "rollout", True),
    ({"top_k": "10", "attention": "none", "heatmap": "0"}, 10, "none", False),
    ({"heatmap": "yes"}, 5, "cls", True),
]


@pytest.mark.parametrize(("fields", "k", "mode", "heatmap"), OPTIONS)
def test_parse_options(fields: dict[str, str], k: int, mode: str, heatmap: bool) -> None:
    options = _parse(fields, 10)
    assert (options.top_k, options.attention, options.heatmap) == (k, mode, heatmap)


def test_default_top_k_is_capped_by_classes() -> None:
    assert _parse({}, 3).top_k == 3


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"top_k": "0"}, "invalid_top_k"),
        ({"top_k": "11"}, "invalid_top_k"),
        ({"top_k": "2.5"}, "invalid_top_k"),
        ({"attention": "everything"}, "invalid_attention"),
        ({"heatmap": "perhaps"}, "invalid_heatmap"),
        ({"heatmap": "true", "attention": "none"}, "invalid_heatmap"),
    ],
)
def test_parse_options_errors(fields: dict[str, str], code: str) -> None:
    with pytest.raises(ApiError) as caught:
        _parse(fields, 10)
    assert caught.value.status == 422 and caught.value.code == code
