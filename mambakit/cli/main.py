"""The entry point of the ``mambakit`` command line: the parser of all subcommands, and :func:`main`."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from mambakit.cli.args import Commands, Parser
from mambakit.cli.explain import add_explain_parser
from mambakit.cli.generate import add_generate_parser
from mambakit.cli.info import add_info_parser
from mambakit.cli.nd import add_nd_parsers
from mambakit.cli.process import headless_plots
from mambakit.cli.tasks import add_tasks_parser
from mambakit.cli.train import add_train_parser


def build_parser() -> Parser:
    """The parser of ``mambakit`` and its subcommands; ``tasks mamba-nd-*`` are routes of ``tasks``."""
    parser = Parser(prog="mambakit", description="Mamba selective state-space language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, action=Commands)
    sub.required = True
    add_train_parser(sub)
    add_generate_parser(sub)
    add_explain_parser(sub)
    add_info_parser(sub)
    add_tasks_parser(sub)
    add_nd_parsers(sub.routes("tasks"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``mambakit`` command line (`argv`: the arguments, default sys.argv[1:]); returns the exit status:
    0, 2 for bad input (one ``error: ...`` line on stderr), 130 when interrupted."""
    headless_plots()
    return build_parser().run(sys.argv[1:] if argv is None else argv)
