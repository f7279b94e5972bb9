"""Triton Inference Server serving the same checkpoint: the peer the protocol benchmark
(``loadtests/oip_bench.py``) measures us against, two ways.

    .venv/triton/bin/python -m loadtests.triton_peer pytriton --http-port 8000 --grpc-port 8001 \\
        --metrics-port 8002 --instances 2
    .venv/triton/bin/python -m loadtests.triton_peer tritonserver --http-port 8000 ...

Both run the real ``tritonserver`` binary that the ``nvidia-pytriton`` wheel (PyPI) ships, with
its HTTP and gRPC front ends, its dynamic batcher (up to ``--max-batch`` images, at most
``--max-delay-us`` of waiting) and its Python backend; they differ in where the model runs:

- ``pytriton``: PyTriton binds a Python callable; the backend's stub hands each batch to this
  process over shared memory and ZeroMQ, and ``--instances`` callables share this process's GIL.
- ``tritonserver``: a plain model repository (``config.pbtxt`` and ``1/model.py``,
  ``loadtests/triton_model.py``) for the binary itself: each instance is a stub process that runs
  the model, no hop.

Either way the model is ``vit-digits`` (the name ours reports) with one input, ``image``
``BYTES [-1, 1]`` (one encoded image per row), and one output, ``probabilities`` ``FP32
[-1, C]``. What the model does is what a Triton user writes in the callable: Pillow decodes, timm's
eval transform (``resolve_data_config``) resizes and normalizes, the model runs under
``torch.inference_mode`` with one intra-op thread per instance, softmax. No attention, no limits.

``.venv/triton`` is made by ``make triton-env``: Debian's own python3.11 (the backend's stub
embeds Debian's libpython3.11; with another Python's stdlib it fails at start), the wheel and
``numpy<2`` (``requirements-triton.txt``), and a ``.pth`` file that puts the project's venv
(torch, timm, Pillow) and the repository behind them.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from loadtests.peer import load
from service.runtime.settings import DEFAULT_MODEL

__all__ = ["MODEL_NAME", "Classifier", "main", "model_repository"]

MODEL_NAME = "vit-digits"
REPO = Path(__file__).resolve().parent.parent


class Classifier:
    """The model as a Triton user runs it: Pillow, timm's eval transform, softmax."""

    def __init__(self, source: str, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = load(source)
        config = resolve_data_config({}, model=self.model)
        self.transform = create_transform(**config)
        self.num_classes: int = self.model.num_classes  # type: ignore[assignment]
        with torch.inference_mode():
            self.model(torch.zeros(1, *config["input_size"]))

    def __call__(self, images: Sequence[bytes]) -> np.ndarray:
        """Class probabilities, one row per encoded image."""
        tensors = []
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                tensors.append(self.transform(image.convert("RGB")))
        with torch.inference_mode():
            probs = self.model(torch.stack(tensors)).softmax(-1)
        return probs.float().numpy()


def _rows(images: np.ndarray) -> list[bytes]:
    """The ``image`` tensor's rows (``[N, 1]`` of bytes objects) as a list of bytes."""
    return [bytes(row[0]) for row in images]


# --- PyTriton ---------------------------------------------------------------------------------
def serve_pytriton(args: argparse.Namespace) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    def instance() -> Any:
        classifier = Classifier(args.model)

        @batch
        def infer(image: np.ndarray) -> dict[str, np.ndarray]:
            return {"probabilities": classifier(_rows(image))}

        return infer

    callables = [instance() for _ in range(args.instances)]
    config = TritonConfig(
        http_address="127.0.0.1", http_port=args.http_port,
        grpc_address="127.0.0.1", grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, allow_metrics=True, log_verbose=0,
    )  # fmt: skip
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=callables,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_delay_us),
            ),
            strict=True,
        )
        print("triton-peer: serving", flush=True)
        triton.serve()


# --- the tritonserver binary with a model repository ----------------------------------------
_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "image" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {classes} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "source" value: {{ string_value: "{source}" }} }}
parameters {{ key: "threads" value: {{ string_value: "1" }} }}
"""


def model_repository(folder: Path, source: str, classes: int, args: argparse.Namespace) -> Path:
    """A model repository with the one model: ``config.pbtxt`` and ``1/model.py``."""
    model = folder / MODEL_NAME
    (model / "1").mkdir(parents=True)
    shutil.copy(REPO / "loadtests" / "triton_model.py", model / "1" / "model.py")
    (model / "config.pbtxt").write_text(
        _CONFIG.format(name=MODEL_NAME, max_batch=args.max_batch, classes=classes,
                       delay_us=args.max_delay_us, instances=args.instances, source=source)
    )  # fmt: skip
    return folder


def serve_tritonserver(args: argparse.Namespace) -> None:
    """Run the wheel's ``tritonserver`` on a model repository until SIGTERM."""
    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

    classes = Classifier(args.model).num_classes
    with tempfile.TemporaryDirectory(prefix="triton-peer-") as tmp:
        work = Path(tmp)
        server = work / "tritonserver"
        shutil.copytree(get_root_module_path() / "tritonserver", server,
                        ignore=shutil.ignore_patterns("python_backend_stubs"))  # fmt: skip
        stub = server / "backends" / "python" / "triton_python_backend_stub"
        shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"), stub)
        repository = model_repository(work / "models", args.model, classes, args)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in (env.get("LD_LIBRARY_PATH"), str(get_libs_path())) if p
        )
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        # The stub's Python: this venv's packages, the project's (the .pth), the repository.
        env["PYTHONPATH"] = ":".join([*sys.path[1:], str(REPO)])
        command = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={server / 'backends'}",
            "--http-address=127.0.0.1", f"--http-port={args.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={args.grpc_port}",
            f"--metrics-port={args.metrics_port}", "--allow-metrics=true",
            "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
            "--log-verbose=0", "--strict-readiness=true",
        ]  # fmt: skip
        process = subprocess.Popen(command, env=env)
        stop = lambda *_: process.send_signal(signal.SIGTERM)  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print("triton-peer: serving", flush=True)
        while process.poll() is None:
            time.sleep(0.2)
        raise SystemExit(process.returncode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("how", choices=["pytriton", "tritonserver"])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--instances", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-delay-us", type=int, default=5000)
    args = parser.parse_args(argv)
    if args.how == "pytriton":
        serve_pytriton(args)
    else:
        serve_tritonserver(args)


if __name__ == "__main__":
    main()
