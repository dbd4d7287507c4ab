"""Argument checks of the SSD op and its decode step: type, dtype, shape and device, once at the boundary.

Every error is a MambaKitError naming the argument, the expected and the actual value.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class Dims(NamedTuple):
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    d_state: int


def shape_text(named: Sequence[Tuple[str, Optional[int]]]) -> str:
    """``[("batch", 2), ("d_state", None)]`` -> ``"(batch=2, d_state)"``."""
    parts = [name if size is None else f"{name}={size}" for name, size in named]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def require_tensor(name: str, value: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> Tensor:
    if not isinstance(value, Tensor):
        raise MambaKitError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        wanted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise MambaKitError(f"{name} must have dtype in ({wanted}), got {value.dtype}")
    return value


def require_shape(
    name: str, value: Tensor, named: Sequence[Tuple[str, Optional[int]]], note: str = ""
) -> None:
    """Raise unless ``value.shape`` matches ``named`` (``None`` sizes are free but must be >= 1)."""
    ok = value.dim() == len(named) and all(
        (size is None and actual >= 1) or actual == size for (_, size), actual in zip(named, value.shape)
    )
    if not ok:
        raise MambaKitError(f"{name} must have shape {shape_text(named)}{note}, got {tuple(value.shape)}")


def require_device(name: str, value: Tensor, device: torch.device) -> None:
    if value.device != device:
        raise MambaKitError(f"{name} must be on the same device as x ({device}), got {value.device}")


def check_dt_options(dt_softplus: object, dt_limit: object) -> None:
    if not isinstance(dt_softplus, bool):
        raise MambaKitError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    pair = isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
    numbers = pair and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit)  # type: ignore
    if not numbers or not dt_limit[0] <= dt_limit[1]:  # type: ignore[index]  (False for NaN)
        raise MambaKitError(f"dt_limit must be a pair (low, high) of floats with low <= high, got {dt_limit!r}")


def check_head_params(
    dims: Dims, device: torch.device, D: Optional[Tensor], dt_bias: Optional[Tensor]
) -> None:
    if D is not None:
        require_tensor("D", D)
        if not (tuple(D.shape) == (dims.nheads,) or tuple(D.shape) == (dims.nheads, dims.headdim)):
            raise MambaKitError(
                f"D must have shape (nheads={dims.nheads},) or (nheads={dims.nheads}, headdim={dims.headdim}), "
                f"got {tuple(D.shape)}"
            )
        require_device("D", D, device)
    if dt_bias is not None:
        require_tensor("dt_bias", dt_bias)
        require_shape("dt_bias", dt_bias, [("nheads", dims.nheads)])
        require_device("dt_bias", dt_bias, device)


def check_ssd_inputs(
    x: object,
    dt: object,
    A: object,
    B: object,
    C: object,
    chunk_size: object,
    D: object,
    z: object,
    dt_bias: object,
    initial_states: object,
    seq_idx: object,
    dt_softplus: object,
    dt_limit: object,
    *,
    need_chunk_size: bool,
    log_decay: object = None,
) -> Dims:
    """Check the arguments of the sequence forms once; return the problem sizes. With ``log_decay`` (batch, seqlen,
    nheads), A must be None (the decay is given per position instead)."""
    x = require_tensor("x", x)
    if x.dim() != 4 or min(x.shape) < 1:
        raise MambaKitError(
            f"x must have shape (batch, seqlen, nheads, headdim) with every size >= 1, got {tuple(x.shape)}"
        )
    batch, seqlen, nheads, headdim = x.shape
    device = x.device
    dt = require_tensor("dt", dt)
    require_shape("dt", dt, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads)])
    if log_decay is None:
        A = require_tensor("A", A)
        require_shape("A", A, [("nheads", nheads)])
    else:
        if A is not None:
            raise MambaKitError(f"A must be None when log_decay is given, got {type(A).__name__}")
        log_decay = require_tensor("log_decay", log_decay)
        require_shape("log_decay", log_decay, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads)])
    B = require_tensor("B", B)
    ok = B.dim() == 4 and B.shape[0] == batch and B.shape[1] == seqlen and min(B.shape) >= 1
    if not ok or nheads % B.shape[2] != 0:
        raise MambaKitError(
            f"B must have shape (batch={batch}, seqlen={seqlen}, ngroups, d_state) with nheads={nheads} "
            f"divisible by ngroups, got {tuple(B.shape)}"
        )
    ngroups, d_state = B.shape[2], B.shape[3]
    C = require_tensor("C", C)
    require_shape("C", C, [("batch", batch), ("seqlen", seqlen), ("ngroups", ngroups), ("d_state", d_state)],
                   " (the shape of B)")
    dims = Dims(batch, seqlen, nheads, headdim, ngroups, d_state)
    if need_chunk_size or chunk_size is not None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise MambaKitError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_head_params(dims, device, D, dt_bias)  # type: ignore[arg-type]
    if z is not None:
        z = require_tensor("z", z)
        require_shape("z", z, [("batch", batch), ("seqlen", seqlen), ("nheads", nheads), ("headdim", headdim)],
                       " (the shape of x)")
    if initial_states is not None:
        initial_states = require_tensor("initial_states", initial_states)
        require_shape("initial_states", initial_states,
                       [("batch", batch), ("nheads", nheads), ("headdim", headdim), ("d_state", d_state)])
    if seq_idx is not None:
        seq_idx = require_tensor("seq_idx", seq_idx, INT_DTYPES)
        require_shape("seq_idx", seq_idx, [("batch", batch), ("seqlen", seqlen)])
    for name, value in (("dt", dt), ("A", A), ("log_decay", log_decay), ("B", B), ("C", C), ("z", z),
                        ("initial_states", initial_states), ("seq_idx", seq_idx)):
        if value is not None:
            require_device(name, value, device)  # type: ignore[arg-type]
    check_dt_options(dt_softplus, dt_limit)
    return dims



def check_ssd_step_inputs(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit) -> Dims:
    state = require_tensor("state", state)
    if state.dim() != 4 or min(state.shape) < 1:
        raise MambaKitError(
            f"state must have shape (batch, nheads, headdim, d_state) with every size >= 1, got {tuple(state.shape)}"
        )
    batch, nheads, headdim, d_state = state.shape
    device = state.device
    x = require_tensor("x", x)
    require_shape("x", x, [("batch", batch), ("nheads", nheads), ("headdim", headdim)], " (from state)")
    dt = require_tensor("dt", dt)
    require_shape("dt", dt, [("batch", batch), ("nheads", nheads)])
    A = require_tensor("A", A)
    require_shape("A", A, [("nheads", nheads)])
    B = require_tensor("B", B)
    ok = B.dim() == 3 and B.shape[0] == batch and B.shape[2] == d_state and B.shape[1] >= 1
    if not ok or nheads % B.shape[1] != 0:
        raise MambaKitError(
            f"B must have shape (batch={batch}, ngroups, d_state={d_state}) with nheads={nheads} divisible by "
            f"ngroups, got {tuple(B.shape)}"
        )
    C = require_tensor("C", C)
    require_shape("C", C, [("batch", batch), ("ngroups", B.shape[1]), ("d_state", d_state)], " (the shape of B)")
    dims = Dims(batch, 1, nheads, headdim, B.shape[1], d_state)
    require_device("x", x, device)
    check_head_params(dims, device, D, dt_bias)
    if z is not None:
        z = require_tensor("z", z)
        require_shape("z", z, [("batch", batch), ("nheads", nheads), ("headdim", headdim)], " (the shape of x)")
    for name, value in (("dt", dt), ("A", A), ("B", B), ("C", C), ("z", z)):
        if value is not None:
            require_device(name, value, device)
    check_dt_options(dt_softplus, dt_limit)
    return dims

