"""Score a digits checkpoint on the held-out sklearn split and the out-of-distribution set.

    python -m models.evaluate_digits local-dir:models/vit-digits [--path service] [--json F]

Two ways into the model, both the way others meet it:

* ``timm``: plain ``timm`` and its eval transform on PIL pictures (what the model card and the
  unit tests quote);
* ``service``: each picture PNG-encoded, decoded by ``service.model.imaging`` and batched through
  ``service.model.engine`` (the exact path of ``POST /classify`` without HTTP).

The held-out split is drawn with ``render_digit`` at 32 px in both polarities; the
out-of-distribution set is ``models.synth.build_ood_set()`` (held-out font families and pen
templates). Accuracy is reported per polarity, and for the OOD set per source kind too.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from matplotlib.figure import Figure
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from models.digits import POLARITIES, load_split, render_digit
from models.synth import OodSet, build_ood_set

__all__ = [
    "Predictor",
    "confusion_matrix",
    "evaluate",
    "main",
    "plot_confusion",
    "plot_misclassified",
    "service_predictor",
    "timm_predictor",
]

Predictor = Callable[[Sequence[Image.Image]], np.ndarray]


def timm_predictor(model: torch.nn.Module, batch_size: int = 256) -> Predictor:
    """Predicted labels through timm's own eval transform."""
    transform = create_transform(**resolve_model_data_config(model))

    @torch.no_grad()
    def predict(images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.stack([transform(img.convert("RGB")) for img in chunk])
            out.append(model(batch).argmax(1).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    return predict


def service_predictor(source: str, batch_size: int = 32) -> Predictor:
    """Predicted labels through the service's decoder and batched device preprocessing."""
    from service.model.engine import Engine
    from service.model.imaging import decode_image
    from service.model.loading import load_model

    engine = Engine(load_model(source, device="cpu", dtype="float32"))
    min_side = engine.info.resize_size

    def predict(images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            pixels = []
            for img in images[start : start + batch_size]:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                pixels.append(decode_image(buf.getvalue(), min_short_side=min_side).pixels)
            result = engine.run(pixels, ["none"] * len(pixels))
            out.append(np.array([int(item.probs.argmax()) for item in result.items]))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    return predict


def confusion_matrix(y: np.ndarray, pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """``m[true, predicted]`` counts."""
    m = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def evaluate(
    predict: Predictor, ood: OodSet | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Accuracy on the held-out split and the OOD set, per polarity and per OOD source kind.

    Args:
        predict: Pictures -> labels.
        ood: The OOD set (built with defaults when ``None``).

    Returns:
        ``(report, predictions)``: the report is JSON-ready; ``predictions`` maps
        ``"held_out/<polarity>"`` and ``"ood/<polarity>"`` to predicted labels, in set order.
    """
    ood = ood if ood is not None else build_ood_set()
    kinds = ood.kinds()
    split = load_split()
    report: dict[str, Any] = {"held_out": {}, "ood": {}, "ood_by_kind": {}, "ood_count": {}}
    predictions: dict[str, np.ndarray] = {}
    for name, invert in POLARITIES.items():
        pred = predict([render_digit(x, 32, invert) for x in split.X_test])
        predictions[f"held_out/{name}"] = pred
        report["held_out"][name] = float(np.mean(pred == split.y_test))

        pred = predict(ood.images[name])
        predictions[f"ood/{name}"] = pred
        correct = pred == ood.labels
        report["ood"][name] = float(np.mean(correct))
        report["ood_by_kind"][name] = {
            k: float(np.mean(correct[kinds == k])) for k in ("fonts", "strokes")
        }
    report["ood_count"] = {k: int(np.sum(kinds == k)) for k in ("fonts", "strokes")}
    report["held_out_count"] = len(load_split().y_test)
    return report, predictions


def plot_confusion(matrices: dict[str, np.ndarray], path: Path) -> None:
    """One confusion matrix per named set, side by side."""
    fig = Figure(figsize=(4.2 * len(matrices), 4.2), dpi=100)
    for i, (title, m) in enumerate(matrices.items(), start=1):
        ax = fig.add_subplot(1, len(matrices), i)
        ax.imshow(m, cmap="Blues")
        for (r, c), v in np.ndenumerate(m):
            if v:
                color = "white" if v > m.max() / 2 else "black"
                ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_misclassified(
    images: Sequence[Image.Image],
    y: np.ndarray,
    pred: np.ndarray,
    captions: Sequence[str],
    path: Path,
    limit: int = 16,
) -> None:
    """Up to ``limit`` misclassified pictures spread over the set, captioned true → predicted."""
    errors = np.flatnonzero(pred != y)
    # Evenly through the set, so every source that fails shows up, not just the first.
    wrong = errors[np.linspace(0, len(errors) - 1, min(limit, len(errors))).astype(int)]
    cols = 8
    rows = max(1, -(-len(wrong) // cols))
    fig = Figure(figsize=(cols * 1.3, rows * 1.55), dpi=100)
    for k, i in enumerate(wrong, start=1):
        ax = fig.add_subplot(rows, cols, k)
        ax.imshow(np.asarray(images[i].convert("L")), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{y[i]}→{pred[i]}\n{captions[i]}", fontsize=6)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point; prints the report and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="local-dir:PATH (or any service model source)")
    parser.add_argument("--path", choices=("timm", "service"), default="timm")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    path: Literal["timm", "service"] = args.path
    if path == "timm":
        model = timm.create_model(args.source, pretrained=True).eval()
        predict = timm_predictor(model)
    else:
        predict = service_predictor(args.source)
    report, _ = evaluate(predict)
    report["source"] = args.source
    report["path"] = path
    for name in POLARITIES:
        kinds = report["ood_by_kind"][name]
        print(
            f"{name:14s} held-out {report['held_out'][name]:.4f}  ood {report['ood'][name]:.4f}"
            f"  (fonts {kinds['fonts']:.4f}, strokes {kinds['strokes']:.4f})"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
