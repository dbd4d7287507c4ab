"""The fused one-token mixer steps (`mambakit.ops.mixer_step`, backend "triton") against their PyTorch composition
in float64, on the CPU interpreter: several consecutive steps on fresh random inputs of awkward shapes (channels not
a multiple of the blocks, d_state and dt_rank not powers of two, groups, per-channel D, dt_limit, no conv bias, the
gate), the states updated in place, rows independent (a NaN row leaves the others untouched), errors."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.errors import MambaKitError  # noqa: E402
from mambakit.ops.mixer_step import mamba1_step, mamba2_step  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

interpreted_module("mambakit.ops.triton.decode")
interpreted_module("mambakit.ops.triton.mixer_step")
interpreted_module("mambakit.ops.triton.mamba2_conv_step")


def _m1_params(g, d_inner, d_state, dt_rank, d_conv, conv_bias, with_D):
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    return dict(conv_weight=r(d_inner, d_conv, scale=0.5), conv_bias=r(d_inner, scale=0.3) if conv_bias else None,
                x_proj_weight=r(dt_rank + 2 * d_state, d_inner, scale=d_inner ** -0.5),
                dt_proj_weight=r(d_inner, dt_rank, scale=dt_rank ** -0.5), dt_proj_bias=r(d_inner, scale=0.5) - 3,
                A_log=torch.log(torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 4 + 0.5),
                D=r(d_inner) if with_D else None)


def _f32(d):
    return {k: (None if v is None else v.float()) for k, v in d.items()}


M1_CASES = {  # batch, d_inner, d_state, dt_rank, d_conv, conv_bias, D
    "d100_n5_r7": (3, 100, 5, 7, 4, True, True),
    "d64_n16_r4_nobias": (1, 64, 16, 4, 4, False, True),
    "d130_n16_r48_noD_w3": (2, 130, 16, 48, 3, True, False),
}


@pytest.mark.parametrize("case", M1_CASES)
def test_mamba1_step_matches_float64_composition(case):
    batch, d_inner, d_state, dt_rank, d_conv, conv_bias, with_D = M1_CASES[case]
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    p64 = _m1_params(g, d_inner, d_state, dt_rank, d_conv, conv_bias, with_D)
    conv64 = torch.randn(batch, d_inner, d_conv, generator=g, dtype=torch.float64)
    ssm64 = torch.randn(batch, d_inner, d_state, generator=g, dtype=torch.float64)
    conv32, ssm32 = conv64.float(), ssm64.float()
    for _ in range(3):
        xz = torch.randn(batch, 2 * d_inner, generator=g, dtype=torch.float64)
        ref = mamba1_step(xz, conv64, ssm64, **p64, backend="ref")
        out = mamba1_step(xz.float(), conv32, ssm32, **_f32(p64), backend="triton")
        assert out.dtype == torch.float32 and out.shape == (batch, d_inner)
        assert rel_err(out, ref) < 1e-5
        assert rel_err(ssm32, ssm64) < 1e-5
        assert rel_err(conv32, conv64) < 1e-6


def _m2_params(g, nheads, headdim, d_state, ngroups, d_conv, d_per_channel):
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    return dict(conv_weight=r(conv_dim, d_conv, scale=0.5), conv_bias=r(conv_dim, scale=0.3),
                dt_bias=r(nheads, scale=0.5) - 2, A_log=torch.log(torch.rand(nheads, generator=g,
                                                                            dtype=torch.float64) * 8 + 1),
                D=r(d_inner if d_per_channel else nheads))


M2_CASES = {  # batch, nheads, headdim, d_state, ngroups, D per channel, dt_limit, gate
    "h6_p12_n10_g2": (2, 6, 12, 10, 2, False, (0.0, float("inf")), False),
    "h4_p64_n16_g1_clamp": (1, 4, 64, 16, 1, True, (0.01, 0.05), False),
    "h6_p40_n24_g3_gate": (3, 6, 40, 24, 3, False, (0.0, float("inf")), True),
}


@pytest.mark.parametrize("one_kernel", [False, True], ids=["conv-then-state", "one-kernel"])
@pytest.mark.parametrize("case", M2_CASES)
def test_mamba2_step_matches_float64_composition(case, one_kernel, monkeypatch):
    import mambakit.ops.mixer_step as mixer_step

    monkeypatch.setattr(mixer_step, "M2_CONV_IN_STEP", one_kernel)
    batch, nheads, headdim, d_state, ngroups, per_channel, dt_limit, gate = M2_CASES[case]
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    p64 = _m2_params(g, nheads, headdim, d_state, ngroups, 4, per_channel)
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    conv64 = torch.randn(batch, conv_dim, 4, generator=g, dtype=torch.float64)
    ssm64 = torch.randn(batch, nheads, headdim, d_state, generator=g, dtype=torch.float64)
    conv32, ssm32 = conv64.float(), ssm64.float()
    for _ in range(3):
        zx = torch.randn(batch, d_inner + conv_dim + nheads, generator=g, dtype=torch.float64)
        kw = dict(ngroups=ngroups, dt_limit=dt_limit, gate=gate)
        ref = mamba2_step(zx, conv64, ssm64, **p64, **kw, backend="ref")
        out = mamba2_step(zx.float(), conv32, ssm32, **_f32(p64), **kw, backend="triton")
        assert out.shape == (batch, d_inner)
        assert rel_err(out, ref) < 1e-5
        assert rel_err(ssm32, ssm64) < 1e-5
        assert rel_err(conv32, conv64) < 1e-6


def test_rows_are_independent_even_with_nan():
    g = torch.Generator().manual_seed(5)
    p = _f32(_m1_params(g, 70, 6, 5, 4, True, True))
    xz = torch.randn(3, 140, generator=g)
    conv, ssm = torch.randn(3, 70, 4, generator=g), torch.randn(3, 70, 6, generator=g)
    clean = mamba1_step(xz, conv.clone(), ssm.clone(), **p, backend="triton")
    bad = xz.clone()
    bad[1, 3] = float("nan")
    conv_b, ssm_b = conv.clone(), ssm.clone()
    out = mamba1_step(bad, conv_b, ssm_b, **p, backend="triton")
    assert torch.equal(out[[0, 2]], clean[[0, 2]])
    assert torch.isfinite(ssm_b[[0, 2]]).all() and not torch.isfinite(out[1]).all()


def test_errors_name_the_argument():
    g = torch.Generator().manual_seed(0)
    p = _f32(_m1_params(g, 32, 4, 3, 4, True, True))
    with pytest.raises(MambaKitError, match="xz"):
        mamba1_step(torch.zeros(2, 63), torch.zeros(2, 32, 4), torch.zeros(2, 32, 4), **p)
    with pytest.raises(MambaKitError, match="backend"):
        mamba1_step(torch.zeros(2, 64), torch.zeros(2, 32, 4), torch.zeros(2, 32, 4), **p, backend="cuda")
    with pytest.raises(MambaKitError, match="dt_transform"):
        mamba1_step(torch.zeros(2, 64), torch.zeros(2, 32, 4), torch.zeros(2, 32, 4), **p, backend="triton",
                    dt_transform=lambda dt: dt)



_SM90_SCRIPT = r"""
import os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mambakit.ops.triton import mixer_step as ms
from mambakit.ops.triton import mamba2_conv_step as cs

bf, f32 = "*bf16", "*fp32"
kernels = {
    "m1_conv_xproj": (ms._m1_conv_xproj_kernel, dict(xz_ptr=bf, cs_ptr=bf, cw_ptr=bf, cb_ptr=bf, wx_ptr=bf,
                                                     xc_ptr=bf, part_ptr=f32),
                      dict(HAS_BIAS=True, BLOCK_D=64, WP=4, BLOCK_O=128, XPROJ=True)),
    "m1_scan_step": (ms._m1_scan_step_kernel, dict(part_ptr=f32, xc_ptr=bf, xz_ptr=bf, wdt_ptr=bf, dtb_ptr=bf,
                                                   alog_ptr=f32, D_ptr=f32, st_ptr=f32, y_ptr=bf),
                     dict(HAS_D=True, BLOCK_D=32, NP=16, RP=64, NB=32, ROWS=1)),
    "m1_scan_step_gemm": (ms._m1_scan_step_kernel, dict(part_ptr=bf, xc_ptr=bf, xz_ptr=bf, wdt_ptr=bf, dtb_ptr=bf,
                                                        alog_ptr=f32, D_ptr=f32, st_ptr=f32, y_ptr=bf),
                          dict(HAS_D=True, BLOCK_D=32, NP=16, RP=64, NB=1, ROWS=1)),
    "m2_state_step": (ms._m2_state_step_kernel, dict(xbc_ptr=bf, zx_ptr=bf, dtb_ptr=f32, alog_ptr=f32, D_ptr=f32,
                                                     st_ptr=f32, y_ptr=bf, dt_lo="fp32", dt_hi="fp32"),
                      dict(HAS_D=True, D_HAS_HDIM=False, HAS_Z=False, CLAMP=False, BLOCK_P=8, NP=128)),
    "m2_conv_state_step": (cs._m2_conv_state_step_kernel,
                           dict(zx_ptr=bf, cs_ptr=bf, cw_ptr=bf, cb_ptr=bf, cnt_ptr="*i32", dtb_ptr=f32,
                                alog_ptr=f32, D_ptr=f32, st_ptr=f32, y_ptr=bf, nw_ptr=bf, part_ptr=f32, dt_lo="fp32",
                                dt_hi="fp32", eps="fp32"),
                           dict(HAS_CB=True, HAS_D=True, D_HAS_HDIM=False, HAS_Z=False, CLAMP=False, NORM=True,
                                NORM_BEFORE_GATE=False, BLOCK_P=16, NP=128, WP=4, RP=128, BLOCK_C=1024)),
}
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for name, (fn, types, consts) in kernels.items():
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]
    except TypeError as exc:  # another Triton version's compile API
        print("API", exc)
        sys.exit(0)
    path = os.path.join(tempfile.mkdtemp(), name + ".cubin")
    open(path, "wb").write(cubin)
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    print(name, " ".join(line.strip() for line in usage.splitlines() if "REG:" in line))
"""


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter compiles nothing: build the kernels for Hopper (Triton's own ptxas, no GPU needed) in a
    child without TRITON_INTERPRET, with the 130M shapes' constants, and read their resource usage: every kernel
    compiles, with no local memory (no register spills)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith("API"):
        pytest.skip(f"this Triton's compile API differs: {run.stdout}")
    lines = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert set(lines) == {"m1_conv_xproj", "m1_scan_step", "m1_scan_step_gemm", "m2_state_step",
                          "m2_conv_state_step"}, run.stdout
    for name, usage in lines.items():
        assert "REG:" in usage and "LOCAL:0" in usage and "STACK:0" in usage, f"{name}: {usage}"


@pytest.mark.parametrize("config", [None, (32, 1, 4), (64, 4, 4), (16, 3, 2), (32, 1, 2, False), (16, 3, 2, True)],
                         ids=["default", "row1", "rows4", "rows3", "partials", "rows3-xproj-gemm"])
def test_mamba1_state_update_blocks(config):
    """The state-update kernel under several blocks (rows of the batch per program, 10 rows being no multiple of 3
    or 4; x_proj as partial sums in the conv kernel or as one product between the kernels, the default beyond batch
    32): equal to the float64 composition, and a NaN row, sharing its program with others, leaves them untouched."""
    from mambakit.ops.triton.mixer_step import StepConfig, mamba1_step_triton

    cfg = None if config is None else StepConfig(*config)
    batch, d_inner, d_state, dt_rank = 10, 70, 6, 5
    g = torch.Generator().manual_seed(11)
    p64 = _m1_params(g, d_inner, d_state, dt_rank, 4, True, True)
    p = _f32(p64)
    conv64 = torch.randn(batch, d_inner, 4, generator=g, dtype=torch.float64)
    ssm64 = torch.randn(batch, d_inner, d_state, generator=g, dtype=torch.float64)
    xz = torch.randn(batch, 2 * d_inner, generator=g, dtype=torch.float64)
    conv32, ssm32 = conv64.float(), ssm64.float()
    conv_b, ssm_b = conv64.float(), ssm64.float()  # the states before the step (the reference updates conv64/ssm64)
    ref = mamba1_step(xz, conv64, ssm64, **p64, backend="ref")
    args = [p[k] for k in ("conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log",
                           "D")]
    out = mamba1_step_triton(xz.float(), conv32, args[0], args[1], args[2], args[3], args[4], args[5], args[6],
                             ssm32, config=cfg)
    assert rel_err(out, ref) < 1e-5 and rel_err(ssm32, ssm64) < 1e-5
    bad = xz.float().clone()
    bad[5, 2] = float("nan")
    out_b = mamba1_step_triton(bad, conv_b, *args[:7], ssm_b, config=cfg)
    others = [i for i in range(batch) if i != 5]
    assert torch.isfinite(out_b[others]).all() and not torch.isfinite(out_b[5]).all()
    assert rel_err(out_b[others], ref[others]) < 1e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_16bit_state_matches_the_lean_step(arch):
    """A bfloat16 SSM state: the kernels compute in float32 and store the rounded state, as the lean PyTorch step
    does (y from the unrounded state in both)."""
    g = torch.Generator().manual_seed(21 + (arch == "mamba2"))
    if arch == "mamba1":
        batch, d_inner, d_state = 2, 70, 6
        p, step = _f32(_m1_params(g, d_inner, d_state, 5, 4, True, True)), mamba1_step
        width, conv_dim, ssm_shape, kw = 2 * d_inner, d_inner, (batch, d_inner, d_state), {}
    else:
        batch, nheads, headdim, d_state, ngroups = 2, 6, 12, 10, 2
        p, step = _f32(_m2_params(g, nheads, headdim, d_state, ngroups, 4, False)), mamba2_step
        d_inner = nheads * headdim
        conv_dim = d_inner + 2 * ngroups * d_state
        width, ssm_shape, kw = d_inner + conv_dim + nheads, (batch, nheads, headdim, d_state), dict(ngroups=ngroups)
    conv = torch.randn(batch, conv_dim, 4, generator=g)
    ssm = torch.randn(*ssm_shape, generator=g).bfloat16()
    states = {b: (conv.clone(), ssm.clone()) for b in ("torch", "triton")}
    for _ in range(3):  # each step from the same state (the two roundings would drift apart over steps)
        for a, b in zip(states["triton"], states["torch"]):
            a.copy_(b)
        xz = torch.randn(batch, width, generator=g)
        ref = step(xz, *states["torch"], **p, **kw, backend="torch")
        out = step(xz, *states["triton"], **p, **kw, backend="triton")
        assert states["triton"][1].dtype == torch.bfloat16
        assert rel_err(out, ref) < 1e-5
        got, want = (states[b][1].double() for b in ("triton", "torch"))
        # within one bfloat16 unit: the interpreter rounds its 16-bit stores toward zero, the GPU to nearest
        assert ((got - want).abs() <= want.abs() * 2.0 ** -7).all()


@pytest.mark.parametrize("block_p", [4, 0])
def test_mamba2_one_kernel_step_equals_the_conv_then_state_kernels(block_p):
    """The fused Mamba-2 step (conv + state in one kernel, the group's B/C windows written by their last reader)
    against the separate conv kernel then the state-step kernel: same outputs and states, with several readers per
    group (block_p 4: 3 blocks x 3 heads), a strided conv state, and the reader counts back at zero after each step."""
    from mambakit.ops.triton.decode import conv1d_update_triton
    from mambakit.ops.triton.mamba2_conv_step import mamba2_conv_state_step_triton
    from mambakit.ops.triton.mixer_step import mamba2_state_step_triton

    g = torch.Generator().manual_seed(7 + block_p)
    batch, nheads, headdim, d_state, ngroups = 3, 6, 12, 10, 2
    p = _f32(_m2_params(g, nheads, headdim, d_state, ngroups, 4, False))
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    conv = torch.randn(batch, 4, conv_dim, generator=g).transpose(1, 2)  # (batch, conv_dim, 4), strided
    ssm = torch.randn(batch, nheads, headdim, d_state, generator=g)
    fused_states, ref_states = (conv.clone().transpose(1, 2).contiguous().transpose(1, 2), ssm.clone()), \
        (conv.clone(), ssm.clone())
    args = (p["dt_bias"], p["A_log"], p["D"])
    for _ in range(3):
        zx = torch.randn(batch, d_inner + conv_dim + nheads, generator=g)
        xbc = conv1d_update_triton(zx[:, d_inner:d_inner + conv_dim], ref_states[0], p["conv_weight"],
                                   p["conv_bias"], "silu")
        ref = mamba2_state_step_triton(xbc, zx, d_inner + conv_dim, *args, ref_states[1], ngroups,
                                       (0.0, float("inf")), True)
        out = mamba2_conv_state_step_triton(zx, fused_states[0], p["conv_weight"], p["conv_bias"], *args,
                                            fused_states[1], ngroups, (0.0, float("inf")), True, block_p=block_p)
        assert torch.equal(out, ref)
        assert torch.equal(fused_states[0], ref_states[0]) and torch.equal(fused_states[1], ref_states[1])
        assert not fused_states[0]._mambakit_reader_counts.any()


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("block_p", [4, 0])
def test_mamba2_one_kernel_step_with_the_gated_norm(norm_before_gate, block_p):
    """The gated RMSNorm inside the one-kernel step (its group's last writer normalises the group) against the
    two-kernel step followed by the PyTorch norm, per group of d_inner / ngroups channels; the counts back at zero;
    mamba2_step(norm=...) takes it with M2_CONV_IN_STEP and equals the same composition without."""
    import mambakit.ops.mixer_step as mixer_step
    from mambakit.ops.norm.naive import rms_norm_gated_torch
    from mambakit.ops.triton.mamba2_conv_step import mamba2_conv_state_step_triton

    g = torch.Generator().manual_seed(17 + block_p + norm_before_gate)
    batch, nheads, headdim, d_state, ngroups = 3, 6, 12, 10, 2
    p = _f32(_m2_params(g, nheads, headdim, d_state, ngroups, 4, False))
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    weight, eps = torch.randn(d_inner, generator=g), 1e-5
    conv, ssm = torch.randn(batch, conv_dim, 4, generator=g), torch.randn(batch, nheads, headdim, d_state, generator=g)
    one, two, three = ((conv.clone(), ssm.clone()) for _ in range(3))
    args = (p["conv_weight"], p["conv_bias"], p["dt_bias"], p["A_log"], p["D"])
    for _ in range(3):
        zx = torch.randn(batch, d_inner + conv_dim + nheads, generator=g) * 2
        y = mamba2_step(zx, *two, *args, ngroups=ngroups, backend="triton")
        ref = rms_norm_gated_torch(y, zx[:, :d_inner], weight, eps, d_inner // ngroups, norm_before_gate)
        out = mamba2_conv_state_step_triton(zx, *one[:1], *args, one[1], ngroups, (0.0, float("inf")), False,
                                            norm=(weight, eps, norm_before_gate), block_p=block_p)
        assert rel_err(out, ref) < 1e-5 and torch.equal(one[1], two[1]) and torch.equal(one[0], two[0])
        assert not one[0]._mambakit_reader_counts.any()
        mixer_step.M2_CONV_IN_STEP = True
        try:
            via_step = mamba2_step(zx, *three, *args, ngroups=ngroups, backend="triton",
                                   norm=(weight, eps, norm_before_gate))
        finally:
            mixer_step.M2_CONV_IN_STEP = False
        assert rel_err(via_step, ref) < 1e-5
    with pytest.raises(MambaKitError, match="norm and gate exclude each other"):
        mamba2_step(zx, *two, *args, ngroups=ngroups, gate=True, norm=(weight, eps, False))
    with pytest.raises(MambaKitError, match=r"norm weight must have shape \(72,\)"):
        mamba2_step(zx, *two, *args, ngroups=ngroups, norm=(weight[:5], eps, False))


def test_mamba2_one_kernel_rows_are_independent_even_with_nan():
    """A NaN in one row's B/C input (read by every head of its group) reaches that row only: the other rows' outputs,
    normalised by their own groups' last writers, and states equal the clean run's."""
    from mambakit.ops.triton.mamba2_conv_step import mamba2_conv_state_step_triton

    g = torch.Generator().manual_seed(9)
    batch, nheads, headdim, d_state, ngroups = 3, 6, 12, 10, 2
    p = _f32(_m2_params(g, nheads, headdim, d_state, ngroups, 4, False))
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    conv, ssm = torch.randn(batch, conv_dim, 4, generator=g), torch.randn(batch, nheads, headdim, d_state, generator=g)
    zx = torch.randn(batch, d_inner + conv_dim + nheads, generator=g)
    norm = (torch.randn(d_inner, generator=g), 1e-5, False)
    args = (p["conv_weight"], p["conv_bias"], p["dt_bias"], p["A_log"], p["D"])
    runs = []
    for bad in (False, True):
        x = zx.clone()
        if bad:
            x[1, d_inner + d_inner + 3] = float("nan")  # a B channel of group 0, row 1
        states = (conv.clone(), ssm.clone())
        out = mamba2_conv_state_step_triton(x, states[0], *args, states[1], ngroups, (0.0, float("inf")), False,
                                            norm=norm, block_p=4)
        runs.append((out, *states))
    (clean, conv_c, ssm_c), (dirty, conv_d, ssm_d) = runs
    keep = [0, 2]
    assert torch.equal(dirty[keep], clean[keep]) and torch.equal(ssm_d[keep], ssm_c[keep])
    assert torch.equal(conv_d[keep], conv_c[keep])
    assert not torch.isfinite(dirty[1]).all() and not torch.isfinite(ssm_d[1]).all()
