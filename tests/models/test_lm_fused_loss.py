"""forward(labels=..., return_logits=False): the loss without logits equals the plain loss, and so do all the
parameter gradients (float64 tiny models: Mamba, Mamba-2, attention, untied head, the hybrid LM with µP scaling)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mambakit.errors import MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.lm import MambaLMHeadModel
from tests.conftest import rel_err

VOCAB = 37
M2 = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 4}
HYBRID = dict(layers=[{"mixer": "mamba2", "mlp": "gated"}, {"mixer": "attention", "mlp": None}],
              mamba2={"d_state": 8, "headdim": 8, "chunk_size": 4}, attention={"num_heads": 4, "num_heads_kv": 2},
              mlp={"d_intermediate": 48}, logits_scaling=2.0, pad_vocab_size_multiple=8)
MODELS = {
    "mamba1": lambda: MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, ssm_cfg={"d_state": 4})),
    "mamba2_untied": lambda: MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, ssm_cfg=M2,
                                                          tie_embeddings=False)),
    "attention": lambda: MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, attn_layer_idx=[1],
                                                      attn_cfg={"num_heads": 4, "num_heads_kv": 2})),
    "hybrid": lambda: HybridLM(HybridConfig(d_model=32, vocab_size=VOCAB, **HYBRID)),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().double()


def _loss_and_grads(model: nn.Module, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kw)
    (out.loss * 2).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_last_tokens", [0, 5])
def test_fused_loss_equals_the_plain_loss(name, num_last_tokens):
    model = _build(name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 13), generator=g)
    labels = torch.randint(0, VOCAB, (3, num_last_tokens or 13), generator=g)
    labels[0, :4] = -100
    labels[2, -1] = -100
    plain, plain_grads = _loss_and_grads(model, ids, labels, num_last_tokens=num_last_tokens)
    fused, fused_grads = _loss_and_grads(model, ids, labels, num_last_tokens=num_last_tokens, return_logits=False)
    assert fused.logits is None and plain.logits is not None
    assert rel_err(fused.loss, plain.loss) < 1e-6  # the plain path rounds the logits to float32
    assert fused_grads.keys() == plain_grads.keys()
    assert ("lm_head.weight" in fused_grads) != model.config.tie_embeddings  # a tied head: the embedding
    for key, grad in plain_grads.items():
        assert rel_err(fused_grads[key], grad) < 1e-5, key


def test_default_forward_is_unchanged():
    model = _build("mamba1")
    ids = torch.randint(0, VOCAB, (2, 7))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 7, model.config.padded_vocab_size)
    want = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids.flatten())
    assert torch.equal(out.loss, want)


def test_fused_loss_errors():
    model = _build("mamba1")
    ids = torch.randint(0, VOCAB, (2, 7))
    with pytest.raises(MambaKitError, match="give labels"):
        model(ids, return_logits=False)
    with pytest.raises(MambaKitError, match=r"labels must have shape \(2, 3\)"):
        model(ids, labels=ids, num_last_tokens=3, return_logits=False)
    with pytest.raises(MambaKitError, match="labels must be an integer"):
        model(ids, labels=ids.double(), return_logits=False)
    with pytest.raises(MambaKitError, match=r"labels must lie in \[0, vocab=40\)"):  # padded to a multiple of 8
        model(ids, labels=torch.full_like(ids, 40), return_logits=False)
    model.lm_head = nn.Linear(16, model.config.padded_vocab_size, bias=True).double()
    with pytest.raises(MambaKitError, match="bias-free nn.Linear"):
        model(ids, labels=ids, return_logits=False)


def test_check_values_off_reads_no_values(monkeypatch):
    """check_values=False: forward reads no values of input_ids or labels (each read is a host sync on CUDA): no
    aminmax; the same loss for in-range data; the shape and dtype checks stay."""
    model = _build("mamba1")
    ids = torch.randint(0, VOCAB, (2, 7))
    want = model(ids, labels=ids, return_logits=False).loss
    model.check_values = False

    def no_read(*args, **kwargs):
        raise AssertionError("values read")

    monkeypatch.setattr(torch, "aminmax", no_read)
    got = model(ids, labels=ids, return_logits=False).loss
    assert torch.equal(got, want)
    with pytest.raises(MambaKitError, match="labels must be an integer"):
        model(ids, labels=ids.double(), return_logits=False)
    with pytest.raises(MambaKitError, match="input_ids must have shape"):
        model(ids[0], labels=ids, return_logits=False)
    monkeypatch.undo()
    model.check_values = True
    with pytest.raises(MambaKitError, match=r"labels must lie in"):
        model(ids, labels=torch.full_like(ids, 40), return_logits=False)
