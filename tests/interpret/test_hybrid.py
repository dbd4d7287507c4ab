"""Explaining hybrid models (HybridLM: Mamba-2, attention and MLP-only layers): the Mamba layers' hidden attention
and the attention layers' softmax attention reproduce what each layer computes, the gradient-weighted maps equal
autograd through the matrices, the rollout skips MLP-only layers, and the pictures and the command on a tiny
transformers Nemotron-H folder."""
from __future__ import annotations

import pytest
import torch

from mambakit.cli import main
from mambakit.interpret.attribution import explain, mixer_layer_indices
from mambakit.interpret.hidden_attention import mamba2_block_attention
from mambakit.interpret.softmax_attention import attention_values, softmax_attention
from mambakit.layers.attention import MHA
from mambakit.models.hybrid import HybridConfig, HybridLM
from tests.conftest import rel_err

pytest.importorskip("matplotlib")

LAYERS = [{"mixer": "mamba2", "mlp": None}, {"mixer": None, "mlp": "plain"}, {"mixer": "attention", "mlp": "gated"},
          {"mixer": "mamba2", "mlp": None}]


def _hybrid(rotary: int = 4, kv: int = 1) -> HybridLM:
    torch.manual_seed(0)
    cfg = HybridConfig(d_model=16, vocab_size=13, layers=LAYERS,
                       mamba2=dict(d_state=4, headdim=8, chunk_size=8, ngroups=1),
                       attention=dict(num_heads=4, num_heads_kv=kv, head_dim=6, rotary_emb_dim=rotary,
                                      separate_qkv=kv == 1),
                       mlp=dict(d_intermediate=24, activation="relu2"))
    model = HybridLM(cfg).double().eval()
    with torch.no_grad():  # away from the structured init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs_and_outputs(model, ids):
    """Per layer with a mixer: (its input after the norm, the input of its out_proj), from one forward."""
    seen = {}
    handles = []
    for i, layer in enumerate(model.backbone.layers):
        if layer.mixer is None:
            continue
        handles.append(layer.mixer.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(("in", i), a[0].detach())))
        handles.append(layer.mixer.out_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(("o", i), a[0].detach())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("rotary, kv", [(4, 1), (0, 2)])
def test_each_layers_matrices_reproduce_its_output(rotary, kv):
    model = _hybrid(rotary, kv)
    ids = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(1))
    seen = _inputs_and_outputs(model, ids)
    for i, layer in enumerate(model.backbone.layers):
        if isinstance(layer.mixer, MHA):
            P = softmax_attention(layer.mixer, seen[("in", i)])
            assert P.shape == (2, 4, 11, 11) and torch.allclose(P.sum(-1), torch.ones(2, 4, 11, dtype=P.dtype))
            assert bool((torch.triu(P, 1) == 0).all())
            o = torch.matmul(P, attention_values(layer.mixer, seen[("in", i)]))  # (batch, heads, L, head_dim)
            assert rel_err(o.transpose(1, 2).flatten(2), seen[("o", i)]) < 1e-12
        elif layer.mixer is not None:
            h = seen[("in", i)]
            ba = mamba2_block_attention(layer.mixer, h)
            x = layer.mixer.ssm_inputs(h).xBC[:, : layer.mixer.d_inner]
            o = torch.einsum("bcij,bcj->bci", ba.matrix, x) + ba.offset
            assert rel_err(o, seen[("o", i)].transpose(1, 2)) < 1e-6  # the layer's gated norm runs in float32


def test_gradient_weighted_attention_map_equals_autograd_through_p():
    model = _hybrid()
    ids = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(2))
    ex = explain(model, ids)
    assert ex.layers == [0, 2, 3] == mixer_layer_indices(model) and ex.kinds == ["mamba2", "attention", "mamba2"]
    mixer = model.backbone.layers[2].mixer
    h = _inputs_and_outputs(model, ids)[("in", 2)]
    leaf = softmax_attention(mixer, h).requires_grad_(True)
    v = attention_values(mixer, h)

    def rebuild(module, args, out):
        return module.out_proj(torch.matmul(leaf, v).transpose(1, 2).flatten(2))

    handle = mixer.register_forward_hook(rebuild)
    try:
        logits = model(ids).logits[:, -1]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, ex.target[:, None]).sum(), leaf)
    ref = (leaf.detach() * grad).clamp_min(0).mean(1)
    assert ref.abs().sum() > 0 and rel_err(ex.grad_attentions[1], ref) < 1e-10
    assert rel_err(ex.attentions[1], leaf.detach().mean(1)) < 1e-14
    ones = torch.ones(2, 9, dtype=torch.float64)
    assert torch.allclose(ex.rollout.sum(-1), ones) and torch.allclose(ex.attribution.sum(-1), ones)


def _transformers_folder(prefix: str, folder, **config):
    """A tiny random transformers `{prefix}ForCausalLM` of `config`, saved into `folder` (skips without it)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, prefix + "ForCausalLM"):
        pytest.skip(f"this transformers has no {prefix}")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    getattr(transformers, prefix + "ForCausalLM")(getattr(transformers, prefix + "Config")(**config)).save_pretrained(
        folder)
    return folder


@pytest.fixture(scope="module")
def nemotron_folder(tmp_path_factory):
    return _transformers_folder("NemotronH", tmp_path_factory.mktemp("nemotron") / "hf", vocab_size=256,
                                hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                intermediate_size=24, ssm_state_size=4, mamba_num_heads=4, mamba_head_dim=8,
                                n_groups=1, chunk_size=8,
                                layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention"])


def test_explain_command_on_a_nemotron_h_folder(nemotron_folder, tmp_path, capsys):
    out = tmp_path / "all"
    assert main(["explain", "--checkpoint", str(nemotron_folder), "--prompt", "hello, world", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attribution.png", "layer_00.png", "layer_02.png",
                                                     "layer_03.png", "relevance.png", "rollout.png"]
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 6 pictures to {out}"
    assert main(["explain", "--checkpoint", str(nemotron_folder), "--prompt", "hi", "--layer", "1",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layer 1 is an MLP layer" in err[0] and "[0, 2, 3]" in err[0]


def test_a_parallel_layers_map_is_the_mean_of_its_two_branches(tmp_path):
    """Falcon-H1 (attention and Mamba-2 side by side): one map per layer, the mean of the attention's softmax
    attention and the Mamba-2 block map, each on the input its branch sees (its in-multiplier applied)."""
    from mambakit.interpret.attribution import layer_attentions
    from mambakit.models.io import from_pretrained

    _transformers_folder("FalconH1", tmp_path / "hf", vocab_size=29, hidden_size=16, intermediate_size=24,
                         num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=4, mamba_d_state=4,
                         mamba_chunk_size=8, num_hidden_layers=2, mamba_d_ssm=24, attention_in_multiplier=1.7,
                         ssm_in_multiplier=0.6, key_multiplier=0.8, mamba_rms_norm=True)
    model = from_pretrained(tmp_path / "hf").double().eval()
    ids = torch.randint(0, 29, (2, 11), generator=torch.Generator().manual_seed(1))
    seen = {}
    handles = [layer.mixer.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach()))
               for i, layer in enumerate(model.backbone.layers)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    maps = layer_attentions(model, ids)
    ex = explain(model, ids)
    assert ex.kinds == ["parallel", "parallel"] and ex.layers == [0, 1]
    for i, layer in enumerate(model.backbone.layers):
        mixer = layer.mixer
        attn = softmax_attention(mixer.attn, 1.7 * seen[i]).mean(1)
        ssm = mamba2_block_attention(mixer.mamba, 0.6 * seen[i]).matrix.abs().mean(1)
        want = (attn + ssm) / 2
        assert rel_err(maps[i], want) <= 1e-10 and rel_err(ex.attentions[i], want) <= 1e-10
        assert rel_err(ssm, attn) > 0.1  # the two branches differ: the mean is not one of them
        w = ex.grad_attentions[i]
        assert torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0
