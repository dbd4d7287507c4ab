"""Issue 21, class 5: a full disk during a save is one `error:` line naming the step that could not be saved and the
step of the checkpoint left intact; that checkpoint still loads. The disk is made full by a failing writer
(ENOSPC), and for real by a file-size limit in a child process (the errors torch and safetensors raise then)."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mambakit.cli import main
from mambakit.models.io.atomic import SaveError
from mambakit.models.io.native import load_checkpoint, load_trainer_state, save_checkpoint
from tests.cli.conftest import TINY, error_line
from tests.reliability.helpers import hidden, logits, tiny_model


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer):
    old = tiny_model(0)
    save_checkpoint(old, tmp_path / "ck", trainer_state={"step": 20})
    if writer == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    else:  # optimizer.pt goes through torch.save; its own error on a full disk is a RuntimeError
        def torch_save(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        monkeypatch.setattr(torch, "save", torch_save)
    with pytest.raises(SaveError) as info:
        save_checkpoint(tiny_model(1), tmp_path / "ck", optimizer_state={"state": {}, "param_groups": []},
                        trainer_state={"step": 40})
    monkeypatch.undo()
    message = str(info.value)
    assert "step 40" in message and "(step 20) is intact" in message and "bytes free" in message
    assert hidden(tmp_path) == [] and load_trainer_state(tmp_path / "ck")["step"] == 20
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "ck")), logits(old), rtol=0, atol=0)


def test_full_disk_on_the_first_save(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(SaveError, match="nothing was there before"):
        save_checkpoint(tiny_model(0), tmp_path / "ck", trainer_state={"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_train_on_a_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys, corpus):
    out = tmp_path / "out"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--save-interval", "2"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--resume", "--steps", "6"]) == 2
    line = error_line(capsys)
    assert "No space left on device" in line and "step 6" in line and "(step 4) is intact" in line
    monkeypatch.undo()
    assert load_trainer_state(out / "checkpoint")["step"] == 4 and hidden(out) == [".mambakit.lock"]


REAL_LIMIT = """
import resource, signal, sys
from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.models.io.native import save_checkpoint
model = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 4}))
save_checkpoint(model, sys.argv[1], trainer_state={"step": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
try:
    save_checkpoint(model, sys.argv[1], trainer_state={"step": 2})
except OSError as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="needs RLIMIT_FSIZE and SIGXFSZ with Linux semantics")
def test_a_real_write_failure(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", REAL_LIMIT, str(tmp_path / "ck")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SaveError") and "(step 1) is intact" in done.stdout, done.stdout
    assert hidden(tmp_path) == [] and load_trainer_state(tmp_path / "ck")["step"] == 1
