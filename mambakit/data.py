"""Byte-level text data: the built-in corpus, loading text from disk, train/validation split, batches.

The built-in corpus is the Python standard library's own ``.py`` sources (found through
``sysconfig.get_paths()["stdlib"]``), so ``mambakit train`` works on any machine with no download.
Text is kept as raw UTF-8 bytes and modelled one byte per token (`ByteTokenizer`, vocabulary 256).
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from mambakit.errors import MambaKitError

#: Cap on the built-in corpus (bytes): the first files in sorted order until this much is gathered.
DEFAULT_CORPUS_MAX_BYTES = 20_000_000
#: Folders of the standard library left out of the built-in corpus (third-party code, tests, charmap tables).
DEFAULT_CORPUS_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
)
#: Fraction of the corpus (its last bytes) held out for validation.
DEFAULT_VAL_FRACTION = 0.05


def _walk_sorted(root: Path, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """All files under `root`, recursively, in a deterministic order (sorted by path), hidden entries skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        found.extend(Path(dirpath) / name for name in sorted(filenames) if not name.startswith("."))
    return found


def default_corpus_files(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> list[Path]:
    """The standard library's ``.py`` files forming the built-in corpus, sorted, at most `max_bytes` in total.

    Third-party packages (site-packages), test suites and the ``encodings`` charmap tables are skipped.
    The order is sorted by path, so the list is the same on every call for a given Python installation.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise MambaKitError(f"cannot find the Python standard library at {root} for the built-in corpus; pass --data")
    files: list[Path] = []
    total = 0
    for path in _walk_sorted(root, DEFAULT_CORPUS_SKIP_DIRS):
        if path.suffix != ".py" or not path.is_file():
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def _read_text_bytes(path: Path) -> bytes | None:
    """The file's bytes when it holds UTF-8 text (no NUL bytes), else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def _join(chunks: list[bytes]) -> bytes:
    """Concatenate file contents, each ending with a newline."""
    return b"".join(c if c.endswith(b"\n") else c + b"\n" for c in chunks if c)


def load_text_corpus(path: str | os.PathLike[str] | None = None) -> bytes:
    """Load a text corpus as UTF-8 bytes.

    `path` is None (the built-in corpus, see `default_corpus_files`), a text file, or a folder whose text
    files are read recursively in sorted order (binary or non-UTF-8 files are skipped).
    Raises `MambaKitError` when the path is missing, empty, or yields no text.
    """
    if path is None:
        chunks = [c for c in (_read_text_bytes(p) for p in default_corpus_files()) if c]
        data = _join(chunks)
        if not data:
            raise MambaKitError("the built-in corpus (Python standard library sources) is empty; pass --data PATH")
        return data
    p = Path(path)
    if not p.exists():
        raise MambaKitError(f"data path {str(path)!r} does not exist")
    if p.is_file():
        if p.stat().st_size == 0:
            raise MambaKitError(f"data file {str(path)!r} is empty")
        data = _read_text_bytes(p)
        if data is None:
            raise MambaKitError(f"data file {str(path)!r} is not UTF-8 text (binary or undecodable)")
        if not data.strip():
            raise MambaKitError(f"data file {str(path)!r} holds only whitespace")
        return data
    if p.is_dir():
        files = _walk_sorted(p)
        if not files:
            raise MambaKitError(f"data folder {str(path)!r} is empty")
        chunks = [c for c in (_read_text_bytes(f) for f in files if f.is_file()) if c and c.strip()]
        if not chunks:
            raise MambaKitError(
                f"data folder {str(path)!r} holds {len(files)} file(s) "
                f"but no UTF-8 text (all binary, empty or undecodable)"
            )
        return _join(chunks)
    raise MambaKitError(f"data path {str(path)!r} is neither a file nor a folder")


def split_train_val(data: bytes, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[bytes, bytes]:
    """Split bytes deterministically: the last `val_fraction` of the bytes is validation, the rest training."""
    if not 0.0 < val_fraction < 1.0:
        raise MambaKitError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    if len(data) < 2:
        raise MambaKitError(f"corpus too small to split: {len(data)} byte(s)")
    n_val = max(1, int(len(data) * val_fraction))
    return data[:-n_val], data[-n_val:]


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    """A uint8 tensor (1-D) holding a copy of `data`."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, no special tokens."""

    vocab_size: int = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (its UTF-8 bytes)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; invalid UTF-8 sequences become U+FFFD. Ids must lie in [0, 256)."""
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise MambaKitError(f"byte token ids must lie in [0, 256), got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass
class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens from a 1-D uint8 tensor, as (inputs, targets) int64 pairs.

    The windows of a batch depend only on (`seed`, `index`), so training resumed at step k draws exactly
    the batches an uninterrupted run would have drawn: no generator state needs saving.
    """

    data: torch.Tensor
    batch_size: int
    seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data.dim() != 1 or self.data.dtype != torch.uint8:
            raise MambaKitError(f"data must be a 1-D uint8 tensor, got {self.data.dim()}-D {self.data.dtype}")
        if self.batch_size <= 0 or self.seq_len <= 0:
            raise MambaKitError(f"batch_size and seq_len must be positive, got {self.batch_size} and {self.seq_len}")
        if self.data.numel() < self.seq_len + 1:
            raise MambaKitError(
                f"data has {self.data.numel()} bytes, fewer than seq_len + 1 = {self.seq_len + 1}; "
                "use more data or a smaller sequence length"
            )

    def batch(self, index: int, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index`: inputs and next-token targets, each (batch_size, seq_len) int64.

        `rows` keeps only those rows of the batch (a data-parallel rank's share): (len(rows), seq_len) each,
        equal to the same rows of the whole batch, without gathering the others.
        """
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (2**63))
        n_starts = self.data.numel() - self.seq_len  # valid window starts: [0, n_starts)
        starts = torch.randint(0, n_starts, (self.batch_size,), generator=gen)
        if rows is not None:
            starts = starts[rows]
        offsets = torch.arange(self.seq_len + 1)
        windows = self.data[starts[:, None] + offsets[None, :]].long()  # (batch, seq_len + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
