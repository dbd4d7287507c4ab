"""What the readers and writers of the transformers hybrid configs share: a config reader that collects every
problem, the RoPE fields, the layer-key pattern of `HybridLM`, and the mixers of a model by kind."""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Union

import torch

from mambakit.models.hybrid import HybridLM
from mambakit.models.io.folder import is_int, is_number, json_float

ROPE_THETA = 10000.0
#: backbone.layers.{i}.{norm|mixer|norm2|mlp}.{rest} of a HybridLM
LAYER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.(norm|mixer|norm2|mlp)\.(.+)$")


#: the embedding and final norm under their transformers names, shared by the Mamba-2 hybrids (bamba, zamba2,
#: falcon_h1)
HF_TOP_KEYS = {"backbone.embedding.weight": "model.embed_tokens.weight",
               "backbone.norm_f.weight": "model.final_layernorm.weight"}


def key_parts(key: str, top: dict[str, str]) -> Union[str, tuple[int, str, str]]:
    """A mambakit key of a HybridLM for a format's key mapping: its file name when `top` names it (a top-level
    tensor), (layer index, part, rest) for a layer tensor, else the key itself (a str)."""
    if key in top:
        return top[key]
    m = LAYER_KEY.match(key)
    return key if m is None else (int(m.group(1)), m.group(2), m.group(3))


class ConfigReader:
    """The config values with transformers' defaults filled in, and the problems found while reading them."""

    def __init__(self, raw: dict[str, Any], defaults: dict[str, Any]):
        self.cfg = dict(defaults)
        self.cfg.update({k: v for k, v in raw.items() if v is not None or k not in defaults})
        self.problems: list[str] = []

    def need(self, name: str, test: Callable[[Any], bool], what: str) -> Any:
        v = self.cfg.get(name)
        if not test(v):
            self.problems.append(f"{name} must be {what}, got {v!r}")
            return None
        return v

    def pos_int(self, name: str) -> Optional[int]:
        return self.need(name, lambda v: is_int(v) and v > 0, "a positive integer")

    def flag(self, name: str) -> Optional[bool]:
        return self.need(name, lambda v: isinstance(v, bool), "true or false")

    def pos_num(self, name: str) -> Optional[float]:
        v = self.need(name, lambda v: is_number(v) and math.isfinite(v) and v > 0, "a positive number")
        return None if v is None else float(v)

    def dt_limit(self, name: str = "time_step_limit") -> Optional[tuple[float, float]]:
        limit = self.cfg.get(name)
        try:
            if not isinstance(limit, (list, tuple)) or len(limit) != 2:
                raise ValueError("expected a list of two numbers")
            lo, hi = json_float(limit[0]), json_float(limit[1])
            if math.isnan(lo) or math.isnan(hi) or not 0.0 <= lo < hi:
                raise ValueError("expected 0 <= low < high")
            return lo, hi
        except ValueError as exc:
            self.problems.append(f"{name} must be [low, high] with 0 <= low < high (high may be Infinity), got "
                                 f"{limit!r} ({exc})")
            return None


def read_rope(r: ConfigReader, head_dim: Optional[int], default_factor: float) -> tuple[Optional[int], float]:
    """(rotary_emb_dim, rope_theta) from rope_parameters (or the legacy top-level rope_theta)."""
    rp = r.cfg.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        r.problems.append(f"rope_parameters must be a JSON object, got {rp!r}")
        return None, ROPE_THETA
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        r.problems.append(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    if r.cfg.get("rope_scaling") not in (None, {}):
        r.problems.append(f"rope_scaling {r.cfg['rope_scaling']!r} is not supported (only plain RoPE)")
    theta = rp.get("rope_theta", r.cfg.get("rope_theta", ROPE_THETA))
    factor = rp.get("partial_rotary_factor", r.cfg.get("partial_rotary_factor", default_factor))
    if not (is_number(theta) and theta > 0):
        r.problems.append(f"rope_theta must be a positive number, got {theta!r}")
        theta = ROPE_THETA
    if not (is_number(factor) and 0 < factor <= 1):
        r.problems.append(f"partial_rotary_factor must be a number in (0, 1], got {factor!r}")
        return None, float(theta)
    if head_dim is None:
        return None, float(theta)
    rotary = int(head_dim * factor)
    if rotary % 2:
        r.problems.append(f"the rotary dimension int(head_dim * partial_rotary_factor) = int({head_dim} * {factor}) "
                          f"= {rotary} must be even")
    return rotary, float(theta)


def mixers_of(model: HybridLM, kind: str) -> list[torch.nn.Module]:
    """The mixers of `model` whose class is named `kind` ("Mamba2", "MHA")."""
    return [layer.mixer for layer in model.backbone.layers if layer.mixer is not None and
            type(layer.mixer).__name__ == kind]
