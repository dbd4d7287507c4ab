"""Training: one tiny step changes only the added parameters; LoRA starts as the identity; config checks."""
import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.remamba.lora import LoRALinear, lora_param_count, merge_lora, rank_for_budget
from mambakit.remamba.train import ReMambaTrainConfig, train_added
from tests.remamba.test_model import make_lm


def batches(g: torch.Generator):
    return torch.randint(0, 40, (2, 30), generator=g), torch.randint(0, 40, (2, 2), generator=g)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mixer,lora,dt", [("mamba1", 0, False), ("mamba2", 2, True), ("mamba1", 2, True)])
def test_one_step_changes_only_the_added_parameters(mixer, lora, dt):
    lm = make_lm(mixer, dtype=torch.float32)
    base_before = snapshot(lm.base)
    adapter_before = snapshot(lm.adapter)
    cfg = ReMambaTrainConfig(steps=1, batch=2, warmup=0, lr=1e-2, lora_rank=lora, train_dt=dt)
    info = train_added(lm, batches, cfg)
    assert len(info["losses"]) == 1 and info["n_trainable"] > 0
    base_after = snapshot(lm.base)
    dt_names = ("dt_proj", "dt_bias")
    for name, before in base_before.items():
        after_name = name
        if name not in base_after:  # wrapped by LoRA: <...>.in_proj.weight -> <...>.in_proj.base.weight
            head, _, leaf = name.rpartition(".")
            after_name = f"{head}.base.{leaf}"
        changed = not torch.equal(before, base_after[after_name])
        assert changed == (dt and any(d in name for d in dt_names)), name
    assert any(not torch.equal(adapter_before[k], v) for k, v in snapshot(lm.adapter).items())
    if lora:
        assert any("lora_" in k and not torch.equal(v, torch.zeros_like(v)) for k, v in base_after.items()
                   if k.endswith("lora_b"))


def test_plain_mode_trains_no_adapter():
    lm = make_lm("mamba1", dtype=torch.float32)
    adapter_before = snapshot(lm.adapter)
    train_added(lm, batches, ReMambaTrainConfig(mode="plain", steps=1, batch=2, lora_rank=2, warmup=0))
    assert all(torch.equal(adapter_before[k], v) for k, v in snapshot(lm.adapter).items())


def test_lora_starts_as_identity_and_merges():
    lin = torch.nn.Linear(6, 4)
    lora = LoRALinear(lin, rank=2)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), lin(x))
    with torch.no_grad():
        lora.lora_b.normal_()
    torch.testing.assert_close(lora.merged()(x), lora(x))
    lm = make_lm("mamba1", dtype=torch.float32)
    assert rank_for_budget(lm.base, lora_param_count(lm.base, 3)) == 3
    train_added(lm, batches, ReMambaTrainConfig(mode="plain", steps=1, batch=2, lora_rank=2, warmup=0))
    ids = torch.randint(0, 40, (1, 12))
    ref = lm.base(ids).logits
    merge_lora(lm.base)
    assert not any(isinstance(m, LoRALinear) for m in lm.base.modules())
    torch.testing.assert_close(lm.base(ids).logits, ref)


@pytest.mark.parametrize("kwargs,match", [({"mode": "x"}, "mode"), ({"p_range": (0.3, 0.1)}, "p_range"),
                                          ({"rho_range": (0.0, 2.0)}, "rho_range"), ({"steps": 0}, "steps"),
                                          ({"mode": "plain"}, "plain")])
def test_train_config_errors(kwargs, match):
    with pytest.raises(MambaKitError, match=match):
        ReMambaTrainConfig(**kwargs)


def test_sampled_configs_lie_in_the_ranges():
    cfg = ReMambaTrainConfig()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = cfg.sample(g)
        assert 0.1 <= c.p <= 0.3 and 0.05 <= c.rho <= 0.2 and c.s == 0.0


def test_lora_on_a_scaled_linear_acts_as_a_weight_change_and_merges_into_its_class():
    """Falcon-H1's in_proj scales its outputs per segment: the adapter's product is scaled the same way, so the
    adapted layer equals the base layer with weight W + scale * B A, and merging keeps the class and the scaling."""
    from mambakit.layers.parallel_mixer import ScaledLinear

    torch.manual_seed(0)
    lin = ScaledLinear(6, 5, bias=True, segments=[(2, 0.5), (3, 3.0)])
    lora = LoRALinear(lin, rank=2)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(4, 6)
    want = torch.nn.functional.linear(x, lora.weight, lin.bias) * torch.tensor([0.5, 0.5, 3.0, 3.0, 3.0])
    torch.testing.assert_close(lora(x), want)
    merged = lora.merged()
    assert type(merged) is ScaledLinear and merged.segments == lin.segments
    torch.testing.assert_close(merged(x), want)
