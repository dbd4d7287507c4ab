"""A layer's first-call dry run (mambakit.ops.triton.compile.module_first_call): it runs the layer's forward and
backward without touching the real parameters' gradients, hooks or the caller's graph; it stays out of the way of
hooks; its key changes with what changes the kernels."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # as in every Triton test here, before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mambakit.layers.first_call import compile_first_call  # noqa: E402
from mambakit.layers.mamba import Mamba  # noqa: E402
from mambakit.layers.mamba2 import Mamba2  # noqa: E402
from mambakit.ops.triton import compile as triton_compile  # noqa: E402


def _layers():
    torch.manual_seed(0)
    return [Mamba2(d_model=16, d_state=4, headdim=8, chunk_size=8), Mamba(d_model=16, d_state=4)]


@pytest.mark.parametrize("layer", _layers(), ids=["mamba2", "mamba"])
def test_dry_run_calls_forward_and_backward_and_leaves_grads_alone(layer, monkeypatch):
    calls = []
    forward = type(layer).forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(layer), "forward", counted)
    grads = []
    autograd_grad = torch.autograd.grad

    def noted_grad(outputs, inputs, *args, **kwargs):
        result = autograd_grad(outputs, inputs, *args, **kwargs)
        grads.append(sum(g is not None for g in result))
        return result

    monkeypatch.setattr(torch.autograd, "grad", noted_grad)
    x = torch.randn(2, 11, 16, requires_grad=True)
    seen = []
    for p in layer.parameters():
        p.register_hook(lambda g: seen.append(g))
    triton_compile.module_first_call(layer, x, seq_idx=None, mask=None)()
    assert calls == [True] and grads == [len(list(layer.parameters())) + 1]  # a backward into x and every weight
    assert all(p.grad is None for p in layer.parameters()) and x.grad is None and not seen
    with torch.no_grad():
        triton_compile.module_first_call(layer, x, seq_idx=None, mask=None)()
    assert calls == [True, False]


def test_dry_run_stays_out_of_the_way_of_hooks():
    layer = _layers()[0]
    x = torch.randn(1, 5, 16)
    seen = []
    handle = layer.out_proj.register_forward_hook(lambda m, i, o: seen.append(o))
    triton_compile.module_first_call(layer, x, seq_idx=None, mask=None)()
    assert not seen  # a submodule's hook: not run


@pytest.mark.parametrize("layer", _layers(), ids=["mamba2", "mamba"])
def test_no_dry_run_with_a_dt_transform(layer, monkeypatch):
    # the layer itself skips its first-call dry run while a dt transform applies (it would run the transform twice)
    module = __import__(type(layer).__module__, fromlist=["compile_first_call"])
    dry_runs = []
    monkeypatch.setattr(module, "compile_first_call", lambda *args: dry_runs.append(args))
    x = torch.randn(1, 5, 16)
    layer(x)
    assert len(dry_runs) == 1
    with layer.transforming_dt(lambda dt: dt * 2):
        layer(x)
    layer(x, dt_transform=lambda dt: dt * 2)
    assert len(dry_runs) == 1


def test_key_follows_what_changes_the_kernels():
    layer = _layers()[0]
    x = torch.randn(2, 16, 16)
    key = triton_compile.module_call_key(layer, x, None, None)
    assert key == triton_compile.module_call_key(layer, torch.randn(4, 32, 16), None, None)  # new sizes, same flags
    assert key != triton_compile.module_call_key(layer, torch.randn(4, 33, 16), None, None)  # seqlen % 16 differs
    assert key != triton_compile.module_call_key(layer, x.double(), None, None)
    assert key != triton_compile.module_call_key(layer, x, torch.zeros(2, 16, dtype=torch.int32), None)
    with torch.no_grad():
        assert key != triton_compile.module_call_key(layer, x, None, None)
    other = Mamba2(d_model=16, d_state=4, headdim=8, chunk_size=16)
    assert key != triton_compile.module_call_key(other, x, None, None)


def test_nothing_happens_on_the_cpu(monkeypatch):
    layer = _layers()[0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as if kernels were compiled: still nothing to do off CUDA
    monkeypatch.setattr(triton_compile, "precompile", lambda run: pytest.fail("precompile on CPU tensors"))
    compile_first_call(layer, torch.randn(1, 4, 16), None, None)


def test_repeated_calls_skip_the_full_key():
    # the full first-call key walks the module (tens of us a call on the training step's host): built again only
    # when the call's signature changes (grad mode, dtype, shape's specialisation, optional inputs)
    from mambakit.ops.first_call import precompile_call

    layer = _layers()[0]
    keys, runs = [], []
    module_call_key = triton_compile.module_call_key

    class Compile:  # the compile module's surface that precompile_call uses, counted
        specialisation = staticmethod(triton_compile.specialisation)
        module_first_call = staticmethod(triton_compile.module_first_call)

        @staticmethod
        def module_call_key(*args):
            keys.append(module_call_key(*args))
            return keys[-1]

        @staticmethod
        def precompile_once(key, run):
            runs.append(key)

    x = torch.randn(2, 11, 16)
    for _ in range(3):
        precompile_call(Compile, layer, x, None, None)
    assert len(keys) == 1 and runs == keys
    with torch.no_grad():
        precompile_call(Compile, layer, x, None, None)
    precompile_call(Compile, layer, x, torch.zeros(2, 11, dtype=torch.long), None)
    precompile_call(Compile, layer, torch.randn(3, 11, 16), torch.zeros(3, 11, dtype=torch.long), None)  # as batch 2
    precompile_call(Compile, layer, torch.randn(3, 16, 16), torch.zeros(3, 16, dtype=torch.long), None)  # seqlen 16
    assert len(keys) == 4 and len(set(keys)) == 4 and runs == keys
    precompile_call(Compile, _layers()[0], x, None, None)  # another module: its own first call
    assert len(keys) == 5
