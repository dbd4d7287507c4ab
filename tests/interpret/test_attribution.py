"""Aggregations, rollout, gradient-weighted attribution, pictures, the explain command, and a planted copy task
whose deciding token the relevance must find."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from mambakit.errors import MambaKitError
from mambakit.interpret.attribution import (
    attention_rollout,
    explain,
    layer_attentions,
    mixer_layers,
    token_relevance,
)
from mambakit.interpret.hidden_attention import mamba1_block_attention, mamba1_hidden_attention
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from tests.conftest import rel_err

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread is faster, and far steadier on a busy machine, than several that must synchronise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(arch: str = "Mamba1", n_layer: int = 2, dtype=torch.float64, vocab_size: int = 11,
          **ssm) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = {"layer": arch, "d_state": 4}
    if arch == "Mamba2":
        cfg.update(headdim=8, chunk_size=8)
    cfg.update(ssm)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=n_layer, vocab_size=vocab_size, ssm_cfg=cfg)).to(dtype)
    return model.eval()


@pytest.mark.parametrize("arch,form", [("Mamba1", "ssm"), ("Mamba1", "block"), ("Mamba2", "ssm"),
                                       ("Mamba2", "block")])
def test_rollout_rows_sum_to_one(arch, form):
    model = _tiny(arch)
    ids = torch.randint(0, 11, (2, 14), generator=torch.Generator().manual_seed(1))
    ex = explain(model, ids, form=form)
    assert len(ex.attentions) == len(ex.grad_attentions) == 2
    for maps in (ex.attentions, ex.grad_attentions):
        for a in maps:
            assert a.shape == (2, 14, 14) and bool((a >= 0).all()) and bool((torch.triu(a, 1) == 0).all())
    ones = torch.ones(2, 14, dtype=torch.float64)
    for r in (ex.rollout, ex.attribution):
        assert torch.allclose(r.sum(-1), ones, atol=1e-12) and bool((r >= 0).all())
    assert torch.allclose(ex.relevance.sum(-1), ones[:, 0], atol=1e-12)
    assert torch.equal(ex.relevance, ex.attribution[:, -1])
    assert torch.equal(ex.target, ex.logits[:, :11].argmax(-1))
    plain = layer_attentions(model, ids, form=form)
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(plain, ex.attentions))


def test_rollout_of_known_maps():
    a = torch.tensor([[[1.0, 0.0], [3.0, 1.0]]])
    r = attention_rollout([a, a])
    # row-normalise -> [[1, 0], [.75, .25]]; + I, normalise -> [[1, 0], [.375, .625]]; squared
    step = torch.tensor([[1.0, 0.0], [0.375, 0.625]])
    assert torch.allclose(r[0], step @ step)
    rel = token_relevance(r, exclude_self=True)
    assert torch.allclose(rel, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(MambaKitError, match="negative"):
        attention_rollout([-a])
    with pytest.raises(MambaKitError, match="at least one"):
        attention_rollout([])


def _gradient_through_leaf(model, ids, layer_idx, target, form):
    """d logit / d matrix by autograd, with the layer's output recomputed from its matrices as a leaf tensor."""
    mixer = model.backbone.layers[layer_idx].mixer
    seen = {}
    handle = mixer.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0].detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    with torch.no_grad():
        s = mixer.ssm_inputs(seen["h"])
    if form == "ssm":
        leaf = mamba1_hidden_attention(mixer, seen["h"]).requires_grad_(True)

        def rebuild():
            return (torch.einsum("bdij,bdj->bdi", leaf, s.u) + s.D[:, None] * s.u) * F.silu(s.z)
    else:
        ba = mamba1_block_attention(mixer, seen["h"])
        leaf = ba.matrix.requires_grad_(True)

        def rebuild():
            return torch.einsum("bdij,bdj->bdi", leaf, s.x) + ba.offset

    handle = mixer.register_forward_hook(lambda m, args, out: m.out_proj(rebuild().transpose(1, 2)))
    try:
        logits = model(ids).logits[:, -1]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), leaf)
    return (leaf.detach() * grad).clamp_min(0).mean(1)


@pytest.mark.parametrize("form", ["ssm", "block"])
def test_gradient_weighted_maps_equal_autograd_through_the_matrix(form):
    model = _tiny("Mamba1")
    ids = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(2))
    ex = explain(model, ids, form=form)
    for layer_idx in range(2):
        ref = _gradient_through_leaf(model, ids, layer_idx, ex.target, form)
        assert ref.abs().sum() > 0
        assert rel_err(ex.grad_attentions[layer_idx], ref) < 1e-10


def test_target_and_position_choose_the_logit():
    model = _tiny("Mamba1")
    ids = torch.randint(0, 11, (1, 10), generator=torch.Generator().manual_seed(3))
    ex = explain(model, ids, target=5, position=6)
    assert ex.position == 6 and int(ex.target) == 5
    assert bool((ex.relevance[:, 7:] == 0).all())  # causal: nothing after the explained position
    assert bool((ex.grad_attentions[-1][:, 7:] == 0).all())
    with pytest.raises(MambaKitError, match="position"):
        explain(model, ids, position=10)
    with pytest.raises(MambaKitError, match="form"):
        explain(model, ids, form="attention")


def test_other_mixers_are_refused():
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=11, ssm_cfg={"layer": "S4", "d_state": 4})
    model = MambaLMHeadModel(cfg)
    with pytest.raises(MambaKitError, match="layer 0 is a S4 mixer"):
        mixer_layers(model)


# ----------------------------------------------------------------------------------------------------------------------
# Pictures and the command
# ----------------------------------------------------------------------------------------------------------------------
def test_pictures_are_written(tmp_path):
    from mambakit.interpret.plots import byte_token_labels, plot_explanation

    model = _tiny("Mamba2", dtype=torch.float32, vocab_size=256)
    text = "ab c\n\u00e9!"
    ids = torch.tensor([list(text.encode())])
    ex = explain(model, ids)
    labels = byte_token_labels(ids[0].tolist())
    assert labels[:4] == ["a", "b", "' '", "c"] and labels[4] == "'\\n'" and labels[5].startswith("'\\x")
    paths = plot_explanation(ex, tmp_path / "pics", labels)
    names = sorted(p.name for p in paths)
    assert names == ["attribution.png", "layer_00.png", "layer_01.png", "relevance.png", "rollout.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    with pytest.raises(MambaKitError, match="one label per position"):
        plot_explanation(ex, tmp_path, labels[:-1])


# ----------------------------------------------------------------------------------------------------------------------
# A planted copy task: the answer is a copy of the token right after a marker
# ----------------------------------------------------------------------------------------------------------------------
N_CONTENT, MARK, QUERY, SEQLEN = 8, 8, 9, 16


def _copy_batch(gen: torch.Generator, n: int):
    """Random content tokens, MARK before one of them, QUERY last; the answer is the marked token.
    Returns ids (n, SEQLEN), the marked positions (n,) and the answers (n,)."""
    ids = torch.randint(0, N_CONTENT, (n, SEQLEN), generator=gen)
    marker = torch.randint(0, SEQLEN - 3, (n,), generator=gen)
    rows = torch.arange(n)
    ids[rows, marker] = MARK
    ids[:, -1] = QUERY
    return ids, marker + 1, ids[rows, marker + 1]


def _top_hits(model, ids, marked, attribution: bool) -> float:
    ex = explain(model, ids, form="block")
    rollout = ex.attribution if attribution else ex.rollout
    top = token_relevance(rollout, exclude_self=True).argmax(-1)
    return float((top == marked).double().mean())


def test_relevance_finds_the_copied_token():
    """Train a one-layer Mamba for a few seconds on selective copying, then the most relevant source token for the
    last prediction must be the marked token (an untrained model, the control, must not find it)."""
    torch.manual_seed(2)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=10, ssm_cfg={"d_state": 8}))
    test_ids, marked, answers = _copy_batch(torch.Generator().manual_seed(123), 32)
    control = _top_hits(model.eval(), test_ids, marked, attribution=False)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(300):
        ids, _, target = _copy_batch(gen, 32)
        loss = F.cross_entropy(model(ids).logits[:, -1], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(test_ids).logits[:, -1].argmax(-1) == answers).double().mean())
    assert accuracy >= 0.9, f"the copy task did not train (accuracy {accuracy:.2f})"
    rollout_hits = _top_hits(model, test_ids, marked, attribution=False)
    attribution_hits = _top_hits(model, test_ids, marked, attribution=True)
    assert control < 0.5, control
    assert rollout_hits >= 0.9, rollout_hits
    assert attribution_hits >= 0.6, attribution_hits
