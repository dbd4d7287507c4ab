"""Issue 21, class 8: the Python API refuses bad arguments with a MambaKitError naming the argument, the expected and
the actual value: the mixers (wrong width, 2-D input, empty sequence, another dtype or device, lists and numpy
arrays, bad masks and seq_idx) and the public ops (non-tensors, grouped B with ungrouped C, backend='triton' on a CPU
tensor outside the interpreter, dt_limit with NaN)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mambakit import MambaKitError
from mambakit.layers.mamba import Mamba
from mambakit.layers.mamba2 import Mamba2
from mambakit.layers.mamba3 import Mamba3
from mambakit.ops.conv1d import causal_conv1d_fn, causal_conv1d_update
from mambakit.ops.mamba3 import mamba3_scan
from mambakit.ops.norm import add_rms_norm, rms_norm, rms_norm_gated
from mambakit.ops.selective_scan import selective_scan_fn, selective_state_update
from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd_step

LAYERS = {
    "Mamba": lambda: Mamba(d_model=16, d_state=4),
    "Mamba2": lambda: Mamba2(d_model=16, d_state=8, headdim=8),
    "Mamba3": lambda: Mamba3(d_model=16, d_state=8, headdim=8),
}

OK = torch.randn(2, 5, 16)
BAD_INPUTS = [  # (name, hidden_states, keyword arguments, words of the message)
    ("width 15", torch.randn(2, 5, 15), {}, r"d_model=16\), got \(2, 5, 15\)"),
    ("width 17", torch.randn(2, 5, 17), {}, r"d_model=16\), got \(2, 5, 17\)"),
    ("2-D", torch.randn(5, 16), {}, r"\(batch, seqlen, d_model=16\), got \(5, 16\)"),
    ("4-D", torch.randn(1, 2, 5, 16), {}, r"got \(1, 2, 5, 16\)"),
    ("seqlen 0", torch.randn(2, 0, 16), {}, r"seqlen >= 1\), got shape \(2, 0, 16\)"),
    ("batch 0", torch.randn(0, 5, 16), {}, r"got shape \(0, 5, 16\)"),
    ("float64", OK.double(), {}, r"layer's dtype torch.float32.*got torch.float64"),
    ("bfloat16", OK.bfloat16(), {}, r"layer's dtype torch.float32.*got torch.bfloat16"),
    ("int", torch.zeros(2, 5, 16, dtype=torch.long), {}, "floating tensor, got dtype torch.int64"),
    ("list", OK.tolist(), {}, "hidden_states must be a torch.Tensor, got list"),
    ("numpy", OK.numpy(), {}, "hidden_states must be a torch.Tensor, got ndarray"),
    ("mask shape", OK, {"mask": torch.ones(2, 4)}, r"mask must have shape \(batch=2, seqlen=5\), got \(2, 4\)"),
    ("mask 2", OK, {"mask": torch.full((2, 5), 2)}, "mask must hold only 0"),
    ("mask 0.5", OK, {"mask": torch.full((2, 5), 0.5)}, "mask must hold only 0"),
    ("mask nan", OK, {"mask": torch.full((2, 5), float("nan"))}, "mask must hold only 0"),
    ("mask list", OK, {"mask": [[1] * 5] * 2}, "mask must be a torch.Tensor, got list"),
    ("seq_idx shape", OK, {"seq_idx": torch.zeros(2, 6, dtype=torch.long)}, r"seq_idx must have shape"),
    ("seq_idx float", OK, {"seq_idx": torch.zeros(2, 5)}, "seq_idx must be an integer tensor"),
    ("seq_idx numpy", OK, {"seq_idx": np.zeros((2, 5), dtype=np.int64)}, "seq_idx must be a torch.Tensor"),
]


@pytest.fixture(scope="module", params=list(LAYERS))
def layer(request):
    torch.manual_seed(0)
    return LAYERS[request.param]()


@pytest.mark.parametrize("name, x, kwargs, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_mixer_refuses(layer, name, x, kwargs, words):
    with pytest.raises(MambaKitError, match=words):
        layer(x, **kwargs)


def test_mixer_accepts_good_inputs(layer):
    assert layer(OK).shape == OK.shape
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    assert torch.isfinite(layer(OK, mask=mask)).all()
    assert layer(OK, mask=mask.float(), seq_idx=torch.zeros(2, 5, dtype=torch.int32)).shape == OK.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another input dtype is fine under autocast
        assert layer(OK.bfloat16()).shape == OK.shape
    assert layer.double()(OK.double()).dtype == torch.float64
    layer.float()


b, L, h, p, g, n, d = 1, 8, 2, 3, 1, 4, 4
x, dt, A = torch.randn(b, L, h, p), torch.rand(b, L, h), -torch.rand(h)
B, C = torch.randn(b, L, g, n), torch.randn(b, L, g, n)
u, delta, As = torch.randn(b, d, L), torch.rand(b, d, L), -torch.rand(d, n)
Bs, Cs = torch.randn(b, n, L), torch.randn(b, n, L)
w = torch.randn(d, 4)

OPS = [  # (name, call, words)
    ("ssd x list", lambda: mamba_chunk_scan_combined(x.tolist(), dt, A, B, C, 4), "x must be a torch.Tensor"),
    ("ssd B numpy", lambda: mamba_chunk_scan_combined(x, dt, A, B.numpy(), C, 4), "B must be a torch.Tensor"),
    ("ssd grouped B, ungrouped C", lambda: mamba_chunk_scan_combined(x, dt, A, torch.randn(b, L, 2, n), C, 4),
     r"C must have shape \(batch=1, seqlen=8, ngroups=2, d_state=4\)"),
    ("ssd triton on cpu", lambda: mamba_chunk_scan_combined(x, dt, A, B, C, 4, backend="triton"),
     "backend='triton' needs CUDA tensors"),
    ("ssd dt_limit nan", lambda: mamba_chunk_scan_combined(x, dt, A, B, C, 4, dt_limit=(float("nan"), 1.0)),
     r"dt_limit must be .*got \(nan, 1.0\)"),
    ("ssd dt_limit nan high", lambda: mamba_chunk_scan_combined(x, dt, A, B, C, 4, dt_limit=(0.0, float("nan"))),
     "dt_limit"),
    ("ssd dt_limit reversed", lambda: mamba_chunk_scan_combined(x, dt, A, B, C, 4, dt_limit=(2.0, 1.0)), "dt_limit"),
    ("ssd chunk 2.5", lambda: mamba_chunk_scan_combined(x, dt, A, B, C, 2.5), "chunk_size must be a positive int"),
    ("ssd_step list", lambda: ssd_step(torch.zeros(b, h, p, n).tolist(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0]),
     "state must be a torch.Tensor"),
    ("ssd_step triton on cpu",
     lambda: ssd_step(torch.zeros(b, h, p, n), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], backend="triton"),
     "needs CUDA tensors"),
    ("scan u list", lambda: selective_scan_fn(u.tolist(), delta, As, Bs, Cs), "u must be a torch.Tensor, got list"),
    ("scan u numpy", lambda: selective_scan_fn(u.numpy(), delta, As, Bs, Cs), "u must be a torch.Tensor, got ndarray"),
    ("scan D list", lambda: selective_scan_fn(u, delta, As, Bs, Cs, D=[1.0] * d), "D must be a torch.Tensor"),
    ("scan B groups not dividing dim", lambda: selective_scan_fn(u, delta, As, torch.randn(b, 3, n, L), Cs),
     r"B must have shape .*groups dividing dim=4"),
    ("scan time-invariant C of the wrong shape", lambda: selective_scan_fn(u, delta, As, Bs, torch.randn(d, n + 1)),
     r"C must have shape .*time-invariant \(dim=4, d_state=4\)"),
    ("scan triton on cpu", lambda: selective_scan_fn(u, delta, As, Bs, Cs, backend="triton"), "needs CUDA tensors"),
    ("scan backend", lambda: selective_scan_fn(u, delta, As, Bs, Cs, backend="cuda"), "backend must be one of"),
    ("state update list", lambda: selective_state_update(torch.zeros(b, d, n).tolist(), u[..., 0], delta[..., 0],
                                                         As, Bs[..., 0], Cs[..., 0]), "state must be a torch.Tensor"),
    ("state update grouped B",
     lambda: selective_state_update(torch.zeros(b, d, n), u[..., 0], delta[..., 0], As, torch.randn(b, 2, n),
                                    Cs[..., 0]), "C must have shape"),
    ("conv x list", lambda: causal_conv1d_fn(u.tolist(), w), "x must be a torch.Tensor"),
    ("conv weight numpy", lambda: causal_conv1d_fn(u, w.numpy()), "weight must be a torch.Tensor"),
    ("conv 2-D x", lambda: causal_conv1d_fn(u[0], w), r"x must have shape \(batch, dim, seqlen\), got \(4, 8\)"),
    ("conv update list", lambda: causal_conv1d_update(u[..., 0].tolist(), torch.zeros(b, d, 4), w),
     "x must be a torch.Tensor"),
    ("rms_norm list", lambda: rms_norm(u.tolist(), torch.ones(L), 1e-5), "x must be a torch.Tensor"),
    ("rms_norm_gated z numpy", lambda: rms_norm_gated(u, u.numpy(), torch.ones(L), 1e-5), "z must be a torch.Tensor"),
    ("add_rms_norm list", lambda: add_rms_norm(u.tolist(), None, torch.ones(L), 1e-5, False),
     "hidden must be a torch.Tensor"),
    ("mamba3 list", lambda: mamba3_scan(*([[1.0]] * 9)), "must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, call, words", OPS, ids=[o[0] for o in OPS])
def test_public_op_refuses(monkeypatch, name, call, words):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # backend='triton' on a CPU tensor outside the interpreter
    with pytest.raises(MambaKitError, match=words):
        call()
