"""Argument types and the parser class of the ``mambakit`` command line.

Every subcommand takes its numbers through the types here, so that a bad value reads the same everywhere:
``error: argument --steps: must be a positive integer, got '0' (see 'mambakit train --help')`` on stderr, exit
status 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Dict, NoReturn, Optional, Sequence, Tuple, Union

from mambakit.cli.process import MAX_THREADS
from mambakit.errors import MambaKitError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line ``error: ...`` on stderr and exit status 2.

    raising: raise MambaKitError(``"<prog>: <message>"``) instead of exiting (for the subcommand functions that
    take a list of arguments, e.g. ``tasks_main(["mqar", "--steps", "3"])``).
    """

    def __init__(self, *args: Any, raising: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raising = raising

    def error(self, message: str) -> NoReturn:
        if self.raising:
            raise MambaKitError(f"{self.prog}: {message}")
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")

    def run(self, argv: Sequence[str]) -> int:
        """Parse `argv` and call the chosen subcommand's ``func(namespace)``; returns the exit status.

        0 for --help; 2 for a usage error, a MambaKitError or an OSError (one ``error: ...`` line on stderr, no
        traceback); 130 on Ctrl-C. The namespace carries ``argv``, the arguments as given (``train --nproc N``
        re-runs them under torchrun).
        """
        argv = list(argv)
        try:
            ns = self.parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error (2, message already printed)
            return exc.code if isinstance(exc.code, int) else 2
        ns.argv = argv
        try:
            if hasattr(ns, "threads"):
                from mambakit.cli.process import set_threads

                set_threads(ns.threads)
            return ns.func(ns)
        except (MambaKitError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130


class _Routes:
    """The routes of one subcommand: parsers picked by the subcommand's first argument (see :class:`Commands`)."""

    def __init__(self, owner: argparse.ArgumentParser, parser_class: type) -> None:
        self.owner = owner
        self.parser_class = parser_class
        self.parsers: Dict[str, argparse.ArgumentParser] = {}

    def add_parser(self, name: str, help: Optional[str] = None, **kwargs: Any) -> argparse.ArgumentParser:
        """A parser for ``<owner prog> <name> ...`` (the signature of a subparsers object's ``add_parser``; `help`
        is not shown: the owner's help describes its first argument)."""
        kwargs.setdefault("prog", f"{self.owner.prog} {name}")
        parser = self.parser_class(**kwargs)
        self.parsers[name] = parser
        return parser


class Commands(argparse._SubParsersAction):
    """The subcommands of a parser: ``parser.add_subparsers(action=Commands, ...)``.

    A subcommand may also have routes (:meth:`routes`): parsers chosen by the subcommand's first argument, which
    then parse the remaining arguments (``mambakit tasks mamba-nd-digits --steps 3``); any other first argument is
    parsed by the subcommand's own parser (``mambakit tasks mqar --steps 3``). Unrecognized arguments of a route are
    reported by the subcommand's parser.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._routes: Dict[str, _Routes] = {}

    def routes(self, command: str) -> _Routes:
        """The routes of the subcommand `command` (added before); add one with ``.add_parser(name, **kwargs)``."""
        if command not in self._routes:
            self._routes[command] = _Routes(self._name_parser_map[command], self._parser_class)
        return self._routes[command]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        command, rest = values[0], list(values[1:])
        routes = self._routes.get(command)
        route = routes.parsers.get(rest[0]) if routes is not None and rest else None
        if route is None:
            return super().__call__(parser, namespace, values, option_string)
        setattr(namespace, self.dest, command)
        parsed, extras = route.parse_known_args(rest[1:], None)
        for key, value in vars(parsed).items():
            setattr(namespace, key, value)
        if extras:
            routes.owner.error(f"unrecognized arguments: {' '.join(extras)}")


def checked(kind: Callable[[str], Any], what: str,
            test: Callable[[Any], bool] = lambda value: True) -> Callable[[str], Any]:
    """An argparse type: parse with `kind` and accept the value when `test` holds; else the message
    ``must be <what>, got '<text>'``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


def _finite(test: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda value: math.isfinite(value) and test(value)


integer = checked(int, "an integer")
number = checked(float, "a number")
positive_int = checked(int, "a positive integer", lambda v: v > 0)
non_negative_int = checked(int, "an integer >= 0", lambda v: v >= 0)
positive_float = checked(float, "a positive number", _finite(lambda v: v > 0))
non_negative_float = checked(float, "a number >= 0", _finite(lambda v: v >= 0))
probability = checked(float, "a number in (0, 1]", _finite(lambda v: 0 < v <= 1))
seed = checked(int, "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63)  # what torch's generators take
non_empty = checked(str, "a non-empty path", lambda v: bool(v.strip()))


def positive_ints(text: str) -> Union[int, Tuple[int, ...]]:
    """An argparse type: one positive integer or several separated by commas: '2' -> 2, '2,4,4' -> (2, 4, 4)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or comma-separated integers, got {text!r}") from None
    if any(p <= 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must hold positive integers, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


THREADS_HELP = (f"torch CPU threads, 1 to {MAX_THREADS} (default: the cores other processes leave free, at least 1; "
                "or OMP_NUM_THREADS when set)")
threads = checked(int, f"an integer in [1, {MAX_THREADS}]", lambda v: 1 <= v <= MAX_THREADS)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """The --threads option every subcommand has (applied by `Parser.run` before the subcommand runs)."""
    p.add_argument("--threads", type=threads, help=THREADS_HELP)
