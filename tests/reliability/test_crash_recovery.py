"""Issue 21, class 4: a save killed at any point leaves a loadable checkpoint; the next save or load deletes what it
left behind and, when only the interrupted save's folders are left, recovers the newest complete checkpoint, saying
so in one line. Crashes are simulated in-process (an exception at each rename), and by a short kill -9 loop."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mambakit.models.io import atomic
from mambakit.models.io.native import load_checkpoint, load_trainer_state, save_checkpoint
from tests.reliability.helpers import hidden, logits, tiny_model


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs (not even an `except Exception`)."""


def crash_at_rename(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the n-th os.rename (1-based) of the next save 'kill' the process, and leave what the save made (a real
    kill runs no clean-up): shutil.rmtree and os.rename do nothing after the crash."""
    real_rename, calls, crashed = os.rename, [], []

    def rename(src, dst):
        if crashed:
            return None
        calls.append((src, dst))
        if len(calls) == n:
            crashed.append(True)
            raise Crash
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None if crashed else real_rmtree(*a, **k))


real_rmtree = atomic.shutil.rmtree


def interrupted_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     n: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    old, new = tiny_model(0), tiny_model(1)
    save_checkpoint(old, tmp_path / "ck", trainer_state={"step": 1})
    crash_at_rename(monkeypatch, n)
    with pytest.raises(Crash):
        save_checkpoint(new, tmp_path / "ck", trainer_state={"step": 2})
    monkeypatch.undo()
    atomic._RUNNING.clear()  # the 'killed' save is not running any more
    return old, new


# rename 1: tmp -> new (the new folder complete), 2: ck -> old, 3: new -> ck
@pytest.mark.parametrize("n, left, expect", [(1, [".tmp-"], "old"), (2, [".new-"], "old"),
                                             (3, [".new-", ".old-"], "new")])
def test_a_crash_at_each_rename_loads_and_is_cleaned(tmp_path, monkeypatch, caplog, n, left, expect):
    old, new = interrupted_save(tmp_path, monkeypatch, n)
    names = hidden(tmp_path)
    assert [infix for infix in (".tmp-", ".new-", ".old-") if any(infix in name for name in names)] == left
    assert (tmp_path / "ck").exists() == (n != 3)
    loaded = load_checkpoint(tmp_path / "ck")  # recovers when ck is missing
    want = old if expect == "old" else new
    torch.testing.assert_close(logits(loaded), logits(want), rtol=0, atol=0)
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == (1 if n == 3 else 0)
    if n == 3:
        assert "interrupted save" in recovered[0] and "\n" not in recovered[0]
        assert hidden(tmp_path) == []
    save_checkpoint(tiny_model(2), tmp_path / "ck", trainer_state={"step": 3})  # the next save cleans up
    assert hidden(tmp_path) == [] and load_trainer_state(tmp_path / "ck")["step"] == 3


def test_only_the_backup_left_is_recovered(tmp_path, caplog):
    model = tiny_model(0)
    save_checkpoint(model, tmp_path / "ck", trainer_state={"step": 7})
    os.rename(tmp_path / "ck", tmp_path / ".ck.old-1234abcd")  # a backup of an older mambakit, no writer recorded
    assert load_trainer_state(tmp_path / "ck")["step"] == 7
    assert any("recovered" in r.getMessage() for r in caplog.records) and hidden(tmp_path) == []


def test_a_running_writers_folders_are_left_alone(tmp_path):
    save_checkpoint(tiny_model(0), tmp_path / "ck")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tag = f"{atomic._host()}-{live.pid}-00000000"
        (tmp_path / f".ck.tmp-{tag}").mkdir()
        (tmp_path / f".ck.tmp-{atomic._host()}-999999999-00000000").mkdir()  # no such process
        (tmp_path / f".ck.tmp-0000ffff-{live.pid}-00000000").mkdir()  # another host: cannot tell
        save_checkpoint(tiny_model(1), tmp_path / "ck")
        assert hidden(tmp_path) == sorted([f".ck.tmp-{tag}", f".ck.tmp-0000ffff-{live.pid}-00000000"])
    finally:
        live.kill()
        live.wait()
    save_checkpoint(tiny_model(1), tmp_path / "ck")
    assert hidden(tmp_path) == [f".ck.tmp-0000ffff-{live.pid}-00000000"]


SAVER = """
import sys, torch
from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.models.io.native import save_checkpoint
torch.manual_seed(0)
model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=256, ssm_cfg={"d_state": 4}))
print("ready", flush=True)
step = 0
while True:
    step += 1
    save_checkpoint(model, sys.argv[1], trainer_state={"step": step})
"""


def test_kill_9_during_saves_never_loses_the_checkpoint(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rng = random.Random(0)
    target = tmp_path / "ck"
    save_checkpoint(tiny_model(0), target, trainer_state={"step": 0})
    for _ in range(10):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, env=env)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert load_trainer_state(target)["step"] >= 0  # loads (recovering if needed) after every kill
    load_checkpoint(target)
    save_checkpoint(tiny_model(0), target)
    assert hidden(tmp_path) == []
