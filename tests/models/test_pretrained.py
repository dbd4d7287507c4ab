"""Loading and saving against Hugging Face transformers (CPU, fp32, tiny random models), through the old import path
mambakit.models.pretrained (the code lives in mambakit.models.io).

transformers -> mambakit (safetensors, sharded safetensors, pytorch_model.bin), mambakit -> transformers, the
mamba_ssm layout, the native format, dtype handling and every error path. Random weights are perturbed with a seeded
generator (HF's init leaves D = 1, norms = 1, zero conv bias, ...) so that a mix-up cannot pass unnoticed.
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from mambakit.errors import CheckpointError, MambaKitError  # noqa: E402
from mambakit.models.config import MambaConfig  # noqa: E402
from mambakit.models.lm import MambaLMHeadModel  # noqa: E402
from mambakit.models.pretrained import from_pretrained, save_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

TOL = 1e-4
SEQLEN = 37  # not a multiple of any chunk_size below
NEW_TOKENS = 32

# name -> (model_type, transformers config kwargs, HF generate may use its cache)
HF_CASES = {
    "mamba-tied-oddvocab": ("mamba", dict(vocab_size=101, hidden_size=32, state_size=8, num_hidden_layers=2), True),
    "mamba-untied-noconvbias-rank5": ("mamba", dict(
        vocab_size=77, hidden_size=48, state_size=4, num_hidden_layers=2, time_step_rank=5, use_conv_bias=False,
        use_bias=True, conv_kernel=3, tie_word_embeddings=False, layer_norm_epsilon=1e-6,
        residual_in_fp32=False), True),
    "mamba2-groups2-untied": ("mamba2", dict(
        vocab_size=101, hidden_size=32, state_size=16, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=2,
        chunk_size=16), True),
    # transformers' cached decode step ignores time_step_limit (so does mamba_ssm's step); its full forward, and
    # mambakit's prefill and step, apply it: compare with transformers' uncached greedy generation.
    "mamba2-groups4-tied-limit": ("mamba2", dict(
        vocab_size=95, hidden_size=48, state_size=8, num_hidden_layers=2, num_heads=8, head_dim=12, n_groups=4,
        chunk_size=8, tie_word_embeddings=True, use_conv_bias=False, use_bias=True, layer_norm_epsilon=1e-6,
        time_step_limit=(0.0, 0.05)), False),
}


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter away from its structured init (ones, zeros, log-ranges), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.add_(0.15 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    mt, kwargs, _ = HF_CASES[case]
    torch.manual_seed(seed)
    if mt == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**kwargs))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kwargs))
    return perturb_(model, seed + 1).eval()


def ids_for(vocab: int, batch: int = 2, seqlen: int = SEQLEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids):
    """transformers' logits of one full forward, without a cache: none is needed, and transformers 5.25's
    DynamicCache cannot count tokens when layer 0 keeps no state (an MLP / MoE layer: DummyLayer has no
    get_seq_length; 5.24 asked the first attention layer)."""
    return model(ids, use_cache=False).logits


@torch.no_grad()
def hf_greedy(model, prompt):
    # an explicit mask: otherwise generate treats prompt tokens equal to pad_token_id as padding
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=None, pad_token_id=0)


@torch.no_grad()
def is_hf_full_forward_greedy(model, seq, n_prompt, vocab):
    """Whether `seq` is the greedy continuation of its first n_prompt tokens under transformers' full forward (no
    cache): one forward, each generated token the argmax at the position before it. Equivalent to comparing with
    generate(use_cache=False), at the cost of one forward instead of one per token."""
    pred = hf_logits(model, seq)[:, n_prompt - 1:-1, :vocab].argmax(-1)
    return pred.tolist() == seq[:, n_prompt:].tolist()


@torch.no_grad()
def our_logits(model, ids):
    return model(ids).logits


# ----------------------------------------------------------------------------------------------------------------------
# transformers -> mambakit
@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_checkpoint_loads_with_same_logits_and_greedy_tokens(case, tmp_path):
    ref = hf_model(case)
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    vocab = ref.config.vocab_size
    assert model.config.vocab_size == vocab and model.config.padded_vocab_size == vocab
    assert model.pretrained_source["format"] == "hf"
    assert model.config.residual_in_fp32 == ref.config.residual_in_fp32  # no effect in fp32: check the field
    assert model.config.norm_epsilon == ref.config.layer_norm_epsilon
    assert model.config.tie_embeddings == ref.config.tie_word_embeddings
    ids = ids_for(vocab)
    out, want = our_logits(model, ids), hf_logits(ref, ids)
    assert out.shape == want.shape
    assert rel_err(out, want) <= TOL
    prompt = ids[:1, :9]
    ours = model.generate(prompt, NEW_TOKENS, temperature=0)
    if HF_CASES[case][2]:
        assert ours.tolist() == hf_greedy(ref, prompt).tolist()
    assert is_hf_full_forward_greedy(ref, ours, prompt.shape[1], vocab)


def test_hf_cached_decode_ignores_time_step_limit(tmp_path):
    """Documents the difference: with a binding time_step_limit transformers' cached generation departs from its
    own full forward; mambakit follows the full forward."""
    ref = hf_model("mamba2-groups4-tied-limit")
    prompt = ids_for(ref.config.vocab_size, 1, 9, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf").generate(prompt, NEW_TOKENS, temperature=0)
    assert is_hf_full_forward_greedy(ref, ours, prompt.shape[1], ref.config.vocab_size)
    cached = hf_greedy(ref, prompt)
    assert cached.tolist() != ours.tolist()
    assert not is_hf_full_forward_greedy(ref, cached, prompt.shape[1], ref.config.vocab_size)


def test_gated_norm_is_per_group_as_transformers_5(tmp_path):
    """n_groups > 1: normalising over all of d_inner (transformers 4.x) would give clearly different logits."""
    ref = hf_model("mamba2-groups4-tied-limit")
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    ids = ids_for(ref.config.vocab_size)
    want = hf_logits(ref, ids)
    assert rel_err(our_logits(model, ids), want) <= TOL
    for layer in model.backbone.layers:
        layer.mixer.norm.group_size = layer.mixer.d_inner
    assert rel_err(our_logits(model, ids), want) > 1e-2


def test_hf_sharded_safetensors_and_pytorch_model_bin(tmp_path):
    ref = hf_model("mamba2-groups2-untied")
    ids = ids_for(ref.config.vocab_size)
    want = hf_logits(ref, ids)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file() and len(shards) > 1
    assert rel_err(our_logits(from_pretrained(tmp_path / "sharded"), ids), want) <= TOL

    binned = tmp_path / "bin"
    binned.mkdir()
    (binned / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save({k: v.clone() for k, v in ref.state_dict().items()}, binned / "pytorch_model.bin")
    assert rel_err(our_logits(from_pretrained(binned), ids), want) <= TOL


def test_hf_tied_bin_with_lm_head_and_transformers_4_config(tmp_path):
    """A tied checkpoint that stores lm_head.weight anyway, a 4.x-style config (no dtype, intermediate_size)."""
    ref = hf_model("mamba-tied-oddvocab")
    ids = ids_for(ref.config.vocab_size)
    d = tmp_path / "m"
    ref.save_pretrained(d)
    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.weight"] = sd["backbone.embeddings.weight"].clone()
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    assert rel_err(our_logits(from_pretrained(d), ids), hf_logits(ref, ids)) <= TOL


@pytest.mark.parametrize("upper", ['Infinity', '"inf"', '{"__float__": "Infinity"}', '"Infinity"'])
def test_time_step_limit_spellings(upper, tmp_path):
    ref = hf_model("mamba2-groups2-untied")
    ref.save_pretrained(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["time_step_limit"] = ["LOW", "HIGH"]
    cfg_path.write_text(json.dumps(cfg).replace('"LOW"', "0.0").replace('"HIGH"', upper))
    model = from_pretrained(tmp_path / "hf")
    assert model.backbone.layers[0].mixer.dt_limit == (0.0, math.inf)


def test_dtype_auto_and_bfloat16(tmp_path):
    ref = hf_model("mamba-tied-oddvocab").to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf", dtype="auto")
    assert model.backbone.embedding.weight.dtype == torch.bfloat16
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.float32  # as mamba_ssm: A_log, D stay fp32
    assert from_pretrained(tmp_path / "hf").lm_head.weight.dtype == torch.float32
    assert from_pretrained(tmp_path / "hf", dtype="float16").lm_head.weight.dtype == torch.float16
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert getattr(model.backbone.layers[0].mixer.A_log, "_no_weight_decay", False)
    assert getattr(model.backbone.layers[0].mixer.dt_proj.bias, "_no_reinit", False)


# ----------------------------------------------------------------------------------------------------------------------
# mambakit -> transformers
OUR_CASES = {
    "mamba1-padded-vocab-tied": dict(d_model=32, n_layer=2, vocab_size=101, pad_vocab_size_multiple=8,
                                     ssm_cfg={"layer": "Mamba1", "d_state": 8, "dt_rank": 3, "conv_bias": False}),
    "mamba1-untied": dict(d_model=32, n_layer=2, vocab_size=64, tie_embeddings=False, residual_in_fp32=False,
                          norm_epsilon=1e-6, ssm_cfg={"layer": "Mamba1", "d_state": 4, "d_conv": 3, "bias": True}),
    "mamba2-groups2-limit": dict(d_model=32, n_layer=2, vocab_size=101, pad_vocab_size_multiple=16,
                                 ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2,
                                          "chunk_size": 16, "dt_limit": (0.0, 0.3)}),
    "mamba2-untied": dict(d_model=48, n_layer=2, vocab_size=70, tie_embeddings=False,
                          ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 3, "chunk_size": 8,
                                   "conv_bias": False}),
}


def our_model(case: str, seed: int = 0) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    return perturb_(MambaLMHeadModel(MambaConfig(**OUR_CASES[case])), seed + 1).eval()


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_save_hf_loads_in_transformers_with_same_logits(case, tmp_path):
    model = our_model(case)
    vocab = model.config.vocab_size
    path = save_pretrained(model, tmp_path / "out", format="hf")
    stored = load_file(str(path / "model.safetensors"))
    assert "backbone.embeddings.weight" in stored and "backbone.embedding.weight" not in stored
    assert ("lm_head.weight" in stored) == (not model.config.tie_embeddings)
    assert stored["backbone.embeddings.weight"].shape[0] == vocab  # unpadded, as transformers expects
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind

    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(ref).__name__ == ("MambaForCausalLM" if model.config.mixer_layer == "Mamba1"
                                  else "Mamba2ForCausalLM")
    ids = ids_for(vocab, seed=1)
    out = our_logits(model, ids)
    assert rel_err(out[..., :vocab], hf_logits(ref, ids)) <= TOL
    prompt = ids[:1, :7]
    generated = model.generate(prompt, NEW_TOKENS, temperature=0)
    assert is_hf_full_forward_greedy(ref, generated, prompt.shape[1], vocab)
    if getattr(model.backbone.layers[0].mixer, "dt_limit", (0.0, math.inf)) == (0.0, math.inf):
        assert generated.tolist() == hf_greedy(ref, prompt).tolist()  # see test_hf_cached_decode_ignores_...

    back = from_pretrained(path)  # and back into mambakit
    assert rel_err(our_logits(back, ids), out[..., :vocab]) <= TOL


def test_save_hf_keeps_token_ids_and_extra_files(tmp_path):
    ref = hf_model("mamba-tied-oddvocab")
    ref.config.eos_token_id = 7
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"stale")
    model = from_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "hf", format="hf")  # in place
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["eos_token_id"] == 7 and cfg["model_type"] == "mamba"
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"
    assert not (tmp_path / "hf" / "pytorch_model.bin").exists()
    ids = ids_for(101)
    assert rel_err(our_logits(from_pretrained(tmp_path / "hf"), ids), hf_logits(ref, ids)) <= TOL


def test_save_hf_refuses_what_transformers_cannot_express(tmp_path):
    mlp = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32, d_intermediate=32,
                                       ssm_cfg={"layer": "Mamba1", "d_state": 4}))
    with pytest.raises(CheckpointError, match="d_intermediate"):
        save_pretrained(mlp, tmp_path / "a", format="hf")
    hdim = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32, ssm_cfg={
        "layer": "Mamba2", "d_state": 4, "headdim": 8, "D_has_hdim": True, "norm_before_gate": True}))
    with pytest.raises(CheckpointError, match="(?s)D_has_hdim.*norm_before_gate"):
        save_pretrained(hdim, tmp_path / "b", format="hf")
    eps = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32, norm_epsilon=1e-6,
                                       ssm_cfg={"layer": "Mamba2", "d_state": 4, "headdim": 8}))
    with pytest.raises(CheckpointError, match="epsilon"):
        save_pretrained(eps, tmp_path / "c", format="hf")
    with pytest.raises(CheckpointError, match="norm_epsilon"):
        save_pretrained(eps, tmp_path / "c", format="mamba_ssm")
    with pytest.raises(MambaKitError, match="format"):
        save_pretrained(eps, tmp_path / "c", format="gguf")
    from mambakit.models.config import MIXER_LAYERS

    if "S4" in MIXER_LAYERS:
        s4 = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32, ssm_cfg={"layer": "S4"}))
        for fmt in ("hf", "mamba_ssm"):
            with pytest.raises(CheckpointError, match="S4"):
                save_pretrained(s4, tmp_path / "d", format=fmt)
    assert not list(tmp_path.iterdir())  # nothing written


def test_save_is_atomic(tmp_path, monkeypatch):
    model = our_model("mamba1-untied")
    path = save_pretrained(model, tmp_path / "ck", format="hf")
    before = (path / "model.safetensors").read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(perturb_(model, 9), tmp_path / "ck", format="hf")
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ----------------------------------------------------------------------------------------------------------------------
# mamba_ssm layout and the native format
def test_mamba_ssm_round_trip(tmp_path):
    model = our_model("mamba2-groups2-limit")
    path = save_pretrained(model, tmp_path / "ssm", format="mamba_ssm")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "pytorch_model.bin"]
    cfg = json.loads((path / "config.json").read_text())
    assert set(cfg) == {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                        "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                        "tie_embeddings"}
    assert "norm_eps" not in cfg["ssm_cfg"] and cfg["ssm_cfg"]["dt_limit"] == [0.0, 0.3]
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    assert {"backbone.embedding.weight", "lm_head.weight"} <= set(sd)
    assert sd["backbone.embedding.weight"].shape[0] == model.config.padded_vocab_size
    ids = ids_for(model.config.vocab_size)
    assert rel_err(our_logits(from_pretrained(path), ids), our_logits(model, ids)) <= TOL


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_official_mamba_ssm_checkpoint(layer, tmp_path):
    """Written by hand as mamba_ssm writes it: official config fields (fused_add_norm, init-only ssm_cfg keys),
    pytorch_model.bin with backbone.embedding.weight and lm_head.weight, vocabulary padded to a multiple of 8."""
    if layer == "Mamba1":
        ref = perturb_(transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=104, hidden_size=32, state_size=8, num_hidden_layers=2)), 5).eval()
        ssm_cfg = {"d_state": 8, "use_fast_path": True}  # the 130m config has "ssm_cfg": {} (all defaults)
    else:
        ref = perturb_(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            vocab_size=104, hidden_size=32, state_size=16, num_hidden_layers=2, num_heads=8, head_dim=8,
            n_groups=2, chunk_size=16, tie_word_embeddings=True)), 5).eval()
        ssm_cfg = {"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 16,
                   "use_mem_eff_path": True, "d_ssm": None}
    d = tmp_path / "official"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(
        d_model=32, d_intermediate=0, n_layer=2, vocab_size=101, ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)))
    sd = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v.clone()
          for k, v in ref.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, d / "pytorch_model.bin")
    model = from_pretrained(d)
    assert model.pretrained_source["format"] == "mamba_ssm" and model.config.padded_vocab_size == 104
    ids = ids_for(101)
    assert rel_err(our_logits(model, ids), hf_logits(ref, ids)) <= TOL


def test_native_checkpoint(tmp_path):
    from mambakit.models import checkpoint

    model = our_model("mamba1-padded-vocab-tied")
    checkpoint.save_checkpoint(model, tmp_path / "native")
    loaded = from_pretrained(tmp_path / "native")
    ids = ids_for(101)
    assert rel_err(our_logits(loaded, ids), our_logits(model, ids)) <= TOL


# ----------------------------------------------------------------------------------------------------------------------
# errors
def test_missing_folder_and_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="(?s)state-spaces/mamba-130m-hf.*download.*--local-dir"):
        from_pretrained("state-spaces/mamba-130m-hf")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        from_pretrained(tmp_path / "f.bin")
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path)


@pytest.fixture
def hf_dir(tmp_path):
    hf_model("mamba2-groups2-untied").save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_weights(path, edit):
    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_weight_problems_are_listed_together(hf_dir):
    def edit(sd):
        del sd["backbone.layers.1.mixer.D"]
        sd["backbone.layers.0.mixer.extra"] = torch.zeros(3)
        sd["backbone.norm_f.weight"] = torch.ones(5)

    _edit_weights(hf_dir, edit)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(hf_dir)
    msg = str(info.value)
    assert "3 problems" in msg and "missing" in msg and "backbone.layers.1.mixer.D" in msg
    assert "unexpected" in msg and "backbone.layers.0.mixer.extra" in msg
    assert "backbone.norm_f.weight: shape (5,)" in msg and "(32,)" in msg


def test_missing_untied_lm_head_and_differing_tied_head(hf_dir):
    _edit_weights(hf_dir, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing tensors.*lm_head.weight"):
        from_pretrained(hf_dir)
    _edit_config(hf_dir, tie_word_embeddings=True)
    tied = from_pretrained(hf_dir)  # tied: lm_head may be absent, and is the embedding
    assert tied.lm_head.weight is tied.backbone.embedding.weight
    assert torch.equal(tied.lm_head.weight, load_file(str(hf_dir / "model.safetensors"))["backbone.embeddings.weight"])
    _edit_weights(hf_dir, lambda sd: sd.update({"lm_head.weight": torch.randn(101, 32)}))
    with pytest.raises(CheckpointError, match="differs from the embedding"):
        from_pretrained(hf_dir)


def test_bad_config_values_are_listed_together(hf_dir):
    _edit_config(hf_dir, hidden_act="gelu", num_heads=6, time_step_limit=[0.0, "lots"], chunk_size=0)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(hf_dir)
    msg = str(info.value)
    assert "4 problems" in msg
    assert "hidden_act 'gelu'" in msg and "num_heads * head_dim" in msg and "time_step_limit" in msg
    assert "chunk_size must be a positive integer" in msg


def test_unsupported_model_type_and_norm_fields(hf_dir):
    _edit_config(hf_dir, norm_before_gate=True)
    with pytest.raises(CheckpointError, match="norm_before_gate"):
        from_pretrained(hf_dir)
    _edit_config(hf_dir, norm_before_gate=False, model_type="zamba2")
    with pytest.raises(CheckpointError, match="zamba2"):
        from_pretrained(hf_dir)
    _edit_config(hf_dir, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        from_pretrained(hf_dir)


def test_mamba_ssm_config_errors(tmp_path):
    d = tmp_path / "ssm"
    save_pretrained(MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32,
                                                 ssm_cfg={"d_state": 4})), d, format="mamba_ssm")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "rms_norm": False, "n_head": 4}))
    with pytest.raises(CheckpointError, match="(?s)2 problems.*n_head.*rms_norm"):
        from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "ssm_cfg": {"d_state": 4, "bogus": 1}}))
    with pytest.raises(CheckpointError, match="bogus"):
        from_pretrained(d)


def test_bin_is_read_without_arbitrary_pickle(tmp_path):
    d = tmp_path / "evil"
    save_pretrained(MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32, ssm_cfg={"d_state": 4})),
                    d, format="mamba_ssm")
    torch.save({"backbone.norm_f.weight": torch.ones(16), "payload": MambaConfig()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        from_pretrained(d)
