"""Synthetic digits: training and out-of-distribution sources never overlap, and draws repeat."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFont

from models.synth import (
    FONT_DIR,
    FONT_WEIGHTS,
    HELD_OUT_FONTS,
    HELD_OUT_STROKES,
    MASK_FILL,
    MASK_SIZE,
    OOD_CANVASES,
    TRAIN_FONTS,
    TRAIN_STROKES,
    OodSet,
    build_ood_set,
    draw_pen_digit,
    font_masks,
    stroke_masks,
)

__all__: list[str] = []


def _family(face: str) -> str:
    return ImageFont.truetype(str(FONT_DIR / face), 20).getname()[0]


def test_font_families_are_disjoint_by_what_the_files_say() -> None:
    train = {_family(f) for faces in TRAIN_FONTS.values() for f in faces}
    held_out = {_family(f) for faces in HELD_OUT_FONTS.values() for f in faces}
    assert train == {"DejaVu Sans", "DejaVu Sans Mono", "STIXGeneral"}
    # Computer Modern's files name themselves per face (cmr10, cmss10, ...).
    assert held_out == {"DejaVu Serif", "cmr10", "cmb10", "cmss10", "cmtt10", "cmti10"}
    assert not train & held_out


def test_held_out_pen_templates_are_not_training_templates() -> None:
    for digit in range(10):
        for template in HELD_OUT_STROKES[digit]:
            assert template not in TRAIN_STROKES[digit]
    assert set(TRAIN_STROKES) == set(HELD_OUT_STROKES) == set(range(10))


def test_font_masks_cover_every_face_digit_and_weight() -> None:
    faces = tuple(f for family in TRAIN_FONTS.values() for f in family)
    masks, labels = font_masks(faces)
    assert masks.shape == (len(faces) * 10 * len(FONT_WEIGHTS), 1, MASK_SIZE, MASK_SIZE)
    assert np.bincount(labels.numpy()).tolist() == [len(faces) * len(FONT_WEIGHTS)] * 10
    for mask in masks[:, 0].numpy():
        rows = np.flatnonzero(mask.max(1) > 0.5)
        # Centred, as tall as MASK_FILL says (wide glyphs are fitted by width instead).
        assert rows[-1] - rows[0] + 1 <= MASK_FILL * MASK_SIZE + 1
        assert abs((rows[0] + rows[-1]) / 2 - (MASK_SIZE - 1) / 2) <= 1.5


def test_stroke_pool_is_reproducible_and_centred() -> None:
    small = {d: TRAIN_STROKES[d][:1] for d in (1, 7)}
    a, labels = stroke_masks(small, per_template=3, seed=5)
    b, _ = stroke_masks(small, per_template=3, seed=5)
    c, _ = stroke_masks(small, per_template=3, seed=6)
    assert labels.tolist() == [1, 1, 1, 7, 7, 7]
    assert np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())
    for mask in a[:, 0].numpy():
        rows = np.flatnonzero(mask.max(1) > 0.3)
        assert MASK_FILL * MASK_SIZE - 3 <= rows[-1] - rows[0] + 1 <= MASK_FILL * MASK_SIZE + 1


def test_pen_digit_lands_where_asked() -> None:
    rng = np.random.default_rng(0)
    img = draw_pen_digit(
        TRAIN_STROKES[1][0], rng, canvas=(120, 80), height=40, center=(30, 50), pen=0.1, jitter=0
    )
    ink = np.asarray(img) > 127
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    assert img.size == (120, 80)
    assert rows[-1] - rows[0] + 1 == pytest.approx(40, abs=2)
    assert (rows[0] + rows[-1]) / 2 == pytest.approx(50, abs=1.5)
    assert (cols[0] + cols[-1]) / 2 == pytest.approx(30, abs=1.5)


@pytest.fixture(scope="module")
def ood() -> OodSet:
    return build_ood_set()


def test_ood_set_is_deterministic_and_both_polarities_share_geometry(ood: OodSet) -> None:
    again = build_ood_set()
    for name in ("light_on_dark", "dark_on_light"):
        for x, y in zip(ood.images[name], again.images[name], strict=True):
            assert x.tobytes() == y.tobytes()
    for light, dark in zip(ood.images["light_on_dark"], ood.images["dark_on_light"], strict=True):
        # One picture, inverted before the single rounding to 8 bits.
        diff = np.asarray(light).astype(int) - (255 - np.asarray(dark).astype(int))
        assert np.abs(diff).max() <= 1


def test_ood_set_composition(ood: OodSet) -> None:
    kinds = ood.kinds()
    sources = ood.sources
    labels = ood.labels
    faces = sum(len(f) for f in HELD_OUT_FONTS.values())
    assert (kinds == "fonts").sum() == faces * 10 * 6
    assert (kinds == "strokes").sum() == 10 * 40
    assert np.bincount(labels).tolist() == [faces * 6 + 40] * 10
    assert all(s.split(":")[1].split("/")[0] in HELD_OUT_FONTS for s in sources if "font:" in s)
    sizes = {img.size for img in ood.images["dark_on_light"]}
    assert sizes == set(OOD_CANVASES)
