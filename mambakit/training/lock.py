"""An exclusive lock on a run's output folder, so that two runs never write the same checkpoint.

The lock is an advisory ``flock`` on ``FOLDER/.mambakit.lock``, which also records the holder (process id, host,
start time, command line). The kernel releases it when the holder exits, however it exits, so the lock of a dead
process is simply taken over (its record is then reported). Where ``fcntl`` is missing (Windows) nothing is locked.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from mambakit.errors import MambaKitError

LOCK_NAME = ".mambakit.lock"


def _describe(record: str) -> str:
    try:
        holder = json.loads(record)
        return (f"process {holder['pid']} on {holder['host']} since {holder['started']} "
                f"({holder['command']})")
    except (ValueError, KeyError, TypeError):
        return "a process that left no readable record"


@contextlib.contextmanager
def exclusive(folder: Path, what: str = "--out") -> Iterator[Optional[str]]:
    """Hold the lock of `folder` (created if missing) for the duration of the block; yields a description of the
    previous holder when its lock was taken over (it had died), else None. Raises MambaKitError naming the holder
    when another live process holds it; `what` names the folder's option in the message."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            record = path.read_text(errors="replace").strip()
            raise MambaKitError(f"{what} {str(folder)!r} is in use by another run: {_describe(record)}; wait for "
                                f"it to finish or choose another {what}") from None
        previous = os.read(fd, 1 << 16).decode(errors="replace").strip()
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        try:
            yield _describe(previous) if previous else None
        finally:
            os.ftruncate(fd, 0)  # an empty record: released cleanly
    finally:
        os.close(fd)  # releases the lock
