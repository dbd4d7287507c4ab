"""The Mamba-1 block: in_proj -> causal depthwise conv1d -> SiLU -> selective SSM, gated by SiLU(z) -> out_proj.

Parameter names, shapes and initialisation follow the official `mamba_ssm.Mamba`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.checks import check_mixer_input
from mambakit.layers.dt_transform import DtTransform, DtTransformMixin
from mambakit.layers.first_call import compile_first_call
from mambakit.layers.state import SSMState, float_state, ssm_state_dtype
from mambakit.layers.step import PreNorm, norm_project_step, plain_linear, project_step
from mambakit.ops.conv1d import causal_conv1d_fn, conv_state_after
from mambakit.ops.dt import mask_dt, process_dt
from mambakit.ops.mamba_inner import fused_available, mamba_inner, mamba_inner_fused_inference
from mambakit.ops.mixer_step import bcdt_norm, mamba1_step
from mambakit.ops.selective_scan import selective_scan_fn


def inverse_softplus(x: Tensor) -> Tensor:
    """The y with softplus(y) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


def init_dt_bias(d: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> Tensor:
    """Inverse softplus of dt drawn log-uniformly in [dt_min, dt_max] and floored at dt_init_floor: (d,) float32."""
    dt = torch.exp(torch.rand(d, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(dt.clamp(min=dt_init_floor))


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise MambaKitError(f"Mamba {name} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")


class MambaScanInputs(NamedTuple):
    """x: conv input (batch, d_inner, seqlen); u: conv output after SiLU, the scan input; delta: (batch, d_inner,
    seqlen), pre-bias and pre-softplus unless a mask was given (then processed, 0 at pads, with delta_bias None and
    delta_softplus False); delta_bias, D: (d_inner,); A: (d_inner, d_state); B, C: (batch, d_state, seqlen); z: gate
    (batch, d_inner, seqlen); delta_softplus: whether the scan still applies the softplus."""

    x: Tensor
    u: Tensor
    delta: Tensor
    delta_bias: Optional[Tensor]
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor
    z: Tensor
    delta_softplus: bool = True


class Mamba(DtTransformMixin, nn.Module):
    """Mamba-1 mixer. Input and output: (batch, seqlen, d_model).

    bcdt_rms: apply a weightless RMSNorm (epsilon bcdt_rms_eps) to dt_low (batch, seqlen, dt_rank), B and C (batch,
    seqlen, d_state) after x_proj, as Falcon-Mamba does; with bcdt_rms_weight also times a learned weight each
    (parameters dt_norm_weight (dt_rank,), B_norm_weight and C_norm_weight (d_state,), initialised to 1), as Jamba does.

    Public surface for applications: `ssm_inputs` (everything the scan reads), `scan` (the scan on them), `finish`
    (the output projection), and the dt transform (`mambakit.layers.dt_transform`; dt is (batch, d_inner, seqlen)).
    """

    dt_time_dim = 2

    def __init__(
        self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, layer_idx: Optional[int] = None,
        scan_backend: str = "auto", bcdt_rms: bool = False, bcdt_rms_eps: float = 1e-6, bcdt_rms_weight: bool = False,
        device=None, dtype=None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                            ("dt_min", dt_min), ("dt_max", dt_max), ("dt_scale", dt_scale)):
            _check_positive(name, value)
        if dt_init not in ("random", "constant"):
            raise MambaKitError(f"Mamba dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not isinstance(bcdt_rms, bool):
            raise MambaKitError(f"Mamba bcdt_rms must be True or False, got {bcdt_rms!r}")
        if bcdt_rms_weight not in (False, True) or (bcdt_rms_weight and not bcdt_rms):
            raise MambaKitError(f"Mamba bcdt_rms_weight must be True (with bcdt_rms=True) or False, got "
                                f"{bcdt_rms_weight!r} with bcdt_rms={bcdt_rms!r}")
        _check_positive("bcdt_rms_eps", bcdt_rms_eps)
        if dt_min > dt_max:
            raise MambaKitError(f"Mamba dt_min must be <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        _check_positive("dt_rank", self.dt_rank)
        self.layer_idx = layer_idx
        self.scan_backend = scan_backend
        # Falcon-Mamba: a weightless RMSNorm on dt_low (before dt_proj), B and C after x_proj
        self.bcdt_rms, self.bcdt_rms_eps = bcdt_rms, float(bcdt_rms_eps)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, dt_init_std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor, device))
        self.dt_proj.bias._no_reinit = True  # a later global init must keep this bias
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # S4D-real: A = -(1..d_state) for every channel
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.dt_norm_weight = self.B_norm_weight = self.C_norm_weight = None
        if bcdt_rms_weight:  # Jamba: the B / C / dt norms have learned weights
            self.dt_norm_weight = nn.Parameter(torch.ones(self.dt_rank, **factory))
            self.B_norm_weight = nn.Parameter(torch.ones(d_state, **factory))
            self.C_norm_weight = nn.Parameter(torch.ones(d_state, **factory))

    @property
    def bcdt_weights(self) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """The learned weights of the dt / B / C norms, or None (weightless or no norms)."""
        if self.dt_norm_weight is None:
            return None
        return self.dt_norm_weight, self.B_norm_weight, self.C_norm_weight

    # ------------------------------------------------------------------------------------------------------------------
    #: allocate_state takes a state_dtype (`mambakit.layers.state.SSM_STATE_DTYPES`)
    accepts_state_dtype = True

    def allocate_state(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None,
                       state_dtype: Optional[torch.dtype] = None) -> SSMState:
        """Zero state: conv (batch, d_inner, d_conv) in the model dtype, ssm (batch, d_inner, d_state) in
        state_dtype, by default float32 (float64 for a float64 model)."""
        device = device or self.out_proj.weight.device
        conv_dtype = dtype or self.conv1d.weight.dtype
        ssm_dtype = ssm_state_dtype(conv_dtype, state_dtype)
        return SSMState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype),
        )

    @property
    def dt_size(self) -> int:
        """Channels of this layer's dt: d_inner."""
        return self.d_inner

    def ssm_inputs(self, hidden_states: Tensor, conv_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None, dt_transform: Optional[DtTransform] = None) -> "MambaScanInputs":
        """Everything the selective scan reads, computed from hidden_states (batch, seqlen, d_model).

        Used by `forward` and by applications (hidden attention, ReMamba, context parallel) so that the math lives
        in one place. dt_transform (default: the installed one, see `transforming_dt`) rewrites the pre-bias,
        pre-softplus delta (batch, d_inner, seqlen). With a mask, delta is returned processed and 0 at the pads.
        """
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 * d_inner, seqlen)
        x, z = xz.chunk(2, dim=1)
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        x_conv = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                  conv_state=conv_state, seq_idx=seq_idx)
        if mask is not None:
            x_conv = x_conv * mask[:, None, :].to(x_conv.dtype)
        x_dbl = self.x_proj(x_conv.transpose(1, 2))  # (batch, seqlen, dt_rank + 2 * d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bcdt_rms:
            dt, B, C = bcdt_norm(dt, B, C, self.bcdt_rms_eps, self.bcdt_weights)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (batch, d_inner, seqlen), bias added in the scan
        transform = self._pick_dt_transform(dt_transform)
        if transform is not None:
            dt = transform(dt)
        fp = torch.float64 if x_conv.dtype == torch.float64 else torch.float32
        delta_bias: Optional[Tensor] = self.dt_proj.bias.to(fp)
        softplus = True
        if mask is not None:  # a padded step must neither decay the state nor add to it: delta = 0 there
            dt = mask_dt(process_dt(dt, delta_bias, True, dtype=fp, channel_dim=1), mask, time_dim=2)
            delta_bias, softplus = None, False
        return MambaScanInputs(x=x, u=x_conv, delta=dt, delta_bias=delta_bias, A=-torch.exp(self.A_log.to(fp)),
                               B=B.transpose(1, 2), C=C.transpose(1, 2), D=self.D.to(fp), z=z, delta_softplus=softplus)

    def scan(self, s: MambaScanInputs, initial_state: Optional[Tensor] = None, seq_idx: Optional[Tensor] = None):
        """The selective scan on `ssm_inputs`: returns y (batch, d_inner, seqlen) and the last state (batch,
        d_inner, d_state), starting from initial_state (batch, d_inner, d_state) if given."""
        return selective_scan_fn(
            s.u, s.delta, s.A, s.B, s.C, s.D, z=s.z, delta_bias=s.delta_bias, delta_softplus=s.delta_softplus,
            return_last_state=True, initial_state=initial_state, seq_idx=seq_idx, backend=self.scan_backend,
        )

    def finish(self, y: Tensor) -> Tensor:
        """The scan's output y (batch, d_inner, seqlen) -> the layer's output (batch, seqlen, d_model)."""
        return self.out_proj(y.transpose(1, 2))

    def forward(self, hidden_states: Tensor, state: Optional[SSMState] = None, seq_idx: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, dt_transform: Optional[DtTransform] = None) -> Tensor:
        """hidden_states: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        state: continue from it (chunked prefill) and update it in place to the state after the last token.
        seq_idx: (batch, seqlen) packed-sequence index; no information crosses a change of index.
        mask: (batch, seqlen) 1 for real tokens, 0 for padding; padded positions leave the state untouched.
        dt_transform: applied to the raw delta (batch, d_inner, seqlen), see `mambakit.layers.dt_transform`.
        """
        check_mixer_input(self, hidden_states, seq_idx, mask)
        if state is None and self.scan_backend in ("auto", "triton") and self._pick_dt_transform(dt_transform) is None:
            compile_first_call(self, hidden_states, seq_idx, mask)  # the Triton kernels' first call (no transform:
            # its dry run would call the transform once more)
        if self._fused_inner_ok(hidden_states, state, mask, dt_transform, seq_idx):
            return self._fused_inner(hidden_states, seq_idx, state)
        s = self.ssm_inputs(hidden_states, state.conv if state is not None else None, seq_idx, mask, dt_transform)
        y, last_state = self.scan(s, float_state(state.ssm) if state is not None else None, seq_idx)
        if state is not None:
            with torch.no_grad():
                state.conv.copy_(self._conv_state_after(s.x, state.conv, mask))
                state.ssm.copy_(last_state)
        return self.finish(y)

    def _fused_inner_ok(self, hidden_states: Tensor, state: Optional[SSMState], mask: Optional[Tensor],
                        dt_transform: Optional[DtTransform], seq_idx: Optional[Tensor]) -> bool:
        """Whether the whole inner path can run as the fused op (`mambakit.ops.mamba_inner`): Triton scan chosen
        on CUDA, no mask, dt transform or Falcon-Mamba norms, plain projections without hooks (a LoRA wrapper or a
        tensor-parallel hook must see its own call); with a recurrent state only outside autograd and without
        seq_idx (a prefill)."""
        if mask is not None or self.bcdt_rms or self._pick_dt_transform(dt_transform) is not None:
            return False
        if state is not None and (torch.is_grad_enabled() or seq_idx is not None):
            return False
        if self.scan_backend not in ("auto", "triton") or hidden_states.dtype == torch.float64:
            return False
        if not (hidden_states.is_cuda or self.scan_backend == "triton") or not fused_available():
            return False
        return all(plain_linear(m) for m in (self.x_proj, self.dt_proj, self.out_proj))

    def _fused_inner(self, hidden_states: Tensor, seq_idx: Optional[Tensor], state: Optional[SSMState]) -> Tensor:
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 * d_inner, seqlen), a view
        fp = torch.float32
        weights = (self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                   self.out_proj.weight, self.out_proj.bias)
        D, delta_bias = self.D.to(fp), self.dt_proj.bias.to(fp)
        if state is None:  # A = -exp(A_log) inside the op
            return mamba_inner(xz, *weights, None, D, delta_bias, True, seq_idx, backend="triton", A_log=self.A_log)
        args = weights + (-torch.exp(self.A_log.to(fp)), D, delta_bias)
        out, last = mamba_inner_fused_inference(xz, *args, state.conv, float_state(state.ssm))
        state.conv.copy_(self._conv_state_after(xz[:, :self.d_inner], state.conv, None))
        state.ssm.copy_(last)
        return out

    def _conv_state_after(self, x: Tensor, conv_state: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The last d_conv real inputs of each row (left or right padding), after the previous state."""
        return conv_state_after(x, self.d_conv, conv_state, mask)

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
        xz, residual = norm_project_step(self.in_proj, h, pre_norm)
        hook = self.dt_transform
        transform = None if hook is None else (lambda dt: hook(dt[:, :, None])[:, :, 0])
        y = mamba1_step(xz, state.conv, state.ssm, self.conv1d.weight.squeeze(1),
                        self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self.A_log,
                        self.D, dt_transform=transform,
                        bcdt_rms_eps=self.bcdt_rms_eps if self.bcdt_rms else None, bcdt_weights=self.bcdt_weights)
        out = project_step(self.out_proj, y, gemv=True)
        out = out if squeeze else out[:, None]
        if pre_norm is None:
            return out
        return out, residual if squeeze else residual[:, None]
