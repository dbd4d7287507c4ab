"""Write a checkpoint folder atomically: an interrupted save leaves the old folder or the new one, never a mix.

`write_folder` fills a temporary sibling folder (same filesystem), flushes it to disk, then swaps it in with two
renames: the existing folder away to ``.NAME.old-XXXXXXXX``, the new one in; the old one is deleted last. A
failure at any point removes the temporary folder and leaves an existing checkpoint as it was. A process killed
between the two renames leaves only the backup, which `backup_hint` points the next reader to.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Optional

from mambakit.errors import CheckpointError

BACKUP_INFIX = ".old-"


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames) to disk; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _apply_default_modes(directory: Path) -> None:
    """Give a folder and its entries the permissions of an ordinary mkdir / open (mkdtemp makes 0700, safetensors
    0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for entry in directory.iterdir():
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link (or copy) the entries of `old` for which keep(name) holds into `new`, unless `new` has them."""
    for entry in old.iterdir():
        if not keep(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            try:
                os.link(entry, new / entry.name, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def write_folder(target: Path, write: Callable[[Path], None], keep: Optional[Callable[[str], bool]] = None) -> Path:
    """Create or replace the folder `target` atomically and return it.

    write(tmp) writes the new files into a temporary folder. keep(name), when given, selects the files of an
    existing `target` that the new folder carries over (e.g. a tokenizer beside the weights); without it nothing of
    the old folder survives. Raises CheckpointError when `target` is a file; re-raises whatever write raises.
    """
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save to {str(target)!r}: it exists and is not a directory")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        write(tmp)
        _apply_default_modes(tmp)
        if keep is not None and target.is_dir():
            _carry_over(target, tmp, keep)
        for f in tmp.iterdir():
            if f.is_file() and not f.is_symlink():
                fsync_file(f)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old: Optional[Path] = None
    try:
        if target.exists():
            old = parent / f".{target.name}{BACKUP_INFIX}{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous checkpoint back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def leftover_backups(target: Path) -> list[Path]:
    """Previous checkpoints left beside `target` by a save interrupted between its two renames, oldest name first."""
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}{BACKUP_INFIX}*"))


def backup_hint(target: Path) -> str:
    """'; an interrupted save left ...' for a missing `target` that has a leftover backup, else ''."""
    backups = leftover_backups(target)
    if not backups:
        return ""
    return f"; an interrupted save left the previous checkpoint at {str(backups[-1])!r} (rename it to restore it)"
