"""What the tests of the transformers hybrids (bamba, nemotron_h, granitemoehybrid) share."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

NEW_TOKENS = 8  # greedy tokens compared with transformers' generate (few: its CPU generate is slow)


@torch.no_grad()
def hf_generate(model: torch.nn.Module, prompt: torch.Tensor, mask: Optional[torch.Tensor] = None,
                new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """transformers' greedy generate; an explicit mask, else prompt tokens equal to pad_token_id read as padding."""
    return model.generate(prompt, attention_mask=torch.ones_like(prompt) if mask is None else mask,
                          max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def save_cases(build: Callable[[str], torch.nn.Module], cases, tmp_path_factory) -> dict[str, tuple]:
    """case -> (the transformers model build(case), the folder it was saved into)."""
    out = {}
    for case in cases:
        ref = build(case)
        folder = Path(tmp_path_factory.mktemp(case)) / "hf"
        ref.save_pretrained(folder)
        out[case] = (ref, folder)
    return out


def nemotron_dt_as_defined(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' Nemotron-H `model` with each Mamba-2 mixer clamping dt to config.time_step_limit, as NVIDIA's
    original (on its kernel path) and transformers >= 5.25 do; transformers < 5.25 clamped its prefill's dt to
    [time_step_min, inf) instead (an upstream bug, fixed in 5.25). A no-op with 5.25. Returns `model`."""
    mixers = [m for m in model.modules() if type(m).__name__ == "NemotronHMamba2Mixer"]
    assert mixers or "linear_attention" not in model.config.layers_block_type, "no NemotronHMamba2Mixer found"
    for m in mixers:
        m.time_step_limit = tuple(model.config.time_step_limit)
    return model


def round_trip(ref: torch.nn.Module, folder: Path, out: Path, seqlen: int = 19, tol: float = 1e-5,
               prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> dict:
    """Load `folder` with mambakit, save it in transformers format into `out`, and check that transformers (its model
    passed through `prepare`) and mambakit both read it back with ref's logits and ref's class; returns the written
    config.json."""
    import json

    import transformers

    from mambakit.models.io import from_pretrained, save_pretrained
    from tests.conftest import rel_err
    from tests.models.test_pretrained import hf_logits, ids_for, our_logits

    model = from_pretrained(folder)
    ids = ids_for(ref.config.vocab_size, seqlen=seqlen, seed=1)
    want = hf_logits(ref, ids)
    save_pretrained(model, out, format="hf")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == ref.config.model_type and raw["architectures"] == [type(ref).__name__]
    back = prepare(transformers.AutoModelForCausalLM.from_pretrained(out).eval())
    assert type(back) is type(ref)
    assert rel_err(hf_logits(back, ids), want) <= tol
    assert rel_err(our_logits(from_pretrained(out), ids), want) <= tol
    return raw


def check_left_padding(model: torch.nn.Module, ref: torch.nn.Module, new_tokens: int = 6) -> None:
    """A left-padded batch (a 5-token row padded by 4, a 9-token row) decodes each row as alone, and as ref does."""
    from tests.models.test_pretrained import ids_for

    short, long = ids_for(ref.config.vocab_size, 1, 5, seed=3), ids_for(ref.config.vocab_size, 1, 9, seed=4)
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(long)])
    out = model.generate(batch, new_tokens, temperature=0, attention_mask=mask)
    assert out[0, 4:].tolist() == model.generate(short, new_tokens, temperature=0)[0].tolist()
    assert out[1].tolist() == model.generate(long, new_tokens, temperature=0)[0].tolist()
    assert out.tolist() == hf_generate(ref, batch, mask, new_tokens=new_tokens).tolist()


def refusal(folder: Path, out: Path, **updates) -> str:
    """The CheckpointError text of loading `folder`'s config.json with `updates` applied (written into `out`)."""
    import json

    import pytest

    from mambakit.errors import CheckpointError
    from mambakit.models.io import from_pretrained

    raw = json.loads((folder / "config.json").read_text())
    raw.update(updates)
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(out)
    return str(info.value)


def check_gradients(model: torch.nn.Module, ref: torch.nn.Module, model_type: str, ids: torch.Tensor,
                    tol: float = 1e-4) -> int:
    """The gradient of the same next-token loss with respect to every parameter equals transformers' (found by the
    file name of each parameter); returns how many parameters were compared. The embedding row of pad_token_id is
    left out: transformers' embeddings never train it (padding_idx), mambakit's do."""
    from mambakit.models.io.hybrid import hybrid_key_map
    from tests.conftest import rel_err

    names = hybrid_key_map(model.config, model_type)
    theirs = dict(ref.named_parameters())
    for m in (model, ref):
        m.zero_grad()
        m(ids[:, :-1], labels=None).logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).mean().backward()
    compared = 0
    for name, p in model.named_parameters():
        q = theirs[names[name]]
        assert p.grad is not None and q.grad is not None, name
        ours, want = p.grad, q.grad
        if name == "backbone.embedding.weight" and ref.config.pad_token_id is not None:
            keep = torch.arange(ours.shape[0]) != ref.config.pad_token_id
            ours, want = ours[keep], want[keep]
        assert rel_err(ours, want) <= tol, (name, rel_err(ours, want))
        compared += 1
    return compared
