"""Issue 21, classes 3 and 10: `mambakit train --out DIR` never replaces a checkpoint silently (--overwrite does),
one run at a time holds DIR (a second fails at start naming the holder; a dead holder's lock is taken over), and
--resume with another --steps says how the learning-rate schedule changes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mambakit.cli import main
from mambakit.models.io.native import load_trainer_state
from mambakit.training.lock import LOCK_NAME, exclusive
from tests.cli.conftest import TINY, error_line

pytest.importorskip("fcntl", reason="advisory locks need fcntl (not on Windows)")

HOLD = """
import sys, time
from pathlib import Path
from mambakit.training.lock import exclusive
with exclusive(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_new_run_does_not_replace_a_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--steps", "2"]) == 2
    line = error_line(capsys)
    assert "already holds a checkpoint (step 4)" in line and "--overwrite" in line and "--resume" in line
    assert load_trainer_state(out / "checkpoint")["step"] == 4
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--steps", "2", "--overwrite"]) == 0
    assert load_trainer_state(out / "checkpoint")["step"] == 2


def test_a_second_writer_fails_naming_the_holder(tmp_path, corpus, capsys):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"holding"
        assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 2
        line = error_line(capsys)
        assert f"process {holder.pid}" in line and "in use by another run" in line
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).read_text()  # the killed holder's record is left: a stale lock
    logs = []
    with exclusive(out) as taken_over:
        logs.append(taken_over)
    assert f"process {holder.pid}" in logs[0]
    with exclusive(out) as taken_over:  # released cleanly: nothing to take over
        assert taken_over is None


def test_resume_with_other_steps_says_what_changes(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--steps", "8", "--no-progress", "--sample-tokens",
                 "0"]) == 0
    printed = capsys.readouterr().out
    assert "--steps 8 differs from the 4 this run was started with" in printed and "step 5 runs at lr" in printed
