"""Falcon-Mamba (transformers model_type "falcon_mamba") against transformers: loading, logits, greedy generation,
the decoding step, and saving in transformers and native format (CPU, fp32, tiny random models)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FalconMambaForCausalLM"):
    pytest.skip("this transformers has no FalconMamba", allow_module_level=True)

from mambakit.errors import CheckpointError  # noqa: E402
from mambakit.models.pretrained import from_pretrained, save_pretrained  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.models.test_pretrained import hf_greedy, ids_for, perturb_  # noqa: E402
from tests.models.test_pretrained import our_logits as logits  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

TOL = 1e-5
CASES = {
    "tied": dict(vocab_size=101, hidden_size=32, state_size=8, num_hidden_layers=2),
    "untied-rank5-eps": dict(vocab_size=77, hidden_size=48, state_size=4, num_hidden_layers=2, time_step_rank=5,
                             use_conv_bias=False, use_bias=True, conv_kernel=3, tie_word_embeddings=False,
                             mixer_rms_eps=1e-3),
}


def hf_falcon(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**CASES[case]))
    return perturb_(model, seed + 1).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_falcon_mamba_loads_with_same_logits_and_greedy_tokens(case, tmp_path):
    ref = hf_falcon(case)
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    mixer = model.backbone.layers[0].mixer
    assert mixer.bcdt_rms and mixer.bcdt_rms_eps == ref.config.mixer_rms_eps
    ids = ids_for(ref.config.vocab_size, seqlen=23)
    assert rel_err(logits(model, ids), logits(ref, ids)) <= TOL
    prompt = ids[:1, :9]
    want = hf_greedy(ref, prompt)
    assert model.generate(prompt, want.shape[1] - prompt.shape[1], temperature=0).tolist() == want.tolist()


def test_falcon_mamba_step_loop_equals_forward(tmp_path):
    ref = hf_falcon("tied")
    ref.save_pretrained(tmp_path / "hf")
    mixer = from_pretrained(tmp_path / "hf").backbone.layers[1].mixer
    x = torch.randn(2, 11, mixer.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = mixer(x)
        state = mixer.allocate_state(2)
        steps = torch.cat([mixer.step(x[:, t:t + 1], state) for t in range(x.shape[1])], dim=1)
    assert rel_err(steps, full) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_falcon_mamba_saves_for_transformers_and_natively(case, tmp_path):
    ref = hf_falcon(case, seed=4)
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    ids = ids_for(ref.config.vocab_size, seqlen=23, seed=1)
    want = logits(ref, ids)

    out = save_pretrained(model, tmp_path / "out", format="hf")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "falcon_mamba" and raw["architectures"] == ["FalconMambaForCausalLM"]
    assert raw["mixer_rms_eps"] == ref.config.mixer_rms_eps
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "FalconMambaForCausalLM"
    assert rel_err(logits(back, ids), want) <= TOL

    native = save_pretrained(model, tmp_path / "native")
    again = from_pretrained(native)
    assert again.backbone.layers[0].mixer.bcdt_rms
    assert rel_err(logits(again, ids)[..., :ref.config.vocab_size], want) <= TOL


def test_falcon_mamba_bad_mixer_rms_eps_is_refused(tmp_path):
    ref = hf_falcon("tied")
    ref.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    raw = json.loads(path.read_text())
    raw["mixer_rms_eps"] = -1
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="mixer_rms_eps must be a positive number, got -1"):
        from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("case", list(CASES))
def test_falcon_mamba_chunked_prefill_and_left_padded_batch(case, tmp_path):
    """The cache continues a prefill in chunks with the one-pass logits; a left-padded batch decodes each row as
    alone, and as transformers' generate does."""
    from tests.models.io.hybrid_helpers import check_left_padding

    ref = hf_falcon(case)
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    ids = ids_for(ref.config.vocab_size, seqlen=21, seed=2)
    cache = model.allocate_cache(2)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 4), (4, 5), (5, 21))]
    assert rel_err(torch.cat(parts, dim=1), logits(model, ids)) <= TOL
    check_left_padding(model, ref)


def test_falcon_mamba_problems_are_listed_together(tmp_path):
    """One CheckpointError names every value mambakit cannot compute exactly, and the missing tensor too."""
    from tests.models.io.hybrid_helpers import refusal

    ref = hf_falcon("tied")
    ref.save_pretrained(tmp_path / "hf")
    text = refusal(tmp_path / "hf", tmp_path / "bad", mixer_rms_eps=0, hidden_act="gelu", time_step_rank=0)
    assert "mixer_rms_eps must be a positive number, got 0" in text
    assert "hidden_act 'gelu' is not supported" in text and "time_step_rank must be a positive integer" in text
