"""How much a busy Python thread slows the model's forward pass in the same process.

    python -m loadtests.gil_contention --out results/gil_contention.json

A worker runs its event loop and its model thread in one process. Each eager PyTorch op releases
the GIL and takes it back; while another thread runs Python (the event loop parsing and refusing
requests under overload), taking it back waits for that thread's switch interval (5 ms by
default), once per op. A traced, frozen graph (TorchScript) runs all its ops without the GIL and
takes it back once per call. This measures forward passes per second of the default model
(batch 8, one torch thread), alone and beside a thread spinning in Python, for eager and frozen
TorchScript, at the default switch interval and at 0.5 ms. It is the worst case (the event loop
also waits on sockets, releasing the GIL), and it is why goodput falls under overload
(docs/BENCHMARKS.md, "Overload").

The same wait hits the event loop from the other side: any call that releases the GIL, however
short, waits to get it back while the decode or model thread holds it. Second table: the cost
of the event loop's per-request calls beside a spinning thread, with the replacements the
service uses (``random`` for request ids, ``heapq.nlargest`` on a list for the top classes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from harness.serving import REPO
from service.model.loading import load_model
from service.runtime.settings import DEFAULT_MODEL

__all__ = ["main"]


@contextlib.contextmanager
def _spinning(busy: bool) -> Iterator[None]:
    """With ``busy``, a thread spinning in Python for the block's duration."""
    if not busy:
        yield
        return
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(200))  # pure Python, as an event loop parsing requests

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        yield
    finally:
        stop.set()
        spinner.join()


def _rate(
    forward: Callable[[torch.Tensor], Any], x: torch.Tensor, seconds: float, busy: bool
) -> float:
    calls, end = 0, time.perf_counter() + seconds
    with _spinning(busy), torch.inference_mode():
        while time.perf_counter() < end:
            forward(x)
            calls += 1
    return calls / seconds


def event_loop_calls(seconds: float) -> list[dict[str, Any]]:
    """Microseconds per call, alone and beside a thread spinning in Python, of the calls a
    request once made on the event loop and the ones that replaced them."""
    import os
    import random

    import numpy as np

    from service.web.answers import top_k

    rng = np.random.default_rng(0)
    ten, thousand = rng.random(10, dtype=np.float32), rng.random(1000, dtype=np.float32)
    labels = tuple(str(i) for i in range(1000))
    calls: dict[str, Callable[[], Any]] = {
        "os.urandom(16).hex() (request id, before)": lambda: os.urandom(16).hex(),
        "random.getrandbits(128) (request id, now)": lambda: f"{random.getrandbits(128):032x}",
    }

    def numpy_top5(p: np.ndarray) -> Any:
        return np.argsort(-p[np.argpartition(-p, 4)[:5]], kind="stable")

    for name, probs in (("10", ten), ("1,000", thousand)):
        calls[f"argpartition + argsort, {name} classes (top-5, before)"] = functools.partial(
            numpy_top5, probs
        )
        calls[f"heapq.nlargest, {name} classes (top-5, now)"] = functools.partial(
            top_k, probs, 5, labels
        )
    rows = []
    for name, call in calls.items():
        timing = {}
        for busy in (False, True):
            with _spinning(busy):
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds / 4:
                    call()
                    count += 1
                timing[busy] = (time.perf_counter() - started) / count * 1e6
        rows.append(
            {"call": name, "alone_us": round(timing[False], 2), "beside_us": round(timing[True], 1)}
        )
        print(
            f"{name:>52}: alone {timing[False]:.2f} us, beside a busy thread {timing[True]:.1f} us",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gil_contention.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(DEFAULT_MODEL, device="cpu", dtype="float32")
    model = loaded.model.eval()
    _, height, width = loaded.info.input_size
    x = torch.randn(args.batch, 3, height, width)
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))
        for _ in range(5):
            model(x)
            frozen(x)
    default_interval = sys.getswitchinterval()
    rows = []
    for interval in (default_interval, 0.0005):
        sys.setswitchinterval(interval)
        for name, forward in (("eager", model), ("frozen TorchScript", frozen)):
            alone = _rate(forward, x, args.seconds, busy=False)
            beside = _rate(forward, x, args.seconds, busy=True)
            row = {
                "forward": name,
                "switch_interval_ms": interval * 1e3,
                "alone_per_s": round(alone, 1),
                "beside_busy_thread_per_s": round(beside, 1),
                "ratio": round(beside / alone, 3),
            }
            rows.append(row)
            print(
                f"{name:>18}, switch interval {interval * 1e3:g} ms: alone {alone:.0f}/s, "
                f"beside a busy Python thread {beside:.0f}/s ({beside / alone:.2f})",
                flush=True,
            )
    sys.setswitchinterval(default_interval)
    calls = event_loop_calls(args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"batch": args.batch, "rows": rows, "event_loop_calls": calls}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
