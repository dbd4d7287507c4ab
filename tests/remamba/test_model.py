"""ReMambaLM: identity check against a plain forward (Mamba-1, Mamba-2), shapes, no-op, generation from stage 2."""
import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from mambakit.remamba import Compression, ReMambaConfig, ReMambaLM, remamba_generate

MIXERS = {
    "mamba1": {"layer": "Mamba1", "d_state": 8},
    "mamba2": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8},
}


def make_lm(mixer: str, dtype=torch.float64, seed: int = 0) -> ReMambaLM:
    torch.manual_seed(seed)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=40, ssm_cfg=dict(MIXERS[mixer]))
    base = MambaLMHeadModel(cfg, dtype=dtype)
    lm = ReMambaLM(base)
    with torch.no_grad():  # non-zero b so that the adaptation is visible where it is not meant to be neutral
        for b in lm.adapter.b:
            b.normal_()
    return lm


def own_embeddings(lm: ReMambaLM, ids: torch.Tensor, cfg: ReMambaConfig) -> Compression:
    """The whole span kept (rho = 1), w = 1, the span's own token embeddings in place of V(H)."""
    plan = cfg.plan(ids.shape[1])
    assert plan.keep == plan.length
    batch = ids.shape[0]
    index = torch.arange(plan.length).expand(batch, -1)
    embeds = lm.base.backbone.embedding(ids[:, plan.start:plan.start + plan.length])
    return Compression(plan, index, torch.ones(batch, plan.length, dtype=embeds.dtype), embeds)


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_identity_with_w1_b0_own_embeddings_equals_plain_forward(mixer):
    lm = make_lm(mixer)
    with torch.no_grad():
        for b in lm.adapter.b:
            b.zero_()
    ids = torch.randint(0, 40, (2, 37))
    cfg = ReMambaConfig(p=0.5, rho=1.0, s=0.2)
    with torch.no_grad():
        ref = lm.base(ids).logits
        out = lm.adapted_forward(ids, own_embeddings(lm, ids, cfg)).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_nonzero_b_changes_only_from_the_span_on(mixer):
    lm = make_lm(mixer)
    ids = torch.randint(0, 40, (2, 30))
    cfg = ReMambaConfig(p=0.3, rho=1.0, s=0.4)
    plan = cfg.plan(30)
    with torch.no_grad():
        ref = lm.base(ids).logits
        out = lm.adapted_forward(ids, own_embeddings(lm, ids, cfg)).logits
    torch.testing.assert_close(out[:, :plan.start], ref[:, :plan.start], rtol=1e-12, atol=1e-12)
    assert (out[:, plan.start:] - ref[:, plan.start:]).abs().max() > 1e-6
    # the hooks are removed afterwards
    assert all(layer.mixer.delta_hook is None for layer in lm.base.backbone.layers)


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_shapes(mixer):
    lm = make_lm(mixer, dtype=torch.float32)
    ids = torch.randint(0, 40, (3, 50))
    cfg = ReMambaConfig(p=0.4, rho=0.25, s=0.1)
    plan = cfg.plan(50)
    comp = lm.compress(ids, cfg)
    assert (plan.start, plan.length, plan.keep) == (5, 20, 5)
    assert comp.index.shape == (3, 5) and comp.weights.shape == (3, 5) and comp.embeds.shape == (3, 5, 32)
    assert bool((comp.index.diff(dim=1) > 0).all()) and bool((comp.weights >= 0).all())
    out = lm(ids, cfg)
    assert out.logits.shape == (3, 50 - 20 + 5, lm.base.config.padded_vocab_size)
    answer = torch.randint(0, 40, (3, 4))
    out = lm(ids, cfg, answer_ids=answer)
    assert out.logits.shape == (3, 35 + 3, lm.base.config.padded_vocab_size)
    assert out.loss is not None and out.loss.ndim == 0


def test_noop_when_span_is_empty_equals_plain_forward():
    lm = make_lm("mamba1")
    ids = torch.randint(0, 40, (2, 10))
    cfg = ReMambaConfig(p=0.5, rho=0.5, s=0.95)
    assert cfg.plan(10).is_noop
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, cfg).logits, lm.base(ids).logits, rtol=1e-12, atol=1e-12)
    out = lm.generate(ids, 3, remamba=cfg, temperature=0)
    assert torch.equal(out, lm.base.generate(ids, 3, temperature=0))


def test_bad_inputs():
    lm = make_lm("mamba1")
    with pytest.raises(MambaKitError, match="input_ids"):
        lm.compress(torch.zeros(2, 0, dtype=torch.long), ReMambaConfig())
    with pytest.raises(MambaKitError, match="answer_ids"):
        lm(torch.zeros(2, 10, dtype=torch.long), ReMambaConfig(), answer_ids=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(MambaKitError, match="inputs_embeds"):
        lm.base(inputs_embeds=torch.zeros(1, 4, 5, dtype=torch.float64))
    with pytest.raises(MambaKitError, match="exactly one"):
        lm.base(torch.zeros(1, 4, dtype=torch.long), inputs_embeds=torch.zeros(1, 4, 32, dtype=torch.float64))


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_generation_continues_the_state_after_stage_2(mixer):
    lm = make_lm(mixer)
    ids = torch.randint(0, 40, (2, 40))
    cfg = ReMambaConfig(p=0.5, rho=0.2, s=0.1)
    out = remamba_generate(lm, ids, 5, cfg, temperature=0)
    assert out.shape == (2, 45) and torch.equal(out[:, :40], ids)
    new = out[:, 40:]
    # one parallel stage-2 pass over [compressed prompt, new tokens] predicts the same tokens
    with torch.no_grad():
        comp = lm.compress(ids, cfg)
        logits = lm.adapted_forward(ids, comp, extra_ids=new[:, :-1]).logits
    length = cfg.plan(40).compressed_len(40)
    assert torch.equal(logits[:, length - 1:, :40].argmax(-1), new)
    # and the switch on the model is the same function
    assert torch.equal(lm.generate(ids, 5, remamba=cfg, temperature=0), out)


def test_loss_without_logits_equals_the_plain_loss():
    lm = make_lm("mamba2")
    prompts, answers = torch.randint(0, 40, (2, 30)), torch.randint(0, 40, (2, 3))
    cfg = ReMambaConfig(p=0.3, rho=0.5, s=0.2)
    outs, grads = [], []
    for return_logits in (True, False):
        lm.zero_grad(set_to_none=True)
        out = lm(prompts, cfg, answer_ids=answers, return_logits=return_logits)
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in lm.adapter.parameters() if p.grad is not None])
    assert outs[0].logits is not None and outs[1].logits is None
    torch.testing.assert_close(outs[1].loss.double(), outs[0].loss.double(), rtol=1e-6, atol=0)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-9)
