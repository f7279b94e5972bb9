"""The only module that runs the model: decoded images in, probabilities and attention out.

One call handles one batch: the uint8 images (any sizes) are packed into one canvas, moved to the
device as uint8, resized/cropped in a single batched ``grid_sample`` following the model's data
config (timm's eval transform: shorter side to ``input/crop_pct``, center crop), normalized, and
sent through the model once. Attention is captured only where the batch needs it: a block whose
weights are wanted runs timm's explicit softmax path for that call, every other block keeps the
fused kernel.

With ``script=True`` (the service's default, ``VIT_TORCHSCRIPT``), a float32 model on the CPU
runs as frozen TorchScript graphs, one per set of captured blocks, traced from the eager model
on first use (the warm-up traces the three). An eager forward pass releases and retakes the GIL
at every op, and each retake waits behind any thread running Python (the event loop, under
load) for up to the switch interval; a graph runs all its ops without the GIL and retakes it
once (``loadtests/gil_contention.py``).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .explain import crop_window
from .loading import LoadedModel
from .options import ATTENTION_MODES, AttentionMode

__all__ = [
    "BatchResult",
    "Engine",
    "ItemResult",
    "rollout",
]

_logger = logging.getLogger(__name__)

# A decoded image: uint8 HWC, a numpy array (Pillow) or a tensor on the device (nvJPEG).
Image = np.ndarray | torch.Tensor
_RANK = {mode: rank for rank, mode in enumerate(ATTENTION_MODES)}
_GRID_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


@dataclass(frozen=True)
class ItemResult:
    """One image's raw outputs."""

    probs: np.ndarray  # (num_classes,) float32 softmax
    attention: np.ndarray | None  # (rows, cols) float32 over patches, sums to 1; None for "none"


@dataclass(frozen=True)
class BatchResult:
    """A batch's per-item outputs and where its time went (milliseconds)."""

    items: list[ItemResult]
    preprocess_ms: float
    forward_ms: float
    attention_ms: float


def rollout(layers: Sequence[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) read from the given query rows.

    Args:
        layers: per block, head-averaged attention (B, N, N), first block first.
        query: (B, N) weights over the query tokens whose rollout is wanted (e.g. one-hot CLS).

    Returns:
        (B, N) how much each token flows into the query through all blocks.
    """
    row = query
    for attn in reversed(layers):
        eye = torch.eye(attn.shape[-1], device=attn.device, dtype=attn.dtype)
        residual = attn + eye  # the skip connection carries the token itself
        residual = residual / residual.sum(dim=-1, keepdim=True)
        # row @ (A_L ... A_1), evaluated right to left one vector-matrix product at a time.
        row = torch.bmm(row.unsqueeze(1), residual).squeeze(1)
    return row


class Engine:
    """Runs batches of decoded images through one loaded ViT."""

    def __init__(self, loaded: LoadedModel, *, script: bool = False) -> None:
        self.model = loaded.model
        self.info = loaded.info
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self._interp = _GRID_MODES.get(self.info.interpolation, "bilinear")
        mean = torch.tensor(self.info.mean, device=self.device, dtype=torch.float32)
        std = torch.tensor(self.info.std, device=self.device, dtype=torch.float32)
        # Folded so normalization is one multiply-add on 0..255 values.
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self._shift = (-mean / std).view(1, -1, 1, 1)
        self._blocks: list[Any] = list(self.model.blocks)  # type: ignore[arg-type]
        self._capture: list[torch.Tensor | None] = [None] * len(self._blocks)
        self._wanted = [False] * len(self._blocks)
        for index, block in enumerate(self._blocks):
            block.attn.attn_drop.register_forward_hook(self._make_hook(index))
        self._script = script and self.device.type == "cpu" and self.dtype == torch.float32
        self._graphs: dict[tuple[int, ...], Any] = {}

    def _make_hook(self, index: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self._wanted[index]:
                # Head average now, in fp32: (B, H, N, N) -> (B, N, N).
                self._capture[index] = output.float().mean(dim=1)

        return hook

    @torch.inference_mode()
    def run(self, images: Sequence[Image], modes: Sequence[AttentionMode]) -> BatchResult:
        """Classify a batch; ``modes[i]`` is the attention image ``i`` asked for."""
        if not images:
            return BatchResult([], 0.0, 0.0, 0.0)
        try:
            return self._run(images, modes)
        except torch.OutOfMemoryError:
            if len(images) == 1:
                raise
            # Halve and retry: a large batch of large inputs must not fail every request in it.
            _logger.warning("device out of memory at batch %d; splitting", len(images))
            torch.cuda.empty_cache()
            half = len(images) // 2
            first = self.run(images[:half], modes[:half])
            second = self.run(images[half:], modes[half:])
            return BatchResult(
                first.items + second.items,
                first.preprocess_ms + second.preprocess_ms,
                first.forward_ms + second.forward_ms,
                first.attention_ms + second.attention_ms,
            )

    def _run(self, images: Sequence[Image], modes: Sequence[AttentionMode]) -> BatchResult:
        started = time.perf_counter()
        batch = self.preprocess(images)
        self._sync()
        preprocessed = time.perf_counter()

        need = max((_RANK[m] for m in modes), default=0)
        depth = len(self._blocks)
        if need == _RANK["rollout"]:
            wanted = list(range(depth))
        elif need == _RANK["cls"]:
            wanted = [depth - 1]
        else:
            wanted = []
        logits = self._forward(batch, wanted)
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        forwarded = time.perf_counter()

        attention: list[np.ndarray | None] = [None] * len(images)
        if wanted:
            attention = self._attention(modes, need)
        self._capture = [None] * depth
        finished = time.perf_counter()

        items = [ItemResult(probs=probs[i], attention=attention[i]) for i in range(len(images))]
        return BatchResult(
            items,
            preprocess_ms=(preprocessed - started) * 1e3,
            forward_ms=(forwarded - preprocessed) * 1e3,
            attention_ms=(finished - forwarded) * 1e3,
        )

    def preprocess(self, images: Sequence[Image]) -> torch.Tensor:
        """Pack uint8 HWC images into one normalized (B, C, H, W) model input on the device.

        Images are numpy arrays (decoded by Pillow) or tensors already on the device (decoded
        there from JPEG); either way each one's exact resize and crop happen here, together.
        """
        heights = [img.shape[0] for img in images]
        widths = [img.shape[1] for img in images]
        canvas_h, canvas_w = max(heights), max(widths)
        if all(isinstance(img, np.ndarray) for img in images):
            host = np.empty((len(images), canvas_h, canvas_w, 3), dtype=np.uint8)
            _fill_canvas(host, images)
            pixels = torch.from_numpy(host)
            if self.device.type == "cuda":
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = torch.empty(
                (len(images), canvas_h, canvas_w, 3), dtype=torch.uint8, device=self.device
            )
            on_device = [
                img.to(self.device)
                if isinstance(img, torch.Tensor)
                else torch.from_numpy(img).to(self.device)
                for img in images
            ]
            _fill_canvas(pixels, on_device)
        pixels = pixels.permute(0, 3, 1, 2).float()

        theta = torch.zeros((len(images), 2, 3), dtype=torch.float32)
        for i, (h, w) in enumerate(zip(heights, widths, strict=True)):
            x0, y0, x1, y1 = crop_window(h, w, self.info)
            # Map output coords in [-1, 1] onto the crop window inside this image's canvas slot.
            theta[i, 0, 0] = (x1 - x0) / canvas_w
            theta[i, 0, 2] = (x0 + x1) / canvas_w - 1
            theta[i, 1, 1] = (y1 - y0) / canvas_h
            theta[i, 1, 2] = (y0 + y1) / canvas_h - 1
        in_c, in_h, in_w = self.info.input_size
        grid = F.affine_grid(
            theta.to(self.device), [len(images), in_c, in_h, in_w], align_corners=False
        )
        resized = F.grid_sample(
            pixels, grid, mode=self._interp, padding_mode="border", align_corners=False
        )
        if self._interp == "bicubic":
            resized = resized.clamp_(0, 255)
        return (resized * self._scale + self._shift).to(self.dtype)

    def _forward(self, batch: torch.Tensor, wanted: list[int]) -> torch.Tensor:
        if self._script:
            graph = self._graphs.get(tuple(wanted))
            if graph is None:
                graph = self._trace(batch, wanted)
            if graph is not None:
                logits, *captured = graph(batch)
                for index, weights in zip(wanted, captured, strict=True):
                    self._capture[index] = weights
                return logits
        return self._eager(batch, wanted)

    def _trace(self, batch: torch.Tensor, wanted: list[int]) -> Any:
        """Trace, freeze and optimize the forward pass that captures ``wanted`` blocks."""
        engine = self

        class Captured(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                logits = engine._eager(x, wanted)
                captured = [engine._capture[i] for i in wanted]
                return (logits, *(c for c in captured if c is not None))

        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # TorchScript's deprecation notice (its successor, torch.compile, needs a C++
                # compiler in the image at run time), and timm's shape asserts traced as
                # constants: the input size is fixed by preprocessing, the batch size stays
                # free (tests/unit/test_engine.py checks sizes 1 to 16 against eager).
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                traced = torch.jit.trace(Captured(), batch, check_trace=False)
                graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except Exception:  # an architecture TorchScript cannot take: run it eagerly
            _logger.warning(
                "cannot run the model as TorchScript; running it eagerly", exc_info=True
            )
            self._script = False
            return None
        finally:
            self._capture = [None] * len(self._blocks)
        self._graphs[tuple(wanted)] = graph
        _logger.info(
            "traced the forward pass capturing %d block(s) in %.0f ms",
            len(wanted),
            (time.perf_counter() - started) * 1e3,
        )
        return graph

    def _eager(self, batch: torch.Tensor, wanted: list[int]) -> torch.Tensor:
        fused = [block.attn.fused_attn for block in self._blocks]
        for index in wanted:
            self._wanted[index] = True
            self._blocks[index].attn.fused_attn = False
        try:
            return self.model(batch)
        finally:
            for index in wanted:
                self._wanted[index] = False
                self._blocks[index].attn.fused_attn = fused[index]

    def _attention(self, modes: Sequence[AttentionMode], need: int) -> list[np.ndarray | None]:
        info = self.info
        prefix = info.num_prefix_tokens
        captured = [c for c in self._capture if c is not None]
        last = captured[-1]
        batch, tokens = last.shape[0], last.shape[-1]
        if info.has_class_token:
            query = None  # the CLS row: read it directly
            cls_rows = last[:, 0, prefix:]
        else:
            # No CLS token: read what the patch tokens attend to, averaged over them.
            query = torch.zeros((batch, tokens), device=last.device)
            query[:, prefix:] = 1.0 / (tokens - prefix)
            cls_rows = torch.bmm(query.unsqueeze(1), last).squeeze(1)[:, prefix:]
        per_mode = {"cls": _normalize(cls_rows)}
        if need == _RANK["rollout"]:
            if query is None:
                query = torch.zeros((batch, tokens), device=last.device)
                query[:, 0] = 1.0
            per_mode["rollout"] = _normalize(rollout(captured, query)[:, prefix:])
        rows, cols = info.grid
        maps = {mode: w.reshape(batch, rows, cols).cpu().numpy() for mode, w in per_mode.items()}
        return [None if mode == "none" else maps[mode][i] for i, mode in enumerate(modes)]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warmup(self, batch_size: int) -> float:
        """Run the largest batch once (every block capturing) so no request pays for it."""
        rng = np.random.default_rng(0)
        side = max(self.info.resize_size, 1)
        images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8)] * batch_size
        started = time.perf_counter()
        self.run(images, ["rollout"] * batch_size)
        self.run(images[:1], ["cls"])
        self.run(images[:1], ["none"])
        return (time.perf_counter() - started) * 1e3


def _fill_canvas(canvas: Any, images: Sequence[Any]) -> None:
    """Copy each HWC image into its canvas slot (numpy or torch, same slicing)."""
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        canvas[i, :h, :w] = img
        # Edge-replicate into the unused canvas so samples at an image border see that
        # border (as a single-image resize would), not a neighbour's padding.
        canvas[i, h:, :w] = img[h - 1 : h]
        canvas[i, :, w:] = canvas[i, :, w - 1 : w]


def _normalize(weights: torch.Tensor) -> torch.Tensor:
    weights = weights.clamp_min(0)
    total = weights.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(1e-12), 1.0 / weights.shape[-1])
