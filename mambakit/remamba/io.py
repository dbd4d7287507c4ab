"""Saving and loading ReMamba's added parameters (Q, K, V, b) beside a base checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from mambakit.errors import CheckpointError
from mambakit.models.lm import MambaLMHeadModel
from mambakit.remamba.model import ReMambaAdapter, ReMambaLM

ADAPTER_NAME = "remamba_adapter.pt"


def save_adapter(lm: ReMambaLM, folder: Union[str, Path]) -> Path:
    """Write folder/remamba_adapter.pt (the adapter's state dict). LoRA adapters, if any, belong to the base: merge
    them (`mambakit.remamba.lora.merge_lora`) and save the base with `save_pretrained`."""
    path = Path(folder) / ADAPTER_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in lm.adapter.state_dict().items()}, path)
    return path


def load_remamba(base: MambaLMHeadModel, path: Union[str, Path], device: Optional[torch.device] = None) -> ReMambaLM:
    """A ReMambaLM on `base` with the adapter read from `path` (a remamba_adapter.pt file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_NAME
    if not path.is_file():
        raise CheckpointError(f"no ReMamba adapter at {str(path)!r}: train one (mambakit.remamba.train) and save it "
                              f"with mambakit.remamba.io.save_adapter")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several exception types for a corrupt file
        raise CheckpointError(f"cannot read ReMamba adapter {str(path)!r}: {exc}") from exc
    adapter = ReMambaAdapter(base)
    own = adapter.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise CheckpointError(f"ReMamba adapter {str(path)!r} does not fit the model: expected "
                              f"{ {k: tuple(v.shape) for k, v in own.items()} }, got {shapes}")
    adapter.load_state_dict(state)
    return ReMambaLM(base, adapter.to(device or base.lm_head.weight.device))
