"""The compat MambaLMHeadModel: official forward with inference_params, allocate_inference_cache, generate with the
official semantics (max_length total, greedy default, scores, eos), MambaConfig's official defaults."""
from __future__ import annotations

import pytest
import torch

from mambakit.compat.mamba_ssm.models.config_mamba import MambaConfig
from mambakit.compat.mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mambakit.compat.mamba_ssm.utils.generation import InferenceParams
from mambakit.models.lm import MambaLMHeadModel as MambaKitLM


def test_config_has_the_official_defaults():
    c = MambaConfig()
    assert (c.d_model, c.n_layer, c.vocab_size, c.fused_add_norm) == (2560, 64, 50277, True)
    assert (c.rms_norm, c.residual_in_fp32, c.pad_vocab_size_multiple, c.tie_embeddings) == (True, True, 8, True)


def tiny(layer="Mamba1", seed=0):
    torch.manual_seed(seed)
    ssm = {"layer": layer, "d_state": 8} if layer == "Mamba1" else {"layer": layer, "d_state": 8, "headdim": 16}
    return MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=ssm)).eval()


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_forward_with_inference_params_matches_the_full_forward(layer):
    model = tiny(layer)
    ids = torch.randint(0, 50, (2, 7))
    full = model(ids).logits
    params = InferenceParams(max_seqlen=7, max_batch_size=2)
    logits = model(ids[:, :5], inference_params=params).logits
    torch.testing.assert_close(logits, full[:, :5], rtol=1e-4, atol=1e-4)
    params.seqlen_offset += 5
    for t in (5, 6):
        step = model(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), inference_params=params,
                     num_last_tokens=1).logits
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
        params.seqlen_offset += 1
    conv, ssm = params.key_value_memory_dict[0]
    assert conv.shape[0] == 2 and ssm.shape[0] == 2


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2", "Mamba3"])
def test_several_tokens_after_the_prompt_match_the_full_forward(layer):
    model = tiny(layer)
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    params = InferenceParams(max_seqlen=11, max_batch_size=3)
    got = [model(ids[:, :4], inference_params=params).logits]
    for a, b in ((4, 8), (8, 9), (9, 11)):
        params.seqlen_offset = a
        got.append(model(ids[:, a:b], inference_params=params).logits)
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-4, atol=1e-4)


def test_allocate_inference_cache_layout():
    model = tiny()
    cache = model.allocate_inference_cache(3, max_seqlen=10)
    assert sorted(cache) == [0, 1]
    conv, ssm = cache[0]
    assert conv.shape == (3, 64, 4) and ssm.shape == (3, 64, 8)


def test_generate_is_greedy_by_default_and_max_length_is_the_total():
    model = tiny()
    ids = torch.randint(0, 50, (2, 4))
    out = model.generate(ids, max_length=10)
    assert out.shape == (2, 10)
    ours = MambaKitLM.generate(model, ids, max_new_tokens=6, temperature=0)
    assert torch.equal(out, ours)


def test_generate_returns_scores_and_stops_at_eos():
    model = tiny(seed=1)
    ids = torch.randint(0, 50, (1, 3))
    res = model.generate(ids, max_length=8, return_dict_in_generate=True, output_scores=True)
    assert res.sequences.shape == (1, 8) and len(res.scores) == 5
    assert torch.equal(res.scores[0].argmax(-1), res.sequences[:, 3])
    eos = int(res.sequences[0, 5])
    stopped = model.generate(ids, max_length=8, eos_token_id=eos)
    assert stopped.shape[1] <= 6 and int(stopped[0, -1]) == eos
    assert model.generate(ids, max_length=8, return_dict_in_generate=True).scores is None


def test_sampling_options_run():
    model = tiny()
    ids = torch.randint(0, 50, (2, 3))
    torch.manual_seed(0)
    out = model.generate(ids, max_length=6, top_k=0, top_p=0.9, temperature=0.7, repetition_penalty=1.2)
    assert out.shape == (2, 6) and torch.equal(out[:, :3], ids)


def test_from_pretrained_gives_the_compat_class(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "ckpt", format="mamba_ssm")
    loaded = MambaLMHeadModel.from_pretrained(str(tmp_path / "ckpt"))
    assert type(loaded) is MambaLMHeadModel
    ids = torch.randint(0, 50, (1, 4))
    assert torch.equal(loaded.generate(ids, 7), model.generate(ids, 7))


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_varlen_prefill_fills_one_cache_row_per_sequence(layer):
    """Packed prompts of lengths 5, 3, 6 with cu_seqlens and seq_idx, then 3 decode steps of batch 3, against each
    sequence's own full forward (float64 model)."""
    model = tiny(layer).double()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 50, (1, n + 3), generator=g) for n in (5, 3, 6)]
    refs = [model(s).logits for s in seqs]
    prompts = [s[:, :-3] for s in seqs]
    cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
    seq_idx = torch.cat([torch.full((p.shape[1],), i, dtype=torch.int32) for i, p in enumerate(prompts)])[None]
    params = InferenceParams(max_seqlen=32, max_batch_size=3)
    logits = model(torch.cat(prompts, 1), inference_params=params, seq_idx=seq_idx, cu_seqlens=cu).logits
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(logits[0, a:b], refs[i][0, :b - a], rtol=1e-9, atol=1e-9)
    for t in range(3):
        params.seqlen_offset += 1
        tokens = torch.stack([s[0, p.shape[1] + t] for s, p in zip(seqs, prompts)])[:, None]
        step = model(tokens, inference_params=params, num_last_tokens=1).logits
        for i, (s, p) in enumerate(zip(seqs, prompts)):
            torch.testing.assert_close(step[i, 0], refs[i][0, p.shape[1] + t], rtol=1e-9, atol=1e-9)


def test_varlen_prefill_names_bad_arguments():
    from mambakit.errors import MambaKitError

    model = tiny("Mamba2")
    ids, cu = torch.randint(0, 50, (1, 6)), torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(MambaKitError, match="seq_idx"):
        model(ids, inference_params=InferenceParams(max_seqlen=8, max_batch_size=2), cu_seqlens=cu,
              seq_idx=torch.zeros(1, 6, dtype=torch.int32))
    with pytest.raises(MambaKitError, match="cu_seqlens"):
        model(ids, inference_params=InferenceParams(max_seqlen=8, max_batch_size=2),
              cu_seqlens=torch.tensor([0, 2, 7], dtype=torch.int32))


def test_varlen_prefill_with_trailing_padding_keeps_no_state_from_it():
    """cu_seqlens ending before the packed length (official padding): the sequences' logits and cache rows are
    those of the unpadded prefill; an empty last sequence keeps a zero state."""
    model = tiny("Mamba2").double()
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(4))
    ref_params = InferenceParams(max_seqlen=16, max_batch_size=3)
    ref = model(ids[:, :6], inference_params=ref_params, cu_seqlens=torch.tensor([0, 2, 6, 6])).logits
    params = InferenceParams(max_seqlen=16, max_batch_size=3)
    got = model(ids, inference_params=params, cu_seqlens=torch.tensor([0, 2, 6, 6])).logits
    assert got.shape[1] == 9
    torch.testing.assert_close(got[:, :6], ref, rtol=1e-12, atol=1e-12)
    for layer, (conv, ssm) in params.key_value_memory_dict.items():
        ref_conv, ref_ssm = ref_params.key_value_memory_dict[layer]
        torch.testing.assert_close(ssm, ref_ssm, rtol=0, atol=0)
        torch.testing.assert_close(conv, ref_conv, rtol=0, atol=0)
        assert not ssm[2].any() and ssm[1].abs().sum() > 0
