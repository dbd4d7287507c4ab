"""S4: a linear time-invariant SSM mixer, the baseline that shows what selectivity adds.

The block is the Mamba block with only the SSM swapped (in_proj -> causal conv -> SiLU -> SSM -> gate SiLU(z) ->
out_proj), so comparisons are like for like. The SSM is diagonal (S4D) with per-channel step dt, complex A, B, C
initialised from HiPPO-LegS (S4D-LegS), S4D-Lin or S4D-Real, discretised by zero-order hold or the bilinear rule,
and computed as a long convolution by FFT (training, prefill) or as a recurrence (decoding; mode="recurrent").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.state import SSMState
from mambakit.ops.conv1d import causal_conv1d_fn, causal_conv1d_update, conv_state_after
from mambakit.ops.lti import (DISCRETIZATIONS, S4D_INITS, causal_fft_conv, discretize, lti_recurrent, s4d_init,
                              ssm_kernel)


class S4(nn.Module):
    """LTI SSM mixer. Input and output: (batch, seqlen, d_model)."""

    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, init: str = "legs",
                 discretization: str = "zoh", mode: str = "conv", dt_min: float = 0.001, dt_max: float = 0.1,
                 conv_bias: bool = True, bias: bool = False, layer_idx: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        if init not in S4D_INITS:
            raise MambaKitError(f"S4 init must be one of {S4D_INITS}, got {init!r}")
        if discretization not in DISCRETIZATIONS:
            raise MambaKitError(f"S4 discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
        if mode not in ("conv", "recurrent"):
            raise MambaKitError(f"S4 mode must be 'conv' or 'recurrent', got {mode!r}")
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(value, int) or value <= 0:
                raise MambaKitError(f"S4 {name} must be a positive integer, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.discretization, self.mode, self.layer_idx = discretization, mode, layer_idx
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        A, B = s4d_init(d_state, init)
        H = self.d_inner
        # the SSM parameters stay float32 whatever `dtype` (as A_log and D of the Mamba layers), on `device`
        self.log_dt = nn.Parameter((torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
                                   .to(device))
        self.A_log_neg_real = nn.Parameter(torch.log(-A.real).float().repeat(H, 1).to(device))  # Re(A) = -exp(.)
        self.A_imag = nn.Parameter(A.imag.float().repeat(H, 1).to(device))
        self.B = nn.Parameter(torch.view_as_real(B.to(torch.complex64)).repeat(H, 1, 1).to(device))  # (H, N, 2)
        self.C = nn.Parameter((torch.randn(H, d_state, 2) * (0.5 ** 0.5)).to(device))
        self.D = nn.Parameter(torch.ones(H, device=device))
        for p in (self.log_dt, self.A_log_neg_real, self.A_imag):
            p._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def discrete_ssm(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """Ā, B̄, C: (d_inner, d_state) complex."""
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        rdtype = torch.float64 if dtype == torch.float64 else torch.float32
        A = torch.complex(-torch.exp(self.A_log_neg_real.to(rdtype)), self.A_imag.to(rdtype))
        B = torch.view_as_complex(self.B.to(rdtype).contiguous())
        C = torch.view_as_complex(self.C.to(rdtype).contiguous())
        A_bar, B_bar = discretize(A, B, torch.exp(self.log_dt.to(rdtype))[:, None], self.discretization)
        return A_bar.to(cdtype), B_bar.to(cdtype), C.to(cdtype)

    def allocate_state(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None) -> SSMState:
        """conv (batch, d_inner, d_conv); ssm (batch, d_inner, d_state) complex."""
        device = device or self.out_proj.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return SSMState(conv=torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
                        ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=cdtype))

    def ssm(self, x: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """The LTI SSM over x (batch, d_inner, L), optionally from a state; returns y and (if state given) the new
        state. Convolutional mode for a fresh sequence, else the recurrence (both give the same numbers)."""
        A_bar, B_bar, C = self.discrete_ssm(x.dtype)
        if self.mode == "recurrent" or state is not None:
            y, last = lti_recurrent(x, A_bar, B_bar, C, state)
            return y, last
        K = ssm_kernel(A_bar, B_bar, C, x.shape[-1])
        return causal_fft_conv(x, K), None

    def forward(self, hidden_states: Tensor, state: Optional[SSMState] = None, seq_idx: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """hidden_states: (batch, seqlen, d_model). mask: left padding only (pads are zero inputs, so an LTI state
        starting from zero is unchanged by them)."""
        if seq_idx is not None:
            raise MambaKitError("S4 does not support seq_idx (packed sequences)")
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        conv_state = state.conv if state is not None else None
        xc = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", conv_state=conv_state)
        if mask is not None:
            xc = xc * mask[:, None, :].to(xc.dtype)
        y, last = self.ssm(xc, state.ssm if state is not None else None)
        y = (y + xc * self.D.to(xc.dtype)[:, None]) * F.silu(z)
        if state is not None:
            with torch.no_grad():
                state.conv.copy_(conv_state_after(x, self.d_conv, state.conv, mask))
                state.ssm.copy_(last)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden_states: Tensor, state: SSMState) -> Tensor:
        squeeze = hidden_states.dim() == 2
        h = hidden_states if squeeze else hidden_states[:, 0]
        x, z = self.in_proj(h).chunk(2, dim=-1)
        xc = causal_conv1d_update(x, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        A_bar, B_bar, C = self.discrete_ssm(xc.dtype)
        state.ssm.mul_(A_bar).add_(B_bar * xc[..., None].to(state.ssm.dtype))
        y = (C * state.ssm).sum(-1).real.to(xc.dtype)
        out = self.out_proj((y + xc * self.D.to(xc.dtype)) * F.silu(z))
        return out if squeeze else out[:, None]
