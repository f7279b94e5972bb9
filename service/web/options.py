"""The per-request choices a client can make (form fields or query parameters), validated.

A bad value is a 422 naming the field and what it accepts; nothing here touches the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ApiError
from ..runtime.settings import ATTENTION_MODES, AttentionMode

__all__ = ["Options", "parse_options"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Options:
    """What one request asked for."""

    top_k: int
    attention: AttentionMode
    heatmap: bool


def parse_options(
    fields: Mapping[str, str],
    num_classes: int,
    *,
    default_top_k: int,
    default_attention: AttentionMode,
) -> Options:
    """Validate the optional fields ``top_k``, ``attention`` and ``heatmap``.

    Raises:
        ApiError: 422 ``invalid_top_k`` / ``invalid_attention`` / ``invalid_heatmap``.
    """
    raw_k = fields.get("top_k")
    if raw_k is None or raw_k == "":
        k = min(default_top_k, num_classes)
    else:
        # Plain ASCII digits only: int() would also take '0_7', '+3' or Arabic-Indic digits.
        digits = raw_k.strip()
        k = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 6 else 0
        if not 1 <= k <= num_classes:
            raise ApiError(
                422,
                "invalid_top_k",
                f"top_k must be an integer from 1 to {num_classes}, not {raw_k!r}.",
            )
    mode = fields.get("attention") or default_attention
    if mode not in ATTENTION_MODES:
        raise ApiError(
            422,
            "invalid_attention",
            f"attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}.",
        )
    raw_heatmap = fields.get("heatmap", "").strip().lower()
    if raw_heatmap not in _TRUE | _FALSE:
        raise ApiError(
            422, "invalid_heatmap", f"heatmap must be true or false, not {fields['heatmap']!r}."
        )
    heatmap = raw_heatmap in _TRUE
    if heatmap and mode == "none":
        raise ApiError(
            422, "invalid_heatmap", "heatmap needs attention 'cls' or 'rollout', not 'none'."
        )
    return Options(top_k=k, attention=mode, heatmap=heatmap)
