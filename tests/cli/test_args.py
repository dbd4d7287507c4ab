"""The shared argument types, the parser class and the routed subcommands of `mambakit.cli.args`."""
from __future__ import annotations

import argparse

import pytest

from mambakit.cli.args import (Commands, Parser, integer, non_negative_float, non_negative_int, number,
                               positive_float, positive_int, positive_ints, probability)
from mambakit.errors import MambaKitError


@pytest.mark.parametrize("kind, good, bad, what", [
    (integer, {"-3": -3, "0": 0}, ["x", "1.5"], "an integer"),
    (number, {"-1.5": -1.5, "1e3": 1000.0}, ["x"], "a number"),
    (positive_int, {"1": 1, "7": 7}, ["0", "-2", "x"], "a positive integer"),
    (non_negative_int, {"0": 0, "3": 3}, ["-1", "x"], "an integer >= 0"),
    (positive_float, {"0.5": 0.5}, ["0", "-1", "nan", "inf", "x"], "a positive number"),
    (non_negative_float, {"0": 0.0, "2": 2.0}, ["-0.1", "nan", "x"], "a number >= 0"),
    (probability, {"1": 1.0, "0.25": 0.25}, ["0", "1.5", "nan"], "a number in (0, 1]"),
])
def test_types_accept_and_refuse(kind, good, bad, what):
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^must be {what.replace('(', '.').replace(']', '.')}, "
                                                             rf"got '{text}'$"):
            kind(text)


def test_positive_ints():
    assert positive_ints("2") == 2 and positive_ints("2,4,4") == (2, 4, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers, got '2,x'"):
        positive_ints("2,x")
    with pytest.raises(argparse.ArgumentTypeError, match="must hold positive integers, got '2,0'"):
        positive_ints("2,0")


def test_parser_prints_one_error_line_and_exits_2(capsys):
    parser = Parser(prog="prog")
    parser.add_argument("--n", type=positive_int)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--n", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: argument --n: must be a positive integer, got '0' (see 'prog --help')\n"
    raising = Parser(prog="prog", raising=True)
    raising.add_argument("--n", type=positive_int)
    with pytest.raises(MambaKitError, match="^prog: argument --n: must be a positive integer"):
        raising.parse_args(["--n", "0"])


def test_run_turns_errors_into_exit_statuses(capsys):
    def fail(ns):
        raise MambaKitError(f"--n {ns.n} is unlucky")

    def interrupted(ns):
        raise KeyboardInterrupt

    parser = Parser(prog="prog")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, action=Commands)
    sub.add_parser("ok").set_defaults(func=lambda ns: 0)
    bad = sub.add_parser("bad")
    bad.add_argument("--n", type=integer, default=13)
    bad.set_defaults(func=fail)
    sub.add_parser("stop").set_defaults(func=interrupted)
    assert parser.run(["ok"]) == 0
    assert parser.run(["bad"]) == 2 and capsys.readouterr().err == "error: --n 13 is unlucky\n"
    assert parser.run(["stop"]) == 130 and capsys.readouterr().err == "error: interrupted\n"
    assert parser.run(["ok", "--help"]) == 0


def test_routes_pick_a_parser_by_the_first_argument(capsys):
    parser = Parser(prog="prog")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, action=Commands)
    own = sub.add_parser("run")
    own.add_argument("name")
    own.add_argument("--x", type=integer)
    own.set_defaults(func="own")
    special = sub.routes("run").add_parser("special", help="not shown")
    special.add_argument("--y", type=integer)
    special.set_defaults(func="special")
    assert special.prog == "prog run special"
    ns = parser.parse_args(["run", "special", "--y", "2"])
    assert (ns.command, ns.func, ns.y) == ("run", "special", 2) and not hasattr(ns, "name")
    ns = parser.parse_args(["run", "plain", "--x", "1"])
    assert (ns.command, ns.func, ns.name, ns.x) == ("run", "own", "plain", 1)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "special", "--x", "1"])
    assert capsys.readouterr().err == "error: unrecognized arguments: --x 1 (see 'prog run --help')\n"
