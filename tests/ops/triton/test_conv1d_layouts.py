"""The Triton conv's entry points `conv1d_forward` / `conv1d_backward` on every layout the Mamba blocks make (x
contiguous, a channel-last slice of an in_proj output, strided in time; out, gy and dx_out in other layouts), against
the float64 PyTorch reference via autograd, on the CPU interpreter; NaN stays where it belongs; bit-identical reruns."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch

from mambakit.errors import MambaKitError
from mambakit.ops.conv1d.naive import causal_conv1d_torch
from tests.conftest import rel_err
from tests.ops.triton import interpreted_module

conv = interpreted_module("mambakit.ops.conv1d.triton")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t (batch, dim, seqlen) copied into a tensor of that layout: contiguous, channel_last (a slice of a wider
    (batch, seqlen, C) buffer), time_strided (every other step of a longer buffer)."""
    batch, dim, seqlen = t.shape
    if layout == "contiguous":
        return t.clone().contiguous()
    if layout == "channel_last":
        buf = torch.full((batch, seqlen, dim + 5), float("nan"), dtype=t.dtype)
        view = buf[..., 2:2 + dim].transpose(1, 2)
    else:
        buf = torch.full((batch, dim, 2 * seqlen), float("nan"), dtype=t.dtype)
        view = buf[..., ::2]
    view.copy_(t)
    return view


def _empty(like: torch.Tensor, layout: str) -> torch.Tensor:
    return _layout(torch.full(like.shape, float("nan"), dtype=like.dtype), layout)


def _packed_idx(batch: int, seqlen: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.zeros(batch, seqlen, dtype=torch.int64)
    for b in range(batch):
        for c in torch.randint(1, max(seqlen, 2), (2,), generator=g).tolist():
            idx[b, c:] += 1
    return idx


def _inputs(batch, dim, seqlen, width, with_bias, packed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, seqlen, generator=g)
    w = torch.randn(dim, width, generator=g) / width
    b = torch.randn(dim, generator=g) if with_bias else None
    seq = _packed_idx(batch, seqlen, g) if packed else None
    gy = torch.randn(batch, dim, seqlen, generator=g)
    return x, w, b, seq, gy


def _reference(x, w, b, silu, seq, gy):
    """y and (dx, dw, db) in float64 by autograd through the PyTorch conv."""
    leaves = [t.double().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = causal_conv1d_torch(leaves[0], leaves[1], leaves[2] if b is not None else None, "silu" if silu else None,
                            seq_idx=seq)
    grads = torch.autograd.grad(y, leaves, gy.double())
    return y.detach(), grads[0], grads[1], grads[2] if b is not None else None


CASES = [  # batch, dim, seqlen, width, bias, silu, packed, x layout, out/gy/dx layout
    (2, 5, 65, 4, True, True, False, "channel_last", "channel_last"),
    (1, 7, 65, 3, False, True, True, "contiguous", "channel_last"),
    (2, 9, 7, 2, True, False, False, "channel_last", "contiguous"),
    (1, 5, 1, 4, True, True, True, "time_strided", "time_strided"),
    (2, 6, 33, 4, False, False, True, "channel_last", "time_strided"),
    (1, 3, 65, 2, True, True, False, "time_strided", "contiguous"),
    (2, 4, 17, 3, True, True, True, "contiguous", "contiguous"),
]


@pytest.mark.parametrize("batch,dim,seqlen,width,with_bias,silu,packed,xl,bl", CASES)
def test_forward_and_backward_match_the_reference(batch, dim, seqlen, width, with_bias, silu, packed, xl, bl):
    x, w, b, seq, gy = _inputs(batch, dim, seqlen, width, with_bias, packed, seed=seqlen * 31 + dim)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, w, b, silu, seq, gy)
    xs = _layout(x, xl)
    out = _empty(x, bl)
    y = conv.conv1d_forward(xs, w, b, silu, seq, out=out)
    assert y is out and rel_err(y, y_ref) <= 1e-5
    dx_out = _empty(x, bl)
    dx, dw, db = conv.conv1d_backward(xs, w, b, silu, seq, _layout(gy, bl), dx_out=dx_out)
    assert dx is dx_out and rel_err(dx, dx_ref) <= 1e-5
    assert dw.shape == w.shape and rel_err(dw, dw_ref) <= 1e-5
    assert (db is None) == (b is None) and (b is None or rel_err(db, db_ref) <= 1e-5)
    # allocated outputs follow x's layout
    y2 = conv.conv1d_forward(xs, w, b, silu, seq)
    dx2 = conv.conv1d_backward(xs, w, b, silu, seq, _layout(gy, bl))[0]
    for t in (y2, dx2):
        assert torch.equal(t, y if t is y2 else dx)
        assert conv.is_channel_last(t) == conv.is_channel_last(xs)


def test_buffers_are_written_in_place_only():
    """out / dx_out views of a bigger buffer: nothing outside the view changes (the NaN fill stays)."""
    x, w, b, seq, gy = _inputs(2, 5, 20, 4, True, False, seed=3)
    buf = torch.full((2, 20, 12), float("nan"))
    view = buf[..., 3:8].transpose(1, 2)
    conv.conv1d_backward(_layout(x, "channel_last"), w, b, True, seq, gy, dx_out=view)
    assert torch.isfinite(view).all()
    assert torch.isnan(buf[..., :3]).all() and torch.isnan(buf[..., 8:]).all()


@pytest.mark.parametrize("xl", ["contiguous", "channel_last"])
def test_autograd_output_layout_and_gradients(xl):
    x, w, b, seq, gy = _inputs(2, 6, 21, 4, True, True, seed=11)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, w, b, True, seq, gy)
    xs = _layout(x, xl).requires_grad_()
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = conv.causal_conv1d_triton(xs, wl, bl, "silu", seq_idx=seq)
    assert conv.is_channel_last(y) == (xl == "channel_last") and rel_err(y, y_ref) <= 1e-5
    if xl == "channel_last":
        assert y.transpose(1, 2).is_contiguous()
    got = torch.autograd.grad(y, (xs, wl, bl), gy)
    for a, r in zip(got, (dx_ref, dw_ref, db_ref)):
        assert rel_err(a, r) <= 1e-5


@pytest.mark.parametrize("gather", [True, False])
def test_the_two_backward_forms_agree(gather, monkeypatch):
    """The gather (shift in registers) and the recomputing fallback give the same gradients."""
    x, w, b, seq, gy = _inputs(2, 5, 40, 4, True, True, seed=5)
    _, dx_ref, dw_ref, db_ref = _reference(x, w, b, True, seq, gy)
    monkeypatch.setattr(conv, "BACKWARD_GATHER", gather)
    dx, dw, db = conv.conv1d_backward(_layout(x, "channel_last"), w, b, True, seq, gy)
    assert rel_err(dx, dx_ref) <= 1e-5 and rel_err(dw, dw_ref) <= 1e-5 and rel_err(db, db_ref) <= 1e-5


@pytest.mark.parametrize("channel_last", [False, True])
def test_gpu_block_sizes(channel_last, monkeypatch):
    """The tiles the GPU uses (clipped to the shape), on the interpreter."""
    sizes = {True: (64, 64), False: (8, 256)}[channel_last]
    monkeypatch.setattr(conv, "block_sizes", lambda cl, backward: sizes)
    x, w, b, seq, gy = _inputs(1, 5, 70, 4, True, True, seed=8)
    y_ref, dx_ref, dw_ref, _ = _reference(x, w, b, True, seq, gy)
    xs = _layout(x, "channel_last" if channel_last else "contiguous")
    assert rel_err(conv.conv1d_forward(xs, w, b, True, seq), y_ref) <= 1e-5
    dx, dw, _ = conv.conv1d_backward(xs, w, b, True, seq, gy)
    assert rel_err(dx, dx_ref) <= 1e-5 and rel_err(dw, dw_ref) <= 1e-5


@pytest.mark.parametrize("xl", ["contiguous", "channel_last"])
def test_nan_stays_where_it_belongs(xl):
    """NaN in x at p: y before p and dx before p - width + 1 stay finite, and so does everything of the next packed
    sequence; NaN in gy at q: dx after q stays finite."""
    batch, dim, seqlen, width, p, q = 1, 5, 48, 4, 20, 30
    x, w, b, _, gy = _inputs(batch, dim, seqlen, width, True, False, seed=2)
    seq = torch.zeros(batch, seqlen, dtype=torch.int64)
    seq[:, 24:] = 1  # x's NaN is in the first sequence
    x[:, 2, p] = float("nan")
    y = conv.conv1d_forward(_layout(x, xl), w, b, True, seq)
    assert torch.isfinite(y[..., :p]).all() and torch.isfinite(y[..., 24:]).all()
    dx = conv.conv1d_backward(_layout(x, xl), w, b, True, seq, gy)[0]
    assert torch.isfinite(dx[..., :p - width + 1]).all() and torch.isfinite(dx[..., 24:]).all()
    x = _inputs(batch, dim, seqlen, width, True, False, seed=2)[0]
    gy[:, 1, q] = float("nan")
    dx = conv.conv1d_backward(_layout(x, xl), w, b, True, None, gy)[0]
    assert torch.isfinite(dx[..., q + 1:]).all() and torch.isfinite(dx[:, [0, 2, 3, 4]]).all()


def test_half_precision_inputs_accumulate_in_float32():
    x, w, b, seq, gy = _inputs(2, 5, 33, 4, True, False, seed=9)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x.half().float(), w.half().float(), b.half().float(), True, seq,
                                               gy.half().float())
    xs = _layout(x.half(), "channel_last")
    out = _empty(x, "channel_last")  # a float32 output of half inputs
    assert rel_err(conv.conv1d_forward(xs, w.half(), b.half(), True, seq, out=out), y_ref) <= 1e-5
    dx, dw, db = conv.conv1d_backward(xs, w.half(), b.half(), True, seq, gy.half())
    assert dx.dtype == dw.dtype == db.dtype == torch.float16
    assert rel_err(dx, dx_ref) <= 2e-3 and rel_err(dw, dw_ref) <= 2e-3 and rel_err(db, db_ref) <= 2e-3


def test_gradients_are_bit_identical_on_two_runs():
    x, w, b, seq, gy = _inputs(2, 7, 65, 4, True, True, seed=4)
    xs = _layout(x.to(torch.bfloat16), "channel_last")
    runs = [conv.conv1d_backward(xs, w, b, True, seq, gy.to(torch.bfloat16)) for _ in range(2)]
    assert all(torch.equal(a, c) for a, c in zip(*runs))


def test_bad_buffers_and_shapes_raise():
    x, w = torch.randn(1, 3, 5), torch.randn(3, 4)
    with pytest.raises(MambaKitError, match="out"):
        conv.conv1d_forward(x, w, None, True, None, out=torch.empty(1, 3, 4))
    with pytest.raises(MambaKitError, match="gy"):
        conv.conv1d_backward(x, w, None, True, None, torch.empty(1, 5, 3))
    with pytest.raises(MambaKitError, match="dx_out"):
        conv.conv1d_backward(x, w, None, True, None, torch.empty(1, 3, 5), dx_out=torch.empty(1, 3, 5).long())
    with pytest.raises(MambaKitError, match="weight"):
        conv.conv1d_forward(x, torch.randn(2, 4), None, True, None)


def test_empty_sequence():
    x, w, b = torch.randn(2, 3, 0), torch.randn(3, 4), torch.randn(3)
    assert conv.conv1d_forward(x, w, b, True, None).shape == (2, 3, 0)
    dx, dw, db = conv.conv1d_backward(x, w, b, True, None, torch.randn(2, 3, 0))
    assert dx.shape == (2, 3, 0) and not dw.any() and not db.any()


_SM90_SCRIPT = r"""
import os, subprocess, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mambakit.ops.conv1d import triton as conv

TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class Launch:
    # stands in for a kernel: conv1d_forward / conv1d_backward's launch arguments, specialised as Triton's launcher
    # does (a tensor: 16-byte aligned; an integer: == 1 becomes a constant, % 16 == 0 is marked divisible)
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, num_warps, **constexprs):
        names = self.fn.arg_names
        sig, consts, attrs = {}, dict(constexprs), {}
        for i, (name, value) in enumerate(zip(names, args)):
            if isinstance(value, torch.Tensor):
                sig[name], attrs[(i,)] = TYPES[value.dtype], [["tt.divisibility", 16]]
            elif value == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        sig.update({n: "constexpr" for n in constexprs})
        src = ASTSource(fn=self.fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                        attrs=attrs)
        cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["cubin"]
        path = os.path.join(tempfile.mkdtemp(), "conv.cubin")
        open(path, "wb").write(cubin)
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        USAGE[NAME] = " ".join(line.strip() for line in usage.splitlines() if "REG:" in line)


conv._conv_fwd_kernel, conv._conv_bwd_kernel = Launch(conv._conv_fwd_kernel), Launch(conv._conv_bwd_kernel)
conv._check = lambda *args: None  # meta tensors
USAGE = {}


def channel_last(batch, dim, seqlen, width):
    return torch.empty(batch, seqlen, width, device="meta", dtype=torch.bfloat16)[..., :dim].transpose(1, 2)


w, b = torch.empty(1536, 4, device="meta"), torch.empty(1536, device="meta")
w2, b2 = torch.empty(1792, 4, device="meta"), torch.empty(1792, device="meta")
cases = {
    "mamba1_channel_last": (channel_last(8, 1536, 2048, 3072), w, b),
    "mamba2_channel_last": (channel_last(8, 1792, 2048, 3352), w2, b2),  # a row stride of 3352 = 8 * 419
    "contiguous": (torch.empty(8, 1536, 2048, device="meta", dtype=torch.bfloat16), w, b),
}
for name, (x, weight, bias) in cases.items():
    NAME = "fwd_" + name
    conv.conv1d_forward(x, weight, bias, True, None)
    NAME = "bwd_" + name
    conv.conv1d_backward(x, weight, bias, True, None, torch.empty_like(x))
print(USAGE)
assert len(USAGE) == 2 * len(cases), "a kernel was not launched"
for name, usage in USAGE.items():
    assert "REG:" in usage and "LOCAL:0" in usage and "STACK:0" in usage, f"{name} spills: {usage}"
"""


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter compiles nothing: build the forward and backward kernels (tl.gather included) for Hopper as
    `conv1d_forward` / `conv1d_backward` launch them on the Mamba-1 / Mamba-2 training shapes (channel-last slices
    of the in_proj output, and contiguous x), in a child without TRITON_INTERPRET (Triton's own ptxas, no GPU
    needed): every one compiles, with no local memory (no register spills)."""
    child = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-3000:]


@pytest.mark.parametrize("width,with_seq", [(4, False), (3, True), (2, False)])
def test_forward_continuing_a_conv_state(width, with_seq):
    """conv1d_forward(conv_state=...) (the inference prefill continuing a state) equals the PyTorch path with the
    state, channel-last x and a strided state included."""

    g = torch.Generator().manual_seed(width)
    batch, dim, seqlen = 2, 7, 19
    x = torch.randn(batch, seqlen, dim + 3, generator=g)[..., :dim].transpose(1, 2)
    w = torch.randn(dim, width, generator=g)
    b = torch.randn(dim, generator=g)
    state = torch.randn(batch, width + 2, dim, generator=g)[:, 1:width + 1].transpose(1, 2)  # strided
    seq = torch.tensor([[0] * 5 + [1] * 14, [2] * 19]) if with_seq else None
    ref = causal_conv1d_torch(x.double(), w.double(), b.double(), "silu", state.double(), seq)
    got = conv.conv1d_forward(x, w, b, True, seq, conv_state=state)
    assert rel_err(got, ref) < 1e-6
    # the differentiable entry point without grad takes the same path
    with torch.no_grad():
        again = conv.causal_conv1d_triton_from_state(x, w, b, "silu", state, seq)
    assert torch.equal(again, got)
