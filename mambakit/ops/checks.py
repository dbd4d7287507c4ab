"""The first check of every public op: its tensor arguments are tensors (a list or a numpy array is refused by name,
not met later as an AttributeError)."""
from __future__ import annotations

from torch import Tensor

from mambakit.errors import MambaKitError


def require_tensors(**named: object) -> None:
    """Raise MambaKitError for the first argument that is neither None nor a torch.Tensor."""
    for name, value in named.items():
        if value is not None and not isinstance(value, Tensor):
            raise MambaKitError(f"{name} must be a torch.Tensor, got {type(value).__name__} (convert it with "
                                f"torch.as_tensor)")
