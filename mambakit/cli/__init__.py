"""The ``mambakit`` command line: ``train``, ``generate``, ``explain`` and ``tasks`` (synthetic tasks, Mamba-ND).

One module per subcommand (:mod:`~mambakit.cli.train`, :mod:`~mambakit.cli.generate`, :mod:`~mambakit.cli.explain`,
:mod:`~mambakit.cli.tasks`, :mod:`~mambakit.cli.nd`, and :mod:`~mambakit.cli.remamba` for the ReMamba options of
``generate``); shared argument types and the parser class in :mod:`~mambakit.cli.args`; finding and loading a
checkpoint and its tokenizer in :mod:`~mambakit.cli.loading`; the process-wide settings of the command line (and only
of it) in :mod:`~mambakit.cli.process`; :func:`main` in :mod:`~mambakit.cli.main`.

Bad input (missing data, unreadable checkpoint, invalid numbers, unknown device, ...) prints one line
``error: ...`` on stderr and exits with status 2; it never shows a traceback.
"""
from mambakit.cli.args import non_negative_float, non_negative_int, positive_float, positive_int, probability
from mambakit.cli.generate import DEFAULT_MAX_PROMPT_TOKENS
from mambakit.cli.main import build_parser, main
from mambakit.nd.train import ND_TASKS

__all__ = ["DEFAULT_MAX_PROMPT_TOKENS", "ND_TASKS", "build_parser", "main", "non_negative_float", "non_negative_int",
           "positive_float", "positive_int", "probability"]
