"""The Mamba-3 block (SISO or MIMO of rank R): one in_proj producing [z, x, B, C, dd_dt, dd_A, trap, angle],
RMSNorm on B and C, the Mamba-3 scan (trapezoidal two-term update, data-dependent rotations of B and C, B/C
biases; no conv), the gate y * silu(z) or, with `is_outproj_norm`, the gated RMSNorm norm(y) * silu(z), and
out_proj.

Parameter names, shapes, packing and initialisation follow the official `mamba_ssm.modules.mamba3.Mamba3`. MIMO
(``is_mimo=True``, rank ``mimo_rank``): B and C per rank, ``mimo_x`` / ``mimo_z`` / ``mimo_o`` (nheads, R, headdim)
mixing x in, the gate and the output (:mod:`mambakit.ops.mamba3.mimo`); its state pairs rotate as in SISO. A per
token is ``clamp(-f(dd_A), max=-A_floor)`` with f the heavy-tail activation (``A_activation="heavy_tail"``, the
official main branch) or softplus (``"softplus"``, the official 2.3.2.post1 release).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.checks import check_mixer_input
from mambakit.layers.first_call import compile_first_call
from mambakit.layers.mamba import init_dt_bias
from mambakit.layers.norm import RMSNorm, RMSNormGated
from mambakit.layers.step import PreNorm, gated_norm_project_step, norm_project_step, project_step
from mambakit.ops.cpu_linear import use_cpu_linear
import mambakit.ops.mamba3 as mamba3_ops
from mambakit.ops.mamba3 import BACKENDS, mamba3_scan, mamba3_step
from mambakit.ops.mamba3.mimo import mamba3_mimo_scan, mamba3_mimo_step, mimo_combine
from mambakit.ops.mamba3.prep_step import mamba3_prep_step, prep_step_fits

A_ACTIVATIONS = ("heavy_tail", "softplus")


def heavy_tail(x: Tensor) -> Tensor:
    """1 + x for x >= 0, 1 / (1 - x) for x < 0: positive, continuous and differentiable at 0 (derivative 1 there).
    Same shape as x."""
    return torch.where(x >= 0, 1 + x, torch.reciprocal(1 - x.clamp(max=0)))


@dataclass
class Mamba3State:
    """Inference state of a Mamba-3 layer, updated in place: angle (batch, nheads, n_angles), ssm (batch, nheads,
    headdim, d_state), k (batch, nheads, d_state) the last token's rotated B with bias ((batch, R, nheads, d_state),
    one per rank, for MIMO), v (batch, nheads, headdim) the last token's x. All float32 (float64 for a float64
    model)."""

    angle: Tensor
    ssm: Tensor
    k: Tensor
    v: Tensor

    def parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.angle, self.ssm, self.k, self.v

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search, dropping finished rows) in place of the stored tensors."""
        self.angle, self.ssm, self.k, self.v = (t.index_select(0, index) for t in self.parts())


class Mamba3ScanInputs(NamedTuple):
    """The keyword arguments of `mamba3_scan` (shapes there: Q = C, K = B after RMSNorm, V = x, Z = the gate or None
    with is_outproj_norm, Input_States the state to start from or None), and z (batch, seqlen, d_inner). MIMO: Q, K
    (batch, seqlen, R, ngroups, d_state), Q_bias, K_bias (nheads, R, d_state), as the MIMO scan takes them."""

    Q: Tensor
    K: Tensor
    V: Tensor
    ADT: Tensor
    DT: Tensor
    Trap: Tensor
    Q_bias: Tensor
    K_bias: Tensor
    Angles: Tensor
    D: Tensor
    Z: Optional[Tensor]
    Input_States: Optional[tuple]
    z: Tensor

    def scan_kwargs(self) -> dict:
        kw = self._asdict()
        del kw["z"]
        return kw


class Mamba3(nn.Module):
    """Mamba-3 mixer (SISO, or MIMO of rank mimo_rank with is_mimo). Input and output: (batch, seqlen, d_model)."""

    def __init__(
        self, d_model: int, d_state: int = 128, expand: int = 2, headdim: int = 64, ngroups: int = 1,
        rope_fraction: float = 0.5, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4, A_activation: str = "heavy_tail", is_outproj_norm: bool = False,
        is_mimo: bool = False, mimo_rank: int = 4, chunk_size: int = 64, layer_idx: Optional[int] = None,
        scan_backend: str = "auto", device=None, dtype=None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("expand", expand), ("headdim", headdim),
                            ("ngroups", ngroups), ("chunk_size", chunk_size), ("mimo_rank", mimo_rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MambaKitError(f"Mamba3 {name} must be a positive integer, got {value!r}")
        if not isinstance(is_mimo, bool):
            raise MambaKitError(f"Mamba3 is_mimo must be a bool, got {is_mimo!r}")
        if rope_fraction not in (0.5, 1.0):
            raise MambaKitError(f"Mamba3 rope_fraction must be 0.5 or 1.0, got {rope_fraction!r}")
        if scan_backend not in BACKENDS:
            raise MambaKitError(f"Mamba3 scan_backend must be one of {BACKENDS}, got {scan_backend!r}")
        if A_activation not in A_ACTIVATIONS:
            raise MambaKitError(f"Mamba3 A_activation must be one of {A_ACTIVATIONS}, got {A_activation!r}")
        if not (isinstance(A_floor, (int, float)) and A_floor >= 0):
            raise MambaKitError(f"Mamba3 A_floor must be a number >= 0, got {A_floor!r}")
        d_inner = expand * d_model
        if d_inner % headdim != 0:
            raise MambaKitError(f"Mamba3 d_inner = expand * d_model = {d_inner} must be divisible by headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups != 0:
            raise MambaKitError(f"Mamba3 nheads = d_inner / headdim = {nheads} must be divisible by ngroups={ngroups}")
        rotated = int(d_state * rope_fraction) // 2 * 2  # the first `rotated` state dims turn, in pairs
        if rotated < 2:
            raise MambaKitError(f"Mamba3 d_state * rope_fraction must be >= 2 (one rotated pair), got "
                                f"d_state={d_state}, rope_fraction={rope_fraction}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.expand, self.headdim = d_model, d_state, expand, headdim
        self.d_inner, self.nheads, self.ngroups, self.num_bc_heads = d_inner, nheads, ngroups, ngroups
        self.rope_fraction, self.num_rope_angles = rope_fraction, rotated // 2
        self.A_floor, self.A_activation, self.is_outproj_norm = float(A_floor), A_activation, is_outproj_norm
        self.is_mimo, self.chunk_size, self.layer_idx = is_mimo, chunk_size, layer_idx
        self.scan_backend = scan_backend
        self.mimo_rank = R = mimo_rank if is_mimo else 1

        d_in_proj = 2 * d_inner + 2 * d_state * ngroups * R + 3 * nheads + self.num_rope_angles
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=False, **factory)
        self.dt_bias = nn.Parameter(init_dt_bias(nheads, dt_min, dt_max, dt_init_floor, device))
        self.dt_bias._no_weight_decay = True
        self.B_bias = nn.Parameter(torch.ones(nheads, R, d_state, device=device))
        self.C_bias = nn.Parameter(torch.ones(nheads, R, d_state, device=device))
        self.B_norm = RMSNorm(d_state, eps=1e-5, **factory)
        self.C_norm = RMSNorm(d_state, eps=1e-5, **factory)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.full((nheads, R, headdim), 1 / R, device=device))
            self.mimo_z = nn.Parameter(torch.ones(nheads, R, headdim, device=device))
            self.mimo_o = nn.Parameter(torch.full((nheads, R, headdim), 1 / R, device=device))
        self.D = nn.Parameter(torch.ones(nheads, device=device))
        self.D._no_weight_decay = True
        if is_outproj_norm:
            self.norm = RMSNormGated(d_inner, eps=1e-5, group_size=headdim, norm_before_gate=True, **factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **factory)

    # ------------------------------------------------------------------------------------------------------------------
    def allocate_state(self, batch_size: int, dtype: Optional[torch.dtype] = None, device=None) -> Mamba3State:
        """Zero state (the four parts of `Mamba3State`) in float32, float64 for a float64 model or dtype."""
        device = device or self.out_proj.weight.device
        fp = torch.float64 if (dtype or self.out_proj.weight.dtype) == torch.float64 else torch.float32
        b, h = batch_size, self.nheads
        k = (b, self.mimo_rank, h, self.d_state) if self.is_mimo else (b, h, self.d_state)
        return Mamba3State(*(torch.zeros(*shape, device=device, dtype=fp) for shape in (
            (b, h, self.num_rope_angles), (b, h, self.headdim, self.d_state), k, (b, h, self.headdim))))

    def split_projection(self, projected: Tensor) -> tuple[Tensor, ...]:
        """(..., d_in_proj) -> z, x (..., d_inner), B, C (..., R * ngroups * d_state), dd_dt, dd_A, trap
        (..., nheads), angle (..., num_rope_angles): the official order."""
        gn = self.mimo_rank * self.ngroups * self.d_state
        return torch.split(projected, [self.d_inner, self.d_inner, gn, gn, self.nheads, self.nheads, self.nheads,
                                       self.num_rope_angles], dim=-1)

    def _A(self, dd_A: Tensor) -> Tensor:
        f = heavy_tail(dd_A) if self.A_activation == "heavy_tail" else F.softplus(dd_A)
        return torch.clamp(-f, max=-self.A_floor)

    def ssm_inputs(self, hidden_states: Tensor, state: Optional[Mamba3State] = None, seq_idx: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> Mamba3ScanInputs:
        """Everything the scan reads, computed from hidden_states (batch, seqlen, d_model) and the state to start
        from (not modified). seq_idx is accepted for the common surface (the scan takes it, not the inputs).

        With a mask (batch, seqlen; 1 = token, 0 = padding) the padded positions neither decay nor add to the state
        (dt = 0 there) and carry the x and B of the token before them, so that the next token's look-back term
        and the final state see the previous real token.
        """
        return self._projected_inputs(self.in_proj(hidden_states), state, mask)

    def _projected_inputs(self, projected: Tensor, state: Optional[Mamba3State] = None,
                          mask: Optional[Tensor] = None) -> Mamba3ScanInputs:
        """`ssm_inputs` from the in_proj output projected (batch, seqlen, d_in_proj)."""
        z, x, B, C, dd_dt, dd_A, trap, angle = self.split_projection(projected)
        fp = torch.float64 if x.dtype == torch.float64 else torch.float32
        batch, seqlen = projected.shape[:2]
        x = x.unflatten(-1, (self.nheads, self.headdim))
        bc = (self.mimo_rank, self.ngroups, self.d_state) if self.is_mimo else (self.ngroups, self.d_state)
        B = self.B_norm(B.unflatten(-1, bc))
        C = self.C_norm(C.unflatten(-1, bc))
        DT = F.softplus(dd_dt.to(fp) + self.dt_bias.to(fp))  # (batch, seqlen, nheads)
        ADT = self._A(dd_A.to(fp)) * DT
        angles = angle.to(fp)[:, :, None].expand(batch, seqlen, self.nheads, self.num_rope_angles)
        start = None if state is None else state.parts()
        if mask is not None:
            if self.is_mimo:
                raise MambaKitError("Mamba3 with is_mimo=True takes no padding mask yet; got a mask")
            x, B, DT, ADT, angles, trap, start = self._pad_rule(mask.bool(), x, B, DT, ADT, angles, trap, state)
        return Mamba3ScanInputs(
            Q=C, K=B, V=x, ADT=ADT.transpose(1, 2), DT=DT.transpose(1, 2), Trap=trap.transpose(1, 2),
            Q_bias=self._bias(self.C_bias, fp), K_bias=self._bias(self.B_bias, fp), Angles=angles, D=self.D.to(fp),
            Z=None if self.is_outproj_norm else z.unflatten(-1, (self.nheads, self.headdim)), Input_States=start,
            z=z)

    def _bias(self, bias: Tensor, fp: torch.dtype) -> Tensor:
        """(nheads, R, d_state) as the scan takes it: all of it for MIMO, (nheads, d_state) for SISO."""
        return bias.to(fp) if self.is_mimo else bias[:, 0].to(fp)

    @staticmethod
    def _pad_rule(keep: Tensor, x, B, DT, ADT, angles, trap, state: Optional[Mamba3State]):
        """Apply the mask keep (batch, seqlen) bool: dt = A*dt = angle = trap = 0 at pads (a NaN there reaches
        nothing); a pad carries x and B of the last token before it. Pads before a row's first token carry zeros,
        and the look-back of that token to the given state is folded into the start state (the pads in between do
        not decay it)."""
        zero = torch.zeros((), dtype=DT.dtype, device=DT.device)
        DT, ADT = torch.where(keep[..., None], DT, zero), torch.where(keep[..., None], ADT, zero)
        angles = torch.where(keep[..., None, None], angles, zero)
        trap = torch.where(keep[..., None], trap, torch.zeros((), dtype=trap.dtype, device=trap.device))
        seqlen = keep.shape[1]
        positions = torch.arange(seqlen, device=keep.device)
        last = torch.cummax(torch.where(keep, positions, -1), dim=1).values  # last token at or before t, or -1
        source = last.clamp(min=0)
        x = torch.where((last >= 0)[..., None, None], x.gather(1, source[..., None, None].expand_as(x)),
                        torch.zeros((), dtype=x.dtype, device=x.device))
        B = torch.where((last >= 0)[..., None, None], B.gather(1, source[..., None, None].expand_as(B)),
                        torch.zeros((), dtype=B.dtype, device=B.device))
        if state is None:
            return x, B, DT, ADT, angles, trap, None
        first = torch.where(keep, positions, seqlen).min(dim=1).values  # (batch,); seqlen for a row of pads only
        late = (first > 0) & (first < seqlen)  # the first token comes after pads
        f = first.clamp(max=seqlen - 1)[:, None, None]
        lam_f = torch.sigmoid(trap.gather(1, f.expand(-1, -1, trap.shape[2])).to(DT.dtype))[:, 0]  # (batch, nheads)
        dt_f = DT.gather(1, f.expand(-1, -1, DT.shape[2]))[:, 0]
        fold = torch.where(late[:, None], (1 - lam_f) * dt_f, zero)[..., None, None]
        ssm = state.ssm + fold * state.v[..., :, None] * state.k[..., None, :]
        k = torch.where(late[:, None, None], zero, state.k)
        v = torch.where(late[:, None, None], zero, state.v)
        return x, B, DT, ADT, angles, trap, (state.angle, ssm, k, v)

    def finish(self, y: Tensor, z: Tensor) -> Tensor:
        """y: (..., nheads, headdim) from the scan (gated there unless is_outproj_norm), z: (..., d_inner) ->
        (..., d_model)."""
        y = y.flatten(-2)
        if self.is_outproj_norm:
            y = self.norm(y, z)
        return self.out_proj(y.to(self.out_proj.weight.dtype))

    def mimo_finish(self, y: Tensor, z: Tensor) -> Tensor:
        """MIMO: y (..., R, nheads, headdim) per rank from the scan, z (..., d_inner) -> (..., d_model): each rank
        gated by silu(z * mimo_z) (or, with is_outproj_norm, by the gated RMSNorm with that gate), mixed by mimo_o."""
        zh = z.unflatten(-1, (self.nheads, self.headdim)).to(y.dtype)
        if self.is_outproj_norm:
            z_r = zh.unsqueeze(-3) * self.mimo_z.transpose(0, 1).to(y.dtype)
            y = self.norm(y.flatten(-2), z_r.flatten(-2)).unflatten(-1, (self.nheads, self.headdim))
            y = mimo_combine(y, self.mimo_o)
        else:
            y = mimo_combine(y, self.mimo_o, zh, self.mimo_z)
        return self.out_proj(y.flatten(-2).to(self.out_proj.weight.dtype))

    def forward(self, hidden_states: Tensor, state: Optional[Mamba3State] = None, seq_idx: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """hidden_states: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        state: continue from it (chunked prefill) and update it in place to the state after the last token.
        seq_idx: (batch, seqlen) packed-sequence index (every state part restarts where it changes). mask:
        (batch, seqlen) 1 = token, 0 = padding (the padded positions leave the state untouched).
        """
        check_mixer_input(self, hidden_states, seq_idx, mask)
        if state is None:
            compile_first_call(self, hidden_states, seq_idx, mask)  # the Triton kernels' first call (CUDA), at once
        if mask is None and self._fused_prep(hidden_states):
            return self.ssd_forward(hidden_states, state, seq_idx)
        s = self.ssm_inputs(hidden_states, state, seq_idx, mask)
        # the kernels only where they run natively: "triton" off CUDA (or in float64) is the PyTorch form
        backend = self.scan_backend
        if backend in ("triton", "ssd") and (not hidden_states.is_cuda or s.V.dtype == torch.float64):
            backend = "torch"
        if self.is_mimo and backend == "ssd":  # the SSD form is SISO only
            backend = "auto"
        if self.is_mimo:
            kw = s.scan_kwargs()
            del kw["Z"]
            y, *final = mamba3_mimo_scan(**kw, MIMO_V=self.mimo_x, chunk_size=self.chunk_size,
                                         return_final_states=True, seq_idx=seq_idx, backend=backend)
        else:
            y, *final = mamba3_scan(**s.scan_kwargs(), chunk_size=self.chunk_size, return_final_states=True,
                                    seq_idx=seq_idx, backend=backend)
        self._store_state(state, final, mask)
        return self.mimo_finish(y, s.z) if self.is_mimo else self.finish(y, s.z)

    @staticmethod
    def _store_state(state: Optional[Mamba3State], final: list, mask: Optional[Tensor]) -> None:
        """Copy the scan's final (angle, ssm, k, v) into state, if given."""
        if state is None:
            return
        with torch.no_grad():
            if mask is not None:  # a row of pads only keeps its k and v
                has_token = mask.bool().any(1)[:, None, None]
                final[2] = torch.where(has_token, final[2], state.k)
                final[3] = torch.where(has_token, final[3], state.v)
            for target, value in zip(state.parts(), final):
                target.copy_(value)

    def _fused_prep(self, hidden_states: Tensor) -> bool:
        """Whether forward takes `ssd_forward`: SISO, scan_backend "auto" or "ssd", and the SSD form's kernels run
        natively on what in_proj will give (its dtype under autocast)."""
        if self.is_mimo or self.scan_backend not in ("auto", "ssd") or self.B_norm.eps != self.C_norm.eps:
            return False  # (the rotary kernel applies both norms with one eps)
        device = hidden_states.device
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = torch.promote_types(hidden_states.dtype, self.in_proj.weight.dtype)
        return mamba3_ops.ssd_form_fits(device, dtype)

    def ssd_forward(self, hidden_states: Tensor, state: Optional[Mamba3State] = None,
                    seq_idx: Optional[Tensor] = None) -> Tensor:
        """forward (SISO, no mask) through the SSD form on its Triton kernels with the per-position prep fused
        (:func:`mambakit.ops.mamba3.ssd_form.mamba3_ssd_raw`: the raw dd_dt, dd_A, trap and angle columns go to
        one kernel). hidden_states: (batch, seqlen, d_model) -> (batch, seqlen, d_model)."""
        from mambakit.ops.mamba3.ssd_form import mamba3_ssd_raw

        z, x, B, C, dd_dt, dd_A, trap, angle = self.split_projection(self.in_proj(hidden_states))
        bc = (self.ngroups, self.d_state)
        hn = (self.nheads, self.d_state)  # the (nheads, 1, d_state) biases as views: no select_backward copies
        out = mamba3_ssd_raw(  # C_norm and B_norm inside the rotary kernel
            C.unflatten(-1, bc), B.unflatten(-1, bc), x.unflatten(-1, (self.nheads, self.headdim)), dd_dt,
            self.dt_bias, dd_A, trap, angle,
            self.C_bias.view(hn), self.B_bias.view(hn), D=self.D,
            Z=None if self.is_outproj_norm else z.unflatten(-1, (self.nheads, self.headdim)),
            Input_States=None if state is None else state.parts(), A_floor=self.A_floor,
            A_activation=self.A_activation, chunk_size=self.chunk_size, return_final_states=state is not None,
            seq_idx=seq_idx, QK_norm=(self.C_norm.weight, self.B_norm.weight, self.C_norm.eps))
        if state is None:
            y = out
        else:
            y, *final = out
            self._store_state(state, final, None)
        y = y.flatten(-2)
        if self.is_outproj_norm:
            y = self.norm(y, z)
        if not torch.is_autocast_enabled(y.device.type):  # autocast casts the product's operands itself
            y = y.to(self.out_proj.weight.dtype)
        return self.out_proj(y)


    #: `step` takes a `PreNorm` (the block's residual add + RMSNorm, fused into in_proj)
    step_fuses_pre_norm = True

    def step(self, hidden_states: Tensor, state: Mamba3State, pre_norm: Optional[PreNorm] = None):
        """One decoding step from the constant-size state. hidden_states: (batch, 1, d_model) or (batch, d_model);
        state updated in place.

        Returns (batch, 1, d_model) (or (batch, d_model) for a 2-D input). With pre_norm, hidden_states is the
        block's input before its residual add + RMSNorm (pre_norm.residual shaped like it), done here inside
        in_proj, and the result is (output, new residual). On CUDA (float32 compute, no autograd) a SISO layer's
        prep and step are one kernel (`mambakit.ops.mamba3.prep_step`): in_proj, that kernel, out_proj.
        """
        squeeze = hidden_states.dim() == 2
        h = hidden_states if squeeze else hidden_states[:, 0]
        if pre_norm is not None and pre_norm.residual is not None and not squeeze:
            pre_norm = pre_norm._replace(residual=pre_norm.residual[:, 0])
        zxbcdt, residual = norm_project_step(self.in_proj, h, pre_norm)
        z = zxbcdt[:, :self.d_inner]
        if self.is_mimo:
            s = self._step_inputs(zxbcdt)
            y = mamba3_mimo_step(state.parts(), s.Q, s.K, s.V, self.mimo_x, s.ADT, s.DT, s.Trap, s.Q_bias, s.K_bias,
                                 s.Angles, D=s.D)
            out = self.mimo_finish(y, z)
        else:
            if self._prep_step_fits(zxbcdt, state):
                y = mamba3_prep_step(state.parts(), zxbcdt, *self._prep_step_params(), nheads=self.nheads,
                                     ngroups=self.ngroups, B_eps=self.B_norm.eps, C_eps=self.C_norm.eps,
                                     A_floor=self.A_floor, A_activation=self.A_activation,
                                     gate=not self.is_outproj_norm, backend="triton")
            else:
                s = self._step_inputs(zxbcdt)
                y = mamba3_step(state.parts(), s.Q, s.K, s.V, s.ADT, s.DT, s.Trap, s.Q_bias, s.K_bias, s.Angles,
                                D=s.D, Z=s.Z)
            y = y.flatten(-2)
            if self.is_outproj_norm:
                out = gated_norm_project_step(self.norm, self.out_proj, y, z)
            else:
                w = self.out_proj.weight  # the CPU's 16-bit product keeps float32 activations (cpu_linear)
                out = project_step(self.out_proj, y if use_cpu_linear(y, w) else y.to(w.dtype), gemv=True)
        out = out if squeeze else out[:, None]
        if pre_norm is None:
            return out
        return out, residual if squeeze else residual[:, None]

    def _prep_step_params(self) -> tuple[Tensor, ...]:
        """dt_bias, B_norm / C_norm weights, B_bias, C_bias (nheads, d_state) and D, uncast, as the fused prep +
        step reads them."""
        return self.dt_bias, self.B_norm.weight, self.C_norm.weight, self.B_bias[:, 0], self.C_bias[:, 0], self.D

    def _prep_step_fits(self, zxbcdt: Tensor, state: Mamba3State) -> bool:
        """Whether `step` takes the fused prep + step kernel: SISO, plain RMSNorm modules on B and C (no hooks),
        and `prep_step_fits` (CUDA, float32 compute, no autograd)."""
        return (not self.is_mimo and type(self.B_norm) is RMSNorm and type(self.C_norm) is RMSNorm
                and not any(m._forward_hooks or m._forward_pre_hooks for m in (self.B_norm, self.C_norm))
                and prep_step_fits(state.parts(), zxbcdt, *self._prep_step_params()))

    def _step_inputs(self, zxbcdt: Tensor) -> Mamba3ScanInputs:
        """The arguments of `mamba3_step` / `mamba3_mimo_step` for one token from its in_proj output zxbcdt (batch,
        d_in_proj): `ssm_inputs` without the seqlen axis (Q, K (batch, ngroups, d_state), V, Z (batch, nheads,
        headdim), ADT, DT, Trap (batch, nheads), Angles (batch, nheads, n_angles); MIMO: Q, K (batch, R, ngroups,
        d_state)); no Input_States."""
        s = self._projected_inputs(zxbcdt[:, None])
        return s._replace(Q=s.Q[:, 0], K=s.K[:, 0], V=s.V[:, 0], ADT=s.ADT[..., 0], DT=s.DT[..., 0],
                          Trap=s.Trap[..., 0], Angles=s.Angles[:, 0], Z=None if s.Z is None else s.Z[:, 0],
                          z=s.z[:, 0])

