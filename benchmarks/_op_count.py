"""Host ops of one call: the torch ops dispatched (a TorchDispatchMode) and the Triton kernel launches (the kernels'
`run`, patched), each counted once. What a launch does inside (the interpreter's own tensor copies) is not counted.

    with OpCounter() as c:
        out = f(x); out.backward(g)
    c.torch_ops, c.launches, c.by_name

Runs anywhere; on the CPU the Triton kernels need TRITON_INTERPRET=1 (set before triton is imported).
"""
from __future__ import annotations

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


class OpCounter(TorchDispatchMode):
    """Counts torch ops (by aten name, `by_name["aten.x"]`) and Triton launches (by kernel name, `by_name["triton
    name"]`) while active. Ops run by a launch itself are not counted."""

    def __init__(self) -> None:
        super().__init__()
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

    def table(self) -> str:
        """The counts by name, most first."""
        return "\n".join(f"{n:5d}  {name}" for name, n in self.by_name.most_common())
