"""Errors raised for bad input. The CLI turns them into a message and exit code 2."""
from __future__ import annotations

from typing import Iterable

MOST_NAMES_LISTED = 12  # longer lists of names in a message end with "... and N more"


class MambaKitError(ValueError):
    """Invalid user input (argument, configuration, data or checkpoint)."""


class CheckpointError(MambaKitError):
    """A checkpoint directory is missing, unreadable or does not match its configuration."""

    @classmethod
    def listing(cls, where: str, problems: list[str]) -> "CheckpointError":
        """One error naming every problem found at `where`, on one line (the CLI prints errors as one line)."""
        if len(problems) == 1:
            return cls(f"{where}: {problems[0]}")
        return cls(f"{where}: {len(problems)} problems: " + "; ".join(problems))


def name_list(names: Iterable[str], most: int = MOST_NAMES_LISTED) -> str:
    """'(count): [a, b, ...]' of the sorted names, at most `most` of them written out."""
    names = sorted(names)
    shown = ", ".join(names[:most])
    more = f", ... and {len(names) - most} more" if len(names) > most else ""
    return f"({len(names)}): [{shown}{more}]"
