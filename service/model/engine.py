"""The only module that runs the model: one batch of images in, probabilities and attention out.

``Work`` is one image as the model takes it (pixels Pillow decoded, or a JPEG to decode on the
device) and ``Outcome`` one image's answer. ``Engine.run_works`` is what the batcher calls with a
batch: JPEGs are decoded on the device in one call (nvJPEG on CUDA; what it refuses goes through
Pillow with the upload's 4xx table), then ``Engine.run`` classifies the pixels.

One call of ``run`` handles one batch: the uint8 images (any sizes) are packed into one canvas,
moved to the device as uint8, resized/cropped in a single batched ``grid_sample`` following the
model's data config (timm's eval transform: shorter side to ``input/crop_pct``, center crop),
normalized, and sent through the model once. Attention is captured only where the batch needs
it: a block whose weights are wanted runs timm's explicit softmax path for that call, every
other block keeps the fused kernel.

With ``script=True`` (the service's default, ``VIT_TORCHSCRIPT``), a float32 model on the CPU
runs as frozen TorchScript graphs, one per set of captured blocks, traced from the eager model
on first use (the warm-up traces the three). An eager forward pass releases and retakes the GIL
at every op, and each retake waits behind any thread running Python (the event loop, under
load) for up to the switch interval; a graph runs all its ops without the GIL and retakes it
once (``loadtests/gil_contention.py``).

On CUDA (``graphs=True``, the service's default, ``VIT_CUDA_GRAPHS``) the forward pass of each
attention mode is captured as CUDA graphs at warm-up, one per batch-size bucket, and a batch is
padded to its bucket (``service/model/graphs.py``). A batch's work is split in two for the
batcher to overlap: ``prepare`` (device decode, canvas, resize, normalize) runs on a CUDA stream
of its own, so batch n+1 is prepared on one thread while batch n's graph runs from another
(``finish``); ``run_works`` does both in turn.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ApiError
from ..metrics import Metrics
from ..runtime.settings import ATTENTION_MODES, AttentionMode
from .geometry import crop_window
from .graphs import BucketedForward, buckets_for
from .imaging import ImageLimits, decode_image
from .loading import LoadedModel, ModelInfo

__all__ = [
    "BatchResult",
    "Engine",
    "ItemResult",
    "Outcome",
    "Prepared",
    "Work",
    "rollout",
]

_logger = logging.getLogger(__name__)

# torchvision 0.29 warns on every decode_jpeg call that TorchCodec supersedes it; decode_jpeg is
# what decodes nvJPEG batches with this torch pin (docs/ARCHITECTURE.md, *GPU data path*).
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)


@dataclass(frozen=True)
class Work:
    """One image for the model: Pillow-decoded pixels, or JPEG bytes to decode on the device."""

    mode: AttentionMode
    pixels: np.ndarray | None = None  # uint8 HWC
    jpeg: bytes | None = None
    version: str | None = None  # over the link: the version the HTTP worker routed it to


@dataclass(frozen=True)
class Outcome:
    """One image's answer from the model."""

    probs: np.ndarray  # (num_classes,) float32
    attention: np.ndarray | None  # (rows, cols) float32, or None for attention "none"
    batch_size: int  # images in the forward pass it rode in
    inference_ms: float  # that batch's device decode + preprocess + forward + attention
    queue_s: float  # from joining the queue to its batch starting
    model: ModelInfo | None = None  # the version that answered, where the runner knows it


# A decoded image: uint8 HWC, a numpy array (Pillow) or a tensor on the device (nvJPEG).
Image = np.ndarray | torch.Tensor
_RANK = {mode: rank for rank, mode in enumerate(ATTENTION_MODES)}
# Warm-up runs of each pass at batch 1 (see ``Engine.warmup``).
WARM_RUNS = 3
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


@dataclass(frozen=True)
class Prepared:
    """A batch decoded and preprocessed on the device, waiting for its forward pass."""

    errors: list[ApiError | None]  # per work: the 4xx its device decode ended in, else None
    good: list[int]  # the works that go through the model, in order
    images: list[Image]  # their decoded pixels (to preprocess again should the pass run out)
    modes: list[AttentionMode]  # their attention modes
    batch: torch.Tensor | None  # their model input; None: none, or preprocessing ran out
    decode_s: float
    preprocess_ms: float


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
    """Runs batches of images through one loaded ViT.

    Args:
        loaded: the model on its device.
        script: run a float32 CPU model as frozen TorchScript graphs.
        graphs: run a CUDA model's forward passes as CUDA graphs, one per attention capture
            and batch-size bucket up to ``max_batch_size``, captured at warm-up.
        max_batch_size: the largest batch the engine is given (the largest bucket).
        limits: what a JPEG the device cannot decode must satisfy when Pillow decodes it.
        metrics: where ``run_works`` records its stage times (and CUDA memory).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        script: bool = False,
        graphs: bool = False,
        max_batch_size: int = 32,
        limits: ImageLimits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
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
        self._hooks = [
            block.attn.attn_drop.register_forward_hook(self._make_hook(index))
            for index, block in enumerate(self._blocks)
        ]
        self._script = script and self.device.type == "cpu" and self.dtype == torch.float32
        self._graphs: dict[tuple[int, ...], Any] = {}
        self._limits = limits or ImageLimits()
        self._metrics = metrics
        cuda = self.device.type == "cuda"
        self.bucketed = (
            BucketedForward(
                self._pass,
                sample_shape=self.info.input_size,
                dtype=self.dtype,
                device=self.device,
                buckets=buckets_for(max_batch_size),
                capture=True,
            )
            if graphs and cuda
            else None
        )
        # Preprocessing's own stream: batch n+1 is prepared while batch n runs.
        self._prep_stream = torch.cuda.Stream(self.device) if cuda else None

    def close(self) -> None:
        """Let go of the model, after its last batch: the attention hooks and the graphs hold
        this engine (reference cycles), so without this its memory would wait for a full
        garbage collection; with it, it is freed as the last reference goes."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._graphs.clear()
        self.bucketed = None
        self._capture = [None] * len(self._blocks)

    @property
    def overlaps(self) -> bool:
        """Whether ``prepare`` of one batch may run beside ``finish`` of another (on CUDA:
        each has its own stream; on the CPU both would share the same cores)."""
        return self._prep_stream is not None

    @property
    def forward_kind(self) -> str:
        """How the forward pass runs: 'cuda-graphs', 'torchscript' or 'eager'."""
        if self.bucketed is not None:
            return "cuda-graphs"
        return "torchscript" if self._script else "eager"

    def _make_hook(self, index: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self._wanted[index]:
                # Head average now, in fp32: (B, H, N, N) -> (B, N, N).
                self._capture[index] = output.float().mean(dim=1)

        return hook

    def run_works(self, works: list[Work]) -> list[Outcome | ApiError]:
        """One batch as the batcher hands it over: one Outcome (queue time left 0 for the
        caller) or per-image ApiError each, stage times recorded."""
        return self.finish(self.prepare(works))

    @torch.inference_mode()
    def prepare(self, works: list[Work]) -> Prepared:
        """Decode a batch's JPEGs on the device and build its model input (on the
        preprocessing stream on CUDA, waited for here: only this thread waits)."""
        images: list[Image | ApiError | None] = [w.pixels for w in works]
        jpegs = [i for i, w in enumerate(works) if w.jpeg is not None]
        with self._preparing():
            started = time.perf_counter()
            if jpegs:
                decoded = self._decode_on_device([works[i].jpeg for i in jpegs])  # type: ignore[misc]
                for i, image in zip(jpegs, decoded, strict=True):
                    images[i] = image
            decoded_at = time.perf_counter()
            good = [i for i, image in enumerate(images) if not isinstance(image, ApiError)]
            pixels: list[Image] = [images[i] for i in good]  # type: ignore[misc]
            batch = None
            if good:
                try:
                    batch = self.preprocess(pixels)
                except torch.OutOfMemoryError:  # ``finish`` runs them in smaller batches
                    _logger.warning("device out of memory preprocessing %d images", len(good))
                    torch.cuda.empty_cache()
            self._sync_preparation()
        return Prepared(
            errors=[image if isinstance(image, ApiError) else None for image in images],
            good=good,
            images=pixels,
            modes=[works[i].mode for i in good],
            batch=batch,
            decode_s=decoded_at - started if jpegs else 0.0,
            preprocess_ms=(time.perf_counter() - decoded_at) * 1e3,
        )

    @torch.inference_mode()
    def finish(self, prepared: Prepared) -> list[Outcome | ApiError]:
        """The forward pass and attention of a prepared batch; one Outcome or ApiError each."""
        result = BatchResult([], prepared.preprocess_ms, 0.0, 0.0)
        if prepared.good:
            result = self._finish(prepared)
        metrics = self._metrics
        if metrics is not None:
            if prepared.decode_s:
                metrics.observe_stage("device_decode", prepared.decode_s)
            metrics.observe_stage("preprocess", result.preprocess_ms / 1e3)
            metrics.observe_stage("forward", result.forward_ms / 1e3)
            metrics.observe_stage("attention", result.attention_ms / 1e3)
            if self.device.type == "cuda":
                metrics.gpu_memory.labels(kind="allocated").set(torch.cuda.memory_allocated())
                metrics.gpu_memory.labels(kind="reserved").set(torch.cuda.memory_reserved())
        inference_ms = (
            prepared.decode_s * 1e3 + result.preprocess_ms + result.forward_ms + result.attention_ms
        )
        outcomes: list[Outcome | ApiError] = [
            _NO_OUTCOME if error is None else error for error in prepared.errors
        ]
        for i, item in zip(prepared.good, result.items, strict=True):
            outcomes[i] = Outcome(item.probs, item.attention, len(prepared.good), inference_ms, 0.0)
        return outcomes

    def _finish(self, prepared: Prepared) -> BatchResult:
        batch = prepared.batch
        if batch is not None:
            if self._prep_stream is not None:
                # Made on the preprocessing stream, read on this one: its memory must not go
                # back to the preprocessing stream before this stream is done with it.
                batch.record_stream(torch.cuda.current_stream(self.device))
            try:
                return self._classify(batch, prepared.modes, prepared.preprocess_ms)
            except torch.OutOfMemoryError:
                if len(prepared.good) == 1:
                    raise
                torch.cuda.empty_cache()
        # Out of memory: again from the pixels, in halves as ``run`` does.
        for image in prepared.images:
            if isinstance(image, torch.Tensor) and self._prep_stream is not None:
                image.record_stream(torch.cuda.current_stream(self.device))
        return self.run(prepared.images, prepared.modes)

    @contextlib.contextmanager
    def _preparing(self) -> Iterator[None]:
        if self._prep_stream is None:
            yield
            return
        with torch.cuda.stream(self._prep_stream):
            yield

    def _sync_preparation(self) -> None:
        if self._prep_stream is not None:
            self._prep_stream.synchronize()

    def _decode_on_device(self, jpegs: list[bytes]) -> list[Image | ApiError]:
        """JPEGs -> HWC uint8 on the device, in one batched call (nvJPEG on CUDA).

        What the device decoder refuses (CMYK, progressive on some hardware, broken files)
        goes through Pillow one by one, with the same 4xx table as an upload decoded on the CPU.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        device = self.device
        min_side = self.info.resize_size
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        out: list[Image | ApiError] = []
        try:
            decoded = decode_jpeg(
                tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
            )
            out = list(_reduce_all(decoded, min_side))
        except Exception as exc:  # one bad file fails the batched call: go one by one
            _logger.debug("batched device decode failed (%s); decoding one by one", exc)
            for data, tensor in zip(jpegs, tensors, strict=True):
                try:
                    chw = decode_jpeg(
                        tensor, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
                    )
                    out.append(_reduce_on_device(chw, min_side))
                except Exception:
                    out.append(self._pillow(data, min_side))
        return out

    def _pillow(self, data: bytes, min_side: int) -> np.ndarray | ApiError:
        try:
            return decode_image(data, min_short_side=min_side, limits=self._limits).pixels
        except ApiError as exc:
            return exc

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
        return self._classify(batch, modes, (time.perf_counter() - started) * 1e3)

    def _classify(
        self, batch: torch.Tensor, modes: Sequence[AttentionMode], preprocess_ms: float
    ) -> BatchResult:
        """The forward pass (capturing what ``modes`` need) and the attention maps."""
        started = time.perf_counter()
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

        attention: list[np.ndarray | None] = [None] * len(modes)
        if wanted:
            attention = self._attention(modes, need)
        self._capture = [None] * depth
        finished = time.perf_counter()

        items = [ItemResult(probs=probs[i], attention=attention[i]) for i in range(len(modes))]
        return BatchResult(
            items,
            preprocess_ms=preprocess_ms,
            forward_ms=(forwarded - started) * 1e3,
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
        same_size = len(set(heights)) == 1 and len(set(widths)) == 1
        if all(isinstance(img, np.ndarray) for img in images):
            if same_size:  # one copy, no per-image slicing
                host = np.stack(images)
            else:
                host = np.empty((len(images), canvas_h, canvas_w, 3), dtype=np.uint8)
                _fill_canvas(host, images)
            pixels = torch.from_numpy(host)
            if self.device.type == "cuda":
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            on_device = [
                img.to(self.device)
                if isinstance(img, torch.Tensor)
                else torch.from_numpy(img).to(self.device)
                for img in images
            ]
            if same_size:
                pixels = torch.stack(on_device)
            else:
                pixels = torch.empty(
                    (len(images), canvas_h, canvas_w, 3), dtype=torch.uint8, device=self.device
                )
                _fill_canvas(pixels, on_device)
        pixels = pixels.permute(0, 3, 1, 2).float()

        # Built in numpy and moved once: a torch op per entry would retake the GIL 4x per image.
        theta = np.zeros((len(images), 2, 3), dtype=np.float32)
        for i, (h, w) in enumerate(zip(heights, widths, strict=True)):
            x0, y0, x1, y1 = crop_window(h, w, self.info)
            # Map output coords in [-1, 1] onto the crop window inside this image's canvas slot.
            theta[i, 0, 0] = (x1 - x0) / canvas_w
            theta[i, 0, 2] = (x0 + x1) / canvas_w - 1
            theta[i, 1, 1] = (y1 - y0) / canvas_h
            theta[i, 1, 2] = (y0 + y1) / canvas_h - 1
        in_c, in_h, in_w = self.info.input_size
        grid = F.affine_grid(
            torch.from_numpy(theta).to(self.device),
            [len(images), in_c, in_h, in_w],
            align_corners=False,
        )
        resized = F.grid_sample(
            pixels, grid, mode=self._interp, padding_mode="border", align_corners=False
        )
        if self._interp == "bicubic":
            resized = resized.clamp_(0, 255)
        return (resized * self._scale + self._shift).to(self.dtype)

    def _forward(self, batch: torch.Tensor, wanted: list[int]) -> torch.Tensor:
        bucketed = self.bucketed
        if bucketed is not None and batch.shape[0] <= bucketed.buckets[-1]:
            logits, *captured = bucketed(tuple(wanted), batch)
            for index, weights in zip(wanted, captured, strict=True):
                self._capture[index] = weights
            return logits
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
        captured_pass = self._pass(tuple(wanted))

        class Captured(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return captured_pass(x)

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

    def _pass(self, key: Any) -> Any:
        """The eager forward pass capturing the blocks in ``key`` (a tuple of indices), as a
        function returning (logits, each captured block's attention): what is traced or
        captured as a graph."""
        wanted = list(key)

        def captured_pass(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits = self._eager(x, wanted)
            captured = [self._capture[i] for i in wanted]
            self._capture = [None] * len(self._blocks)
            return (logits, *(c for c in captured if c is not None))

        return captured_pass

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
        if self.bucketed is not None:
            depth = len(self._blocks)
            with torch.inference_mode():
                self.bucketed.warm([(), (depth - 1,), tuple(range(depth))])
            _logger.info(
                "captured %d CUDA graphs (buckets %s) in %.0f ms",
                3 * len(self.bucketed.buckets),
                ",".join(map(str, self.bucketed.buckets)),
                self.bucketed.capture_ms,
            )
        self.run(images, ["rollout"] * batch_size)
        # A lone request runs at batch 1: each pass there more than once, since TorchScript's
        # executor profiles a graph's first run and optimizes it on the second (26 ms against
        # 1 ms for the digits model's CLS pass, measured with loadtests/first_answer.py).
        for _ in range(WARM_RUNS):
            for mode in ATTENTION_MODES:
                self.run(images[:1], [mode])
        return (time.perf_counter() - started) * 1e3

    def warm_thread(self) -> None:
        """On the thread that will run the batches (``MicroBatcher.on_model_thread``): a lone
        image in each attention mode, twice, through the batcher's own path (``prepare`` and
        ``finish``, in inference mode), unrecorded. The first batch on a fresh thread took
        ~1.7 ms more than the next on the digits model (measured with ``run_works`` after
        ``warmup`` on another thread)."""
        side = max(self.info.resize_size, 1)
        pixels = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
        metrics, self._metrics = self._metrics, None
        try:
            for _ in range(2):
                for mode in ATTENTION_MODES:
                    self.finish(self.prepare([Work(mode, pixels)]))
        finally:
            self._metrics = metrics


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


def _reduce_all(decoded: Sequence[torch.Tensor], min_side: int) -> list[torch.Tensor]:
    """``_reduce_on_device`` for a whole batch, one call per image size (a batch of photos from
    one camera is one stack: a few ops instead of a few per image)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, chw in enumerate(decoded):
        groups.setdefault(tuple(chw.shape), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(decoded)
    for indices in groups.values():
        if len(indices) == 1:
            out[indices[0]] = _reduce_on_device(decoded[indices[0]], min_side)
            continue
        stacked = _reduce_on_device(torch.stack([decoded[i] for i in indices]), min_side)
        for i, hwc in zip(indices, stacked.unbind(0), strict=True):
            out[i] = hwc
    return out  # type: ignore[return-value]


def _reduce_on_device(chw: torch.Tensor, min_side: int) -> torch.Tensor:
    """CHW uint8 -> HWC uint8 (or a stack of them, NCHW -> NHWC), box-reduced by an integer
    factor like the Pillow path."""
    stacked = chw.dim() == 4
    batch = chw if stacked else chw.unsqueeze(0)
    factor = min(batch.shape[2], batch.shape[3]) // min_side
    if factor >= 2:
        pooled = torch.nn.functional.avg_pool2d(batch.float(), factor, ceil_mode=True)
        batch = pooled.round_().to(torch.uint8)
    hwc = batch.permute(0, 2, 3, 1)
    return hwc if stacked else hwc[0]


_NO_OUTCOME = ApiError(500, "inference_failed", "The model gave no answer for this image.")
