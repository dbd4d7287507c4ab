"""Tests of the Triton kernels, run on the CPU interpreter: TRITON_INTERPRET=1 is set here, once, before any test
module of this package imports triton (Triton decides when a kernel is decorated whether it is interpreted; the
ops read the variable at call time)."""
from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _compiled_kernel_modules() -> list:
    """Loaded mambakit modules that define a kernel decorated without TRITON_INTERPRET (imported before it was set:
    those kernels would compile instead of running on the interpreter)."""
    from triton.runtime.jit import JITFunction

    return [m for name, m in list(sys.modules.items()) if name.startswith("mambakit.") and m is not None
            and any(isinstance(v, JITFunction) and getattr(v.fn, "__module__", None) == m.__name__
                    for v in vars(m).values())]


def interpreted_module(name: str):
    """Import `name` with every mambakit kernel interpreted: modules whose kernels were decorated before
    TRITON_INTERPRET was set are imported again (twice, so that each one also picks up its re-imported helpers)."""
    importlib.import_module(name)
    stale = _compiled_kernel_modules()
    for _ in range(2 if stale else 0):
        for m in stale:
            importlib.reload(m)
    return sys.modules[name]


_SM90_CHILD = r"""
import json, os, subprocess, sys, tempfile
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module, kernel, default_ptr, variants = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
for name, (types, consts) in variants.items():
    warps = consts.pop("num_warps", 4)
    sig = {a: "constexpr" if a in consts else types.get(a, default_ptr if a.endswith("_ptr") else "i32")
           for a in fn.arg_names}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]
    except TypeError:
        print("null")
        sys.exit(0)
    path = os.path.join(tempfile.mkdtemp(), name + ".cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    dump = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    out[name] = " ".join(line.strip() for line in dump.splitlines() if "REG:" in line)
print(json.dumps(out))
"""


def sm90_resource_usage(module: str, kernel: str, default_ptr: str, variants: dict):
    """Compile `module.kernel` for Hopper (sm_90, Triton's own ptxas: no GPU needed) in a child without
    TRITON_INTERPRET, once per variant {name: (argument types, constexprs)} (pointers default to default_ptr, other
    arguments to i32; float arguments must be given; a "num_warps" entry of the constexprs, default 4, is the
    launch's), and return {name: cuobjdump's resource-usage line}, or None
    where this Triton's compile API differs."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SM90_CHILD, json.dumps([module, kernel, default_ptr, variants])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
