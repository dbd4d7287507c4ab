"""Compile the Triton kernels of a first call side by side, in forked processes.

Triton compiles a kernel on its first launch, one kernel after the other, and (Triton 3.6) holds the GIL for most of
a compile, so threads do not overlap them. ``precompile(run)`` calls ``run`` once with every compile of a mambakit
kernel noted instead of done (those launches are skipped, so ``run`` must only write to buffers it allocates), then
compiles the noted kernels in forked child processes, one per kernel, into Triton's on-disk cache. The real launches
that follow load them from there. A child that fails or hangs only costs time: its kernel is then compiled on
launch, as without this.
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, NamedTuple

import torch
import triton

#: Seconds to wait for the children before leaving the rest of the compiles to the launches.
CHILD_TIMEOUT_S: float = 120.0


class CompileRequest(NamedTuple):
    """What Triton needs to compile one specialisation of a kernel (as its cache hook sees it)."""

    kernel: Any  # triton.runtime.jit.JITFunction
    key: str
    signature: dict
    constants: dict
    attrs: dict
    options: dict


@contextmanager
def noting_compiles(module_prefix: str = "mambakit.") -> Iterator[List[CompileRequest]]:
    """Within: in this thread, a kernel of a module under ``module_prefix`` that is not compiled yet is neither
    compiled nor launched; its compile request is appended to the yielded list. Other threads, other kernels and
    kernels already compiled run as usual."""
    from triton import knobs

    noted: List[CompileRequest] = []
    thread = threading.get_ident()
    previous = knobs.runtime.jit_cache_hook

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 (Triton's names)
        if threading.get_ident() == thread and str(fn.module).startswith(module_prefix):
            options = json.loads(compile["specialization_data"])["options"]
            noted.append(CompileRequest(fn.jit_function, str(key), compile["signature"], compile["constants"],
                                        compile["configs"][0], options))
            return True  # skip this compile (and so the launch)
        if previous is not None:
            return previous(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                            already_compiled=already_compiled)
        return None

    knobs.runtime.jit_cache_hook = hook
    try:
        yield noted
    finally:
        knobs.runtime.jit_cache_hook = previous


def _compile(request: CompileRequest, target: Any) -> None:
    """Compile one request for target into Triton's cache (what JITFunction does on a first launch)."""
    from triton.compiler import ASTSource, make_backend

    options = {k: tuple(v) if isinstance(v, list) else v for k, v in request.options.items()}
    options = make_backend(target).parse_options(options)
    source = ASTSource(request.kernel, request.signature, request.constants, request.attrs)
    triton.compile(source, target=target, options=options.__dict__)


def compile_in_children(requests: List[CompileRequest], target: Any, timeout_s: float = CHILD_TIMEOUT_S) -> int:
    """Compile each request in its own forked child (at most os.cpu_count() at a time) into Triton's on-disk cache.
    Returns how many children succeeded. Children do not touch the GPU (compiling needs only the target)."""
    unique = list({(id(r.kernel), r.key): r for r in requests}.values())
    running: dict = {}
    done = 0
    deadline = time.monotonic() + timeout_s
    slots = max(1, os.cpu_count() or 1)
    pending = list(unique)
    while pending or running:
        while pending and len(running) < slots:
            request = pending.pop(0)
            with warnings.catch_warnings():  # "multi-threaded process: fork() may deadlock": hence the timeout
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    _compile(request, target)
                    code = 0
                finally:
                    os._exit(code)
            running[pid] = request
        finished = []
        for pid in running:
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped:
                finished.append((pid, status))
        for pid, status in finished:
            done += os.waitstatus_to_exitcode(status) == 0
            del running[pid]
        if not finished:
            if time.monotonic() > deadline:
                for pid in running:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                return done
            time.sleep(0.005)
    return done


#: Compile first calls side by side (False: one kernel after the other, on first launch, as Triton does by itself).
ENABLED: bool = True
_DONE: set = set()


def specialisation(*values: Any) -> tuple:
    """What Triton specialises a kernel on, of these integers and tensors (== 1 and divisible by 16; a tensor's
    strides and its address): a key under which new lengths and batch sizes do not count as new."""
    flags = []
    for v in values:
        ints = [*v.stride(), v.data_ptr()] if isinstance(v, torch.Tensor) else [int(v)]
        flags += [(i == 1, i % 16 == 0) for i in ints]
    return tuple(flags)


def precompile_once(key: Any, run: Callable[[], Any]) -> None:
    """Once per key: `precompile(run)`. Skipped when disabled and when Triton interprets kernels (nothing to
    compile; run would just repeat the work)."""
    if not ENABLED or key in _DONE or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    _DONE.add(key)
    precompile(run)


def precompile(run: Callable[[], Any]) -> int:
    """Note the compiles that ``run()`` would do (skipping those launches), then do them in parallel children.
    Returns the number of kernels compiled that way (0 where fork is unavailable)."""
    if not hasattr(os, "fork"):
        return 0
    with noting_compiles() as requests:
        run()
    if not requests:
        return 0
    target = triton.runtime.driver.active.get_current_target()
    return compile_in_children(requests, target)
