"""Markdown tables from the benchmarks' JSON lines files (the rows `_common.Rows` writes to $OUT/<name>.jsonl).

    python benchmarks/results_table.py OUT/decode.jsonl [OUT/train_step.jsonl ...] [--columns arch shape ms ...]

One table per file, headed by the file's name, printed to stdout; the columns are every key of the rows in their
first-seen order unless --columns names them. Paste the output into benchmarks/RESULTS.md under a dated heading;
the hand-written history there stays as it is.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from _common import table


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one JSON lines file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of the rows, in the order they first appear."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def render(path: Path, columns: Optional[list[str]] = None) -> str:
    """`### <file name>` and the markdown table of its rows."""
    rows = read_rows(path)
    return f"### {path.name}\n\n" + table(rows, columns or columns_of(rows)) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="JSON lines files written by the benchmarks")
    ap.add_argument("--columns", nargs="+", help="the columns to show, in order (default: all)")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"results_table.py: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print("\n".join(render(f, args.columns) for f in args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
