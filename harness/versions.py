"""A second version of the default model, made here (nothing downloaded), for the swap tests
and drills: the digits model with its classifier's rows rolled by one, so it answers each digit
as the next one (a 7 as 8): which version answered shows in the predictions themselves."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.runtime.settings import REPO_ROOT

__all__ = ["DIGITS_DIR", "shifted_digits"]

DIGITS_DIR = REPO_ROOT / "models" / "vit-digits"


def shifted_digits(folder: Path, shift: int = 1) -> str:
    """Write the shifted digits model to ``folder`` (a timm hub folder); its source string."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DIGITS_DIR / "config.json", folder / "config.json")
    weights = load_file(DIGITS_DIR / "model.safetensors")
    for name in ("head.weight", "head.bias"):
        weights[name] = torch.roll(weights[name], shifts=shift, dims=0).contiguous()
    save_file(weights, folder / "model.safetensors")
    return f"local-dir:{folder}"
