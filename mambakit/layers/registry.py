"""The sequence mixers a model can be built from: one table of names, accepted spellings, layer classes and defaults.

=========  ==============================  ==========================  ===============  =========================
name       layer class                     accepted spellings          default d_state  heads
=========  ==============================  ==========================  ===============  =========================
Mamba1     `mambakit.layers.mamba.Mamba`   Mamba1, mamba1, mamba       16               -
Mamba2     `mambakit.layers.mamba2.Mamba2` Mamba2, mamba2              64               `default_headdim`
Mamba3     `mambakit.layers.mamba3.Mamba3` Mamba3, mamba3              64               `default_headdim`
S4         `mambakit.layers.s4.S4`         S4, s4                      64               -
MHA        `mambakit.layers.attention.MHA` MHA, attention              (no state)       -
=========  ==============================  ==========================  ===============  =========================

`MambaConfig.ssm_cfg["layer"]` stores the name (first column); the command lines and the applications take any
accepted spelling and resolve it with `mixer_spec`. Attention is configured through `MambaConfig.attn_layer_idx`,
not `ssm_cfg`, so it is not an SSM layer (`ssm_layer_names`).

A new mixer (e.g. Mamba-3) is one more `MixerSpec` in `_SPECS` plus its layer module: config validation, the model
builder, the LM trainer, the tasks and Mamba-ND then accept it. The table is a constant: nothing registers itself at
import time. Layer classes are imported when first asked for (`MixerSpec.layer_class`), so reading the table costs no
kernel imports.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping, Optional

from torch import nn

from mambakit.errors import MambaKitError

#: Head sizes tried for Mamba-2 when none is given: the first one dividing d_inner (fewer, larger heads are faster
#: on the CPU, where the SSD's chunk-local work grows with the number of heads).
HEADDIM_PREFERENCE: tuple[int, ...] = (64, 32, 16, 8)


@dataclass(frozen=True)
class MixerSpec:
    """One mixer: its name, the spellings that select it, where its layer class lives, and its defaults.

    d_state: the state size used when none is given (None: the mixer has no state size).
    ssm: configured by `MambaConfig.ssm_cfg` (False: attention, configured by `attn_cfg`).
    has_heads: the layer takes `headdim` (default from `default_headdim`).
    """

    name: str
    module: str
    class_name: str
    spellings: tuple[str, ...]
    d_state: Optional[int]
    ssm: bool = True
    has_heads: bool = False

    def layer_class(self) -> type[nn.Module]:
        """The layer's nn.Module class, imported on first use."""
        return getattr(importlib.import_module(self.module), self.class_name)


_SPECS = (
    MixerSpec("Mamba1", "mambakit.layers.mamba", "Mamba", ("Mamba1", "mamba1", "mamba"), d_state=16),
    MixerSpec("Mamba2", "mambakit.layers.mamba2", "Mamba2", ("Mamba2", "mamba2"), d_state=64, has_heads=True),
    MixerSpec("Mamba3", "mambakit.layers.mamba3", "Mamba3", ("Mamba3", "mamba3"), d_state=64, has_heads=True),
    MixerSpec("S4", "mambakit.layers.s4", "S4", ("S4", "s4"), d_state=64),
    MixerSpec("MHA", "mambakit.layers.attention", "MHA", ("MHA", "attention"), d_state=None, ssm=False),
)
#: name -> spec, in table order (read-only).
MIXERS: Mapping[str, MixerSpec] = MappingProxyType({s.name: s for s in _SPECS})
_BY_SPELLING: Mapping[str, MixerSpec] = MappingProxyType({w: s for s in _SPECS for w in s.spellings})


def ssm_layer_names() -> tuple[str, ...]:
    """The names valid in `MambaConfig.ssm_cfg["layer"]`: ("Mamba1", "Mamba2", "Mamba3", "S4")."""
    return tuple(s.name for s in _SPECS if s.ssm)


def mixer_spec(spelling: str, allowed: Optional[Iterable[str]] = None, arg: str = "mixer") -> MixerSpec:
    """The spec selected by `spelling` (any accepted spelling, e.g. "mamba", "mamba1" or "Mamba1").

    allowed: names (first column) this caller accepts, e.g. ("Mamba1", "Mamba2"); None = all. `arg` names the
    argument in the error raised for an unknown or disallowed spelling.
    """
    spec = _BY_SPELLING.get(spelling) if isinstance(spelling, str) else None
    names = tuple(MIXERS) if allowed is None else tuple(allowed)
    if spec is None or spec.name not in names:
        choices = [w for n in names for w in MIXERS[n].spellings]
        raise MambaKitError(f"{arg} must be one of {choices}, got {spelling!r}")
    return spec


def default_d_state(spelling: str) -> Optional[int]:
    """The state size of a mixer when none is given: Mamba1 16, Mamba2 64, Mamba3 64, S4 64, attention None."""
    return mixer_spec(spelling).d_state


def default_headdim(d_inner: int, preferred: Iterable[int] = HEADDIM_PREFERENCE) -> int:
    """Head size of a headed mixer with `d_inner` channels: the first of `preferred` dividing d_inner, else
    gcd(d_inner, 64)."""
    return next((h for h in preferred if d_inner % h == 0), math.gcd(d_inner, 64))
