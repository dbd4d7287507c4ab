"""The mixers' dt transform: a function applied to the raw (pre-bias, pre-softplus) dt of a Mamba or Mamba-2
layer, the one documented way for an application (ReMamba) to change a layer's discretisation step.

Given explicitly (``layer(x, dt_transform=fn)``, ``layer.ssm_inputs(x, dt_transform=fn)``), or installed for the
duration of a block when the call goes through a model (``with layer.transforming_dt(fn): model(...)``) or for
good (``layer.dt_transform = fn``; the old name ``delta_hook`` is a deprecated alias).
``fn`` maps dt to a tensor of the same shape: Mamba-1 (batch, d_inner, seqlen), Mamba-2 (batch, seqlen, nheads);
``layer.dt_size`` is its channel count and ``layer.dt_time_dim`` its time axis.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from torch import Tensor

DtTransform = Callable[[Tensor], Tensor]


class DtTransformMixin:
    """What a mixer with a dt gives applications: `transforming_dt`, `dt_transform`, `dt_size`, `dt_time_dim`."""

    dt_time_dim: int = 1
    _dt_transform: Optional[DtTransform] = None

    @property
    def dt_size(self) -> int:  # pragma: no cover - each mixer defines it
        raise NotImplementedError

    @property
    def dt_transform(self) -> Optional[DtTransform]:
        """The installed transform (None: dt unchanged); set it for good here, or for a block with
        `transforming_dt`."""
        return self._dt_transform

    @dt_transform.setter
    def dt_transform(self, fn: Optional[DtTransform]) -> None:
        self._dt_transform = fn

    @contextmanager
    def transforming_dt(self, fn: Optional[DtTransform]) -> Iterator[None]:
        """Within the block, every call of the layer (forward, ssm_inputs, step) applies ``fn`` to its raw dt; the
        previous transform is restored on exit."""
        previous = self._dt_transform
        self._dt_transform = fn
        try:
            yield
        finally:
            self._dt_transform = previous

    def _pick_dt_transform(self, explicit: Optional[DtTransform]) -> Optional[DtTransform]:
        return explicit if explicit is not None else self._dt_transform

    @property
    def delta_hook(self) -> Optional[DtTransform]:
        """Deprecated alias of `dt_transform` (use `transforming_dt` or the ``dt_transform`` argument)."""
        return self._dt_transform

    @delta_hook.setter
    def delta_hook(self, fn: Optional[DtTransform]) -> None:
        if fn is not None:
            warnings.warn("delta_hook is deprecated: use layer.transforming_dt(fn) or forward(..., dt_transform=fn)",
                          DeprecationWarning, stacklevel=2)
        self._dt_transform = fn
