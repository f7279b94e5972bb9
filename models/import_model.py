"""Put any supported model source into the BentoML model store, ready for ``bentoml build``.

    python -m models.import_model local-dir:models/vit-digits --name vit-digits
    python -m models.import_model hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k \
        --name vit-s
    python -m models.import_model vit_small_patch16_224@weights.safetensors --name vit-s

The model is loaded and checked exactly as the service would load it, then stored in timm's hub
folder format (``config.json`` + ``model.safetensors``), so ``VIT_MODEL=bento:NAME`` serves it and
plain timm can still read it (``local-dir:`` on the stored folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from service.model.loading import ModelLoadError, load_model

__all__ = ["import_model", "main"]


def import_model(source: str, name: str) -> str:
    """Load ``source`` (validating it), store it as ``name``; return the new tag."""
    import bentoml

    loaded = load_model(source, device="cpu", dtype="float32")
    info = loaded.info
    config = dict(loaded.config)
    config["label_names"] = list(info.label_names)
    config.setdefault("num_classes", info.num_classes)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in _tensors(loaded)}
    with bentoml.models.create(
        name,
        module="vit_serve",
        labels={"family": "vit", "architecture": info.architecture},
        metadata={
            "source": source,
            "architecture": info.architecture,
            "num_classes": info.num_classes,
            "input_size": list(info.input_size),
            "patch_size": list(info.patch_size),
            "num_params": info.num_params,
        },
    ) as stored:
        folder = Path(stored.path)
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(stored.tag)


def _tensors(loaded: object) -> list[tuple[str, torch.Tensor]]:
    model = loaded.model  # type: ignore[attr-defined]
    return list(model.state_dict().items())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="local-dir:PATH | hf-hub:ORG/NAME | ARCH@FILE | bento:TAG")
    parser.add_argument("--name", required=True, help="name in the BentoML model store")
    args = parser.parse_args(argv)
    try:
        tag = import_model(args.source, args.name)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
