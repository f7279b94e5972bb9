"""The forward pass padded to batch-size buckets, and on CUDA replayed as captured CUDA graphs.

An eager forward pass of ViT-B launches ~200 kernels from Python, and between two launches the
launching thread may wait for the GIL behind the model process's event loop (its ZeroMQ traffic)
for up to the switch interval: on the lent H200 a batch of 32 took 7.4 ms served against 3.4 ms
alone. A CUDA graph launches them all with one call. A graph is captured for a fixed input shape,
so batches are padded up to a bucket (powers of two up to the largest batch, and the largest
batch itself): a batch of 5 runs the graph of 8 and reads back its first 5 rows.

Padding changes no answer: every op of a ViT works within one image (layer norm per token,
attention within an image's tokens, the head per image), so the rows past a batch's own, whatever
they hold, never reach its rows (``tests/unit/test_graphs.py`` and, on a GPU,
``tests/unit/test_gpu.py`` check it with mixed batch sizes).

``BucketedForward`` with ``capture=False`` pads the same way and runs the function eagerly: the
CPU tests use it to check the padding on a machine without CUDA.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Hashable, Sequence

import torch

__all__ = ["BucketedForward", "buckets_for"]

_logger = logging.getLogger(__name__)

# What the captured function returns: the logits, then whatever else the pass captured.
Outputs = tuple[torch.Tensor, ...]


def buckets_for(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes = {1 << k for k in range(max_batch_size.bit_length()) if 1 << k <= max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


class BucketedForward:
    """``fn(key)`` makes the function for one kind of pass (e.g. which blocks' attention it
    captures); each (key, bucket) gets its static input and, with ``capture``, a CUDA graph.

    Args:
        make_fn: key -> a function of one input batch returning a tuple of tensors whose first
            dimension is the batch.
        sample_shape: one input's shape (C, H, W).
        dtype: the input's dtype.
        device: where the model runs.
        buckets: the batch sizes captured; a batch above the largest is refused.
        capture: capture CUDA graphs (CUDA only), else run padded eagerly.
    """

    def __init__(
        self,
        make_fn: Callable[[Hashable], Callable[[torch.Tensor], Outputs]],
        *,
        sample_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        buckets: Sequence[int],
        capture: bool,
    ) -> None:
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._make_fn = make_fn
        self._shape = tuple(sample_shape)
        self._dtype = dtype
        self._device = device
        self.buckets = tuple(sorted(set(buckets)))
        self.capture = capture
        self._fns: dict[Hashable, Callable[[torch.Tensor], Outputs]] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._graphs: dict[tuple[Hashable, int], tuple[torch.cuda.CUDAGraph, Outputs]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.capture_ms = 0.0  # spent capturing so far

    def bucket(self, size: int) -> int:
        """The smallest bucket that holds ``size`` images."""
        index = bisect.bisect_left(self.buckets, size)
        if index == len(self.buckets):
            raise ValueError(f"a batch of {size} is larger than the largest bucket")
        return self.buckets[index]

    def __call__(self, key: Hashable, batch: torch.Tensor) -> Outputs:
        """Run the pass ``key`` on ``batch``; each output cut back to the batch's rows.

        With ``capture`` the outputs are the graph's own buffers: read them before the next
        call with the same key and bucket (its replay overwrites them).
        """
        size = batch.shape[0]
        bucket = self.bucket(size)
        static = self._input(bucket)
        static[:size].copy_(batch)
        if self.capture:
            graph, outputs = self._graph(key, bucket)
            graph.replay()
        else:
            outputs = self._fn(key)(static)
        return tuple(out[:size] for out in outputs)

    def warm(self, keys: Sequence[Hashable]) -> float:
        """Capture (or run once) every (key, bucket) now; milliseconds spent."""
        started = time.perf_counter()
        for key in keys:
            for bucket in self.buckets:
                if self.capture:
                    self._graph(key, bucket)
                else:
                    self._fn(key)(self._input(bucket))
        return (time.perf_counter() - started) * 1e3

    def _fn(self, key: Hashable) -> Callable[[torch.Tensor], Outputs]:
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._make_fn(key)
        return fn

    def _input(self, bucket: int) -> torch.Tensor:
        static = self._inputs.get(bucket)
        if static is None:
            static = torch.zeros((bucket, *self._shape), dtype=self._dtype, device=self._device)
            self._inputs[bucket] = static
        return static

    def _graph(self, key: Hashable, bucket: int) -> tuple[torch.cuda.CUDAGraph, Outputs]:
        found = self._graphs.get((key, bucket))
        if found is not None:
            return found
        started = time.perf_counter()
        fn, static = self._fn(key), self._input(bucket)
        # Warm on a side stream first (cuBLAS handles, lazy kernels), as capture requires.
        current = torch.cuda.current_stream(self._device)
        side = torch.cuda.Stream(self._device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(static)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One memory pool for all the graphs: only one replays at a time, and its outputs are
        # read before the next one runs.
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = fn(static)
        torch.cuda.synchronize(self._device)
        spent = (time.perf_counter() - started) * 1e3
        self.capture_ms += spent
        _logger.debug("captured %r at batch %d in %.0f ms", key, bucket, spent)
        self._graphs[(key, bucket)] = found = (graph, tuple(outputs))
        return found
