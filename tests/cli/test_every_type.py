"""Every supported transformers `model_type` through the commands: `generate` and `explain` read a tiny random
folder with its own tokenizer.json, and `train --init-from` fine-tunes it (all weights, and LoRA on the Mamba
projections) into a folder that transformers reads back with mambakit's logits (CPU, fp32)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from mambakit.cli import main  # noqa: E402
from mambakit.models.io import from_pretrained  # noqa: E402
from tests.cli.conftest import bpe_tokenizer_json  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB = 96
FAST = ["--steps", "3", "--seq-len", "16", "--batch-size", "2", "--eval-interval", "3", "--eval-batches", "1",
        "--lr", "1e-2", "--no-progress"]
_M2 = dict(mamba_n_heads=4, mamba_d_state=4, mamba_chunk_size=8)
# model_type -> (transformers class prefix, config keywords): every kind of layer each type has, tiny
TYPES = {
    "mamba": ("Mamba", dict(hidden_size=16, num_hidden_layers=2, state_size=4)),
    "mamba2": ("Mamba2", dict(hidden_size=16, num_hidden_layers=2, state_size=4, num_heads=4, head_dim=8, n_groups=1,
                              chunk_size=8)),
    "falcon_mamba": ("FalconMamba", dict(hidden_size=16, num_hidden_layers=2, state_size=4)),
    "bamba": ("Bamba", dict(_M2, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                            num_hidden_layers=2, attn_layer_indices=[1])),
    "nemotron_h": ("NemotronH", dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                     intermediate_size=24, ssm_state_size=4, mamba_num_heads=4, mamba_head_dim=8,
                                     n_groups=1, chunk_size=8,
                                     layers_block_type=["linear_attention", "full_attention", "mlp"])),
    "granitemoehybrid": ("GraniteMoeHybrid", dict(
        hidden_size=16, num_attention_heads=2, mamba_n_heads=4, mamba_d_state=4, mamba_chunk_size=8,
        shared_intermediate_size=24, intermediate_size=12, num_hidden_layers=2, num_key_value_heads=1,
        layer_types=["linear_attention", "full_attention"], num_local_experts=3, num_experts_per_tok=2,
        position_embedding_type="rope", embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=3.0)),
    "jamba": ("Jamba", dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                            mamba_d_state=4, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
                            num_experts=3, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1)),
    "zamba2": ("Zamba2", dict(hidden_size=16, intermediate_size=20, num_attention_heads=2, n_mamba_heads=4,
                              mamba_d_state=4, chunk_size=8, adapter_rank=3, num_hidden_layers=3, num_mem_blocks=1,
                              layers_block_type=["mamba", "hybrid", "mamba"])),
    "falcon_h1": ("FalconH1", dict(_M2, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                   num_key_value_heads=1, num_hidden_layers=2, mamba_d_ssm=24, ssm_in_multiplier=1.1,
                                   ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.7], attention_in_multiplier=1.2)),
}


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("my_texts")
    (folder / "a.txt").write_text("".join(f"the cat number {n} sat on the mat and the dog ran {n % 7} times.\n"
                                          for n in range(120)))
    return folder


@pytest.fixture(scope="module")
def tokenizer_json(texts, tmp_path_factory) -> Path:
    return bpe_tokenizer_json([texts / "a.txt"], VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _folder(model_type: str, tokenizer_json: Path, root: Path) -> Path:
    prefix, kwargs = TYPES[model_type]
    if not hasattr(transformers, prefix + "ForCausalLM"):
        pytest.skip(f"this transformers has no {prefix}")
    torch.manual_seed(0)
    config = getattr(transformers, prefix + "Config")(vocab_size=VOCAB, **kwargs)
    folder = root / "hf"
    getattr(transformers, prefix + "ForCausalLM")(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return folder


@pytest.mark.parametrize("model_type", list(TYPES))
def test_generate_explain_and_finetune(model_type, tokenizer_json, texts, tmp_path, capsys):
    folder = _folder(model_type, tokenizer_json, tmp_path)
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "the cat", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    pictures = tmp_path / "explain"
    assert main(["explain", "--checkpoint", str(folder), "--prompt", "the cat sat on", "--out", str(pictures),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("prediction after the last token ") and "top-" in printed
    names = sorted(p.name for p in pictures.iterdir())
    assert {"rollout.png", "attribution.png", "relevance.png"} < set(names) and "layer_00.png" in names

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    before = from_pretrained(folder).state_dict()
    for mode, extra in (("full", []), ("lora", ["--lora-rank", "2"])):
        out = tmp_path / mode
        assert main(["train", "--init-from", str(folder), "--data", str(texts), "--out", str(out), *FAST,
                     *extra]) == 0
        ckpt = out / "checkpoint"
        assert (ckpt / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
        ours = from_pretrained(ckpt).eval()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
        assert type(theirs).__name__ == TYPES[model_type][0] + "ForCausalLM"
        with torch.no_grad():
            assert rel_err(ours(ids).logits[..., :VOCAB], theirs(ids).logits) <= 1e-5
        changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
        if mode == "full":
            assert "backbone.embedding.weight" in changed
        else:  # only the Mamba mixers' projections move
            assert changed and all(k.endswith(("in_proj.weight", "out_proj.weight")) for k in changed), changed
            assert all(".attn." not in k and "shared" not in k for k in changed), changed
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "lora"), "--prompt", "the dog", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("the dog")
