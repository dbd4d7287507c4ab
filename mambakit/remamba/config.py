"""ReMamba settings: which span of the prompt is compressed (s, p) and how much of it is kept (rho).

The span of a prompt of length L starts at ``floor(s * L)`` and is ``ceil(p * L)`` tokens long, clipped so that it
ends before the last prompt token (that token is the query of stage 1 and always stays in the sequence). Of the
span's n tokens the ``K = ceil(rho * n)`` most relevant are kept. When the clipped span is empty (a very short
prompt, or s so large that the span starts at the last token) K is 0 and ReMamba is a documented no-op: stage 2 is a
plain forward pass of the prompt.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from mambakit.errors import MambaKitError
from mambakit.models.config import config_from_dict

_EPS = 1e-9  # ceil(0.3 * 10) must be 3, not 4 (0.3 * 10 = 3.0000000000000004)


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _check_fraction(name: str, value: Any, low_open: bool, high_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise MambaKitError(f"ReMambaConfig.{name} must lie in {interval}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SpanPlan:
    """Where stage 1 compresses a prompt: tokens [start, start + length) are replaced by `keep` selected ones."""

    start: int
    length: int
    keep: int

    @property
    def is_noop(self) -> bool:
        return self.keep == 0

    def compressed_len(self, prompt_len: int) -> int:
        """Length of the stage-2 sequence."""
        return prompt_len - self.length + self.keep


@dataclass
class ReMambaConfig:
    """p: span length as a fraction of the prompt, in (0, 1]; rho: fraction of the span kept, in (0, 1];
    s: span start as a fraction of the prompt, in [0, 1). The paper trains with s = 0, p ~ U(0.1, 0.3),
    rho ~ U(0.05, 0.2)."""

    p: float = 0.2
    rho: float = 0.1
    s: float = 0.0

    def __post_init__(self) -> None:
        self.p = _check_fraction("p", self.p, low_open=True, high_open=False)
        self.rho = _check_fraction("rho", self.rho, low_open=True, high_open=False)
        self.s = _check_fraction("s", self.s, low_open=False, high_open=True)

    def plan(self, prompt_len: int) -> SpanPlan:
        """The span of a prompt of `prompt_len` tokens (see the module docstring)."""
        if not isinstance(prompt_len, int) or prompt_len < 1:
            raise MambaKitError(f"prompt length must be an integer >= 1, got {prompt_len!r}")
        start = min(int(math.floor(self.s * prompt_len + _EPS)), prompt_len - 1)
        length = min(_ceil(self.p * prompt_len), prompt_len - 1 - start)
        keep = _ceil(self.rho * length) if length > 0 else 0
        return SpanPlan(start=start, length=max(length, 0), keep=keep)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReMambaConfig":
        return config_from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
