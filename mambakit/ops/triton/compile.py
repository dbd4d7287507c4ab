"""Compile the Triton kernels of a first call side by side, in forked processes.

Triton compiles a kernel on its first launch, one kernel after the other, and (Triton 3.6) holds the GIL for most of
a compile, so threads do not overlap them. ``precompile(run)`` calls ``run`` once with every compile of a mambakit
kernel noted instead of done (those launches are skipped, so ``run`` must only write to buffers it allocates), then
compiles the noted kernels in forked child processes, one per kernel, into Triton's on-disk cache. The real launches
that follow load them from there. A child that fails or hangs only costs time: its kernel is then compiled on
launch, as without this.

Each child also builds the kernel's launcher (Triton 3.6 compiles a small C module per kernel signature with the host
compiler on first launch, and caches it on disk too). Kernels already in the on-disk cache get no child.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, NamedTuple, Optional

import torch
import triton

from mambakit.ops.triton.device import interpreted

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


class _Note(list):
    """The compile requests of one open `noting_compiles`: those of its thread, and those of the autograd graph
    tasks lent to it (a CUDA backward runs in an autograd engine thread, which may run other graph tasks too)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.graph_tasks: set = set()

    def takes_this_call(self) -> bool:
        return threading.get_ident() == self.thread or (
            bool(self.graph_tasks) and _graph_task() in self.graph_tasks)


def _graph_task() -> int:
    """The id of the autograd graph task running here (-1: none, or this torch does not tell)."""
    return torch._C._current_graph_task_id() if hasattr(torch._C, "_current_graph_task_id") else -1


_OPEN: List[_Note] = []  # open notes, innermost last


def _open_note() -> Optional[_Note]:
    """The innermost open note that takes this thread's (or this graph task's) calls, or None."""
    return next((note for note in reversed(_OPEN) if note.takes_this_call()), None)


@contextmanager
def noting_compiles(module_prefix: str = "mambakit.") -> Iterator[List[CompileRequest]]:
    """Within: in this thread (and in the autograd graph tasks lent to it, see `module_first_call`), a kernel of a
    module under ``module_prefix`` that is not compiled yet is neither compiled nor launched; its compile request is
    appended to the yielded list. Other threads, other kernels and kernels already compiled run as usual."""
    from triton import knobs

    noted = _Note()
    previous = knobs.runtime.jit_cache_hook

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 (Triton's names)
        if noted.takes_this_call() and str(fn.module).startswith(module_prefix):
            options = json.loads(compile["specialization_data"])["options"]
            noted.append(CompileRequest(fn.jit_function, str(key), compile["signature"], compile["constants"],
                                        compile["configs"][0], options))
            return True  # skip this compile (and so the launch)
        if previous is not None:
            return previous(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                            already_compiled=already_compiled)
        return None

    knobs.runtime.jit_cache_hook = hook
    _OPEN.append(noted)
    try:
        yield noted
    finally:
        _OPEN.remove(noted)
        knobs.runtime.jit_cache_hook = previous


def _source_and_options(request: CompileRequest, target: Any) -> tuple:
    from triton.compiler import ASTSource, make_backend

    options = {k: tuple(v) if isinstance(v, list) else v for k, v in request.options.items()}
    backend = make_backend(target)
    source = ASTSource(request.kernel, request.signature, request.constants, request.attrs)
    return source, backend, backend.parse_options(options)  # as JITFunction passes them to triton.compile


def _compile(request: CompileRequest, target: Any) -> None:
    """Compile one request for target into Triton's cache, and build its launcher (what a first launch does,
    short of loading the kernel onto the GPU)."""
    source, _, options = _source_and_options(request, target)
    kernel = triton.compile(source, target=target, options=options.__dict__)
    try:  # a launcher needs no GPU to be built; where this fails the first launch builds it
        triton.runtime.driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001 (only time is at stake)
        pass


def _in_disk_cache(request: CompileRequest, target: Any) -> bool:
    """Whether Triton's on-disk cache already holds this compile (the lookup triton.compile starts with). False
    where this Triton's internals differ: the request then just gets its child."""
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        from triton.runtime.cache import get_cache_key, get_cache_manager

        source, backend, options = _source_and_options(request, target)
        options = backend.parse_options(dict(options.__dict__, **source.parse_options()))  # as triton.compile does
        key = get_cache_key(source, backend, options, env_vars=get_cache_invalidating_env_vars())
        manager = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest())
        name = f"{source.name[:150]}.json"
        return name in (manager.get_group(name) or {})
    except Exception:  # noqa: BLE001
        return False


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
    if not ENABLED or key in _DONE or interpreted():
        return
    _DONE.add(key)
    if _open_note() is not None:  # within an enclosing first call's run: its note of compiles takes these in
        return
    precompile(run)


def precompile(run: Callable[[], Any]) -> int:
    """Note the compiles that ``run()`` would do (skipping those launches), then do them in parallel children.
    An exception in ``run`` ends it early (what it noted is still compiled); the real call that follows raises it
    again if it is real. Returns the number of kernels compiled that way (0 where fork is unavailable)."""
    if not hasattr(os, "fork"):
        return 0
    with noting_compiles() as requests:
        try:
            run()
        except Exception:  # noqa: BLE001 (it ran on the skipped launches' unset outputs; a real error recurs later)
            pass
    if not requests:
        return 0
    target = triton.runtime.driver.active.get_current_target()
    return compile_in_children([r for r in requests if not _in_disk_cache(r, target)], target)


def module_first_call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Callable[[], None]:
    """A ``run`` for `precompile_once`: ``module(*args, **kwargs)`` and, where autograd records it, a backward
    through it, on detached copies of its parameters and tensor inputs, so that no ``.grad``, parameter hook or
    outer autograd graph is touched. A module with forward hooks (here or below) is not run (the hooks would see the
    extra call): its ops then compile their own first calls."""

    def run() -> None:
        if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
            return
        if not torch.is_grad_enabled():
            module(*args, **kwargs)
            return

        def leaf(v: Any) -> Any:
            return v.detach().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point() else v

        params = {name: leaf(p) for name, p in module.named_parameters()}
        args_, kwargs_ = [leaf(a) for a in args], {k: leaf(v) for k, v in kwargs.items()}
        out = torch.func.functional_call(module, params, tuple(args_), kwargs_)
        inputs = [t for t in (*params.values(), *args_, *kwargs_.values()) if torch.is_tensor(t) and t.requires_grad]
        if torch.is_tensor(out) and out.requires_grad and inputs:
            note = _open_note()
            if note is not None:  # the backward's graph task notes its compiles too, in whatever thread it runs
                out.register_hook(lambda grad: note.graph_tasks.add(_graph_task()))
            try:  # a materialised upstream gradient, given through a product: grad_outputs imports sympy (slow)
                torch.autograd.grad((out * torch.empty_like(out)).sum(), inputs, allow_unused=True)
            finally:
                if note is not None:
                    note.graph_tasks.clear()

    return run


def module_call_key(module: torch.nn.Module, hidden_states: torch.Tensor, *optional: Any) -> tuple:
    """A first-call key for a mixer layer: its type, its plain settings (sizes, flags) and parameters (shape, dtype,
    requires_grad), the input's dtype and Triton specialisation, autocast and grad mode, which optional inputs are
    given. (A key that says too little only costs a skipped first-call compile: the ops then compile their own.)"""
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    settings = tuple((k, v) for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, tuple)))
    params = tuple((p.shape, p.dtype, p.requires_grad) for p in module.parameters())
    return (type(module), settings, params, hidden_states.dtype, autocast, torch.is_grad_enabled(),
            tuple(o is None for o in optional), hidden_states.device,
            specialisation(*hidden_states.shape[:-1], hidden_states))
