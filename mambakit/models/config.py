"""Language-model configuration: one dataclass that round-trips through JSON (mamba_ssm field names)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mambakit.errors import MambaKitError
from mambakit.layers.registry import mixer_spec, ssm_layer_names

#: The names of `ssm_cfg["layer"]` (see `mambakit.layers.registry`).
MIXER_LAYERS = ssm_layer_names()


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """cls(**data) for a config dataclass, refusing keys that are not its fields (a typo must not pass silently)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MambaKitError(f"unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}")
    return cls(**data)


@dataclass
class MambaConfig:
    """Configuration of `MambaLMHeadModel`, with the field names of the official `mamba_ssm.MambaConfig`.

    `ssm_cfg` holds the mixer's keyword arguments plus `"layer": "Mamba1" | "Mamba2" | "S4"` (default Mamba1; any
    spelling of `mambakit.layers.registry`, e.g. "mamba2", is accepted and stored as the name).
    `attn_layer_idx` lists the layers that are attention instead of SSM (hybrid stacks), configured by `attn_cfg`.
    `fused_add_norm` is read and written for compatibility (official configs carry it); it switches nothing:
    mambakit fuses the residual add + RMSNorm where it can on its own (the decode path does, through
    `mambakit.ops.norm.add_rms_norm`).
    """

    d_model: int = 256
    d_intermediate: int = 0
    n_layer: int = 4
    vocab_size: int = 256
    ssm_cfg: dict[str, Any] = field(default_factory=dict)
    attn_layer_idx: list[int] = field(default_factory=list)
    attn_cfg: dict[str, Any] = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = False  # read for compatibility; see the class docstring
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MambaKitError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise MambaKitError(f"MambaConfig.d_intermediate must be an integer >= 0, got {self.d_intermediate!r}")
        for name, kind in (("ssm_cfg", dict), ("attn_cfg", dict), ("attn_layer_idx", list)):
            if not isinstance(getattr(self, name), kind):
                raise MambaKitError(f"MambaConfig.{name} must be a {'JSON object' if kind is dict else 'list'}, "
                                    f"got {getattr(self, name)!r}")
        eps = self.norm_epsilon
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
            raise MambaKitError(f"MambaConfig.norm_epsilon must be a positive finite number, got {eps!r}")
        layer = self.ssm_cfg.get("layer", "Mamba1")
        name = mixer_spec(layer, allowed=MIXER_LAYERS, arg="MambaConfig.ssm_cfg['layer']").name
        if name != layer:
            self.ssm_cfg = {**self.ssm_cfg, "layer": name}
        bad = [i for i in self.attn_layer_idx if not (isinstance(i, int) and 0 <= i < self.n_layer)]
        if bad:
            raise MambaKitError(f"MambaConfig.attn_layer_idx entries must lie in [0, n_layer={self.n_layer}), "
                                f"got {bad}")

    @property
    def mixer_layer(self) -> str:
        return self.ssm_cfg.get("layer", "Mamba1")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MambaConfig":
        return config_from_dict(cls, data)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "MambaConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MambaKitError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise MambaKitError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)
