"""Random inputs of the Mamba-3 scan for the op tests."""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F


def scan_inputs(batch=2, seqlen=37, nheads=4, ngroups=2, headdim=5, d_state=7, n_angles=3, dtype=torch.float64,
                states=True, packed=True, gate=True, seed=0):
    """Keyword arguments of mamba3_scan: random Q, K, V, dt in (0, ~2), A*dt < 0, angles large enough to wrap 2 pi."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    DT = F.softplus(randn(batch, nheads, seqlen))
    kw = dict(Q=randn(batch, seqlen, ngroups, d_state), K=randn(batch, seqlen, ngroups, d_state),
              V=randn(batch, seqlen, nheads, headdim), DT=DT,
              ADT=-(torch.rand(batch, nheads, seqlen, generator=g, dtype=torch.float64).to(dtype) * DT),
              Trap=randn(batch, nheads, seqlen), Q_bias=randn(nheads, d_state), K_bias=randn(nheads, d_state),
              Angles=randn(batch, seqlen, nheads, n_angles, scale=2.0), D=randn(nheads))
    if gate:
        kw["Z"] = randn(batch, seqlen, nheads, headdim)
    if states:
        kw["Input_States"] = (torch.rand(batch, nheads, n_angles, generator=g, dtype=torch.float64).to(dtype)
                              * 2 * math.pi, randn(batch, nheads, headdim, d_state), randn(batch, nheads, d_state),
                              randn(batch, nheads, headdim))
    if packed:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.long)
        seq_idx[0, seqlen // 3:] = 1
        seq_idx[0, 2 * seqlen // 3:] = 2
        seq_idx[-1, seqlen - 4:] = 7
        kw["seq_idx"] = seq_idx
    return kw


def angle_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest distance between two angle tensors on the circle."""
    d = torch.remainder(a.double() - b.double() + math.pi, 2 * math.pi) - math.pi
    return float(d.abs().max())


def assert_same_outputs(out, ref, tol: float) -> None:
    """(y, angle, ssm, k, v) against a reference: rel_err < tol, the angle on the circle."""
    from tests.conftest import rel_err

    assert rel_err(out[0], ref[0]) < tol
    assert angle_err(out[1], ref[1]) < tol
    for a, b in zip(out[2:], ref[2:]):
        assert rel_err(a, b) < tol


def as_dtype(kw: dict, dtype: torch.dtype, device="cpu") -> dict:
    """The scan's keyword arguments with the floating tensors in dtype (Input_States in float32) on device."""
    out = {n: (t.to(device, dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
               else t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    if "Input_States" in kw:
        out["Input_States"] = tuple(s.to(device, torch.float32) for s in kw["Input_States"])
    return out


def scan_grads(kw: dict, scan, seed: int = 5, parts=("y", "angle", "ssm", "k", "v")):
    """Run scan(**kw) -> (y, angle, ssm, k, v) with every floating input a leaf, back-propagate a fixed random
    weighting of the outputs named in parts, and return (outputs, {input name: gradient}); Input_States' parts are
    named state_angle, state_ssm, state_k, state_v."""
    leaves = {n: (t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
              for n, t in kw.items()}
    if "Input_States" in kw:
        leaves["Input_States"] = tuple(s.clone().requires_grad_(True) for s in kw["Input_States"])
    out = scan(**leaves)
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    for name, t in zip(("y", "angle", "ssm", "k", "v"), out):
        if name in parts:
            w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)
            loss = loss + ((torch.cos(t) if name == "angle" else t) * w).sum()
    loss.backward()
    grads = {n: t.grad for n, t in leaves.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    for part, s in zip(("angle", "ssm", "k", "v"), leaves.get("Input_States", ())):
        grads[f"state_{part}"] = s.grad
    return out, grads


def assert_grads_repeat(kw: dict, scan, first=None) -> None:
    """scan_grads(kw, scan) twice (or once more after `first`, a gradient dict of it) gives bit-identical
    gradients."""
    first = scan_grads(kw, scan)[1] if first is None else first
    again = scan_grads(kw, scan)[1]
    for n in first:
        assert torch.equal(first[n], again[n]), n


def assert_matches_torch(kw: dict, dtype: torch.dtype, tol: float, scan_torch, scan_triton,
                         grad_tol: Optional[dict] = None) -> None:
    """The Triton scan on kw (in dtype) against the torch form on the same values in float32: y, the final ssm state
    and every gradient within tol (rel_err; grad_tol {input name: tolerance} overrides it for those gradients), and
    bit-identical gradients run to run."""
    from tests.conftest import rel_err

    ref_out, ref = scan_grads(as_dtype(kw, torch.float32, kw["V"].device), scan_torch)
    out, got = scan_grads(kw, scan_triton)
    assert out[0].dtype == dtype
    assert rel_err(out[0], ref_out[0]) < tol
    assert rel_err(out[2], ref_out[2]) < tol
    for name in ref:
        limit = (grad_tol or {}).get(name, tol)
        assert rel_err(got[name], ref[name]) < limit, (name, rel_err(got[name], ref[name]), limit)
    assert_grads_repeat(kw, scan_triton, got)


def mimo_inputs(rank=3, batch=2, seqlen=23, nheads=4, ngroups=2, headdim=5, d_state=6, n_angles=2, seed=3, **kw):
    """Keyword arguments of the MIMO scan: scan_inputs' (without the gate) with per-rank Q, K, biases, MIMO_V and
    a per-rank k in Input_States."""
    out = scan_inputs(batch=batch, seqlen=seqlen, nheads=nheads, ngroups=ngroups, headdim=headdim, d_state=d_state,
                      n_angles=n_angles, gate=False, seed=seed, **kw)
    dtype = out["V"].dtype
    g = torch.Generator().manual_seed(seed + 100)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    out.update(Q=randn(batch, seqlen, rank, ngroups, d_state), K=randn(batch, seqlen, rank, ngroups, d_state),
               MIMO_V=randn(nheads, rank, headdim), Q_bias=randn(nheads, rank, d_state),
               K_bias=randn(nheads, rank, d_state))
    if "Input_States" in out:
        angle, ssm, _, v = out["Input_States"]
        out["Input_States"] = (angle, ssm, randn(batch, rank, nheads, d_state), v)
    return out


def assert_cuda_states(states, ref, tol: float = 1e-5) -> None:
    """CUDA step states (angle, ssm, k, v) against float64 CPU ones: float32, the angle on the circle."""
    from tests.conftest import rel_err

    assert angle_err(states[0].cpu(), ref[0]) < tol
    for a, b in zip(states[1:], ref[1:]):
        assert a.dtype == torch.float32 and rel_err(a.cpu(), b) < tol


def spy(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that each call appends 1 to the returned list."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def graphed_step_loop(m, x: torch.Tensor) -> torch.Tensor:
    """A layer's step over x (batch, seqlen, d_model) from a zero state, captured once in a CUDA graph and replayed
    per position (the first call, compilation, outside the capture): the outputs (batch, seqlen, d_model)."""
    state = m.allocate_state(x.shape[0])
    inp = x[:, 0].clone()
    m.step(inp, state)
    for s in state.parts():
        s.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m.step(inp, state)
    for s in state.parts():
        s.zero_()
    graphed = []
    for t in range(x.shape[1]):
        inp.copy_(x[:, t])
        graph.replay()
        graphed.append(out.clone())
    return torch.stack(graphed, 1)


PREP_OUTS = ("adt", "scale", "corr", "first_back", "theta")


def prep_reference(dd_dt, dt_bias, dd_A, trap, angle, angle0, seq_idx, A_floor, A_activation, fp):
    """The fused prep's reference: the composition the layer and the SSD form made before (Mamba3.ssm_inputs,
    position_terms, sequence_angles), in fp."""
    from mambakit.layers.mamba3 import heavy_tail
    from mambakit.ops.mamba3.chunked import position_terms
    from mambakit.ops.mamba3.ssd_form import sequence_angles

    batch, L, H = dd_dt.shape
    S = angle.shape[-1]
    DT = F.softplus(dd_dt.to(fp) + dt_bias.to(fp))
    f = heavy_tail(dd_A.to(fp)) if A_activation == "heavy_tail" else F.softplus(dd_A.to(fp))
    ADT = torch.clamp(-f, max=-A_floor) * DT
    angles = angle.to(fp)[:, :, None].expand(batch, L, H, S)
    N = 2 * S + 1
    dummy = torch.zeros(batch, L, 1, N, dtype=fp)
    terms = position_terms(dummy, dummy, torch.zeros(batch, L, H, 1, dtype=fp), ADT.transpose(1, 2),
                           DT.transpose(1, 2), trap.transpose(1, 2), torch.zeros(H, N, dtype=fp),
                           torch.zeros(H, N, dtype=fp), angles, None, None, None, 64, seq_idx, with_qk=False)
    theta, _ = sequence_angles(terms.inc, terms.starts, angle0)
    return terms.adt, terms.scale, terms.gamma - terms.scale, terms.first_back, theta


def prep_inputs(batch, seqlen, nheads, n_angles, dtype, seed, packed=True, angle0=True, device="cpu"):
    """Raw columns as slices of one in_proj-like output (strided), the bias, a start angle, seq_idx, on device:
    (the in_proj-like output, {column name: tensor}, seq_idx or None)."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * nheads + n_angles + 5
    proj = torch.randn(batch, seqlen, width, generator=g, dtype=torch.float64) * 1.5
    proj[..., nheads:2 * nheads] *= 0.1  # dd_A near 0: both sides of the heavy tail and the A_floor clamp
    proj[0, 0, nheads] = 30.0  # softplus past its threshold
    proj = proj.to(device, dtype)  # sliced on the device: strided columns there too
    dt_bias = (torch.randn(nheads, generator=g, dtype=torch.float64) - 2.0).to(device, dtype)
    a0 = (torch.rand(batch, nheads, n_angles, generator=g, dtype=torch.float64) * 2 * math.pi).to(device, dtype)
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
        seq_idx[0, seqlen // 3:] = 1
        seq_idx[0, seqlen // 3 + 1:] = 2  # a sequence of one position
        seq_idx[-1, seqlen - 4:] = 5
        seq_idx = seq_idx.to(device)
    cols = dict(dd_dt=proj[..., 5:5 + nheads], dt_bias=dt_bias, dd_A=proj[..., 5 + nheads:5 + 2 * nheads],
                trap=proj[..., 5 + 2 * nheads:5 + 3 * nheads], angle=proj[..., 5 + 3 * nheads:],
                angle0=a0 if angle0 else None)
    return proj, cols, seq_idx
