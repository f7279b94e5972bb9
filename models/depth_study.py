"""The depth trade-off of the digits ViT, measured: same recipe at depth 2, 4, 6 and 8.

    python -m models.depth_study [--out results/depth-study] [--depths 2 4 6 8]

Each depth is trained by ``models.train_digits`` with everything else fixed (seed, data,
augmentation, schedule, early stopping), then measured: parameters, training time, forward
latency at batch 1 and 32 (fp32, 2 threads, median of repeated runs), held-out and
out-of-distribution accuracy. The previous recipe (sklearn digits only) is trained once at the
shipped depth for the before/after picture. Writes ``study.json``, ``study.md`` and
``depth-study.png`` (train loss, validation accuracy and the OOD monitor per epoch, per depth)
into ``--out``; ``make depth-study`` runs it (23 minutes on 2 quiet cores, not part of CI).
Training times and latencies are only comparable within one quiet run; ``--remeasure`` re-times
the forward passes of an existing study without training again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from matplotlib.figure import Figure

from models.digits import POLARITIES
from models.train_digits import MODEL_ARGS, train

__all__ = ["forward_latency_ms", "main", "run_study"]

BATCHES = (1, 32)


@torch.inference_mode()
def forward_latency_ms(model: torch.nn.Module, batch: int, repeats: int = 50) -> float:
    """Median wall time of one forward pass at ``batch`` (after warm-up), in milliseconds."""
    x = torch.randn(batch, 3, 32, 32)
    for _ in range(5):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _latency(model: torch.nn.Module) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return {str(b): forward_latency_ms(model, b) for b in BATCHES}
    finally:
        torch.set_num_threads(threads)


def _row(name: str, depth: int, record: dict[str, Any], folder: Path) -> dict[str, Any]:
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    latency = _latency(model)
    ev = record["evaluation"]
    best = record["epochs"][record["best_epoch"] - 1]
    return {
        "run": name,
        "recipe": record["recipe"],
        "depth": depth,
        "params": record["param_count"],
        "weights_bytes": record["weights_bytes"],
        "train_seconds": record["timings"]["train_seconds"],
        "epochs_run": record["epochs_run"],
        "best_epoch": record["best_epoch"],
        "final_train_loss": record["epochs"][-1]["train_loss"],
        "best_val_acc": best["val_acc"],
        "latency_ms": latency,
        "held_out": ev["held_out"],
        "ood": ev["ood"],
        "ood_by_kind": ev["ood_by_kind"],
        "epochs": record["epochs"],
    }


def run_study(out: Path, depths: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """Train and measure every depth, then the previous recipe at the shipped depth."""
    runs: list[tuple[str, str, int]] = [(f"depth-{d}", "mixed", d) for d in depths]
    runs.append((f"sklearn-only-depth-{MODEL_ARGS['depth']}", "sklearn", MODEL_ARGS["depth"]))
    rows = []
    for name, recipe, depth in runs:
        folder = out / name
        print(f"== {name}", flush=True)
        record = train(folder, seed=seed, recipe=recipe, depth=depth)
        rows.append(_row(name, depth, record, folder))
        (out / "study.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    pol = list(POLARITIES)
    lines = [
        "| run | params | train s | epochs (best) | fwd b1 ms | fwd b32 ms "
        "| held-out L/D | OOD L/D | OOD fonts / strokes (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fonts = statistics.mean(r["ood_by_kind"][p]["fonts"] for p in pol)
        strokes = statistics.mean(r["ood_by_kind"][p]["strokes"] for p in pol)
        lines.append(
            f"| {r['run']} | {r['params']:,} | {r['train_seconds']:.0f} "
            f"| {r['epochs_run']} ({r['best_epoch']}) "
            f"| {r['latency_ms']['1']:.2f} | {r['latency_ms']['32']:.2f} "
            f"| {r['held_out'][pol[0]]:.1%} / {r['held_out'][pol[1]]:.1%} "
            f"| {r['ood'][pol[0]]:.1%} / {r['ood'][pol[1]]:.1%} "
            f"| {fonts:.1%} / {strokes:.1%} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(12, 4.2), dpi=100)
    axes = [fig.add_subplot(1, 3, i) for i in (1, 2, 3)]
    for r in rows:
        xs = [e["epoch"] for e in r["epochs"]]
        style = "--" if r["recipe"] == "sklearn" else "-"
        axes[0].plot(xs, [e["train_loss"] for e in r["epochs"]], style, label=r["run"])
        axes[1].plot(xs, [e["val_acc"] for e in r["epochs"]], style, label=r["run"])
        axes[2].plot(xs, [e["ood_acc"] for e in r["epochs"]], style, label=r["run"])
    titles = (
        "train loss (augmented, smoothed)",
        "validation accuracy (selection)",
        "out-of-distribution accuracy (monitor only)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    axes[1].set_ylim(0.0, 1.01)
    axes[2].set_ylim(0.0, 1.01)
    axes[2].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Command line entry point: train, measure, write the table and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/depth-study"))
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="only re-time the forward passes of the runs in --out (on a quiet machine)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="--remeasure: rounds per model")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.remeasure:
        rows = json.loads((args.out / "study.json").read_text())
        models = [
            timm.create_model(f"local-dir:{args.out / row['run']}", pretrained=True).eval()
            for row in rows
        ]
        # Round-robin, so a noisy moment on a shared machine hits every model alike.
        rounds: list[list[dict[str, float]]] = [[] for _ in rows]
        for _ in range(args.rounds):
            for i, model in enumerate(models):
                rounds[i].append(_latency(model))
        for row, measured in zip(rows, rounds, strict=True):
            row["latency_ms"] = {
                str(b): statistics.median(m[str(b)] for m in measured) for b in BATCHES
            }
        (args.out / "study.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    else:
        rows = run_study(args.out, args.depths, args.seed)
    table = _table(rows)
    (args.out / "study.md").write_text(table, encoding="utf-8")
    _plot(rows, args.out / "depth-study.png")
    print(table)
    print(f"study took {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
