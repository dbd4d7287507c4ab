"""The SSD form's fused per-position prep (mambakit.ops.mamba3.triton_prep) on the CPU interpreter against the
PyTorch composition it replaces (the layer's DT / ADT, `position_terms`, `sequence_angles`): every output and every
gradient in float64 (to 1e-10) and float32, both A activations, strided raw columns (in_proj slices), packed
sequences, a start angle, a NaN kept causal."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are (re)loaded: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from tests.conftest import rel_err  # noqa: E402
from tests.ops.mamba3.helpers import PREP_OUTS as OUTS, angle_err  # noqa: E402
from tests.ops.mamba3.helpers import prep_inputs as make_inputs, prep_reference as reference  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

kernels = interpreted_module("mambakit.ops.mamba3.triton_prep")

NAMES = ("dd_dt", "dt_bias", "dd_A", "trap", "angle", "angle0")


def run_both(cols, seq_idx, A_floor, act, fp, seed=9):
    """(fused outputs, fused grads, reference outputs, reference grads) for one fixed weighting of the outputs."""
    leaves = {n: (t.detach().clone().requires_grad_(True) if t is not None else None) for n, t in cols.items()}
    ref_leaves = {n: (t.detach().clone().double().requires_grad_(True) if t is not None else None)
                  for n, t in cols.items()}
    out = kernels.position_prep(**leaves, seq_idx=seq_idx, A_floor=A_floor, A_activation=act, fp=fp)
    ref = reference(**ref_leaves, seq_idx=seq_idx, A_floor=A_floor, A_activation=act, fp=torch.float64)
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref]

    def loss(outs):
        total = 0.0
        for name, o, w in zip(OUTS, outs, ws):
            if o.dim() == 3:  # transposed: the upstream gradients of adt, scale, corr arrive with other strides
                total = total + (o.double().transpose(1, 2) * w.transpose(1, 2)).sum()
            else:
                total = total + ((torch.cos(o.double()) if name == "theta" else o.double()) * w).sum()
        return total

    used = [n for n in NAMES if leaves[n] is not None]
    grads = dict(zip(used, torch.autograd.grad(loss(out), [leaves[n] for n in used])))
    ref_grads = dict(zip(used, torch.autograd.grad(loss(ref), [ref_leaves[n] for n in used])))
    return out, grads, ref, ref_grads


SHAPES = [dict(batch=2, seqlen=37, nheads=3, n_angles=4), dict(batch=2, seqlen=70, nheads=3, n_angles=12),
          dict(batch=1, seqlen=5, nheads=2, n_angles=1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["heavy_tail", "softplus"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_outputs_and_gradients_match_the_composition(shape, act, dtype, tol):
    proj, cols, seq_idx = make_inputs(**shape, dtype=dtype, seed=shape["seqlen"])
    out, grads, ref, ref_grads = run_both(cols, seq_idx, A_floor=0.3 if act == "heavy_tail" else 1e-4, act=act,
                                          fp=dtype)
    for name, o, r in zip(OUTS, out, ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        err = angle_err(o, r) if name == "theta" else rel_err(o, r)
        assert err < tol, (name, err)
    for name in ref_grads:
        assert grads[name].dtype == cols[name].dtype and rel_err(grads[name], ref_grads[name]) < tol, name


@pytest.mark.parametrize("packed,angle0", [(False, False), (True, False), (False, True)])
def test_without_start_angle_or_sequences(packed, angle0):
    _, cols, seq_idx = make_inputs(2, 40, 3, 4, torch.float64, seed=3, packed=packed, angle0=angle0)
    out, grads, ref, ref_grads = run_both(cols, seq_idx, 1e-4, "heavy_tail", torch.float64)
    for name, o, r in zip(OUTS, out, ref):
        assert (angle_err(o, r) if name == "theta" else rel_err(o, r)) < 1e-10, name
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-10, name


def test_bf16_columns_float32_compute():
    _, cols, seq_idx = make_inputs(2, 37, 3, 4, torch.bfloat16, seed=4)
    cols["dt_bias"] = cols["dt_bias"].float()
    cols["angle0"] = cols["angle0"].float()
    out, grads, ref, ref_grads = run_both(cols, seq_idx, 1e-4, "heavy_tail", torch.float32)
    for name, o, r in zip(OUTS, out, ref):
        assert o.dtype == torch.float32 and (angle_err(o, r) if name == "theta" else rel_err(o, r)) < 2e-5, name
    for name in ref_grads:
        assert grads[name].dtype == cols[name].dtype and rel_err(grads[name], ref_grads[name]) < 1e-2, name


@pytest.mark.parametrize("column", ["dd_dt", "dd_A", "trap", "angle"])
def test_nan_stays_causal(column):
    """A NaN at position t reaches no output before t (the look-back term of t - 1 reads DT_t and lambda_t: the
    scale and corr of t - 1 may be NaN); outputs before that equal the NaN-free run's."""
    _, cols, _ = make_inputs(1, 50, 2, 3, torch.float64, seed=5, packed=False)
    clean = kernels.position_prep(**cols, seq_idx=None, A_floor=1e-4, A_activation="heavy_tail", fp=torch.float64)
    t = 23
    cols[column] = cols[column].clone()
    cols[column][0, t, 0] = float("nan")
    out = kernels.position_prep(**cols, seq_idx=None, A_floor=1e-4, A_activation="heavy_tail", fp=torch.float64)
    reached = False
    for name, o, c in zip(OUTS, out, clean):
        if name == "first_back":
            assert torch.equal(o, c)
            continue
        first = t - 1 if name in ("scale", "corr") else t
        assert torch.equal(o[:, :first], c[:, :first]), name
        reached = reached or not bool(torch.isfinite(o[:, first]).all())
    assert reached
    if column in ("dd_dt", "angle"):  # the angles carry it to the end
        assert not torch.isfinite(out.theta[0, -1]).all()


def test_a_new_sequence_starts_clean_after_a_nan():
    """With seq_idx, a NaN in one sequence's angles does not reach the next sequence's angles."""
    _, cols, seq_idx = make_inputs(1, 40, 2, 3, torch.float64, seed=6, packed=False)
    seq_idx = torch.zeros(1, 40, dtype=torch.long)
    seq_idx[0, 20:] = 1
    cols["angle"] = cols["angle"].clone()
    cols["angle"][0, 10, 1] = float("nan")
    out = kernels.position_prep(**cols, seq_idx=seq_idx, A_floor=1e-4, A_activation="heavy_tail", fp=torch.float64)
    assert torch.isnan(out.theta[0, 10:20, :, 1]).all()
    assert torch.isfinite(out.theta[0, 20:]).all() and torch.isfinite(out.theta[0, :10]).all()


def _layer_pair(monkeypatch, **cfg):
    """A Mamba3 layer on the fused path (the CPU made to look like CUDA for the SSD form) and a copy on "torch"."""
    import mambakit.ops.mamba3 as mamba3_ops
    from mambakit.layers.mamba3 import Mamba3

    for name in ("mambakit.ops.ssd.triton", "mambakit.ops.mamba3.triton_rotary", "mambakit.ops.mamba3.triton_gate"):
        interpreted_module(name)
    monkeypatch.setattr(mamba3_ops, "ssd_form_fits", lambda device, dtype: dtype != torch.float64)
    torch.manual_seed(0)
    fused = Mamba3(**cfg)
    with torch.no_grad():  # B / C biases and D away from their all-ones init, dd_A columns with both signs
        for p in (fused.B_bias, fused.C_bias, fused.D):
            p.add_(torch.randn_like(p) * 0.3)
    ref = Mamba3(**cfg, scan_backend="torch")
    ref.load_state_dict(fused.state_dict())
    return fused, ref


LAYERS = [dict(d_model=12, d_state=16, headdim=8, ngroups=1), dict(d_model=36, d_state=24, headdim=24, ngroups=3,
                                                                    A_activation="softplus", is_outproj_norm=True)]


@pytest.mark.parametrize("cfg", LAYERS)
@pytest.mark.parametrize("with_state", [False, True])
def test_layer_fused_path_equals_the_torch_backend(monkeypatch, cfg, with_state):
    fused, ref = _layer_pair(monkeypatch, **cfg)
    calls = []
    real = fused.ssd_forward
    monkeypatch.setattr(fused, "ssd_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, cfg["d_model"], generator=g)
    seq_idx = torch.zeros(2, 37, dtype=torch.long)
    seq_idx[0, 15:] = 1
    states = [None, None]
    if with_state:
        ref_state = ref.allocate_state(2)
        for t in ref_state.parts():
            t.copy_(torch.randn(t.shape, generator=g))
        states = [type(ref_state)(*(t.clone() for t in ref_state.parts())), ref_state]
    outs, grads = [], []
    for layer, st in zip((fused, ref), states):
        xi = x.clone().requires_grad_(not with_state)  # a state is updated in place: no backward through it
        with torch.set_grad_enabled(not with_state):
            out = layer(xi, state=st, seq_idx=seq_idx)
        outs.append(out)
        if not with_state:
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
            params = [p for _, p in sorted(layer.named_parameters())]
            grads.append(torch.autograd.grad((out * w).sum(), [xi] + params))
    assert calls == [1]
    assert rel_err(outs[0], outs[1]) < 1e-4
    names = ["x"] + [n for n, _ in sorted(fused.named_parameters())]
    for name, a, b in zip(names, *grads) if grads else ():
        assert rel_err(a, b) < 1e-4, name
    if with_state:
        for part, a, b in zip(("angle", "ssm", "k", "v"), states[0].parts(), states[1].parts()):
            assert (angle_err(a, b) if part == "angle" else rel_err(a, b)) < 1e-4, part


def test_layer_takes_the_old_path_with_a_mask_or_the_torch_backend(monkeypatch):
    fused, ref = _layer_pair(monkeypatch, d_model=12, d_state=16, headdim=8)
    x = torch.randn(1, 9, 12)
    assert fused._fused_prep(x) and not ref._fused_prep(x)
    out = fused(x, mask=torch.ones(1, 9))  # the mask path: ssm_inputs, then mamba3_scan
    assert rel_err(out, ref(x)) < 1e-4


def test_raw_entry_names_bad_columns():
    from mambakit.errors import MambaKitError
    from mambakit.ops.mamba3.ssd_form import mamba3_ssd_raw

    b, L, H, G, N, P, S = 2, 9, 4, 2, 8, 3, 2
    ok = dict(Q=torch.randn(b, L, G, N), K=torch.randn(b, L, G, N), V=torch.randn(b, L, H, P),
              dd_dt=torch.randn(b, L, H), dt_bias=torch.randn(H), dd_A=torch.randn(b, L, H), trap=torch.randn(b, L, H),
              angle=torch.randn(b, L, S), Q_bias=torch.randn(H, N), K_bias=torch.randn(H, N))
    for name, bad, msg in (("dd_dt", torch.randn(b, H, L), "dd_dt must have shape"),
                           ("dd_A", torch.randn(b, L, H + 1), "dd_A must have shape"),
                           ("trap", torch.randn(b, L), "trap must have shape"),
                           ("angle", torch.randn(b, L, H, S), "angle must have shape"),
                           ("dt_bias", torch.randn(H, 1), "dt_bias must have shape")):
        with pytest.raises(MambaKitError, match=msg):
            mamba3_ssd_raw(**{**ok, name: bad})
    with pytest.raises(MambaKitError, match="A_activation"):
        mamba3_ssd_raw(**ok, A_activation="relu")


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter compiles nothing: build the prep kernels (float32 compute, bf16 columns, int32 seq_idx, float64
    angle sums), the rotary kernels with the folded norm and the gate's with the correction for Hopper (no GPU
    needed), at the 130M block's sizes (32 angles, d_state 128, headdim 64), and read their resource usage: no local
    memory (no register spills)."""
    from tests.ops.triton import sm90_resource_usage

    cols = {n: "*bf16" for n in ("dt_ptr", "a_ptr", "trap_ptr", "ang_ptr")}
    prep = dict(HEAVY=True, HAS_SEQ=True, SMALL=0.25, BL=kernels.BLOCK_L, BS=32)
    plain = dict(prep, HEAVY=False, HAS_SEQ=False)  # the other branches: softplus, no seq_idx, no state
    usage = sm90_resource_usage("mambakit.ops.mamba3.triton_prep", "_prep_fwd", "*fp32", {
        "fwd": ({**cols, "seq_ptr": "*i32", "a_floor": "fp32"}, dict(prep, HAS_ANG0=True)),
        "fwd_plain": ({**cols, "seq_ptr": "*i32", "a_floor": "fp32"}, dict(plain, HAS_ANG0=False))})
    if usage is None:
        pytest.skip("this Triton's compile API differs")
    grads = {**cols, "ddt_ptr": "*bf16", "da_ptr": "*bf16", "dtrap_ptr": "*bf16", "seq_ptr": "*i32", "a_floor": "fp32"}
    usage.update(sm90_resource_usage("mambakit.ops.mamba3.triton_prep", "_prep_bwd", "*fp32", {
        "bwd": (grads, dict(prep, HAS_DFB=True)), "bwd_plain": (grads, dict(plain, HAS_DFB=False))}))
    rotary = interpreted_module("mambakit.ops.mamba3.triton_rotary")
    bf16 = {n: "*bf16" for n in ("Q_ptr", "K_ptr")}
    for kernel, (bl, warps) in (("_rotary_fwd", rotary.NORM_FWD), ("_rotary_bwd", rotary.NORM_BWD)):
        types = {**bf16, "eps": "fp32", **({"dQ_ptr": "*bf16", "dK_ptr": "*bf16"} if kernel == "_rotary_bwd" else {})}
        consts = dict(BL=bl, BS=32, BR=64, HAS_REST=True, NORM=True, num_warps=warps)
        usage.update(sm90_resource_usage("mambakit.ops.mamba3.triton_rotary", kernel, "*fp32",
                                         {kernel: (types, consts)}))
    gate = dict(HAS_Z=True, HAS_CORR=True, HAS_D=True, BR=16, BP=64)
    for kernel in ("_skip_gate_fwd", "_skip_gate_bwd"):  # the correction formed in the gate's kernels
        usage.update(sm90_resource_usage("mambakit.ops.mamba3.triton_gate", kernel, "*fp32", {
            kernel: ({"z_ptr": "*bf16", "out_ptr": "*bf16", "dz_ptr": "*bf16"}, dict(gate))}))
    for name, line in usage.items():
        assert "REG:" in line and "LOCAL:0" in line and "STACK:0" in line, f"{name}: {line}"
