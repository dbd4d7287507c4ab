"""Context parallelism (gloo, 2 and 4 CPU processes): the SSD and Mamba-1 scans and the Mamba/Mamba2 blocks run on
a sequence split across ranks equal the single-process result on the full sequence, outputs and gradients.

One spawn per world size runs every check; each rank returns its relative errors and communication counts.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mambakit.distributed._testing import run_on_ranks
from mambakit.distributed.collectives import count_comm
from mambakit.distributed.context_parallel import (
    context_parallel, context_parallel_selective_scan, context_parallel_ssd, sequence_shard,
)
from mambakit.errors import MambaKitError
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.ops.selective_scan import selective_scan_fn
from mambakit.ops.ssd import mamba_chunk_scan_combined
from tests.conftest import rel_err

F64 = torch.float64
TOL = 1e-10


def _compare(rank: int, world: int, full_inputs: dict, run_full, run_cp, seq_dims: dict) -> dict:
    """Run the full op on every rank (same seed) and the context-parallel op on this rank's segment; compare
    outputs and gradients. seq_dims: input name -> its sequence dim (None for shared parameters, whose gradients
    are summed over ranks). run_*: inputs -> list of outputs to weight into the loss."""
    full = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in full_inputs.items()}
    outs_full = run_full(full)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs_full]
    sum(((o * w).sum() for o, w in zip(outs_full, weights))).backward()

    local = {k: (v if seq_dims[k] is None else sequence_shard(v, dim=seq_dims[k])).clone().detach()
             for k, v in full_inputs.items()}
    for v in local.values():
        v.requires_grad_(v.is_floating_point())
    with count_comm() as fwd:
        outs_cp = run_cp(local)
    # output 0 is per position (sharded along dim 1 of y, or 2 for the (batch, dim, seqlen) layout); further outputs
    # are final states, compared on the last rank only
    ys_full = [sequence_shard(outs_full[0].detach(), dim=seq_dims["_y"])] + [o.detach() for o in outs_full[1:]]
    wy = [sequence_shard(weights[0], dim=seq_dims["_y"])] + weights[1:]
    last = rank == world - 1
    loss = (outs_cp[0] * wy[0]).sum()
    errs = {"y": rel_err(outs_cp[0], ys_full[0])}
    for i, (o, ref, w) in enumerate(zip(outs_cp[1:], ys_full[1:], wy[1:])):
        loss = loss + (o * w).sum() * float(last)  # only the last rank's segment state is the final state
        if last:
            errs[f"final{i}"] = rel_err(o, ref)
    with count_comm() as both:
        loss.backward()
    for k, v in local.items():
        if v.grad is None:
            continue
        g = v.grad
        if seq_dims[k] is None:
            g = g.clone()
            dist.all_reduce(g)
            errs[f"grad_{k}"] = rel_err(g, full[k].grad)
        else:
            errs[f"grad_{k}"] = rel_err(g, sequence_shard(full[k].grad, dim=seq_dims[k]))
    return {"errs": errs, "fwd": fwd.snapshot(), "bwd": both.snapshot()}


def _ssd_case(rank, world, seqlen, ngroups=2, dt_limit=(0.0, float("inf"))):
    g = torch.Generator().manual_seed(seqlen * 10 + ngroups)
    b, h, p, n = 2, 4, 3, 5
    inputs = dict(
        x=torch.randn(b, seqlen, h, p, generator=g, dtype=F64), dt=torch.randn(b, seqlen, h, generator=g, dtype=F64),
        A=-torch.rand(h, generator=g, dtype=F64) * 2 - 0.2,
        B=torch.randn(b, seqlen, ngroups, n, generator=g, dtype=F64),
        C=torch.randn(b, seqlen, ngroups, n, generator=g, dtype=F64), D=torch.randn(h, generator=g, dtype=F64),
        z=torch.randn(b, seqlen, h, p, generator=g, dtype=F64), dt_bias=torch.randn(h, generator=g, dtype=F64),
    )
    seq = dict(x=1, dt=1, A=None, B=1, C=1, D=None, z=1, dt_bias=None, _y=1)
    kw = dict(dt_softplus=True, dt_limit=dt_limit, return_final_states=True)

    def full(t):
        return list(mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=t["D"], z=t["z"],
                                              dt_bias=t["dt_bias"], **kw))

    def cp(t):
        return list(context_parallel_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, D=t["D"], z=t["z"],
                                         dt_bias=t["dt_bias"], **kw))

    return _compare(rank, world, inputs, full, cp, seq)


def _scan_case(rank, world, seqlen, grouped=False):
    g = torch.Generator().manual_seed(seqlen + 3)
    b, d, n = 2, 6, 4
    bc_shape = (b, 2, n, seqlen) if grouped else (b, n, seqlen)
    inputs = dict(
        u=torch.randn(b, d, seqlen, generator=g, dtype=F64), delta=torch.randn(b, d, seqlen, generator=g, dtype=F64),
        A=-torch.rand(d, n, generator=g, dtype=F64) * 2 - 0.2, B=torch.randn(*bc_shape, generator=g, dtype=F64),
        C=torch.randn(*bc_shape, generator=g, dtype=F64), D=torch.randn(d, generator=g, dtype=F64),
        z=torch.randn(b, d, seqlen, generator=g, dtype=F64), delta_bias=torch.randn(d, generator=g, dtype=F64),
    )
    seq = dict(u=2, delta=2, A=None, B=-1, C=-1, D=None, z=2, delta_bias=None, _y=2)

    def run(fn, **extra):
        def call(t):
            return list(fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], z=t["z"], delta_bias=t["delta_bias"],
                           delta_softplus=True, return_last_state=True, **extra))
        return call

    return _compare(rank, world, inputs, run(selective_scan_fn), run(context_parallel_selective_scan), seq)


def _block_case(rank, world, block_cls, seqlen):
    torch.manual_seed(11)
    if block_cls is Mamba2:
        block = Mamba2(16, d_state=8, headdim=4, ngroups=2, chunk_size=8, bias=True, dtype=F64)
    else:
        block = Mamba(16, d_state=4, bias=True, dtype=F64)
    block = block.to(F64)  # A_log, D and dt_bias are created in float32
    with torch.no_grad():
        for prm in block.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    hidden = torch.randn(2, seqlen, 16, dtype=F64)
    cp_block = context_parallel(block)

    names = [name for name, _ in block.named_parameters()]

    def full(t):
        return [torch.func.functional_call(block, {k: t[k] for k in names}, (t["hidden"],))]

    def cp(t):
        return [torch.func.functional_call(cp_block, {"block." + k: t[k] for k in names}, (t["hidden"],))]

    inputs = {"hidden": hidden, **{k: v.detach() for k, v in block.named_parameters()}}
    seq = {"hidden": 1, "_y": 1, **{k: None for k in names}}
    return _compare(rank, world, inputs, full, cp, seq)


def _worker(rank: int, world: int) -> dict:
    out = {}
    for L in (37, 2 * 37):  # not multiples of the chunk size 8; two lengths to show the comm does not grow
        out[f"ssd_L{L}"] = _ssd_case(rank, world, L)
        out[f"scan_L{L}"] = _scan_case(rank, world, L)
    out["ssd_g1_clamped"] = _ssd_case(rank, world, 29, ngroups=1, dt_limit=(0.01, 1.5))
    out["scan_grouped"] = _scan_case(rank, world, 29, grouped=True)
    out["mamba2_block"] = _block_case(rank, world, Mamba2, 37)
    out["mamba_block"] = _block_case(rank, world, Mamba, 37)
    try:
        context_parallel(Mamba2(16, d_state=8, headdim=4, dtype=F64))(torch.zeros(1, 2, 16, dtype=F64))
        out["short_error"] = None
    except MambaKitError as exc:
        out["short_error"] = str(exc)
    return out


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    return request.param, run_on_ranks(_worker, request.param)


def test_outputs_and_gradients_match_full_sequence(results):
    world, per_rank = results
    worst = {}
    for rank_out in per_rank:
        for case, res in rank_out.items():
            if case == "short_error":
                continue
            for name, err in res["errs"].items():
                worst[(case, name)] = max(worst.get((case, name), 0.0), err)
    bad = {k: v for k, v in worst.items() if not v < TOL}
    assert not bad, f"world={world}: relative errors above {TOL}: {bad}"
    names = {n for (_, n) in worst}
    assert {"y", "final0", "grad_x", "grad_dt", "grad_A", "grad_B", "grad_C", "grad_D", "grad_z",
            "grad_dt_bias", "grad_u", "grad_delta", "grad_delta_bias", "grad_hidden"} <= names


def test_comm_is_o_state_and_independent_of_seqlen(results):
    world, per_rank = results
    b, h, p, n, d, ns = 2, 4, 3, 5, 6, 4
    for rank_out in per_rank:
        for L in (37, 74):
            ssd, scan = rank_out[f"ssd_L{L}"], rank_out[f"scan_L{L}"]
            # forward: all-gather (output bytes) of the segment state and its log decay
            assert ssd["fwd"]["bytes"] == {"all_gather": world * 8 * (b * h * p * n + b * h)}
            assert scan["fwd"]["bytes"] == {"all_gather": world * 8 * 2 * b * d * ns}
            # backward: one all-gather of the gradient w.r.t. the incoming state
            assert ssd["bwd"]["bytes"] == {"all_gather": world * 8 * b * h * p * n}
            assert scan["bwd"]["bytes"] == {"all_gather": world * 8 * b * d * ns}
    first, last = per_rank[0]["mamba2_block"], per_rank[-1]["mamba2_block"]
    halo = 2 * (4 - 1) * 16 * 8  # batch * (d_conv - 1) * d_model float64
    assert first["fwd"]["bytes"]["send"] == halo and "send" not in last["fwd"]["bytes"]
    assert first["fwd"]["calls"]["all_gather"] == 1 and first["bwd"]["calls"]["all_gather"] == 1


def test_short_segment_is_refused(results):
    _, per_rank = results
    assert "d_conv - 1 = 3" in per_rank[0]["short_error"]
