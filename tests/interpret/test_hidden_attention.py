"""Hidden-attention matrices reproduce the layers exactly: alpha u (+ D u) is the scan, the full-block matrices give
the input of out_proj; row blocks equal the one-shot result; no NaN for huge decays."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.errors import MambaKitError
from mambakit.interpret.hidden_attention import (
    conv_toeplitz,
    hidden_attention,
    mamba1_block_attention,
    mamba1_hidden_attention,
    mamba2_block_attention,
    mamba2_hidden_attention,
    selective_scan_attention,
)
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.ops.conv1d import causal_conv1d_fn
from mambakit.ops.selective_scan import selective_scan_ref
from mambakit.ops.ssd import mamba_chunk_scan_combined
from tests.conftest import rel_err

TOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread is faster, and far steadier on a busy machine, than several that must synchronise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _extras(batch: int, seqlen: int):
    """No packing; packed sequences (seq_idx); left and right padding (mask)."""
    cut = seqlen // 3
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.long)
    seq_idx[0, cut:] = 1
    seq_idx[-1, 2 * cut:] = 3
    mask = torch.ones(batch, seqlen)
    mask[0, :3] = 0
    mask[-1, -2:] = 0
    return [{}, {"seq_idx": seq_idx}, {"mask": mask}]


def _out_proj_input(layer, hidden, **kw) -> torch.Tensor:
    """The layer's own input of out_proj, (batch, d_inner, L), captured from its forward."""
    seen = {}
    handle = layer.out_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("o", args[0]))
    try:
        with torch.no_grad():
            layer(hidden, **kw)
    finally:
        handle.remove()
    return seen["o"].transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Mamba-1
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seqlen", [13, 40])
def test_mamba1_alpha_reproduces_the_scan(seqlen):
    torch.manual_seed(seqlen)
    layer = Mamba(16, d_state=8).double()
    hidden = torch.randn(2, seqlen, 16, dtype=torch.float64)
    for kw in _extras(2, seqlen):
        with torch.no_grad():
            s = layer.ssm_inputs(hidden, **kw)
            ref = selective_scan_ref(s.u, s.delta, s.A, s.B, s.C, s.D, z=s.z, delta_bias=s.delta_bias,
                                     delta_softplus=s.delta_softplus, seq_idx=kw.get("seq_idx"))
        alpha = mamba1_hidden_attention(layer, hidden, **kw)
        assert alpha.shape == (2, layer.d_inner, seqlen, seqlen) and alpha.dtype == torch.float64
        assert bool((torch.triu(alpha, 1) == 0).all())
        y = (torch.einsum("bdij,bdj->bdi", alpha, s.u) + s.D[:, None] * s.u) * F.silu(s.z)
        assert rel_err(y, ref) < TOL, kw.keys()


def test_mamba1_row_and_channel_blocks_equal_one_shot():
    torch.manual_seed(1)
    layer = Mamba(16, d_state=8).double()
    hidden = torch.randn(2, 37, 16, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 20 + [1] * 17, [0] * 37])
    picked = [7, 0, 31]
    for kw in ({}, {"seq_idx": seq_idx}):
        full = mamba1_hidden_attention(layer, hidden, block_rows=37, **kw)
        assert rel_err(mamba1_hidden_attention(layer, hidden, block_rows=5, **kw), full) < 1e-13
        for rows in (1, 16):  # one channel per block, ragged last row block
            blocked = mamba1_hidden_attention(layer, hidden, channels=picked, block_rows=rows, max_block_elements=500,
                                              **kw)
            assert rel_err(blocked, full[:, picked]) < 1e-13


def test_mamba1_block_form_reproduces_out_proj_input():
    torch.manual_seed(2)
    layer = Mamba(16, d_state=8, d_conv=4).double()
    with torch.no_grad():
        layer.conv1d.bias.normal_()  # a visible offset
    hidden = torch.randn(2, 29, 16, dtype=torch.float64)
    for kw in _extras(2, 29):
        x = layer.ssm_inputs(hidden, **kw).x
        ref = _out_proj_input(layer, hidden, **kw)
        for rows in (None, 4):
            ba = mamba1_block_attention(layer, hidden, block_rows=rows, **kw)
            assert ba.matrix.shape == (2, layer.d_inner, 29, 29) and ba.offset.shape == (2, layer.d_inner, 29)
            o = torch.einsum("bcij,bcj->bci", ba.matrix, x) + ba.offset
            assert rel_err(o, ref) < TOL, (kw.keys(), rows)
        sub = mamba1_block_attention(layer, hidden, channels=[3, 30], **kw)
        assert rel_err(sub.matrix, ba.matrix[:, [3, 30]]) < 1e-13 and rel_err(sub.offset, ba.offset[:, [3, 30]]) < 1e-13


def test_mamba1_no_nan_with_huge_decay():
    torch.manual_seed(3)
    layer = Mamba(16, d_state=8).double()
    with torch.no_grad():
        layer.dt_proj.bias.fill_(40.0)  # delta ~ 40, delta * A down to -320 per step
    hidden = torch.randn(1, 31, 16, dtype=torch.float64)
    alpha = mamba1_hidden_attention(layer, hidden, block_rows=8)
    assert bool(torch.isfinite(alpha).all())
    s = layer.ssm_inputs(hidden)
    ref = selective_scan_ref(s.u, s.delta, s.A, s.B, s.C, s.D, delta_bias=s.delta_bias, delta_softplus=s.delta_softplus)
    assert rel_err(torch.einsum("bdij,bdj->bdi", alpha, s.u) + s.D[:, None] * s.u, ref) < TOL
    alpha32 = mamba1_hidden_attention(layer.float(), hidden.float(), block_rows=8)
    assert alpha32.dtype == torch.float32 and bool(torch.isfinite(alpha32).all())
    ba = mamba1_block_attention(layer, hidden.float(), block_rows=8)
    assert bool(torch.isfinite(ba.matrix).all() and torch.isfinite(ba.offset).all())


def test_selective_scan_attention_grouped_b_c():
    torch.manual_seed(4)
    batch, dim, N, L, G = 2, 6, 3, 11, 3
    delta = F.softplus(torch.randn(batch, dim, L, dtype=torch.float64))
    A = -torch.rand(dim, N, dtype=torch.float64) * 4
    B, C = torch.randn(2, batch, G, N, L, dtype=torch.float64)
    u = torch.randn(batch, dim, L, dtype=torch.float64)
    alpha = selective_scan_attention(delta, A, B, C, block_rows=4)
    assert rel_err(torch.einsum("bdij,bdj->bdi", alpha, u), selective_scan_ref(u, delta, A, B, C)) < TOL


def test_conv_toeplitz_is_the_conv():
    torch.manual_seed(5)
    w = torch.randn(5, 4, dtype=torch.float64)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    M = conv_toeplitz(w, 12)
    assert rel_err(torch.einsum("cij,bcj->bci", M, x), causal_conv1d_fn(x, w)) < 1e-14
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    Ms = conv_toeplitz(w, 12, seq_idx=seq_idx)
    assert rel_err(torch.einsum("bcij,bcj->bci", Ms, x), causal_conv1d_fn(x, w, seq_idx=seq_idx)) < 1e-14


def test_errors_name_the_argument():
    layer = Mamba(16, d_state=4)
    hidden = torch.randn(1, 5, 16)
    with pytest.raises(MambaKitError, match="channels"):
        mamba1_hidden_attention(layer, hidden, channels=[32])
    with pytest.raises(MambaKitError, match="hidden_states"):
        mamba1_hidden_attention(layer, torch.randn(1, 5, 8))
    with pytest.raises(MambaKitError, match="block_rows"):
        mamba1_hidden_attention(layer, hidden, block_rows=0)
    with pytest.raises(MambaKitError, match="Mamba2"):
        mamba2_hidden_attention(layer, hidden)
    with pytest.raises(MambaKitError, match="Mamba or Mamba2"):
        hidden_attention(torch.nn.Linear(16, 16), hidden)


# ----------------------------------------------------------------------------------------------------------------------
# Mamba-2
# ----------------------------------------------------------------------------------------------------------------------
MAMBA2_CONFIGS = [{}, {"ngroups": 2, "D_has_hdim": True}, {"rmsnorm": False},
                  {"norm_before_gate": True, "dt_limit": (0.01, 0.5)}]


def _gated_norm_f64(layer: Mamba2, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The gated RMSNorm restated in float64 (the layer's module computes it in float32)."""
    norm = layer.norm
    g = y if norm.norm_before_gate else y * F.silu(z)
    groups = g.unflatten(-1, (-1, norm.group_size))
    out = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + norm.eps)).flatten(-2) * norm.weight
    return out * F.silu(z) if norm.norm_before_gate else out


@pytest.mark.parametrize("config", MAMBA2_CONFIGS)
def test_mamba2_alpha_reproduces_ssd(config):
    torch.manual_seed(6)
    layer = Mamba2(d_model=16, d_state=8, headdim=8, chunk_size=8, **config).double()
    hidden = torch.randn(2, 21, 16, dtype=torch.float64)
    for kw in _extras(2, 21):
        with torch.no_grad():
            s = layer.ssm_inputs(hidden, **kw)
            ref = mamba_chunk_scan_combined(s.x, s.dt, s.A, s.B, s.C, 8, D=s.D, seq_idx=kw.get("seq_idx"),
                                            **s.dt_args)
        alpha = mamba2_hidden_attention(layer, hidden, **kw)
        assert alpha.shape == (2, layer.nheads, 21, 21)
        D = s.D if s.D.dim() == 2 else s.D[:, None]
        y = torch.einsum("bhij,bjhp->bihp", alpha, s.x) + D * s.x
        assert rel_err(y, ref) < TOL, kw.keys()
        assert rel_err(mamba2_hidden_attention(layer, hidden, heads=[3, 1], **kw), alpha[:, [3, 1]]) < 1e-14


@pytest.mark.parametrize("config", MAMBA2_CONFIGS)
def test_mamba2_block_form_reproduces_out_proj_input(config):
    torch.manual_seed(7)
    layer = Mamba2(d_model=16, d_state=8, headdim=8, chunk_size=8, **config).double()
    with torch.no_grad():
        layer.conv1d.bias.normal_()
        if layer.rmsnorm:
            layer.norm.weight.uniform_(0.5, 1.5)
    hidden = torch.randn(2, 19, 16, dtype=torch.float64)
    for kw in _extras(2, 19):
        with torch.no_grad():
            s = layer.ssm_inputs(hidden, **kw)
        x = s.xBC[:, : layer.d_inner]
        ba = mamba2_block_attention(layer, hidden, **kw)
        o = torch.einsum("bcij,bcj->bci", ba.matrix, x) + ba.offset
        layer_o = _out_proj_input(layer, hidden, **kw)
        if layer.rmsnorm:
            # exact against the float64 norm; the layer's own norm runs in float32
            with torch.no_grad():
                y = mamba_chunk_scan_combined(s.x, s.dt, s.A, s.B, s.C, 8, D=s.D, seq_idx=kw.get("seq_idx"),
                                              **s.dt_args).flatten(2)
            assert rel_err(o, _gated_norm_f64(layer, y, s.z).transpose(1, 2)) < TOL, kw.keys()
            assert rel_err(o, layer_o) < 1e-6, kw.keys()
        else:
            assert rel_err(o, layer_o) < TOL, kw.keys()
        sub = mamba2_block_attention(layer, hidden, channels=[9, 2, 30], **kw)
        assert rel_err(sub.matrix, ba.matrix[:, [9, 2, 30]]) < 1e-14


def test_mamba2_no_nan_with_huge_decay():
    torch.manual_seed(8)
    layer = Mamba2(d_model=16, d_state=8, headdim=8, A_init_range=(8.0, 16.0)).double()
    with torch.no_grad():
        layer.dt_bias.fill_(40.0)
    hidden = torch.randn(1, 25, 16, dtype=torch.float64)
    alpha = mamba2_hidden_attention(layer, hidden)
    ba = mamba2_block_attention(layer.float(), hidden.float())
    assert bool(torch.isfinite(alpha).all() and torch.isfinite(ba.matrix).all() and torch.isfinite(ba.offset).all())
