"""The Mamba-2 block: one in_proj producing [z, x, B, C, dt], a causal conv over xBC, the SSD scan with a scalar
decay per head, the gated RMSNorm norm(y * silu(z)) and out_proj.

With d_ssm < d_inner (the official `d_ssm`), the SSM covers d_ssm channels and a gated MLP the other
d_mlp = d_inner - d_ssm: in_proj gives [z0, x0, z, x, B, C, dt] and out_proj reads cat([silu(z0) * x0, y]).
Parameter names, shapes, packing and initialisation follow the official `mamba_ssm.Mamba2`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.checks import check_mixer_input
from mambakit.layers.dt_transform import DtTransform, DtTransformMixin
from mambakit.layers.first_call import compile_first_call
from mambakit.layers.mamba import init_dt_bias
from mambakit.layers.norm import RMSNormGated
from mambakit.layers.state import SSMState, float_state, ssm_state_dtype
from mambakit.layers.step import (PreNorm, gated_norm_project_step, norm_project_step, plain_linear,
                                   project_step)
from mambakit.ops import mixer_step, norm_linear
from mambakit.ops.conv1d import causal_conv1d_fn, conv_state_after
from mambakit.ops.dt import mask_dt, process_dt
from mambakit.ops.mamba2_inner import fused_available, mamba2_inner
from mambakit.ops.mixer_step import mamba2_step
from mambakit.ops.ssd import mamba_chunk_scan_combined

#: chunk_size only trades speed for memory (the function is the same); on CPU 64 is fastest
_CPU_CHUNK = 64


class Mamba2ScanInputs(NamedTuple):
    """xBC: conv input (batch, conv_dim, seqlen); x: (batch, seqlen, nheads, headdim) after conv + SiLU; dt:
    (batch, seqlen, nheads), raw unless dt_args is empty; A: (nheads,); B, C: (batch, seqlen, ngroups, d_state);
    D: (nheads,) or (nheads, headdim); z: (batch, seqlen, 2 * d_mlp + d_ssm), the gate [z0, x0, z] (only z, of
    d_ssm = d_inner channels, unless d_ssm < d_inner); dt_args: the dt processing left to the scan."""

    xBC: Tensor
    x: Tensor
    dt: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor
    z: Tensor
    dt_args: dict


class Mamba2(DtTransformMixin, nn.Module):
    """Mamba-2 mixer. Input and output: (batch, seqlen, d_model).

    Public surface for applications: `split_projection` (in_proj output -> z, xBC, dt), `ssm_inputs` (everything the
    scan reads), `scan_chunk_size`, `scan`, `finish` (gated norm and output projection), and the dt transform
    (`mambakit.layers.dt_transform`; dt is (batch, seqlen, nheads)).
    """

    dt_time_dim = 1

    def __init__(
        self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64, ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0), D_has_hdim: bool = False, rmsnorm: bool = True,
        norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")), bias: bool = False, conv_bias: bool = True,
        chunk_size: int = 256, layer_idx: Optional[int] = None, norm_eps: float = 1e-5, d_ssm: Optional[int] = None,
        device=None, dtype=None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                            ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MambaKitError(f"Mamba2 {name} must be a positive integer, got {value!r}")
        d_inner = expand * d_model
        if d_ssm is None:
            d_ssm = d_inner
        elif not isinstance(d_ssm, int) or isinstance(d_ssm, bool) or not 0 < d_ssm <= d_inner:
            raise MambaKitError(f"Mamba2 d_ssm must be None or an integer in [1, d_inner = expand * d_model = "
                                f"{d_inner}], got {d_ssm!r}")
        if d_ssm % headdim != 0:
            what = "d_inner = expand * d_model" if d_ssm == d_inner else "d_ssm"
            raise MambaKitError(f"Mamba2 {what} = {d_ssm} must be divisible by headdim={headdim}")
        nheads = d_ssm // headdim
        if nheads % ngroups != 0:
            raise MambaKitError(f"Mamba2 nheads = d_ssm / headdim = {nheads} must be divisible by ngroups={ngroups}")
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise MambaKitError(f"Mamba2 A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        if not 0 <= dt_limit[0] < dt_limit[1]:
            raise MambaKitError(f"Mamba2 dt_limit must satisfy 0 <= low < high, got {dt_limit}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner, self.headdim, self.ngroups, self.nheads = d_inner, headdim, ngroups, nheads
        self.D_has_hdim, self.rmsnorm, self.chunk_size = D_has_hdim, rmsnorm, chunk_size
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.layer_idx = layer_idx
        self.conv_dim = d_ssm + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(init_dt_bias(nheads, dt_min, dt_max, dt_init_floor, device))
        self.dt_bias._no_weight_decay = True
        self.dt_bias._no_reinit = True
        A = torch.empty(nheads, dtype=torch.float32, device=device).uniform_(lo, hi)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_ssm if D_has_hdim else nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(d_ssm, eps=norm_eps, group_size=d_ssm // ngroups,
                                     norm_before_gate=norm_before_gate, **factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)

    # ------------------------------------------------------------------------------------------------------------------
    #: allocate_state takes a state_dtype (`mambakit.layers.state.SSM_STATE_DTYPES`)
    accepts_state_dtype = True

    def allocate_state(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None,
                       state_dtype: Optional[torch.dtype] = None) -> SSMState:
        """Zero state: conv (batch, conv_dim, d_conv) in the model dtype, ssm (batch, nheads, headdim, d_state) in
        state_dtype, by default float32 (float64 for a float64 model)."""
        device = device or self.out_proj.weight.device
        conv_dtype = dtype or self.conv1d.weight.dtype
        ssm_dtype = ssm_state_dtype(conv_dtype, state_dtype)
        return SSMState(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=conv_dtype),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype),
        )

    @property
    def d_ssm(self) -> int:
        """Channels of the SSM: nheads * headdim (d_inner unless the official d_ssm narrowed it)."""
        return self.nheads * self.headdim

    @property
    def d_mlp(self) -> int:
        """Channels of the gated MLP beside the SSM: d_inner - d_ssm (0 by default)."""
        return self.d_inner - self.d_ssm

    @property
    def dt_size(self) -> int:
        """Channels of this layer's dt: nheads."""
        return self.nheads

    def split_projection(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The in_proj output (..., d_in_proj) -> z (..., 2 * d_mlp + d_ssm), xBC (..., conv_dim), dt (..., nheads);
        z is the gate [z0, x0, z] of `finish` (just z when d_ssm = d_inner)."""
        return torch.split(zxbcdt, [2 * self.d_mlp + self.d_ssm, self.conv_dim, self.nheads], dim=-1)


    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_dim) -> x (..., nheads, headdim), B, C (..., ngroups, d_state)."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_ssm, gn, gn], dim=-1)
        return (x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, self.d_state)),
                C.unflatten(-1, (self.ngroups, self.d_state)))

    def _D(self, fp: torch.dtype) -> Tensor:
        D = self.D.to(fp)
        return D.view(self.nheads, self.headdim) if self.D_has_hdim else D

    def finish(self, y: Tensor, z: Tensor) -> Tensor:
        """The scan's output y (..., d_ssm) and the gate z (..., 2 * d_mlp + d_ssm) -> (..., d_model), through the
        gated norm (without rmsnorm the scan has applied the gate already), and with d_ssm < d_inner the gated MLP
        part silu(z0) * x0 in front of it."""
        return self.out_proj(self._gated(y, z))

    def _gated(self, y: Tensor, z: Tensor) -> Tensor:
        """out_proj's input (..., d_inner) from y (..., d_ssm) and the gate z (..., 2 * d_mlp + d_ssm)."""
        if self.d_mlp == 0:
            return self.norm(y, z) if self.rmsnorm else y
        z0, x0, z = torch.split(z, [self.d_mlp, self.d_mlp, self.d_ssm], dim=-1)
        if self.rmsnorm:
            y = self.norm(y, z)
        return torch.cat([F.silu(z0) * x0, y.to(x0.dtype)], dim=-1)


    def scan_chunk_size(self, x: Tensor) -> int:
        """The SSD chunk for inputs like x: the configured one on CUDA, at most 64 elsewhere (CPU speed)."""
        return self.chunk_size if x.is_cuda else min(self.chunk_size, _CPU_CHUNK)

    def ssm_inputs(self, hidden_states: Tensor, conv_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None, dt_transform: Optional[DtTransform] = None) -> "Mamba2ScanInputs":
        """Everything the SSD scan reads, computed from hidden_states (batch, seqlen, d_model).

        Used by `forward` and by applications (hidden attention, ReMamba, context parallel). dt_transform (default:
        the installed one, see `transforming_dt`) rewrites the pre-bias, pre-softplus dt (batch, seqlen, nheads).
        With a mask, dt is returned already processed (softplus, limits, zero at pads) and `dt_args` is empty.
        """
        z, xBC, dt = self.split_projection(self.in_proj(hidden_states))
        transform = self._pick_dt_transform(dt_transform)
        if transform is not None:
            dt = transform(dt)
        xBC = xBC.transpose(1, 2)  # (batch, conv_dim, seqlen)
        if mask is not None:
            xBC = xBC * mask[:, None, :].to(xBC.dtype)
        xBC_conv = causal_conv1d_fn(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                    conv_state=conv_state, seq_idx=seq_idx)
        if mask is not None:
            xBC_conv = xBC_conv * mask[:, None, :].to(xBC_conv.dtype)
        x, B, C = self._split_xbc(xBC_conv.transpose(1, 2))
        fp = torch.float64 if x.dtype == torch.float64 else torch.float32
        dt_args = dict(dt_bias=self.dt_bias.to(fp), dt_softplus=True, dt_limit=self.dt_limit)
        if mask is not None:
            # process dt here so that padded positions get exactly delta = 0 (no decay, no input), whatever dt_limit
            dt = mask_dt(process_dt(dt, dtype=fp, **dt_args), mask, time_dim=1)
            dt_args = {}
        return Mamba2ScanInputs(xBC=xBC, x=x, dt=dt, A=-torch.exp(self.A_log.to(fp)), B=B, C=C, D=self._D(fp), z=z,
                                dt_args=dt_args)

    def scan_gate(self, s: Mamba2ScanInputs) -> Optional[Tensor]:
        """The gate the scan applies, (batch, seqlen, nheads, headdim): z without rmsnorm, None with it (the gated
        norm of `finish` applies z then)."""
        return None if self.rmsnorm else s.z[..., 2 * self.d_mlp:].unflatten(-1, (self.nheads, self.headdim))

    def scan(self, s: Mamba2ScanInputs, initial_states: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None):
        """The SSD scan on `ssm_inputs` (with the gate when there is no norm): returns y (batch, seqlen, nheads,
        headdim) and the final state (batch, nheads, headdim, d_state), from initial_states if given."""
        return mamba_chunk_scan_combined(
            s.x, s.dt, s.A, s.B, s.C, self.scan_chunk_size(s.x), D=s.D, z=self.scan_gate(s), seq_idx=seq_idx,
            initial_states=initial_states, return_final_states=True, **s.dt_args,
        )

    def forward(self, hidden_states: Tensor, state: Optional[SSMState] = None, seq_idx: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, dt_transform: Optional[DtTransform] = None) -> Tensor:
        """hidden_states: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        state: continue from it (chunked prefill) and update it in place to the state after the last token.
        seq_idx: (batch, seqlen) packed-sequence index. mask: (batch, seqlen) 1 = token, 0 = padding (the padded
        positions leave the state untouched). dt_transform: applied to the raw dt (batch, seqlen, nheads), see
        `mambakit.layers.dt_transform`.
        """
        check_mixer_input(self, hidden_states, seq_idx, mask)
        if state is None and self._pick_dt_transform(dt_transform) is None:
            compile_first_call(self, hidden_states, seq_idx, mask)  # the Triton kernels' first call (CUDA)
        if state is None and mask is None and self._fused_inner_ok(hidden_states, dt_transform):
            return self._fused_inner(hidden_states, seq_idx)
        s = self.ssm_inputs(hidden_states, state.conv if state is not None else None, seq_idx, mask, dt_transform)
        y, last = self.scan(s, float_state(state.ssm) if state is not None else None, seq_idx)
        if state is not None:
            with torch.no_grad():
                state.conv.copy_(conv_state_after(s.xBC, self.d_conv, state.conv, mask))
                state.ssm.copy_(last)
        return self.finish(y.flatten(-2), s.z)

    def _fused_inner_ok(self, hidden_states: Tensor, dt_transform: Optional[DtTransform]) -> bool:
        """Whether the inner path of a forward without state or mask can run as the fused op
        (`mambakit.ops.mamba2_inner`): CUDA, not float64, no d_mlp part, the gated norm over groups of d_inner /
        ngroups, no dt transform, a plain out_proj without hooks (a LoRA wrapper or a tensor-parallel hook must see
        its own call)."""
        if not hidden_states.is_cuda or hidden_states.dtype == torch.float64 or not self.rmsnorm or self.d_mlp:
            return False
        if self._pick_dt_transform(dt_transform) is not None or self.norm.group_size != self.d_inner // self.ngroups:
            return False
        return plain_linear(self.out_proj) and fused_available()

    def _fused_inner(self, hidden_states: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
        return mamba2_inner(self.in_proj(hidden_states), self.conv1d.weight, self.conv1d.bias, self.dt_bias, None,
                            self._D(torch.float32), self.norm.weight, self.out_proj.weight, self.out_proj.bias,
                            headdim=self.headdim, ngroups=self.ngroups, chunk_size=self.scan_chunk_size(hidden_states),
                            eps=self.norm.eps, norm_before_gate=self.norm.norm_before_gate, dt_limit=self.dt_limit,
                            seq_idx=seq_idx, A_log=self.A_log, backend="triton")  # A = -exp(A_log) inside the op

    def _norm_in_step(self, zxbcdt: Tensor) -> bool:
        """Whether this step's gated RMSNorm runs inside the one-kernel Triton step (`mixer_step.M2_NORM_IN_STEP`):
        CUDA, a batch beyond the out_proj GEMV's (which fuses the norm itself), the plain norm over groups of
        d_inner / ngroups, no d_mlp part."""
        if not (mixer_step.M2_CONV_IN_STEP and mixer_step.M2_NORM_IN_STEP and zxbcdt.is_cuda and self.rmsnorm):
            return False
        norm = self.norm
        return (self.d_mlp == 0 and zxbcdt.shape[0] > norm_linear.GEMV_MAX_BATCH and type(norm) is RMSNormGated
                and not (norm._forward_hooks or norm._forward_pre_hooks)
                and norm.group_size == self.d_inner // self.ngroups)

    #: `step` takes a `PreNorm` (the block's residual add + RMSNorm, fused into in_proj)
    step_fuses_pre_norm = True

    def step(self, hidden_states: Tensor, state: SSMState, pre_norm: Optional[PreNorm] = None):
        """One decoding step. hidden_states: (batch, 1, d_model) or (batch, d_model); state updated in place.

        Returns (batch, 1, d_model) (or (batch, d_model) for a 2-D input). With pre_norm, hidden_states is the
        block's input before its residual add + RMSNorm (pre_norm.residual shaped like it), done here inside
        in_proj, and the result is (output, new residual).
        """
        squeeze = hidden_states.dim() == 2
        h = hidden_states if squeeze else hidden_states[:, 0]
        if pre_norm is not None and pre_norm.residual is not None and not squeeze:
            pre_norm = pre_norm._replace(residual=pre_norm.residual[:, 0])
        zxbcdt, residual = norm_project_step(self.in_proj, h, pre_norm)
        hook = self.dt_transform
        transform = None if hook is None else (lambda dt: hook(dt[:, None])[:, 0])
        ssm_part = zxbcdt if self.d_mlp == 0 else zxbcdt[:, 2 * self.d_mlp:].contiguous()  # [z, x, B, C, dt]
        norm_here = transform is None and self._norm_in_step(zxbcdt)
        y = mamba2_step(ssm_part, state.conv, state.ssm, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                        self.dt_bias, self.A_log, self.D, self.ngroups, self.dt_limit, gate=not self.rmsnorm,
                        dt_transform=transform,
                        norm=(self.norm.weight, self.norm.eps, self.norm.norm_before_gate) if norm_here else None)
        y = y.to(zxbcdt.dtype)
        if norm_here:
            out = project_step(self.out_proj, y)
        elif self.d_mlp > 0:
            out = project_step(self.out_proj, self._gated(y, zxbcdt[:, :2 * self.d_mlp + self.d_ssm]))
        elif self.rmsnorm:
            out = gated_norm_project_step(self.norm, self.out_proj, y, zxbcdt[:, :self.d_inner])
        else:
            out = project_step(self.out_proj, y)
        out = out if squeeze else out[:, None]
        if pre_norm is None:
            return out
        return out, residual if squeeze else residual[:, None]
