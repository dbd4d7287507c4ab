"""Small pieces the reliability tests share: a tiny model, its logits, the hidden folders beside a checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from mambakit import MambaConfig, MambaLMHeadModel

IDS = torch.tensor([[3, 100, 7, 255, 0, 42]])


def tiny_model(seed: int = 0) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    return MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=256, ssm_cfg={"d_state": 4})).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def hidden(parent: Path) -> list[str]:
    """Names of the dot-folders (temporary, new, backup) beside a checkpoint."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
