"""Shared pieces of the command-line tests: a tiny training run on a small corpus, and the one-error-line check."""
from __future__ import annotations

from pathlib import Path

import pytest

from mambakit.cli import main

TINY = ["--steps", "4", "--d-model", "16", "--n-layer", "1", "--d-state", "4", "--seq-len", "16",
        "--batch-size", "2", "--eval-interval", "2", "--eval-batches", "1", "--sample-tokens", "8", "--no-progress"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(f"for i in range({n}):\n    print(i)\n" for n in range(500)))
    return path


@pytest.fixture(scope="session")
def run_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The --out folder of `mambakit train` with the TINY options on `corpus`."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    return out


def bpe_tokenizer_json(files: list[Path], vocab_size: int, path: Path) -> Path:
    """Train a byte-level BPE tokenizer of at most vocab_size ids on `files` and save it as `path` (a
    tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(p) for p in files], trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0]))
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(path))
    return path


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The single line written to stderr, checked to be an 'error: ...' line."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]
