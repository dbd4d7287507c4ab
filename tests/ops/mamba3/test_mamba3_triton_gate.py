"""The SSD form's fused skip + gate kernels (mambakit.ops.mamba3.triton_gate) against PyTorch in float64, forward and
every gradient, on the CPU interpreter: with and without the gate, odd head dims, strided gates and upstream
gradients, 16-bit outputs, non-finite values kept to their own rows."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are (re)loaded: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.conftest import rel_err  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

kernels = interpreted_module("mambakit.ops.mamba3.triton_gate")


def _reference(y, v, diag, z):
    out = y + diag[..., None] * v
    return out if z is None else out * F.silu(z)


def _inputs(batch, seqlen, nheads, headdim, gate, seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    z = randn(batch, seqlen, nheads, 2 * headdim)[..., headdim:] if gate else None  # a strided view, as in a layer
    return randn(batch, seqlen, nheads, headdim), randn(batch, seqlen, nheads, headdim), randn(batch, seqlen, nheads), z


@pytest.mark.parametrize("shape", [dict(batch=2, seqlen=9, nheads=3, headdim=5), dict(batch=1, seqlen=40, nheads=2,
                                                                                        headdim=16)])
@pytest.mark.parametrize("gate", [True, False])
def test_forward_and_gradients_match_pytorch(shape, gate):
    args64 = _inputs(**shape, gate=gate, seed=shape["headdim"])
    leaves64 = [a.clone().requires_grad_(True) if a is not None else None for a in args64]
    leaves32 = [a.detach().float().requires_grad_(True) if a is not None else None for a in args64]
    ref = _reference(*leaves64)
    out = kernels.skip_gate(*leaves32, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == ref.shape and rel_err(out, ref) < 1e-6
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w_strided = torch.cat((w, w), dim=-1)[..., : ref.shape[-1]]  # an upstream gradient with other strides
    used = [i for i, a in enumerate(leaves64) if a is not None]
    grads_ref = torch.autograd.grad((ref * w).sum(), [leaves64[i] for i in used])
    grads = torch.autograd.grad(out, [leaves32[i] for i in used], grad_outputs=w_strided.float())
    for i, a, b in zip(used, grads, grads_ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5, ("y", "v", "diag", "z")[i]


def test_half_output_and_non_finite_rows():
    y, v, diag, z = (t.float() for t in _inputs(batch=1, seqlen=6, nheads=2, headdim=4, gate=True, seed=3))
    out = kernels.skip_gate(y, v, diag, z.to(torch.bfloat16), out_dtype=torch.bfloat16)
    ref = _reference(y.double(), v.double(), diag.double(), z.to(torch.bfloat16).double())
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    y[0, 2, 1, 0] = float("nan")
    out = kernels.skip_gate(y, v, diag, z, out_dtype=torch.float32)
    bad = ~torch.isfinite(out)
    assert bad[0, 2, 1, 0] and bad.sum() == 1


@pytest.mark.parametrize("with_d", [True, False])
def test_correction_formed_in_the_kernel(with_d):
    """diag = qk * corr + D[head] in the kernel: forward and the gradients of qk, corr and D."""
    y, v, qk, z = _inputs(batch=2, seqlen=11, nheads=3, headdim=6, gate=True, seed=7)
    g = torch.Generator().manual_seed(8)
    corr = torch.randn(qk.shape, generator=g, dtype=torch.float64)
    D = torch.randn(3, generator=g, dtype=torch.float64) if with_d else None
    args64 = [y, v, qk, z, corr, D]
    leaves64 = [a.clone().requires_grad_(True) if a is not None else None for a in args64]
    leaves32 = [a.detach().float().requires_grad_(True) if a is not None else None for a in args64]
    y6, v6, qk6, z6, c6, D6 = leaves64
    ref = _reference(y6, v6, qk6 * c6 + (D6 if D6 is not None else 0.0), z6)
    y3, v3, qk3, z3, c3, D3 = leaves32
    out = kernels.skip_gate(y3, v3, qk3, z3, out_dtype=torch.float32, corr=c3, D=D3)
    assert rel_err(out, ref) < 1e-6
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    used = [i for i, a in enumerate(leaves64) if a is not None]
    grads_ref = torch.autograd.grad((ref * w).sum(), [leaves64[i] for i in used])
    grads = torch.autograd.grad((out * w.float()).sum(), [leaves32[i] for i in used])
    for i, a, b in zip(used, grads, grads_ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5, ("y", "v", "qk", "z", "corr", "D")[i]
