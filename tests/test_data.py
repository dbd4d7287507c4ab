"""Tests of mambakit.data: built-in corpus, loading from disk, split, byte tokenizer, batch sampler."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from mambakit.data import (
    BatchSampler,
    ByteTokenizer,
    bytes_to_tensor,
    default_corpus_files,
    load_text_corpus,
    split_train_val,
)
from mambakit.errors import MambaKitError


def test_default_corpus_files_found_sorted_and_deterministic() -> None:
    files = default_corpus_files()
    assert len(files) > 50
    assert files == default_corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in files:
        assert f.suffix == ".py"
        parts = f.relative_to(stdlib).parts
        assert "site-packages" not in parts and "test" not in parts


def test_default_corpus_respects_the_cap() -> None:
    files = default_corpus_files(max_bytes=200_000)
    assert files and sum(f.stat().st_size for f in files) <= 200_000
    assert files == default_corpus_files()[: len(files)]


def test_load_default_corpus_is_utf8_text() -> None:
    data = load_text_corpus(None)
    assert isinstance(data, bytes) and len(data) > 1_000_000
    assert "def " in data[:200_000].decode("utf-8")


def test_load_file_and_folder(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("héllo world\n")
    assert load_text_corpus(f) == "héllo world\n".encode()
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first\n")
    (folder / "sub" / "c.md").write_text("third\n")
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02\xff")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert load_text_corpus(folder) == b"first\nsecond\nthird\n"
    assert load_text_corpus(str(folder)) == load_text_corpus(folder)


def _bad_path(tmp_path: Path, kind: str) -> Path:
    """A data path of the given kind of badness."""
    if kind == "missing":
        return tmp_path / "missing.txt"
    if kind == "empty dir":
        (tmp_path / "d").mkdir()
        return tmp_path / "d"
    content = {"empty file": b"", "binary file": b"\x00\xff\x10", "whitespace file": b" \n\n"}[kind]
    (tmp_path / "f.txt").write_bytes(content)
    return tmp_path / "f.txt"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("empty file", "is empty"),
        ("binary file", "not UTF-8 text"),
        ("whitespace file", "only whitespace"),
        ("empty dir", "is empty"),
    ],
)
def test_bad_paths_raise(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(MambaKitError, match=message):
        load_text_corpus(_bad_path(tmp_path, kind))


def test_folder_without_text_raises(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "y.txt").write_bytes(b"")
    with pytest.raises(MambaKitError, match="no UTF-8 text"):
        load_text_corpus(tmp_path)


def test_split_is_deterministic_and_covers_everything() -> None:
    data = bytes(range(256)) * 40
    train, val = split_train_val(data)
    assert (train, val) == split_train_val(data)
    assert train + val == data
    assert len(val) == int(len(data) * 0.05)
    with pytest.raises(MambaKitError):
        split_train_val(data, val_fraction=0.0)
    with pytest.raises(MambaKitError):
        split_train_val(b"x")


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    text = "def f(x):\n    return 'ünïcode ✓'\n"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # truncated UTF-8 becomes the replacement character
    with pytest.raises(MambaKitError):
        tok.decode([256])


def test_batch_sampler_windows_are_shifted_and_seeded() -> None:
    data = bytes_to_tensor(bytes(range(200)))
    sampler = BatchSampler(data, batch_size=4, seq_len=16, seed=3)
    x, y = sampler.batch(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((y - x) % 256, torch.ones_like(x))  # consecutive bytes of the source
    assert torch.equal(sampler.batch(0)[0], x)
    assert not torch.equal(sampler.batch(1)[0], x)
    assert not torch.equal(BatchSampler(data, 4, 16, seed=4).batch(0)[0], x)
    full = BatchSampler(bytes_to_tensor(bytes(range(17))), batch_size=2, seq_len=16)
    assert torch.equal(full.batch(5)[1][0], torch.arange(1, 17))  # exactly one window fits


def test_batch_sampler_rejects_short_data() -> None:
    with pytest.raises(MambaKitError, match="seq_len"):
        BatchSampler(bytes_to_tensor(b"short"), batch_size=2, seq_len=16)
    with pytest.raises(MambaKitError):
        BatchSampler(torch.zeros(100, dtype=torch.int64), batch_size=2, seq_len=16)
