"""`mambakit.training.optim`: what is decayed, and AdamW's settings."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mambakit.layers.norm import RMSNorm
from mambakit.training.optim import adamw, param_groups


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)  # weight decayed, bias not
        self.norm = RMSNorm(6)  # scale: a vector
        self.A_log = nn.Parameter(torch.zeros(6, 2))  # a matrix, undecayed by name
        self.marked = nn.Parameter(torch.zeros(3, 3))
        self.marked._no_weight_decay = True  # a matrix, undecayed by mark
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 6))
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def names(model: nn.Module, params: list) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_groups_contents() -> None:
    model = Tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    # in named_parameters order (a module's own parameters before its children's); the frozen one in neither
    assert names(model, decay["params"]) == ["pos_embed", "proj.weight"]
    assert names(model, no_decay["params"]) == ["A_log", "marked", "proj.bias", "norm.weight"]


def test_groups_with_other_suffixes() -> None:
    model = Tiny()
    decay, no_decay = param_groups(model, 0.05, no_decay_suffixes=("pos_embed",))
    assert names(model, decay["params"]) == ["A_log", "proj.weight"]
    assert names(model, no_decay["params"]) == ["marked", "pos_embed", "proj.bias", "norm.weight"]


def test_lm_groups_leave_ssm_parameters_undecayed() -> None:
    from mambakit.models.config import MambaConfig
    from mambakit.models.lm import MambaLMHeadModel

    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, ssm_cfg={"layer": "Mamba2", "headdim": 8}))
    decay, no_decay = param_groups(model, 0.1)
    decayed = names(model, decay["params"])
    assert decayed and all(model.get_parameter(n).dim() >= 2 for n in decayed)
    assert not any(n.endswith(("A_log", ".D", "dt_bias", "bias", "norm.weight")) for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.98), (0.9, 0.999)])
def test_adamw_settings(betas) -> None:
    model = Tiny()
    opt = adamw(param_groups(model, 0.1), lr=0.01, betas=betas, eps=1e-6)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    for group, wd in zip(opt.param_groups, (0.1, 0.0)):
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.01, betas, 1e-6, wd)
    flat = adamw([model.proj.weight], lr=0.5, betas=betas, weight_decay=0.2)
    assert flat.param_groups[0]["weight_decay"] == 0.2 and flat.param_groups[0]["eps"] == 1e-8
