"""``mambakit tasks mamba-nd-*`` and the standalone Mamba-ND command (``python -m mambakit.nd.cli``)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mambakit.cli.nd import add_nd_parsers, main, options_from_namespace


def test_cli_parsers_and_errors(capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    parsers = add_nd_parsers(sub)
    assert set(parsers) == {"mamba-nd-digits", "mamba-nd-video"}
    ns = parser.parse_args(["mamba-nd-video", "--mixer", "mamba1", "--order-mode", "fixed", "--patch", "2,4,4",
                            "--steps", "3", "--seed", "1", "--no-progress"])
    assert ns.nd_task == "mamba-nd-video"
    opts = options_from_namespace(ns)
    assert opts == {"mixer": "mamba1", "order_mode": "fixed", "patch": (2, 4, 4), "steps": 3, "seed": 1,
                    "progress": False}
    assert main(["mamba-nd-digits", "--steps", "0"]) == 2
    assert main(["mamba-nd-digits", "--patch", "3", "--no-progress"]) == 2
    assert "multiple of patch_size" in capsys.readouterr().err


def test_old_module_path_still_runs():
    """``python -m mambakit.nd.cli`` (the commands in benchmarks/RESULTS.md) is the same command line."""
    proc = subprocess.run([sys.executable, "-m", "mambakit.nd.cli", "mamba-nd-digits", "--steps", "0"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: argument --steps: must be a positive integer, got '0' (see 'python -m "
                                  "mambakit.nd.cli mamba-nd-digits --help')")
