"""The server a user would write instead of ours: the peer the scale benchmark measures us against.

    python -m loadtests.peer --model local-dir:models/vit-digits --port 8000 --workers 2 --threads 1

FastAPI on uvicorn (uvloop and httptools when installed), plain timm and Pillow, and an asyncio
micro-batcher: requests queue, and one background task takes everything queued (up to
``--max-batch``) whenever the model is idle, runs the forward on one worker thread and resolves
the requests' futures. Same model and preprocessing as the service (timm's eval transform from
``resolve_data_config``), top-5 labels as JSON; no attention, no limits, no metrics.

``--workers`` is the number of uvicorn processes, each with its own model; ``--threads`` is
torch's intra-op threads per process (0 = every CPU this process may use). The settings reach
each worker process through ``PEER_*`` environment variables. ``POST /classify`` takes the image
as multipart field ``image`` (other fields are ignored) or as a raw ``image/*`` body.
``GET /healthz`` is 200 once every worker has loaded and warmed up, and names the pid, event loop
and HTTP protocol of the process that answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from service.runtime.settings import DEFAULT_MODEL

__all__ = ["Batcher", "app", "http_protocol", "load", "main"]

TOP_K = 5

_Item = tuple[torch.Tensor, "asyncio.Future[torch.Tensor]"]


def load(source: str) -> torch.nn.Module:
    """The model as a timm user loads it: hub folders by name, ``ARCH@FILE.safetensors`` by hand."""
    if source.startswith(("local-dir:", "hf-hub:")):
        model = timm.create_model(source, pretrained=True)
    else:
        arch, _, path = source.partition("@")
        state_dict = load_file(path)
        num_classes = int(state_dict["head.weight"].shape[0])
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        model.load_state_dict(state_dict)
    return model.eval()


def _labels(model: Any) -> list[str]:
    names = model.pretrained_cfg.get("label_names")
    if names and len(names) == model.num_classes:
        return [str(name) for name in names]
    if model.num_classes == 1000:
        imagenet = ImageNetInfo("imagenet-1k")
        return [imagenet.index_to_description(i) for i in range(1000)]
    return [str(i) for i in range(model.num_classes)]


def http_protocol() -> str:
    """Which of uvicorn's HTTP implementations this process runs."""
    for name in ("httptools", "h11"):
        if f"uvicorn.protocols.http.{name}_impl" in sys.modules:
            return name
    return "unknown"


class Batcher:
    """One model on one thread; whatever queued while it was busy goes in the next batch."""

    def __init__(self, model: torch.nn.Module, max_batch: int) -> None:
        self._model = model
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="peer-model")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start taking batches off the queue (call on the serving event loop)."""
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop the background task and the model thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def submit(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities for one preprocessed image."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((image, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            images = [image for image, _ in batch]
            try:
                probs = await loop.run_in_executor(self._thread, self._forward, images)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), row in zip(batch, probs, strict=True):
                if not future.done():
                    future.set_result(row)

    def _forward(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return self._model(torch.stack(list(images))).softmax(-1)


@dataclass(frozen=True)
class _Peer:
    transform: Any
    labels: list[str]
    batcher: Batcher

    def preprocess(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            return self.transform(image.convert("RGB"))


def _workers_ready() -> bool:
    # Every worker leaves a file once warmed up, so /healthz speaks for all of them: a benchmark
    # that started while one was still loading would see its connections land on the others.
    state_dir = os.environ.get("PEER_STATE_DIR")
    if not state_dir:
        return True
    ready = len(list(Path(state_dir).glob("ready-*")))
    return ready >= int(os.environ.get("PEER_WORKERS", "1"))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    torch.set_num_threads(int(os.environ.get("PEER_THREADS", "0")) or len(os.sched_getaffinity(0)))
    model = load(os.environ.get("PEER_MODEL", DEFAULT_MODEL))
    config = resolve_data_config({}, model=model)
    max_batch = int(os.environ.get("PEER_MAX_BATCH", "32"))
    with torch.inference_mode():
        model(torch.zeros(max_batch, *config["input_size"]))
    batcher = Batcher(model, max_batch)
    batcher.start()
    app.state.peer = _Peer(create_transform(**config), _labels(model), batcher)
    if state_dir := os.environ.get("PEER_STATE_DIR"):
        (Path(state_dir) / f"ready-{os.getpid()}").touch()
    yield
    await batcher.close()


app = FastAPI(title="ViT peer", lifespan=_lifespan, docs_url=None, redoc_url=None)


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


@app.post("/classify")
async def classify(request: Request) -> JSONResponse:
    """Top-5 labels for the image in field ``image`` or the raw ``image/*`` body."""
    peer: _Peer = request.app.state.peer
    if request.headers.get("content-type", "").startswith("image/"):
        data = await request.body()
    else:
        async with request.form() as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return _bad_request("send the image in multipart field 'image'")
            data = await upload.read()
    try:
        image = await run_in_threadpool(peer.preprocess, data)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return _bad_request(f"not a readable image: {exc}")
    probs = await peer.batcher.submit(image)
    scores, indices = probs.topk(min(TOP_K, len(peer.labels)))
    predictions = [
        {"index": i, "label": peer.labels[i], "score": s}
        for i, s in zip(indices.tolist(), scores.tolist(), strict=True)
    ]
    return JSONResponse({"predictions": predictions})


@app.get("/healthz")
async def healthz() -> JSONResponse:
    """Ready once every worker is warmed up; which process, loop and HTTP parser answered."""
    ready = _workers_ready()
    body = {
        "ready": ready,
        "pid": os.getpid(),
        "event_loop": type(asyncio.get_running_loop()).__module__,
        "http_protocol": http_protocol(),
        "torch_threads": torch.get_num_threads(),
        "http_workers": int(os.environ.get("PEER_WORKERS", "1")),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve the peer with uvicorn."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local-dir:, hf-hub: or ARCH@FILE")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process; 0=all")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    state_dir = tempfile.mkdtemp(prefix="vit-peer-")
    os.environ.update(
        PEER_MODEL=args.model,
        PEER_THREADS=str(threads),
        PEER_MAX_BATCH=str(args.max_batch),
        PEER_WORKERS=str(args.workers),
        PEER_STATE_DIR=state_dir,
        OMP_NUM_THREADS=str(threads),
    )
    try:
        uvicorn.run(
            "loadtests.peer:app",
            host=args.host,
            port=args.port,
            workers=args.workers,
            access_log=False,
            log_level="warning",
        )
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
