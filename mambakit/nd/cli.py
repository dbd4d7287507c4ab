"""Kept for ``python -m mambakit.nd.cli TASK ...`` (the commands in benchmarks/RESULTS.md) and old imports: the
Mamba-ND command line lives in :mod:`mambakit.cli.nd` (``mambakit tasks mamba-nd-digits ...`` is the same)."""
import sys

from mambakit.cli.nd import add_nd_arguments, add_nd_parsers, format_result, main, nd_task_main, options_from_namespace

__all__ = ["add_nd_arguments", "add_nd_parsers", "format_result", "main", "nd_task_main", "options_from_namespace"]

if __name__ == "__main__":
    sys.exit(main())
