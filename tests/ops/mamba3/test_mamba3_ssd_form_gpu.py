"""GPU: the Mamba-3 layer's scan_backend "auto" reaching the SSD form (mambakit.ops.mamba3.ssd_form) on CUDA; its
forward and gradients against the chunked form are in test_mamba3_triton_gpu (backend "ssd"). The fused per-position
prep (mambakit.ops.mamba3.triton_prep) compiled, with bf16 raw columns, against the float64 PyTorch composition on
the CPU, and the bf16 layer on it against the float32 chunked form."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import rel_err

pytestmark = pytest.mark.gpu


def test_layer_auto_routes_to_the_ssd_form_on_cuda(monkeypatch):
    import mambakit.ops.mamba3.ssd_form as ssd_form
    from mambakit.layers.mamba3 import Mamba3

    calls = []
    real = ssd_form.mamba3_ssd_raw  # the layer's entry (the per-position prep fused)
    monkeypatch.setattr(ssd_form, "mamba3_ssd_raw", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = Mamba3(64, d_state=32, headdim=16, chunk_size=16).cuda()
    x = torch.randn(2, 50, 64, device="cuda")
    got = layer(x)
    layer.scan_backend = "torch"
    assert calls and rel_err(got, layer(x)) < 1e-4


@pytest.mark.parametrize("act", ["heavy_tail", "softplus"])
@pytest.mark.parametrize("shape", [dict(batch=2, seqlen=37, nheads=3, n_angles=4),
                                   dict(batch=2, seqlen=2048, nheads=24, n_angles=32)])
def test_fused_prep_bf16_columns_against_float64(shape, act):
    """Every output and gradient against the float64 composition, within 1e-5 (outputs) / 1e-2 (the 16-bit
    gradients) or twice the float32 composition's own error (the angles' float32 increments add up over 2048
    positions in both)."""
    from mambakit.ops.mamba3.triton_prep import position_prep
    from tests.ops.mamba3.helpers import PREP_OUTS as OUTS, angle_err
    from tests.ops.mamba3.helpers import prep_inputs as make_inputs, prep_reference as reference

    _, cols, seq_idx = make_inputs(**shape, dtype=torch.bfloat16, seed=1)
    _, gpu, gpu_seq = make_inputs(**shape, dtype=torch.bfloat16, seed=1, device="cuda")  # strided on the GPU
    for d in (cols, gpu):
        d["dt_bias"], d["angle0"] = d["dt_bias"].float(), d["angle0"].float()
    assert gpu["dd_dt"].stride(-1) == 1 and gpu["dd_dt"].stride(1) > gpu["dd_dt"].shape[-1]
    g = torch.Generator().manual_seed(2)
    ws = None

    def run(fn, leaves, fp, **kw):
        nonlocal ws
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
        out = fn(**leaves, A_floor=1e-4, A_activation=act, fp=fp, **kw)
        if ws is None:
            ws = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
        loss = sum(((torch.cos(o) if n == "theta" else o).double().cpu() * w).sum() for n, o, w in zip(OUTS, out, ws))
        loss.backward()
        return [o.detach().cpu() for o in out], {n: t.grad.cpu() for n, t in leaves.items()}

    want, want_g = run(reference, {n: t.double() for n, t in cols.items()}, torch.float64, seq_idx=seq_idx)
    got, got_g = run(position_prep, gpu, torch.float32, seq_idx=gpu_seq)
    own, own_g = run(reference, cols, torch.float32, seq_idx=seq_idx)  # the composition in float32
    for name, o, c, r in zip(OUTS, got, own, want):
        err = angle_err if name == "theta" else rel_err
        assert err(o, r) < max(1e-5, 2 * err(c, r)), name
    for name in want_g:
        assert got_g[name].dtype == gpu[name].dtype
        assert rel_err(got_g[name], want_g[name]) < max(1e-2, 2 * rel_err(own_g[name], want_g[name])), name


def test_bf16_layer_on_the_fused_prep_against_float32_chunked():
    """The bf16 layer ("auto": the fused path) against the float32 chunked form on the same rounded weights and
    input, every gradient within 1e-2 or twice the error of the bf16 layer on the chunked form (bf16's own: on the
    CPU interpreter the fused path's dt_bias gradient missed by 1.4e-2 where the composition's did by 1.0e-2)."""
    from mambakit.layers.mamba3 import Mamba3

    torch.manual_seed(0)
    ref = Mamba3(64, d_state=32, headdim=16, chunk_size=16, scan_backend="torch").cuda()
    layer = Mamba3(64, d_state=32, headdim=16, chunk_size=16).cuda().to(torch.bfloat16)
    layer.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})  # the same rounded weights
    x = torch.randn(2, 300, 64, device="cuda").to(torch.bfloat16)
    seq_idx = torch.zeros(2, 300, dtype=torch.int32, device="cuda")
    seq_idx[0, 120:] = 1
    w = torch.randn(2, 300, 64, device="cuda")

    def run(module, inp):
        for p in module.parameters():
            p.grad = None
        leaf = inp.clone().requires_grad_(True)
        out = module(leaf, seq_idx=seq_idx)
        (out.float() * w).sum().backward()
        return {"out": out, "x": leaf.grad, **{n: p.grad for n, p in module.named_parameters()}}

    want = run(ref, x.float())
    got = run(layer, x)
    layer.scan_backend = "torch"
    bf16_own = run(layer, x)
    for name in want:
        allowed = max(1e-2, 2 * rel_err(bf16_own[name], want[name]))
        assert rel_err(got[name], want[name]) < allowed, name
