"""Finding a checkpoint folder and choosing its tokenizer (`mambakit.cli.loading`)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mambakit.cli.loading import MAX_BYTE_VOCAB, find_checkpoint, load_tokenizer
from mambakit.data import ByteTokenizer
from mambakit.errors import MambaKitError


def test_find_checkpoint_accepts_a_training_output_folder(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert find_checkpoint(tmp_path / "checkpoint") == tmp_path / "checkpoint"
    assert find_checkpoint(tmp_path / "missing") == tmp_path / "missing"  # the loader names what is wrong


def test_bytes_only_for_a_byte_sized_vocabulary(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tmp_path, 256), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path, MAX_BYTE_VOCAB), ByteTokenizer)
    with pytest.raises(MambaKitError, match="vocabulary of 50280 tokens but no tokenizer.json"):
        load_tokenizer(tmp_path, 50280)


def test_tokenizer_json_is_read(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")  # optional third-party dependency (mambakit[hf])
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path, 50280)
    assert loaded.vocab_size == 3 and loaded.encode("hello world") == [1, 2]
    (tmp_path / "tokenizer.json").write_text("{oops")
    with pytest.raises(MambaKitError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path, 3)
