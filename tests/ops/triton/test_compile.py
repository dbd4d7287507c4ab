"""Parallel first-call compiles (mambakit.ops.triton.compile) without a GPU: the cache hook notes only this
thread's mambakit kernels, and forked children compile a noted kernel for an H100 into Triton's on-disk cache."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import pytest

triton = pytest.importorskip("triton")

from mambakit.ops.triton.compile import noting_compiles


def _call_hook(module: str) -> object:
    from triton import knobs

    compile_args = {"specialization_data": '{"options": {"num_warps": 4}}', "signature": {"x": "i32"},
                    "constants": {}, "configs": [{}]}
    return knobs.runtime.jit_cache_hook(key="k", repr="r", fn=SimpleNamespace(module=module, jit_function="kernel"),
                                        compile=compile_args, is_manual_warmup=False, already_compiled=False)


def test_noting_compiles_takes_only_this_threads_mambakit_kernels():
    from triton import knobs

    before = knobs.runtime.jit_cache_hook
    with noting_compiles() as noted:
        assert _call_hook("mambakit.ops.triton.ssd") is True  # skipped: noted instead
        assert not _call_hook("somebody.else")  # compiled as usual
        other = []
        thread = threading.Thread(target=lambda: other.append(_call_hook("mambakit.ops.triton.ssd")))
        thread.start()
        thread.join()
        assert not other[0]  # another thread's compile goes ahead
    assert knobs.runtime.jit_cache_hook is before
    assert len(noted) == 1 and noted[0].kernel == "kernel" and noted[0].options == {"num_warps": 4}


CHILD_SCRIPT = textwrap.dedent("""
    import glob, os, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from mambakit.ops.triton.compile import CompileRequest, _in_disk_cache, compile_in_children

    @triton.jit
    def scale(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)

    requests = [CompileRequest(scale, "key", {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {(2,): 64}, {},
                               {"num_warps": 4, "num_stages": 2})]
    target = GPUTarget("cuda", 90, 32)
    before = _in_disk_cache(requests[0], target)
    done = compile_in_children(requests + requests, target)  # the duplicate is compiled once
    cubins = glob.glob(os.path.join(os.environ["TRITON_CACHE_DIR"], "*", "scale.cubin"))
    after = _in_disk_cache(requests[0], target)
    print("compiled", done, "cubins", len(cubins), "cached before", before, "after", after)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_children_compile_into_the_cache_and_the_parent_sees_it_there(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    script = tmp_path / "compile_scale.py"
    script.write_text(CHILD_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "compiled 1 cubins 1 cached before False after True" in run.stdout, run.stdout + run.stderr[-2000:]


def test_a_first_call_inside_another_is_left_to_it(monkeypatch):
    from mambakit.ops.triton import compile as triton_compile

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # precompile_once does nothing while kernels are interpreted
    ran = []
    with noting_compiles():
        triton_compile.precompile_once(("test", "nested"), lambda: ran.append(1))
    assert not ran and ("test", "nested") in triton_compile._DONE  # the enclosing run notes its compiles
    triton_compile._DONE.discard(("test", "nested"))


def test_a_lent_graph_task_notes_its_compiles_in_any_thread_and_no_other_task_does():
    import torch

    from mambakit.ops.triton.compile import _graph_task

    results = []

    class Launch(torch.autograd.Function):  # its backward "launches" a kernel not compiled yet
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            results.append(bool(_call_hook("mambakit.ops.triton.ssd")))
            return grad * 2

    def backward_passes(note):  # in another thread, as a CUDA backward runs in autograd's own thread
        x = torch.ones(2, requires_grad=True)
        lent = Launch.apply(x).sum()
        lent.register_hook(lambda grad: note.graph_tasks.add(_graph_task()))
        torch.autograd.grad(lent, [x])
        torch.autograd.grad(Launch.apply(x).sum(), [x])  # another graph task

    with noting_compiles() as noted:
        thread = threading.Thread(target=backward_passes, args=(noted,))
        thread.start()
        thread.join()
    assert results == [True, False] and len(noted) == 1


def test_a_failing_dry_run_does_not_fail_the_call():
    from mambakit.ops.triton import compile as triton_compile

    def run():
        raise ValueError("computed on a skipped launch's unset output")

    assert triton_compile.precompile(run) == 0  # nothing noted, nothing compiled, nothing raised
