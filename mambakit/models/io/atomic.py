"""Write a checkpoint folder atomically: an interrupted save leaves the old folder or the new one, never a mix, and
the next save or load puts right what a killed one left behind.

`write_folder` fills a temporary sibling folder ``.NAME.tmp-TAG`` (same filesystem), flushes it to disk, renames it
``.NAME.new-TAG`` (complete), then swaps it in with two renames: the existing folder away to ``.NAME.old-TAG``, the
new one in; the old one is deleted last. TAG names the writer (a hash of the host name, the process id, a random
part). A failure at any point removes what this save made and leaves an existing checkpoint as it was.

A process killed midway leaves some of these folders. `tidy` (called by every save, and by `recover` before a
load) deletes those of writers that are gone and, when NAME itself is missing (killed between the two renames),
renames the newest complete one back to NAME, saying so in one line (logger ``mambakit``, a warning: printed on
stderr unless logging is configured). Folders of a live writer are never touched; a writer is judged only on its
own host (another host's leftovers are left alone) and never on Windows.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from mambakit.errors import CheckpointError

TMP_INFIX, READY_INFIX, BACKUP_INFIX = ".tmp-", ".new-", ".old-"
_INFIXES = (TMP_INFIX, READY_INFIX, BACKUP_INFIX)
LOG = logging.getLogger("mambakit")
# Writer tags of the saves running in this process now (a leftover with this process id and another tag is stale).
_RUNNING: set[str] = set()
_RUNNING_LOCK = threading.Lock()
# Words of the errors of torch.save and safetensors that come from a failed write, not from bad input.
_WRITE_FAILURE_WORDS = ("I/O error", "inline_container", "PytorchStreamWriter", "file write failed", "No space")


class SaveError(OSError):
    """A checkpoint could not be written (full disk, quota, I/O error); the folder's previous content is intact."""


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


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _new_tag() -> str:
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_alive(tag: str) -> bool:
    """Whether the save that made a folder with this tag may still be running (when in doubt: True)."""
    parts = tag.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return False  # no writer recorded: left by a version of mambakit that is not running any more
    host, pid = parts[0], int(parts[1])
    if host != _host() or os.name == "nt":
        return True
    if pid == os.getpid():
        with _RUNNING_LOCK:
            return tag in _RUNNING
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: a process of another user has this id
        return True
    return True


def leftovers(target: Path, alive: Optional[bool] = None) -> dict[str, list[Path]]:
    """The temporary, complete-new and backup folders beside `target`, by infix, newest first (alive: only those of
    running writers (True) or of gone ones (False); None: all)."""
    found: dict[str, list[Path]] = {infix: [] for infix in _INFIXES}
    if not target.parent.is_dir():
        return found
    for infix in _INFIXES:
        for p in target.parent.glob(f".{target.name}{infix}*"):
            if alive is None or _writer_alive(p.name[len(target.name) + 1 + len(infix):]) == alive:
                found[infix].append(p)
    for paths in found.values():
        paths.sort(key=lambda p: (p.lstat().st_mtime, p.name), reverse=True)
    return found


def tidy(target: Path) -> Optional[Path]:
    """Delete what saves of gone writers left beside `target`; when `target` is missing, first rename the newest
    complete one (a ``.new``, else an ``.old`` folder) to `target` and log one line. Returns the folder recovered
    from, or None. Never raises for a folder it cannot rename or delete (it stays)."""
    stale = leftovers(target, alive=False)
    recovered = None
    if not os.path.lexists(target):
        for candidate in stale[READY_INFIX] + stale[BACKUP_INFIX]:
            try:
                os.rename(candidate, target)
            except OSError:
                continue
            fsync_dir(target.parent)
            recovered = candidate
            kind = "the new checkpoint it had written" if READY_INFIX in candidate.name else "the previous checkpoint"
            LOG.warning(f"recovered {str(target)!r} from {candidate.name}, {kind}, left by an interrupted save")
            break
    for paths in stale.values():
        for p in paths:
            if p != recovered:
                shutil.rmtree(p, ignore_errors=True)
    return recovered


def recover(target: Path, wait_s: float = 2.0) -> Optional[Path]:
    """Before reading `target`: `tidy` it, and when it is missing while a running save is between its two renames,
    wait up to `wait_s` seconds for it to appear. Returns the folder recovered from, or None."""
    recovered = tidy(target)
    deadline = time.monotonic() + wait_s
    while not os.path.lexists(target) and time.monotonic() < deadline:
        live = leftovers(target, alive=True)
        if not (live[READY_INFIX] or live[BACKUP_INFIX]):
            break
        time.sleep(0.02)
    return recovered


def _apply_default_modes(directory: Path) -> None:
    """Give a folder and its entries the permissions of an ordinary mkdir / open (the folder is made 0700,
    safetensors 0600)."""
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


def _is_write_failure(exc: Exception) -> bool:
    """Whether an error of writing a file is the disk's (full, quota, I/O), not the data's."""
    return isinstance(exc, OSError) or any(word in str(exc) for word in _WRITE_FAILURE_WORDS)


def _save_error(target: Path, exc: Exception, what: str, previous: str) -> SaveError:
    try:
        free = f"; {shutil.disk_usage(target.parent).free:,} bytes free there"
    except OSError:
        free = ""
    error = SaveError(f"cannot save {what} to {str(target)!r}: {exc}{free}; {previous}")
    error.errno = getattr(exc, "errno", None)
    return error


def _previous(target: Path, describe: Optional[Callable[[Path], str]]) -> str:
    if not target.is_dir():
        return "nothing was there before"
    detail = describe(target) if describe is not None else ""
    return f"the one already there{detail} is intact"


def write_folder(target: Path, write: Callable[[Path], None], keep: Optional[Callable[[str], bool]] = None,
                 what: str = "the checkpoint", describe: Optional[Callable[[Path], str]] = None) -> Path:
    """Create or replace the folder `target` atomically and return it.

    write(tmp) writes the new files into a temporary folder. keep(name), when given, selects the files of an
    existing `target` that the new folder carries over (e.g. a tokenizer beside the weights); without it nothing of
    the old folder survives. Raises CheckpointError when `target` is a file; SaveError (an OSError) when writing
    fails for the disk's sake (full, quota, I/O error; `what` and describe(existing folder), e.g. " (step 20)",
    word its message); re-raises whatever else write raises.
    """
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save to {str(target)!r}: it exists and is not a directory")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tidy(target)
    tag = _new_tag()
    tmp = parent / f".{target.name}{TMP_INFIX}{tag}"
    ready = parent / f".{target.name}{READY_INFIX}{tag}"
    with _RUNNING_LOCK:
        _RUNNING.add(tag)
    try:
        return _swap_in(target, tmp, ready, parent / f".{target.name}{BACKUP_INFIX}{tag}", write, keep, what,
                        describe)
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(tag)


def _swap_in(target: Path, tmp: Path, ready: Path, old: Path, write: Callable[[Path], None],
             keep: Optional[Callable[[str], bool]], what: str, describe: Optional[Callable[[Path], str]]) -> Path:
    parent = target.parent
    try:
        os.mkdir(tmp, 0o700)
        try:
            write(tmp)
            _apply_default_modes(tmp)
            if keep is not None and target.is_dir():
                _carry_over(target, tmp, keep)
            for f in tmp.iterdir():
                if f.is_file() and not f.is_symlink():
                    fsync_file(f)
            fsync_dir(tmp)
        except Exception as exc:
            if _is_write_failure(exc):
                raise _save_error(target, exc, what, _previous(target, describe)) from exc
            raise
        os.rename(tmp, ready)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    moved = False
    try:
        if target.exists():
            os.rename(target, old)
            moved = True
        os.rename(ready, target)
    except BaseException:
        if moved and not target.exists():
            os.rename(old, target)  # put the previous checkpoint back
            moved = False
        shutil.rmtree(ready, ignore_errors=True)
        raise
    fsync_dir(parent)
    if moved:
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
