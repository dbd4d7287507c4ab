"""Run-to-run determinism of the Mamba-3 scans' gradients (issue 23), checked on the CPU: no autograd node whose CUDA
backward adds with atomics (scatter_add_, index_add_, index_put_ with accumulate) in any form's graph; the
segment-start gather of the angles against torch.gather; and the Triton kernels (interpreted) with every output
buffer filled with NaN before the launch, so an entry that no program writes would show."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are (re)loaded: kernels run on the CPU interpreter

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from mambakit.ops.mamba3 import mamba3_scan  # noqa: E402
from mambakit.ops.mamba3.chunked import _AtSegmentStart  # noqa: E402
from mambakit.ops.mamba3.mimo import mamba3_mimo_scan  # noqa: E402
from tests.ops.mamba3.helpers import as_dtype, mimo_inputs, scan_grads, scan_inputs  # noqa: E402
from tests.ops.triton import interpreted_module  # noqa: E402

siso = interpreted_module("mambakit.ops.mamba3.triton")
mimo = interpreted_module("mambakit.ops.mamba3.triton_mimo")

#: Backward nodes whose CUDA kernels accumulate with atomics in an order that changes from run to run.
ATOMIC_BACKWARDS = ("GatherBackward", "IndexSelectBackward", "IndexBackward", "IndexPutBackward",
                    "ScatterAddBackward", "IndexAddBackward", "CummaxBackward", "CumminBackward", "TakeBackward",
                    "PutBackward", "EmbeddingBackward", "RepeatInterleaveBackward")


def _backward_nodes(*outputs: torch.Tensor) -> set:
    seen, names, todo = set(), set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


FORMS = {
    "siso_torch": (lambda **kw: mamba3_scan(**kw, return_final_states=True, chunk_size=8, backend="torch"),
                   False),
    "siso_triton": (lambda **kw: siso.mamba3_scan_triton(**kw, return_final_states=True, chunk_size=16), False),
    "mimo_torch": (lambda **kw: mamba3_mimo_scan(**kw, return_final_states=True, chunk_size=4, backend="torch"),
                   True),
    "mimo_triton": (lambda **kw: mimo.mamba3_mimo_scan_triton(**kw, return_final_states=True, chunk_size=4),
                    True),
}


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("name", sorted(FORMS))
def test_no_atomic_backward_in_graph(name, packed):
    scan, is_mimo = FORMS[name]
    make = mimo_inputs if is_mimo else scan_inputs
    kw = as_dtype(make(batch=2, seqlen=21, nheads=2, ngroups=1, headdim=3, d_state=4, n_angles=2, packed=packed),
                  torch.float32)
    leaves = {n: t.requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for n, t in kw.items()}
    leaves["Input_States"] = tuple(s.requires_grad_(True) for s in kw["Input_States"])
    out = scan(**leaves)
    bad = sorted(n for n in _backward_nodes(*out) if n.rstrip("0123456789") in ATOMIC_BACKWARDS)
    assert not bad, bad


@pytest.mark.parametrize("seed", range(4))
def test_segment_start_gather_matches_torch_gather(seed):
    g = torch.Generator().manual_seed(seed)
    batch, nchunks, Q = 2, 3, 11
    starts = torch.rand(batch, nchunks, Q, generator=g) < 0.3
    starts[0, 0] = False
    starts[1, 1, 0] = True  # a segment starting at a chunk's first position
    first = torch.cummax(torch.where(starts, torch.arange(Q), 0), dim=2).values
    x = torch.randn(batch, nchunks, Q, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    got = _AtSegmentStart.apply(x, first)
    (dx,) = torch.autograd.grad((got * w).sum(), x)
    want = torch.gather(x, 2, first[..., None, None].expand_as(x))
    (dx_want,) = torch.autograd.grad((want * w).sum(), x)
    assert torch.equal(got, want)
    assert torch.allclose(dx, dx_want, rtol=0, atol=1e-12)
    small = x[:1, :2, :, :1].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _AtSegmentStart.apply(t, first[:1, :2]), (small,))


class _Poisoned:
    """A kernel whose launches first fill the tensor arguments at `outputs` (positions) with NaN."""

    def __init__(self, kernel, outputs):
        self.kernel, self.outputs = kernel, outputs

    def __getitem__(self, grid):
        def launch(*args, **kw):
            for i in self.outputs:
                args[i].fill_(float("nan"))
            return self.kernel[grid](*args, **kw)
        return launch


def test_kernels_write_every_output_entry(monkeypatch):
    # the failing GPU case's structure, smaller: several chunks, the last one partial, the backward's headdim in
    # two blocks (the second one padded), d_state padded, packed sequences, initial states
    kw = as_dtype(scan_inputs(batch=2, seqlen=37, nheads=2, ngroups=1, headdim=40, d_state=12, n_angles=3),
                  torch.float32)

    def scan(**k):
        return siso.mamba3_scan_triton(**k, return_final_states=True, chunk_size=16)

    out, want = scan_grads(kw, scan)
    monkeypatch.setattr(siso, "_mamba3_fwd_kernel", _Poisoned(siso._mamba3_fwd_kernel, (7, 8, 9)))
    monkeypatch.setattr(siso, "_mamba3_bwd_kernel", _Poisoned(siso._mamba3_bwd_kernel, (9, 10, 11, 12, 13, 14)))
    out_p, got = scan_grads(kw, scan)
    for a, b in zip(out, out_p):
        assert torch.equal(a, b)
    for n in want:
        assert torch.isfinite(got[n]).all() and torch.equal(got[n], want[n]), n
