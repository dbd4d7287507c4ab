"""The ``mambakit`` entry point: subcommands, routing, exit statuses, the process-wide settings it alone makes."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mambakit
from mambakit.cli import build_parser, main
from mambakit.cli.nd import nd_task_main
from mambakit.cli.tasks import tasks_main
from tests.cli.conftest import error_line

REPO = Path(__file__).resolve().parents[2]


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "mambakit", "train", "--steps", "0"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: argument --steps") and "Traceback" not in proc.stderr


def test_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--help"]) == 0
    assert "--d-model" in capsys.readouterr().out
    assert main(["--help"]) == 0
    listed = re.findall(r"^    (\w+) ", capsys.readouterr().out, flags=re.M)
    assert listed == ["train", "generate", "explain", "info", "tasks"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["fly"], "invalid choice"),
        (["train", "--steps", "0"], "--steps: must be a positive integer"),
        (["train", "--d-model", "-8"], "--d-model: must be a positive integer"),
        (["train", "--batch-size", "two"], "--batch-size: must be a positive integer"),
        (["train", "--seq-len", "0"], "--seq-len"),
        (["train", "--n-layer", "0"], "--n-layer"),
        (["train", "--d-state", "0"], "--d-state"),
        (["train", "--lr", "0"], "--lr: must be a positive number"),
        (["train", "--lr", "nan"], "--lr: must be a positive number"),
        (["train", "--eval-interval", "0"], "--eval-interval"),
        (["train", "--arch", "mamba9"], "invalid choice"),
        (["train", "--data", "/no/such/file.txt"], "does not exist"),
        (["train", "--device", "tpu"], "unknown device"),
        (["generate", "--prompt", "x"], "--checkpoint"),
        (["generate", "--checkpoint", "/no/such/dir", "--prompt", "x"], "does not exist"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["generate", "--checkpoint", ".", "--prompt", "x", "--top-k", "-1"], "--top-k"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path,
                              monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default --out (runs/mamba) must not be a checkpoint left in the checkout
    assert main(argv) == 2
    assert message in error_line(capsys)


def test_tasks_and_nd_subcommands_are_wired(capsys: pytest.CaptureFixture) -> None:
    assert main(["tasks", "bogus-task"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["tasks", "mamba-nd-digits", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: mambakit tasks mamba-nd-digits ")
    assert main(["explain", "--help"]) == 0


def test_the_parser_routes_the_mamba_nd_tasks() -> None:
    """`tasks mamba-nd-*` are parsed by their own parsers, chosen by argparse; any other NAME by the tasks parser."""
    parser = build_parser()
    ns = parser.parse_args(["tasks", "mamba-nd-video", "--patch", "2,4,4", "--steps", "3"])
    assert (ns.command, ns.func, ns.nd_task, ns.patch, ns.steps) == ("tasks", nd_task_main, "mamba-nd-video",
                                                                     (2, 4, 4), 3)
    ns = parser.parse_args(["tasks", "mqar", "--steps", "3"])
    assert (ns.command, ns.func, ns.name, ns.steps) == ("tasks", tasks_main, "mqar", 3)
    # options before the task name belong to the synthetic tasks: NAME is then the Mamba-ND task's name
    ns = parser.parse_args(["tasks", "--steps", "3", "mamba-nd-digits"])
    assert (ns.func, ns.name) == (tasks_main, "mamba-nd-digits")


@pytest.mark.parametrize("argv, message", [
    (["tasks", "mamba-nd-digits", "--steps", "0"], "argument --steps: must be a positive integer, got '0' "
                                                   "(see 'mambakit tasks mamba-nd-digits --help')"),
    (["tasks", "mamba-nd-video", "--patch", "2,x"], "--patch: must be an integer or comma-separated integers"),
    (["tasks", "mamba-nd-video", "--weight-decay", "-1"], "--weight-decay: must be a non-negative number"),
    (["tasks", "mamba-nd-video", "--bogus"], "unrecognized arguments: --bogus (see 'mambakit tasks --help')"),
    (["tasks", "mqar", "--bogus"], "unrecognized arguments: --bogus (see 'mambakit --help')"),
    (["tasks"], "NAME is required: one of selective-copying, copying, induction-heads, mqar, parity, "
                "modular-arithmetic, mamba-nd-digits, mamba-nd-video (or --list)"),
    (["tasks", "--steps", "3", "mamba-nd-digits"], "the options of mamba-nd-digits come after its name"),
])
def test_routed_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert message in error_line(capsys)


def test_main_draws_headless(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point selects matplotlib's file-only backend for this process and the ones it starts."""
    monkeypatch.delenv("MPLBACKEND", raising=False)
    assert main(["explain", "--help"]) == 0
    assert os.environ["MPLBACKEND"] == "Agg"
    if "matplotlib" in sys.modules:
        assert sys.modules["matplotlib"].get_backend().lower() == "agg"


def test_only_the_command_line_changes_the_process() -> None:
    """No library module selects a matplotlib backend or changes the C allocator: the CLI does
    (mambakit.cli.process)."""
    package = Path(mambakit.__file__).parent
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.parent.name != "cli" and re.search(r"matplotlib\.use\(|\bmallopt\b", p.read_text())]
    assert offenders == []


def test_subcommand_handlers_are_public() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        func = parser.get_default("func")
        assert func.__module__ == f"mambakit.cli.{name}" and not func.__name__.startswith("_")
