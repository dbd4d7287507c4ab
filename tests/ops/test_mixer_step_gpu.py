"""GPU: the fused one-token mixer steps in bfloat16 and float32 against their PyTorch composition in float64, for
the 130M shapes (Mamba-1: d_inner 1536, d_state 16, dt_rank 48; Mamba-2: 24 heads x 64, d_state 128), and a
Mamba-1 / Mamba-2 LM's graphed decode against its eager decode and its full forward."""
from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.ops.mixer_step import mamba1_step, mamba2_step
from tests.conftest import rel_err

pytestmark = pytest.mark.gpu


def _cast(d, dtype):
    return {k: (None if v is None else v.to("cuda", dtype if k not in ("A_log", "D", "dt_proj_bias", "dt_bias")
                                             else torch.float32)) for k, v in d.items()}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch", [1, 64])
def test_mamba1_step_cuda(dtype, tol, batch):
    g = torch.Generator().manual_seed(batch)
    d, n, r = 1536, 16, 48
    p = dict(conv_weight=torch.randn(d, 4, generator=g) * 0.5, conv_bias=torch.randn(d, generator=g) * 0.3,
             x_proj_weight=torch.randn(r + 2 * n, d, generator=g) * d ** -0.5,
             dt_proj_weight=torch.randn(d, r, generator=g) * r ** -0.5, dt_proj_bias=torch.randn(d, generator=g) - 3,
             A_log=torch.log(torch.rand(d, n, generator=g) * 4 + 0.5), D=torch.randn(d, generator=g))
    pc = _cast(p, dtype)
    conv = torch.randn(batch, d, 4, generator=g)
    ssm = torch.randn(batch, d, n, generator=g)
    xz = torch.randn(batch, 2 * d, generator=g)
    # the reference sees the same rounded inputs, in float64
    p64 = {k: (None if v is None else v.double().cpu()) for k, v in pc.items()}
    conv64, ssm64 = conv.to(dtype).double(), ssm.double()
    ref = mamba1_step(xz.to(dtype).double(), conv64, ssm64, **p64, backend="ref")
    conv_c, ssm_c = conv.to("cuda", dtype), ssm.cuda()
    out = mamba1_step(xz.to("cuda", dtype), conv_c, ssm_c, **pc, backend="triton")
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), ref) < tol
    assert rel_err(ssm_c.cpu(), ssm64) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch", [1, 64])
def test_mamba2_step_cuda(dtype, tol, batch):
    g = torch.Generator().manual_seed(batch + 1)
    h, hd, n = 24, 64, 128
    di = h * hd
    cd = di + 2 * n
    p = dict(conv_weight=torch.randn(cd, 4, generator=g) * 0.5, conv_bias=torch.randn(cd, generator=g) * 0.3,
             dt_bias=torch.randn(h, generator=g) * 0.5 - 2, A_log=torch.log(torch.rand(h, generator=g) * 8 + 1),
             D=torch.randn(h, generator=g))
    pc = _cast(p, dtype)
    p64 = {k: v.double().cpu() for k, v in pc.items()}
    conv = torch.randn(batch, cd, 4, generator=g).to(dtype)
    ssm = torch.randn(batch, h, hd, n, generator=g)
    zx = torch.randn(batch, di + cd + h, generator=g).to(dtype)
    conv64, ssm64 = conv.double(), ssm.double()
    ref = mamba2_step(zx.double(), conv64, ssm64, **p64, ngroups=1, backend="ref")
    conv_c, ssm_c = conv.cuda(), ssm.cuda()
    out = mamba2_step(zx.cuda(), conv_c, ssm_c, **pc, ngroups=1, backend="triton")
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), ref) < tol
    assert rel_err(ssm_c.cpu(), ssm64) < tol


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_lm_graphed_decode_equals_eager_and_forward(layer):
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=256, n_layer=3, vocab_size=1000, ssm_cfg={"layer": layer})
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (4, 40), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(4)
        model(ids[:, :30], cache=cache)
        stepped = torch.stack([model.step(ids[:, t], cache) for t in range(30, 40)], 1)
    assert rel_err(stepped, full[:, 30:]) < 1e-4
    eager = model.generate(ids[:, :8], max_new_tokens=12, temperature=0)
    graphed = model.generate(ids[:, :8], max_new_tokens=12, temperature=0, cuda_graph=True)
    assert torch.equal(eager, graphed)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_bf16_state_kernels_equal_the_lean_step(layer):
    """A bfloat16 SSM state on the GPU: the fused step (float32 arithmetic, the state rounded to nearest once per
    token) against the lean PyTorch step on the same state; graphed decoding equals eager with that state."""
    torch.manual_seed(1)
    cfg = MambaConfig(d_model=256, n_layer=3, vocab_size=1000, ssm_cfg={"layer": layer})
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (4, 40), device="cuda")
    with torch.no_grad():
        cache = model.allocate_cache(4, state_dtype=torch.bfloat16)
        model(ids[:, :30], cache=cache)
        mixer, state = model.backbone.layers[0].mixer, cache.states[0]
        width = mixer.in_proj.out_features
        xz = torch.randn(4, width, device="cuda", dtype=torch.bfloat16)
        step = mamba1_step if layer == "Mamba1" else mamba2_step
        args = ((mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight,
                 mixer.dt_proj.bias, mixer.A_log, mixer.D) if layer == "Mamba1" else
                (mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D,
                 mixer.ngroups))
        runs = {}
        for backend in ("torch", "triton"):
            conv, ssm = state.conv.clone(), state.ssm.clone()
            runs[backend] = step(xz, conv, ssm, *args, backend=backend), ssm
        assert runs["triton"][1].dtype == torch.bfloat16
        # bf16 weights and inputs: the lean step rounds x_proj's and dt_proj's outputs to bf16, the kernel does not
        assert rel_err(runs["triton"][0], runs["torch"][0]) < 2e-2
        assert rel_err(runs["triton"][1], runs["torch"][1]) < 2e-2
    eager = model.generate(ids[:, :8], max_new_tokens=12, temperature=0, state_dtype=torch.bfloat16)
    graphed = model.generate(ids[:, :8], max_new_tokens=12, temperature=0, cuda_graph=True,
                             state_dtype=torch.bfloat16)
    assert torch.equal(eager, graphed)


@pytest.mark.parametrize("batch,nheads,ngroups,dtype,state_dtype", [
    (1, 24, 1, torch.bfloat16, torch.float32), (16, 24, 1, torch.bfloat16, torch.bfloat16),
    (64, 24, 1, torch.bfloat16, torch.float32), (7, 32, 8, torch.bfloat16, torch.float32),
    (5, 48, 2, torch.float32, torch.float32)])
def test_one_kernel_mamba2_step_equals_conv_then_state_kernels(batch, nheads, ngroups, dtype, state_dtype):
    """The one-kernel Mamba-2 step (`mixer_step.M2_CONV_IN_STEP`; the group's B/C conv windows written by their last
    reader) against the conv kernel then the state kernel, bitwise, over 200 steps: a reader that saw a window
    already shifted by the last reader (a missing acquire-release) would differ."""
    from mambakit.ops.triton.decode import conv1d_update_triton
    from mambakit.ops.triton.mamba2_conv_step import mamba2_conv_state_step_triton
    from mambakit.ops.triton.mixer_step import mamba2_state_step_triton

    g = torch.Generator(device="cuda").manual_seed(batch)
    headdim, d_state = 64, 128 if ngroups < 8 else 64
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    cw, cb = (r(conv_dim, 4) * 0.5).to(dtype), (r(conv_dim) * 0.3).to(dtype)
    dt_bias, D = r(nheads) * 0.5 - 2, r(nheads)
    A_log = torch.log(torch.rand(nheads, device="cuda", generator=g) * 8 + 1)
    conv, ssm = r(batch, conv_dim, 4).to(dtype), r(batch, nheads, headdim, d_state).to(state_dtype)
    two, one = (conv.clone(), ssm.clone()), (conv.clone(), ssm.clone())
    for _ in range(200):
        zx = r(batch, d_inner + conv_dim + nheads).to(dtype)
        xbc = conv1d_update_triton(zx[:, d_inner:d_inner + conv_dim], two[0], cw, cb, "silu")
        y2 = mamba2_state_step_triton(xbc, zx, d_inner + conv_dim, dt_bias, A_log, D, two[1], ngroups,
                                      (0.0, float("inf")), False)
        y1 = mamba2_conv_state_step_triton(zx, one[0], cw, cb, dt_bias, A_log, D, one[1], ngroups,
                                           (0.0, float("inf")), False)
        assert torch.equal(y1, y2) and torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert not one[0]._mambakit_reader_counts.any()


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_lm_one_kernel_step_with_the_norm_inside(state_dtype, monkeypatch):
    """A Mamba-2 LM (ngroups 2) decoding with the one-kernel step and the gated norm inside it (both switches on,
    batch 4 beyond the GEMV batch): steps after a prefill equal the forward, graphed equals eager, and the tokens
    equal the default two-kernel path's."""
    import mambakit.ops.mixer_step as mixer_step

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=256, n_layer=3, vocab_size=1000,
                      ssm_cfg={"layer": "Mamba2", "ngroups": 2, "headdim": 32, "d_state": 64})
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (4, 40), device="cuda")
    baseline = model.generate(ids[:, :8], max_new_tokens=12, temperature=0, state_dtype=state_dtype)
    monkeypatch.setattr(mixer_step, "M2_CONV_IN_STEP", True)
    monkeypatch.setattr(mixer_step, "M2_NORM_IN_STEP", True)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(4, state_dtype=state_dtype)
        model(ids[:, :30], cache=cache)
        stepped = torch.stack([model.step(ids[:, t], cache) for t in range(30, 40)], 1)
    assert rel_err(stepped, full[:, 30:]) < (1e-4 if state_dtype is None else 2e-2)
    eager = model.generate(ids[:, :8], max_new_tokens=12, temperature=0, state_dtype=state_dtype)
    graphed = model.generate(ids[:, :8], max_new_tokens=12, temperature=0, cuda_graph=True, state_dtype=state_dtype)
    assert torch.equal(eager, graphed) and torch.equal(eager, baseline)
