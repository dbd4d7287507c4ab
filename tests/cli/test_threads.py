"""The thread policy of the command line: --threads on every subcommand, OMP_NUM_THREADS honoured, and the automatic
default leaving to other processes the cores they keep busy."""
from __future__ import annotations

import os

import pytest
import torch

from mambakit.cli import process
from mambakit.cli.main import build_parser, main


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_explicit_then_environment_then_automatic(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert process.set_threads(1) == 1 and torch.get_num_threads() == 1
    assert process.set_threads(None) == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(process, "auto_threads", lambda: 1)
    assert process.set_threads(None) == 1


@pytest.mark.parametrize("busy,expected", [(0, "all"), (1, "all-1"), (10**6, 1)])
def test_auto_threads_leaves_busy_cores(monkeypatch, busy, expected):
    monkeypatch.setattr(process, "busy_cores", lambda: busy)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    want = {"all": cores, "all-1": max(1, cores - 1), 1: 1}[expected]
    assert process.auto_threads() == want


def test_busy_cores_reads_a_count():
    n = process.busy_cores(samples=3, interval=0.0)
    assert isinstance(n, int) and n >= 0


@pytest.mark.parametrize("command", ["train", "generate", "explain", "info", "tasks"])
def test_every_subcommand_has_threads(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "--threads" in sub.choices[command].format_help()


def test_bad_threads_is_one_error_line(capsys):
    assert main(["generate", "--checkpoint", "nowhere", "--prompt", "x", "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--threads" in err[0]


def test_threads_applied_before_the_subcommand(tmp_path, capsys):
    torch.set_num_threads(2)
    # no folder
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x", "--threads", "1"]) == 2
    assert torch.get_num_threads() == 1
