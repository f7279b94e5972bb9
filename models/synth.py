"""Digits that look like what people upload: typeset from fonts and drawn as pen strokes.

Two uses, kept apart so one never leaks into the other:

* **Training sources** (``font_masks(TRAIN_FONTS)``, ``stroke_masks(...)`` from
  ``TRAIN_STROKES``): 64×64 ink masks with the digit centred at a fixed height, which
  ``models.train_digits`` then places, turns, thickens, blurs and colours on the fly in torch.
* **The out-of-distribution set** (``build_ood_set``): finished RGB pictures at real canvas sizes,
  drawn directly with Pillow from font *families* and pen *templates* that training never sees
  (``HELD_OUT_FONTS``, ``HELD_OUT_STROKES``), in both polarities with the same geometry.

The fonts are the TrueType files matplotlib ships (``mpl-data/fonts/ttf``), so nothing is
downloaded and every machine with the pinned matplotlib renders the same glyphs. The pen digits
are skeletons written here as control points in a unit box (x right, y down), jittered and
traced through a Catmull-Rom spline with a round pen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "FONT_DIR",
    "FONT_WEIGHTS",
    "HELD_OUT_FONTS",
    "HELD_OUT_STROKES",
    "MASK_FILL",
    "MASK_SIZE",
    "OOD_CANVASES",
    "TRAIN_FONTS",
    "TRAIN_STROKES",
    "OodSet",
    "build_ood_set",
    "draw_pen_digit",
    "font_masks",
    "stroke_masks",
]

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
# Family -> faces. Training and evaluation never share a family, not just a size or a weight.
TRAIN_FONTS: dict[str, tuple[str, ...]] = {
    "DejaVu Sans": (
        "DejaVuSans.ttf",
        "DejaVuSans-Bold.ttf",
        "DejaVuSans-Oblique.ttf",
        "DejaVuSans-BoldOblique.ttf",
    ),
    "DejaVu Sans Mono": (
        "DejaVuSansMono.ttf",
        "DejaVuSansMono-Bold.ttf",
        "DejaVuSansMono-Oblique.ttf",
        "DejaVuSansMono-BoldOblique.ttf",
    ),
    "STIX General": (
        "STIXGeneral.ttf",
        "STIXGeneralBol.ttf",
        "STIXGeneralItalic.ttf",
        "STIXGeneralBolIta.ttf",
    ),
}
HELD_OUT_FONTS: dict[str, tuple[str, ...]] = {
    "DejaVu Serif": (
        "DejaVuSerif.ttf",
        "DejaVuSerif-Bold.ttf",
        "DejaVuSerif-Italic.ttf",
        "DejaVuSerif-BoldItalic.ttf",
    ),
    # cmmi10 is left out everywhere: its digits are old-style figures with descenders.
    "Computer Modern": ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf"),
}

MASK_SIZE = 64
# Outline widths (px at 200 px type) each training glyph is also drawn with.
FONT_WEIGHTS = (0, 6)
# Digit height as a fraction of the mask: room left for thickening, rotation and slant.
MASK_FILL = 0.8

Point = tuple[float, float]
Stroke = list[Point]
Template = list[Stroke]


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float) -> Stroke:
    """Control points along an ellipse from ``a0`` to ``a1`` degrees (0 = right, 90 = down)."""
    steps = max(2, math.ceil(abs(a1 - a0) / 30.0))
    return [
        (
            cx + rx * math.cos(math.radians(a0 + (a1 - a0) * i / steps)),
            cy + ry * math.sin(math.radians(a0 + (a1 - a0) * i / steps)),
        )
        for i in range(steps + 1)
    ]


def _join(*parts: Stroke) -> Stroke:
    """One stroke through several pieces, in order."""
    return [point for part in parts for point in part]


# Each digit has several ways people write it. Training sees the first list, the
# out-of-distribution set only the second: other proportions, start points, loops and slants.
TRAIN_STROKES: dict[int, list[Template]] = {
    0: [
        [_arc(0.5, 0.5, 0.28, 0.46, -90, 275)],
        [_arc(0.5, 0.5, 0.32, 0.44, -60, 310)],
        [_arc(0.5, 0.5, 0.22, 0.47, -100, 265)],
    ],
    1: [
        [[(0.5, 0.0), (0.5, 1.0)]],
        [[(0.3, 0.22), (0.52, 0.0), (0.52, 1.0)]],
        [[(0.32, 0.2), (0.52, 0.0), (0.52, 1.0)], [(0.3, 1.0), (0.74, 1.0)]],
    ],
    2: [
        [_join(_arc(0.5, 0.28, 0.27, 0.27, 190, 400), [(0.22, 1.0), (0.8, 1.0)])],
        [
            [
                (0.25, 0.25),
                (0.45, 0.03),
                (0.72, 0.15),
                (0.7, 0.42),
                (0.4, 0.72),
                (0.2, 1.0),
                (0.5, 0.95),
                (0.82, 0.98),
            ]
        ],
        [_join(_arc(0.48, 0.3, 0.3, 0.3, 200, 380), [(0.2, 1.0), (0.82, 1.0)])],
    ],
    3: [
        [_join(_arc(0.48, 0.26, 0.26, 0.24, 200, 450), _arc(0.48, 0.74, 0.3, 0.26, 270, 520)[1:])],
        [_join([(0.22, 0.02), (0.75, 0.02), (0.45, 0.42)], _arc(0.48, 0.7, 0.3, 0.28, 250, 520))],
        [_arc(0.5, 0.25, 0.24, 0.23, 180, 440), _arc(0.48, 0.73, 0.3, 0.27, 260, 510)],
    ],
    4: [
        [[(0.55, 0.0), (0.18, 0.66), (0.86, 0.66)], [(0.66, 0.3), (0.66, 1.0)]],
        [[(0.66, 1.0), (0.66, 0.0), (0.16, 0.68), (0.86, 0.68)]],
        [[(0.3, 0.0), (0.24, 0.58), (0.84, 0.58)], [(0.7, 0.0), (0.7, 1.0)]],
    ],
    5: [
        [_join([(0.76, 0.02), (0.3, 0.02), (0.28, 0.44)], _arc(0.48, 0.69, 0.3, 0.3, 230, 520))],
        [
            _join([(0.3, 0.02), (0.28, 0.44)], _arc(0.48, 0.69, 0.3, 0.3, 230, 520)),
            [(0.3, 0.02), (0.78, 0.0)],
        ],
        [_join([(0.72, 0.0), (0.32, 0.04), (0.24, 0.4)], _arc(0.46, 0.7, 0.32, 0.28, 235, 530))],
    ],
    6: [
        [
            [
                (0.72, 0.02),
                (0.45, 0.15),
                (0.27, 0.45),
                (0.25, 0.75),
                (0.45, 0.98),
                (0.72, 0.85),
                (0.72, 0.6),
                (0.5, 0.5),
                (0.27, 0.65),
            ]
        ],
        [_join([(0.66, 0.0), (0.34, 0.3)], _arc(0.5, 0.72, 0.26, 0.27, 195, 560))],
        [_join([(0.7, 0.05), (0.4, 0.25), (0.26, 0.6)], _arc(0.5, 0.74, 0.25, 0.25, 180, 545))],
    ],
    7: [
        [[(0.2, 0.02), (0.8, 0.02), (0.4, 1.0)]],
        [[(0.2, 0.02), (0.8, 0.02), (0.42, 1.0)], [(0.36, 0.52), (0.76, 0.5)]],
        [[(0.2, 0.05), (0.8, 0.02), (0.6, 0.4), (0.48, 1.0)]],
    ],
    8: [
        [_arc(0.5, 0.26, 0.22, 0.24, 0, 365), _arc(0.5, 0.74, 0.28, 0.26, 0, 365)],
        [
            [
                (0.7, 0.12),
                (0.5, 0.02),
                (0.3, 0.15),
                (0.4, 0.38),
                (0.7, 0.62),
                (0.68, 0.9),
                (0.5, 0.98),
                (0.3, 0.88),
                (0.32, 0.62),
                (0.62, 0.38),
                (0.7, 0.15),
            ]
        ],
        [_arc(0.5, 0.27, 0.25, 0.26, -90, 275), _arc(0.5, 0.75, 0.25, 0.24, -90, 275)],
    ],
    9: [
        [_arc(0.5, 0.3, 0.26, 0.28, 0, 365), [(0.76, 0.3), (0.72, 1.0)]],
        [_join(_arc(0.5, 0.3, 0.26, 0.28, 0, 365), [(0.72, 0.75), (0.45, 0.98), (0.28, 0.9)])],
        [_arc(0.46, 0.28, 0.24, 0.26, -10, 360), [(0.7, 0.22), (0.58, 1.0)]],
    ],
}
HELD_OUT_STROKES: dict[int, list[Template]] = {
    0: [[_arc(0.5, 0.5, 0.34, 0.42, -110, 240)]],
    1: [[[(0.4, 0.16), (0.58, 0.0), (0.45, 1.0)]]],
    2: [[[(0.22, 0.2), (0.5, 0.02), (0.76, 0.2), (0.7, 0.42), (0.26, 1.0), (0.82, 1.0)]]],
    3: [
        [
            _join(
                _arc(0.5, 0.25, 0.25, 0.23, 190, 440),
                [(0.42, 0.5)],
                _arc(0.5, 0.74, 0.28, 0.25, 265, 500),
            )
        ]
    ],
    4: [[[(0.5, 0.0), (0.2, 0.7), (0.84, 0.7)], [(0.62, 0.42), (0.6, 1.0)]]],
    5: [
        [
            _join([(0.28, 0.02), (0.26, 0.42)], _arc(0.5, 0.68, 0.3, 0.32, 225, 515)),
            [(0.28, 0.04), (0.74, 0.08)],
        ]
    ],
    6: [[_join([(0.62, 0.0), (0.36, 0.28), (0.26, 0.62)], _arc(0.5, 0.73, 0.24, 0.26, 185, 548))]],
    7: [[[(0.2, 0.16), (0.22, 0.02), (0.8, 0.02), (0.5, 1.0)]]],
    8: [
        [
            [
                (0.66, 0.1),
                (0.48, 0.0),
                (0.3, 0.12),
                (0.36, 0.34),
                (0.66, 0.58),
                (0.7, 0.86),
                (0.48, 1.0),
                (0.28, 0.86),
                (0.36, 0.58),
                (0.64, 0.34),
                (0.66, 0.1),
            ]
        ]
    ],
    9: [[_join(_arc(0.5, 0.3, 0.24, 0.25, 10, 370), [(0.7, 0.6), (0.62, 1.0)])]],
}


def _catmull_rom(points: Sequence[Point], per_segment: int = 8) -> np.ndarray:
    """A smooth curve through ``points`` (the ends repeated), as a dense ``(n, 2)`` array."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) < 3:
        t = np.linspace(0.0, 1.0, per_segment + 1)[:, None]
        return p[0] + t * (p[-1] - p[0])
    padded = np.concatenate([p[:1], p, p[-1:]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        out.append(
            0.5
            * (
                2 * p1
                + (-p0 + p2) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
            )
        )
    out.append(p[-1:])
    return np.concatenate(out)


def draw_pen_digit(
    template: Template,
    rng: np.random.Generator,
    *,
    canvas: tuple[int, int],
    height: float,
    center: tuple[float, float],
    pen: float,
    jitter: float = 0.02,
    slant: float = 0.0,
    stretch: float = 1.0,
    rotate_deg: float = 0.0,
    supersample: int = 4,
) -> Image.Image:
    """Trace one pen digit onto a black canvas in white ink, anti-aliased.

    Args:
        template: Strokes of control points in the unit box.
        rng: Draws the control-point jitter.
        canvas: ``(width, height)`` in pixels.
        height: Digit height in pixels (the ink's extent, pen included).
        center: Where the digit's box centre lands, in pixels.
        pen: Pen width as a fraction of ``height``.
        jitter: Standard deviation of the control-point wobble, in unit-box units.
        slant: Horizontal shear (x += slant · (0.5 - y)); positive leans right.
        stretch: Width multiplier.
        rotate_deg: Clockwise rotation about the box centre.
        supersample: Draw this many times larger, then box-filter down.

    Returns:
        A mode ``L`` image, ink 255.
    """
    strokes = []
    for stroke in template:
        pts = np.asarray(stroke) + rng.normal(0.0, jitter, size=(len(stroke), 2))
        strokes.append(_catmull_rom([tuple(p) for p in pts]))
    allpts = np.concatenate(strokes)
    lo, hi = allpts.min(0), allpts.max(0)
    mid = (lo + hi) / 2
    pen_px = max(1.0, pen * height)
    scale = (height - pen_px) / max(hi[1] - lo[1], 1e-6)
    angle = math.radians(rotate_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    s = supersample
    width_px, height_px = canvas
    img = Image.new("L", (width_px * s, height_px * s), 0)
    draw = ImageDraw.Draw(img)
    radius = pen_px * s / 2
    for stroke in strokes:
        rel = stroke - mid
        x = rel[:, 0] * stretch + slant * (-rel[:, 1])
        y = rel[:, 1]
        xr, yr = x * cos - y * sin, x * sin + y * cos
        pts = [
            ((center[0] + px * scale) * s, (center[1] + py * scale) * s)
            for px, py in zip(xr, yr, strict=True)
        ]
        draw.line(pts, fill=255, width=max(1, round(pen_px * s)), joint="curve")
        for px, py in (pts[0], pts[-1]):
            draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=255)
    return img.reduce(s) if s > 1 else img


def _font_path(face: str) -> Path:
    path = FONT_DIR / face
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: matplotlib's bundled fonts are needed")
    return path


def _glyph(face: str, digit: int, px: int = 200, weight: int = 0) -> Image.Image:
    """The digit's ink, cropped to its bounding box (mode ``L``, ink 255)."""
    font = ImageFont.truetype(str(_font_path(face)), px)
    pad = px // 2 + weight
    img = Image.new("L", (2 * px + 2 * pad, 2 * px + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad, pad), str(digit), fill=255, font=font, stroke_width=weight,
                             stroke_fill=255)  # fmt: skip
    box = img.getbbox()
    if box is None:
        raise ValueError(f"{face} has no glyph for {digit}")
    return img.crop(box)


def _fit(glyph: Image.Image, size: int, fill: float) -> np.ndarray:
    """Scale ``glyph`` to ``fill`` of ``size`` in height, centred on a square, as float [0, 1]."""
    h = fill * size
    w = glyph.width * h / glyph.height
    if w > fill * size:  # a wide glyph is fitted by its width instead
        w, h = fill * size, glyph.height * fill * size / glyph.width
    small = glyph.resize((max(1, round(w)), max(1, round(h))), Image.Resampling.LANCZOS)
    square = Image.new("L", (size, size), 0)
    square.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
    return np.asarray(square, dtype=np.float32) / 255.0


@cache
def font_masks(fonts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One centred ``MASK_SIZE`` mask per face and digit.

    Args:
        fonts: Font file names in ``FONT_DIR``.

    Returns:
        ``(masks (n, 1, 64, 64) float, labels (n,) int64)``.
    """
    masks, labels = [], []
    for face in fonts:
        for digit in range(10):
            # As designed, and with a 6 px outline at 200 px: heavier than the face's bold.
            for weight in FONT_WEIGHTS:
                masks.append(_fit(_glyph(face, digit, weight=weight), MASK_SIZE, MASK_FILL))
                labels.append(digit)
    return torch.from_numpy(np.stack(masks)[:, None]), torch.tensor(labels)


def stroke_masks(
    templates: dict[int, list[Template]], per_template: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool of jittered pen digits, centred at ``MASK_FILL`` height, from thin pen to marker.

    Args:
        templates: Digit -> its stroke templates.
        per_template: Variants drawn from each template.
        seed: Fixes every draw.

    Returns:
        ``(masks (n, 1, 64, 64) float, labels (n,) int64)``.
    """
    rng = np.random.default_rng(seed)
    masks, labels = [], []
    c = MASK_SIZE / 2
    for digit, variants in templates.items():
        for template in variants:
            for _ in range(per_template):
                img = draw_pen_digit(
                    template,
                    rng,
                    canvas=(MASK_SIZE, MASK_SIZE),
                    height=MASK_FILL * MASK_SIZE,
                    center=(c, c),
                    pen=float(rng.uniform(0.05, 0.17)),
                    jitter=float(rng.uniform(0.0, 0.035)),
                    slant=float(rng.uniform(-0.25, 0.3)),
                    stretch=float(rng.uniform(0.75, 1.25)),
                )
                masks.append(np.asarray(img, dtype=np.float32) / 255.0)
                labels.append(digit)
    return torch.from_numpy(np.stack(masks)[:, None]), torch.tensor(labels)


# Canvases as people send them: squares of several sizes, landscape and portrait.
OOD_CANVASES: tuple[tuple[int, int], ...] = (
    (64, 64),
    (100, 100),
    (160, 160),
    (96, 64),
    (64, 96),
    (200, 150),
    (150, 200),
)


@dataclass(frozen=True)
class OodSet:
    """The out-of-distribution pictures: each geometry drawn once per polarity.

    ``images[polarity][i]`` is an RGB picture of digit ``labels[i]`` from ``sources[i]``
    (``"font:<family>/<face>"`` or ``"pen:<digit>.<template>"``).
    """

    images: dict[str, list[Image.Image]]
    labels: np.ndarray
    sources: list[str]

    def kinds(self) -> np.ndarray:
        """``"fonts"`` or ``"strokes"`` for each picture."""
        return np.array(["fonts" if s.startswith("font:") else "strokes" for s in self.sources])


def _placement(
    rng: np.random.Generator, canvas: tuple[int, int]
) -> tuple[float, tuple[float, float]]:
    """A digit height and centre that keep the digit inside the square the service crops."""
    w, h = canvas
    short = min(w, h)
    height = float(rng.uniform(0.4, 0.9)) * short
    room = (short - height) / 2 * 0.8
    cx = w / 2 + float(rng.uniform(-room, room))
    cy = h / 2 + float(rng.uniform(-room, room))
    return height, (cx, cy)


def _finish(ink: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    """Blur, paper and ink levels, noise; the same picture in both polarities."""
    if rng.random() < 0.4:
        ink = ink.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.2))))
    a = np.asarray(ink, dtype=np.float32) / 255.0
    noise = rng.normal(0.0, float(rng.uniform(0.0, 0.04)), size=a.shape)
    paper, pen = float(rng.uniform(0.0, 0.25)), float(rng.uniform(0.75, 1.0))
    light = paper + (pen - paper) * a + noise
    out = {}
    for name, img in (("light_on_dark", light), ("dark_on_light", 1.0 - light)):
        pixels = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        out[name] = Image.fromarray(pixels, mode="L").convert("RGB")
    return out


def _font_picture(
    face: str, digit: int, rng: np.random.Generator, canvas: tuple[int, int]
) -> Image.Image:
    height, center = _placement(rng, canvas)
    weight = int(rng.integers(0, 3))
    glyph = _glyph(face, digit, px=160, weight=weight * 4)
    glyph = glyph.rotate(float(rng.uniform(-12, 12)), Image.Resampling.BICUBIC, expand=True)
    box = glyph.getbbox() or (0, 0, glyph.width, glyph.height)
    glyph = glyph.crop(box)
    scale = height / glyph.height
    small = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(height))), Image.Resampling.LANCZOS
    )
    img = Image.new("L", canvas, 0)
    img.paste(small, (round(center[0] - small.width / 2), round(center[1] - small.height / 2)))
    return img


def build_ood_set(
    per_font_digit: int = 6, per_stroke_template: int = 40, seed: int = 20261128
) -> OodSet:
    """Draw the out-of-distribution set: held-out font families and held-out pen templates.

    Every picture gets its own canvas (``OOD_CANVASES``), digit height 40-90 % of the short
    side, a position inside the square the service's center crop keeps, a rotation of up to
    ±12°, a stroke weight (fonts: 0, 4 or 8 px of outline at 160 px; pens: 4-15 % of the
    height), a blur with p = 0.4, paper and ink levels and noise, then both polarities.

    Args:
        per_font_digit: Pictures per held-out face and digit.
        per_stroke_template: Pictures per held-out pen template.
        seed: Fixes every draw; the default is the set quoted in the model card.

    Returns:
        The set, in a fixed order.
    """
    rng = np.random.default_rng(seed)
    images: dict[str, list[Image.Image]] = {"light_on_dark": [], "dark_on_light": []}
    labels: list[int] = []
    sources: list[str] = []

    def add(ink: Image.Image, digit: int, source: str) -> None:
        for name, img in _finish(ink, rng).items():
            images[name].append(img)
        labels.append(digit)
        sources.append(source)

    for family, faces in HELD_OUT_FONTS.items():
        for face in faces:
            for digit in range(10):
                for _ in range(per_font_digit):
                    canvas = OOD_CANVASES[int(rng.integers(len(OOD_CANVASES)))]
                    add(_font_picture(face, digit, rng, canvas), digit, f"font:{family}/{face}")
    for digit, variants in HELD_OUT_STROKES.items():
        for t, template in enumerate(variants):
            for _ in range(per_stroke_template):
                canvas = OOD_CANVASES[int(rng.integers(len(OOD_CANVASES)))]
                height, center = _placement(rng, canvas)
                ink = draw_pen_digit(
                    template,
                    rng,
                    canvas=canvas,
                    height=height,
                    center=center,
                    pen=float(rng.uniform(0.04, 0.15)),
                    jitter=float(rng.uniform(0.0, 0.03)),
                    slant=float(rng.uniform(-0.2, 0.25)),
                    stretch=float(rng.uniform(0.8, 1.2)),
                    rotate_deg=float(rng.uniform(-12, 12)),
                )
                add(ink, digit, f"pen:{digit}.{t}")
    return OodSet(images=images, labels=np.array(labels), sources=sources)
