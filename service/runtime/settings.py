"""Service settings: one object, read once from the environment (prefix ``VIT_``), passed down.

Nothing else in the service reads the environment. Every field is documented in the README's
settings table (``tests/unit/test_settings.py`` keeps the two in step).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ATTENTION_MODES",
    "DEFAULT_MODEL",
    "REPO_ROOT",
    "AttentionMode",
    "Settings",
    "load_settings",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = f"local-dir:{REPO_ROOT / 'models' / 'vit-digits'}"

# What attention an answer carries: none, the last block's CLS row, or the rollout over all.
AttentionMode = Literal["none", "cls", "rollout"]
ATTENTION_MODES: tuple[AttentionMode, ...] = ("none", "cls", "rollout")


class Settings(BaseSettings):
    """Everything an operator can tune, with safe defaults."""

    model_config = SettingsConfigDict(env_prefix="VIT_", extra="ignore", frozen=True)

    # --- model -------------------------------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL,
        description=(
            "Model source: 'local-dir:PATH', 'hf-hub:ORG/NAME', 'ARCH@FILE' (timm architecture "
            "+ .safetensors/.pth/.bin), or 'bento:NAME[:VERSION]' (BentoML model store)."
        ),
    )
    models: str = Field(
        "",
        description=(
            "Several models served at once: comma-separated 'NAME=SOURCE' (any source VIT_MODEL "
            "takes), the first the default; each has its own batcher, queue bound and warm-up. "
            "Requests pick one by name (/classify?model=NAME, the X-Model header, "
            "/v2/models/NAME/...). Empty = the one model VIT_MODEL names."
        ),
    )
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = bfloat16 where the hardware runs it fast, else float32."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description=(
            "Intra-op CPU threads; 0 = the CPUs this process may use (its CPU affinity, capped "
            "by a container's cgroup CPU quota)."
        ),
    )

    workers: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "HTTP worker processes; 0 = one per usable CPU (replicas), a quarter of them "
            "(split on CPU) or the CPUs left beside the model processes (split on GPU); "
            "at most 16."
        ),
    )
    topology: Literal["auto", "replicas", "split"] = Field(
        "auto",
        description=(
            "'replicas': each HTTP worker runs its own copy of the model; 'split': HTTP "
            "workers feed one model process per device; 'auto': split on GPU, and on CPU "
            "replicas for models under 400 MiB of weights."
        ),
    )
    devices: str = Field(
        "",
        description=(
            "Comma-separated devices, one model process each (e.g. 'cuda:0,cuda:1'); "
            "empty = VIT_DEVICE ('auto': every visible GPU, else the CPU)."
        ),
    )
    model_endpoints: str = Field(
        "",
        description=(
            "split: comma-separated ZeroMQ endpoints of model processes run elsewhere "
            "(e.g. 'tcp://vit-model:5555'); empty = the local model processes over ipc."
        ),
    )
    model_bind: str = Field(
        "",
        description=(
            "split, model process: the ZeroMQ endpoint to listen on (e.g. 'tcp://0.0.0.0:5555'); "
            "empty = a private ipc socket beside the HTTP workers."
        ),
    )
    device_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Decode JPEG uploads on the model's device in batches (nvJPEG on CUDA); "
            "'auto' = on for CUDA models."
        ),
    )
    tracing: bool = Field(
        False,
        description="Trace /classify routes with OpenTelemetry (BentoML's tracing config).",
    )
    request_timeout_s: int = Field(
        60, ge=1, description="Longest a request may take in all; 504 inference_timeout after."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a client may take to send a request's headers (408, then closed).",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Longest a client may take to send a request's body (408)."
    )
    grpc_port: int = Field(
        3001,
        ge=0,
        le=65535,
        description=(
            "Port of the Open Inference Protocol over gRPC, on the HTTP server's address, "
            "shared by the HTTP workers; 0 = no gRPC."
        ),
    )
    max_concurrency: int = Field(
        0,
        ge=0,
        description=(
            "Requests one HTTP worker works on at once; more are refused at once with 503 "
            "overloaded, before their body is read. 0 = four times the largest batch."
        ),
    )
    drain_delay_s: float = Field(
        5.0,
        ge=0,
        description=(
            "On SIGTERM: how long /readyz answers 503 while requests are still admitted, so a "
            "load balancer can take this server out first (SIGINT skips it)."
        ),
    )
    grace_period_s: float = Field(
        25.0,
        gt=0,
        description=(
            "On SIGTERM: the most time, drain delay included, to answer accepted requests "
            "before the processes exit; keep it under the orchestrator's (Kubernetes' "
            "terminationGracePeriodSeconds, Docker's stop timeout)."
        ),
    )
    on_load_failure: Literal["exit", "serve"] = Field(
        "exit",
        description=(
            "When the model cannot load: 'exit' = log the error and exit non-zero, so a "
            "restart policy sees it; 'serve' = stay up, /readyz 503 and every request 503 "
            "load_failed with the error."
        ),
    )
    access_log: bool = Field(True, description="Log each HTTP request (BentoML's access log).")
    admin_token: str = Field(
        "",
        repr=False,
        description=(
            "Turns on the model repository API (/v2/repository/...: load a new version of "
            "the model without a restart); callers send 'Authorization: Bearer <token>'. "
            "Empty = the API is off (403)."
        ),
    )
    canary_model: str = Field(
        "",
        description=(
            "A second version served beside VIT_MODEL from the start (any source VIT_MODEL "
            "takes), taking VIT_CANARY_PERCENT of the requests; replicas topology only."
        ),
    )
    canary_percent: int = Field(
        10, ge=1, le=99, description="The share of requests VIT_CANARY_MODEL answers."
    )
    load_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest a repository load waits for every replica to load and warm it.",
    )
    cache_bytes: int = Field(
        16 * 1024 * 1024,
        ge=0,
        description=(
            "Response cache per HTTP worker: answers kept by (upload's sha256, model version, "
            "options), least recently used out first; 0 = off."
        ),
    )

    # --- batching ----------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most images per forward pass.")
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description=(
            "Longest a batch waits for more images, and only while more requests are being "
            "decoded; a lone request never waits."
        ),
    )
    max_queue_images: int = Field(
        512, ge=1, description="Images waiting for the model beyond which requests get 503."
    )

    # --- request limits ----------------------------------------------------------------
    max_images_per_request: int = Field(32, ge=1, description="Most images in /classify_batch.")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_pixels: int = Field(40_000_000, ge=1, description="Largest image, width × height.")
    min_side: int = Field(8, ge=1, description="Smallest image side accepted (422 below).")
    max_aspect_ratio: float = Field(20.0, ge=1.0, description="Widest aspect ratio accepted.")
    default_top_k: int = Field(5, ge=1, description="top_k when the request gives none.")
    default_attention: AttentionMode = Field("cls", description="Attention mode by default.")
    torchscript: bool = Field(
        True,
        description=(
            "Run a float32 model on the CPU as frozen TorchScript graphs (traced at warm-up), "
            "so a forward pass does not wait for the GIL at every op."
        ),
    )
    cuda_graphs: bool = Field(
        True,
        description=(
            "Run a CUDA model's forward pass as CUDA graphs captured at warm-up, one per "
            "attention mode and batch-size bucket (powers of two up to VIT_MAX_BATCH_SIZE); a "
            "batch is padded to its bucket."
        ),
    )
    test_gate: str = Field(
        "",
        description=(
            "Tests only: a file; while it exists, the model does not load and each batch waits "
            "before it runs, and the file says which batch waits and how many images queue "
            "behind it ('held=N queued=M'). Empty = off."
        ),
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"VIT_DEVICE must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {value!r}")

    @property
    def concurrency_limit(self) -> int:
        """Requests one HTTP worker admits at once (``max_concurrency``, 0 = auto)."""
        return self.max_concurrency or 4 * self.max_batch_size

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: str) -> str:
        _parse_models(value)
        return value

    @property
    def model_sources(self) -> list[tuple[str, str]]:
        """The models served, ``(name, source)`` each, the default first: ``VIT_MODELS``, or
        ``VIT_MODEL`` alone with no name (the checkpoint names it)."""
        return _parse_models(self.models) or [("", self.model)]

    def per_model(self) -> list[tuple[str, Settings]]:
        """Each model of ``model_sources`` with the settings it runs under: these, with its own
        source, and the canary set at start (``VIT_CANARY_MODEL``) for the first only."""
        return [
            (name, self.model_copy(update={"model": source} | ({"canary_model": ""} if n else {})))
            for n, (name, source) in enumerate(self.model_sources)
        ]

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if len(self.model_sources) > 1 and (self.model_endpoints or self.model_bind):
            raise ValueError(
                "VIT_MODELS with VIT_MODEL_ENDPOINTS or VIT_MODEL_BIND: a model server run on "
                "its own serves one model; run one per model, or leave VIT_MODELS empty"
            )
        if self.topology == "replicas" and (self.model_endpoints or self.model_bind):
            raise ValueError(
                "VIT_MODEL_ENDPOINTS and VIT_MODEL_BIND belong to the split topology: set "
                "VIT_TOPOLOGY=split (or auto), or leave them empty for replicas"
            )
        if self.canary_model and self.topology == "split":
            raise ValueError(
                "VIT_CANARY_MODEL needs the replicas topology (split serves one version)"
            )
        if self.drain_delay_s >= self.grace_period_s:
            raise ValueError(
                f"VIT_DRAIN_DELAY_S ({self.drain_delay_s}) must be shorter than "
                f"VIT_GRACE_PERIOD_S ({self.grace_period_s})"
            )
        if self.max_queue_images < self.max_batch_size:
            raise ValueError(
                f"VIT_MAX_QUEUE_IMAGES ({self.max_queue_images}) must be at least "
                f"VIT_MAX_BATCH_SIZE ({self.max_batch_size})"
            )
        return self


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _parse_models(value: str) -> list[tuple[str, str]]:
    """``VIT_MODELS``' ``NAME=SOURCE`` pairs, checked: names well formed and unique."""
    models: list[tuple[str, str]] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, equals, source = (part.strip() for part in entry.partition("="))
        if not equals or not source:
            raise ValueError(f"VIT_MODELS: {entry!r} is not NAME=SOURCE")
        if not _MODEL_NAME.fullmatch(name):
            raise ValueError(
                f"VIT_MODELS: {name!r} is not a model name (letters, digits, '_', '.', '-'; "
                "at most 64, starting with a letter or digit)"
            )
        if any(name == seen for seen, _ in models):
            raise ValueError(f"VIT_MODELS: the name {name!r} is given twice")
        models.append((name, source))
    return models


def load_settings() -> Settings:
    """Read the settings from the environment, once per process."""
    return Settings()
