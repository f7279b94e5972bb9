"""Model loading: a source string becomes a ready, evaluated timm ViT plus its ``ModelInfo``.

Sources:
    ``local-dir:PATH``        a timm hub folder (``config.json`` + ``model.safetensors``)
    ``hf-hub:ORG/NAME``       the same, through timm and the Hugging Face cache
    ``ARCH@FILE``             a registered timm architecture plus a checkpoint file
                              (``.safetensors``; ``.pth``/``.bin`` only with ``weights_only=True``)
    ``bento:NAME[:VERSION]``  a model put in the BentoML model store by ``models.import_model``

Every number the API reports about the model is derived here, from the model itself, so nothing
downstream repeats a constant. Loading either returns a complete model or raises
``ModelLoadError`` with what went wrong and what to do; it never returns a half-loaded model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from timm.data import ImageNetInfo, resolve_model_data_config

from .geometry import resize_sides

__all__ = [
    "SUPPORTED_FAMILY",
    "LoadedModel",
    "ModelInfo",
    "ModelLoadError",
    "load_model",
    "parse_source",
    "resolve_device",
    "resolve_dtype",
]

_logger = logging.getLogger(__name__)

SUPPORTED_FAMILY = (
    "timm Vision Transformers with a patch embedding: ViT, DeiT (incl. distilled), "
    "DINOv2 (incl. register tokens), EVA, BEiT and their relatives"
)
_SOURCE_HELP = (
    "use 'local-dir:PATH' (timm hub folder), 'hf-hub:ORG/NAME', 'ARCH@FILE.safetensors' "
    "or 'bento:NAME[:VERSION]'"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SourceKind = Literal["local-dir", "hf-hub", "file", "bento"]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What the service knows and reports about the loaded model."""

    name: str
    source: str
    architecture: str
    model_class: str
    num_classes: int
    label_names: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    num_patches: int
    patch_dim: int
    embed_dim: int
    depth: int
    num_heads: int
    num_prefix_tokens: int
    num_register_tokens: int
    has_class_token: bool
    position_embedding_kind: str
    position_embedding_shape: tuple[int, ...] | None
    num_params: int
    device: str
    dtype: str
    version: str = "1"  # which version of the served model this is (a load adds one)

    @property
    def sequence_length(self) -> int:
        """Tokens the encoder sees: prefix tokens (CLS, distillation, registers) plus patches."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def resize_size(self) -> int:
        """Shorter-side size the eval transform resizes to before its center crop."""
        return max(resize_sides(self.input_size, self.crop_pct))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (labels left out: they can be long)."""
        data = asdict(self)
        data.pop("label_names")
        data["sequence_length"] = self.sequence_length
        return data


@dataclass
class LoadedModel:
    """A ready model (eval mode, on its device and dtype) and what describes it."""

    model: torch.nn.Module
    info: ModelInfo
    config: dict[str, Any]


def parse_source(source: str) -> tuple[SourceKind, str, str | None]:
    """Split a source string into (kind, location, architecture-or-None)."""
    source = source.strip()
    if source.startswith("local-dir:"):
        return "local-dir", source[len("local-dir:") :], None
    if source.startswith("hf-hub:"):
        return "hf-hub", source[len("hf-hub:") :], None
    if source.startswith("bento:"):
        return "bento", source[len("bento:") :], None
    if "@" in source:
        arch, _, path = source.partition("@")
        return "file", path, arch
    raise ModelLoadError(f"Cannot tell what kind of model source {source!r} is: {_SOURCE_HELP}.")


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; anything else is taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"VIT_DEVICE={device} but CUDA is not available: use 'cpu' or 'auto'.")
    return resolved


def _cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


# Below this width a CPU's AMX tiles stay mostly empty and bf16 gains nothing. Measured on a
# Xeon with AMX, one thread, batch 32 of 32x32 images, 6 blocks, bf16 over fp32: width 64 1.01x
# (the default model itself: 0.67-0.77x), 128 1.60x, 192 2.19x, 384 3.27x.
AMX_MIN_WIDTH = 128


def resolve_dtype(dtype: str, device: torch.device, width: int | None = None) -> torch.dtype:
    """'auto' is bfloat16 where the hardware runs it fast: CUDA with bf16, or a CPU with AMX
    for a model at least ``AMX_MIN_WIDTH`` wide (``width``: its embedding size, if known)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # Without AMX, CPU bf16 matmuls are emulated and several times slower than fp32.
    if not _cpu_has_amx() or (width is not None and width < AMX_MIN_WIDTH):
        return torch.float32
    return torch.bfloat16


def load_model(
    source: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a ViT from a source string, ready for inference.

    Args:
        source: Where the model is; see the module docstring for the forms.
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        dtype: 'auto', 'float32', 'bfloat16' or 'float16'.
        cache_dir: Hugging Face cache folder for 'hf-hub:' sources (default: HF's own).

    Raises:
        ModelLoadError: the source is missing, corrupt, mismatched or not a ViT.
    """
    kind, location, arch = parse_source(source)
    torch_device = resolve_device(device)
    name = {"local-dir": Path(location).name, "file": Path(location).stem}.get(kind, location)
    if kind == "bento":
        location = str(_bento_model_path(location))
        kind = "local-dir"
    if kind == "local-dir":
        model, config = _load_local_dir(location)
    elif kind == "hf-hub":
        model, config = _load_hf_hub(location, cache_dir)
    else:
        assert arch is not None
        model, config = _load_arch_file(arch, location)

    _check_vit(model, source)
    width = getattr(model, "embed_dim", None)
    torch_dtype = resolve_dtype(dtype, torch_device, width if isinstance(width, int) else None)
    model.eval().requires_grad_(False)
    model.to(device=torch_device, dtype=torch_dtype)
    info = _describe(model, config, name, source, torch_device, torch_dtype)
    _logger.info(
        "loaded %s (%s, %d params) on %s as %s",
        info.name,
        info.model_class,
        info.num_params,
        info.device,
        info.dtype,
    )
    return LoadedModel(model=model, info=info, config=config)


def _bento_model_path(tag: str) -> Path:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(tag).path)
    except NotFound as exc:
        raise ModelLoadError(
            f"No model {tag!r} in the BentoML model store: import one with "
            f"'python -m models.import_model SOURCE --name NAME' (see 'bentoml models list')."
        ) from exc


def _load_local_dir(location: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    path = Path(location).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"Model folder {str(path)!r} does not exist: give the folder that holds "
            f"config.json and model.safetensors ('local-dir:PATH')."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{str(path)!r} has no config.json: a timm hub folder holds config.json "
            f"(architecture, num_classes, pretrained_cfg) beside model.safetensors."
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON ({exc}): re-export it.") from exc
    if not isinstance(config, dict) or "architecture" not in config:
        raise ModelLoadError(
            f"{config_file} has no 'architecture': it must name a registered timm model "
            "(e.g. 'vit_small_patch16_224') with 'model_args' overrides."
        )
    weights = path / "model.safetensors"
    if not weights.is_file():
        unsafe = [p.name for p in path.glob("*") if p.suffix in (".pth", ".bin", ".pt")]
        hint = f" (found {', '.join(unsafe)}: convert it to safetensors)" if unsafe else ""
        raise ModelLoadError(f"{str(path)!r} has no model.safetensors{hint}.")
    _check_safetensors(weights)
    model = _create(f"local-dir:{path}", pretrained=True, what=str(path))
    return model, config


def _load_hf_hub(
    model_id: str,
    cache_dir: str | Path | None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        config_path = hf_hub_download(model_id, "config.json", cache_dir=cache_dir)
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"hf-hub:{model_id} is not in the Hugging Face cache and the hub cannot be reached: "
            "download it where there is network access (or import it with "
            "models.import_model) and try again."
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"hf-hub:{model_id} could not be fetched: {exc}") from exc
    config = json.loads(Path(config_path).read_text())
    model = _create(f"hf-hub:{model_id}", pretrained=True, what=model_id, cache_dir=cache_dir)
    return model, config


def _load_arch_file(arch: str, location: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    path = Path(location).expanduser()
    if not timm.is_model(arch):
        raise ModelLoadError(
            f"{arch!r} is not a registered timm architecture: give one such as "
            f"'vit_small_patch16_224@{location}' (see timm.list_models('vit_*'))."
        )
    if not path.is_file():
        raise ModelLoadError(f"Checkpoint file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        _check_safetensors(path)
        state_dict = load_safetensors(str(path), device="cpu")
    elif path.suffix in (".pth", ".bin", ".pt"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"{str(path)!r} could not be read as a weights-only PyTorch checkpoint ({exc}); "
                "pickled code is refused: save a plain state_dict, ideally as .safetensors."
            ) from exc
        state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(state_dict, dict):
            raise ModelLoadError(f"{str(path)!r} holds no state_dict.")
    else:
        raise ModelLoadError(
            f"Unsupported checkpoint {path.name!r}: use .safetensors (or .pth/.bin state_dicts)."
        )
    num_classes = _head_classes(state_dict)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    model = _create(arch, pretrained=False, what=arch, **kwargs)
    _check_vit(model, f"{arch}@{location}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"Checkpoint {path.name!r} does not match architecture {arch!r}: "
            f"{_first_lines(str(exc))} Name the architecture it was trained as."
        ) from exc
    config = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "model_args": kwargs,
        "pretrained_cfg": _json_cfg(model.pretrained_cfg),
    }
    return model, config


def _head_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    for key in ("head.weight", "head.fc.weight"):
        if key in state_dict and state_dict[key].ndim == 2:
            return int(state_dict[key].shape[0])
    return None


def _check_safetensors(path: Path) -> None:
    """Validate the header against the file size, so corrupt or truncated files fail clearly."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} is corrupt or truncated ({exc}): re-download or re-export it."
        ) from exc


def _create(name: str, *, pretrained: bool, what: str, **kwargs: Any) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except ModelLoadError:
        raise
    except RuntimeError as exc:
        message = str(exc)
        if "size mismatch" in message or "Missing key" in message or "Unexpected key" in message:
            raise ModelLoadError(
                f"Weights in {what!r} do not match the architecture in its config: "
                f"{_first_lines(message)} Fix config.json's architecture/model_args."
            ) from exc
        raise ModelLoadError(f"Could not build {what!r}: {_first_lines(message)}") from exc
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"Could not build {what!r}: {_first_lines(str(exc))}") from exc


def _first_lines(message: str, limit: int = 300) -> str:
    """The start of a (possibly huge) error message, on one line."""
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text if text.endswith((".", "…")) else text + "."


def _check_vit(model: Any, source: str) -> None:
    patch_embed = getattr(model, "patch_embed", None)
    blocks = getattr(model, "blocks", None)
    ok = (
        patch_embed is not None
        and getattr(patch_embed, "patch_size", None) is not None
        and getattr(patch_embed, "grid_size", None) is not None
        and blocks is not None
        and len(blocks) > 0
        and all(hasattr(block, "attn") for block in blocks)
    )
    if not ok:
        raise ModelLoadError(
            f"{source!r} is a {type(model).__name__}, which has no ViT patch embedding and "
            f"attention blocks. Supported: {SUPPORTED_FAMILY}."
        )


def _json_cfg(cfg: Any) -> dict[str, Any]:
    raw = cfg if isinstance(cfg, dict) else asdict(cfg)
    return {k: v for k, v in raw.items() if isinstance(v, (str, int, float, bool, list, tuple))}


def _label_names(model: Any, config: dict[str, Any]) -> tuple[str, ...]:
    num_classes = int(model.num_classes)
    cfg = config.get("pretrained_cfg") or {}
    for names in (config.get("label_names"), cfg.get("label_names")):
        if names and len(names) == num_classes:
            return tuple(str(n) for n in names)
    if num_classes == 1000:
        imagenet = ImageNetInfo("imagenet-1k")
        return tuple(imagenet.index_to_description(i) for i in range(num_classes))
    return tuple(f"class_{i}" for i in range(num_classes))


def _position_embedding(model: Any) -> tuple[str, tuple[int, ...] | None]:
    pos_embed = getattr(model, "pos_embed", None)
    has_rope = getattr(model, "rope", None) is not None
    has_rel = (
        any(
            getattr(block.attn, "relative_position_bias_table", None) is not None
            for block in model.blocks
        )
        or getattr(model, "rel_pos_bias", None) is not None
    )
    kinds = []
    if isinstance(pos_embed, torch.Tensor):
        kinds.append("learned")
    if has_rope:
        kinds.append("rope")
    if has_rel:
        kinds.append("relative")
    shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else None
    return "+".join(kinds) or "none", shape


def _describe(
    model: Any,
    config: dict[str, Any],
    name: str,
    source: str,
    device: torch.device,
    dtype: torch.dtype,
) -> ModelInfo:
    data_cfg = resolve_model_data_config(model)
    patch_embed = model.patch_embed
    patch_size = tuple(int(p) for p in patch_embed.patch_size)
    grid = tuple(int(g) for g in patch_embed.grid_size)
    in_chans = int(data_cfg["input_size"][0])
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    num_reg = int(getattr(model, "num_reg_tokens", 0))
    first_attn = model.blocks[0].attn
    kind, shape = _position_embedding(model)
    architecture = str(config.get("architecture") or model.pretrained_cfg.get("architecture"))
    return ModelInfo(
        name=name,
        source=source,
        architecture=architecture,
        model_class=type(model).__name__,
        num_classes=int(model.num_classes),
        label_names=_label_names(model, config),
        input_size=tuple(int(s) for s in data_cfg["input_size"]),  # type: ignore[arg-type]
        mean=tuple(float(m) for m in data_cfg["mean"]),
        std=tuple(float(s) for s in data_cfg["std"]),
        interpolation=str(data_cfg["interpolation"]),
        crop_pct=float(data_cfg["crop_pct"]),
        crop_mode=str(data_cfg.get("crop_mode", "center")),
        patch_size=patch_size,  # type: ignore[arg-type]
        grid=grid,  # type: ignore[arg-type]
        num_patches=grid[0] * grid[1],
        patch_dim=in_chans * patch_size[0] * patch_size[1],
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(first_attn.num_heads),
        num_prefix_tokens=num_prefix,
        num_register_tokens=num_reg,
        has_class_token=getattr(model, "cls_token", None) is not None,
        position_embedding_kind=kind,
        position_embedding_shape=shape,
        num_params=sum(p.numel() for p in model.parameters()),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
