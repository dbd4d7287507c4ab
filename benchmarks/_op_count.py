"""Host ops of one call: the torch ops dispatched (a TorchDispatchMode) and the Triton kernel launches (the kernels'
`run`, patched), each counted once. What a launch does inside (the interpreter's own tensor copies) is not counted.

    with OpCounter() as c:
        out = f(x); out.backward(g)
    c.torch_ops, c.launches, c.by_name

Runs anywhere; on the CPU the Triton kernels need TRITON_INTERPRET=1 (set before triton is imported).
OpCounter(skip_launches=True) counts the launches without running them (measurement only: their outputs keep
torch.empty's garbage), which makes counting a whole block or LM step fast under the interpreter.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _kernel_classes() -> list[type]:
    """The classes whose `run` launches a Triton kernel: the compiled JITFunction and the interpreter's."""
    classes = []
    from triton.runtime.jit import JITFunction
    classes.append(JITFunction)
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover (older Triton)
        pass
    return classes


#: aten ops that launch no GPU kernel: views and other metadata, allocations, dtype queries
NO_KERNEL = frozenset({"view", "_unsafe_view", "slice", "select", "transpose", "t", "permute", "unsqueeze", "squeeze",
                       "expand", "as_strided", "split", "split_with_sizes", "unbind", "alias", "detach", "empty",
                       "empty_like", "empty_strided", "promote_types", "result_type", "_reshape_alias", "unfold"})


class OpCounter(TorchDispatchMode):
    """Counts torch ops (by aten name, `by_name["aten.x"]`) and Triton launches (by kernel name, `by_name["triton
    name"]`) while active. Ops run by a launch itself are not counted; with skip_launches the launches return at
    once instead of running."""

    def __init__(self, skip_launches: bool = False) -> None:
        super().__init__()
        self.skip_launches = skip_launches
        self.by_name: Counter = Counter()
        self.torch_ops = 0
        self.launches = 0
        self._inside_launch = 0
        self._saved: list[tuple[type, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if not self._inside_launch:
            self.torch_ops += 1
            self.by_name[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    def _patch(self) -> None:
        counter = self
        for cls in _kernel_classes():
            original = cls.run

            def run(kernel, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if counter._inside_launch:
                    return _original(kernel, *args, **kwargs)
                counter.launches += 1
                fn = getattr(kernel, "fn", kernel)
                counter.by_name["triton " + getattr(fn, "__name__", "?")] += 1
                if counter.skip_launches:
                    return None
                counter._inside_launch += 1
                try:
                    return _original(kernel, *args, **kwargs)
                finally:
                    counter._inside_launch -= 1

            self._saved.append((cls, original))
            cls.run = run

    def __enter__(self) -> "OpCounter":
        self._patch()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Optional[bool]:
        try:
            return super().__exit__(*exc)
        finally:
            for cls, original in reversed(self._saved):
                cls.run = original
            self._saved.clear()

    @property
    def kernel_ops(self) -> int:
        """The torch ops counted that run a kernel on the GPU (not in NO_KERNEL), plus the Triton launches."""
        return sum(n for name, n in self.by_name.items() if name.split(".")[0] not in NO_KERNEL)

    def table(self) -> str:
        """The counts by name, most first."""
        return "\n".join(f"{n:5d}  {name}" for name, n in self.by_name.most_common())


@contextlib.contextmanager
def launches_skipped():
    """Measurement only: every Triton launch returns at once (its outputs keep torch.empty's garbage), nothing
    counted; for timing the host side without the launches."""
    saved = []
    for cls in _kernel_classes():
        saved.append((cls, cls.run))
        cls.run = lambda kernel, *args, **kwargs: None
    try:
        yield
    finally:
        for cls, original in reversed(saved):
            cls.run = original


def autograd_nodes(*outputs: torch.Tensor) -> int:
    """The autograd graph's nodes reachable from outputs' grad_fn (AccumulateGrad of the leaves included): what the
    engine runs in their backward."""
    seen, stack = set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return len(seen)
