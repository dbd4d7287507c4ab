"""mambakit.models.io.atomic: the one atomic folder writer (replace, carry over, roll back, leftover backups)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mambakit.errors import CheckpointError
from mambakit.models.io.atomic import backup_hint, leftover_backups, write_folder


def writer(**files: str):
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)
    return write


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_new_folder_with_ordinary_permissions(tmp_path):
    target = write_folder(tmp_path / "a" / "out", writer(x="1"))
    assert target == tmp_path / "a" / "out" and (target / "x").read_text() == "1"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask and (target / "x").stat().st_mode & 0o777 == 0o666 & ~mask
    assert hidden(tmp_path / "a") == []


def test_replace_keeps_only_what_keep_selects(tmp_path):
    write_folder(tmp_path / "out", writer(weights="old", tokenizer="tok", notes="n"))
    inode = (tmp_path / "out" / "tokenizer").stat().st_ino
    write_folder(tmp_path / "out", writer(weights="new"), keep=lambda name: name == "tokenizer")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer", "weights"]
    assert (tmp_path / "out" / "weights").read_text() == "new"
    assert (tmp_path / "out" / "tokenizer").stat().st_ino == inode  # hard-linked, not copied
    write_folder(tmp_path / "out", writer(weights="newer"))  # without keep nothing of the old folder survives
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["weights"]
    assert hidden(tmp_path) == []


def test_a_failed_write_leaves_the_old_folder(tmp_path):
    write_folder(tmp_path / "out", writer(weights="old"))

    def broken(tmp: Path) -> None:
        (tmp / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path / "out", broken)
    assert (tmp_path / "out" / "weights").read_text() == "old" and hidden(tmp_path) == []


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    write_folder(tmp_path / "out", writer(weights="old"))
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 3:  # (1: tmp -> new) the old folder has been moved away; moving the new one in fails
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        write_folder(tmp_path / "out", writer(weights="new"))
    monkeypatch.undo()
    assert (tmp_path / "out" / "weights").read_text() == "old" and hidden(tmp_path) == []


def test_a_file_is_not_replaced(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        write_folder(tmp_path / "out", writer(x="1"))
    assert (tmp_path / "out").read_text() == "a file" and hidden(tmp_path) == []


def test_leftover_backup_is_found(tmp_path):
    assert leftover_backups(tmp_path / "out") == [] and backup_hint(tmp_path / "out") == ""
    write_folder(tmp_path / "out", writer(x="1"))
    os.rename(tmp_path / "out", tmp_path / ".out.old-1234abcd")  # as if killed between the two renames
    assert leftover_backups(tmp_path / "out") == [tmp_path / ".out.old-1234abcd"]
    assert ".out.old-1234abcd" in backup_hint(tmp_path / "out") and "rename it" in backup_hint(tmp_path / "out")
    assert leftover_backups(tmp_path / "missing" / "out") == []
