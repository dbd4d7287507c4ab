"""``mambakit tasks NAME``: the handler, the parser, bad arguments, and the allocator setting it makes."""
from __future__ import annotations

import argparse
import json
import platform
import re

import pytest

import mambakit.cli.tasks as tasks_cli
from mambakit.cli import main
from mambakit.cli.process import keep_freed_memory
from mambakit.cli.tasks import add_tasks_parser, tasks_main
from mambakit.errors import MambaKitError
from mambakit.tasks.runner import TASK_DEFAULTS, run_task

# tiny sizes; every run passes threads=1 (run_task restores the thread count after it)
TINY = dict(batch=2, d_model=8, n_layer=1, seq_len=12, eval_samples=2, eval_lengths=[], threads=1, progress=False,
            log=lambda msg: None)


def test_cli_handler_tiny_run(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["mqar", "--mixer", "mamba2", "--steps", "3", "--batch-size", "4", "--d-model", "16", "--n-layer", "1",
            "--d-state", "8", "--seq-len", "12", "--n-pairs", "2", "--vocab", "8", "--eval-samples", "8",
            "--threads", "1", "--out", str(out), "--no-progress"]
    assert tasks_main(args) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "mamba2" in text
    assert (out / "mqar_mamba2.png").stat().st_size > 0
    assert json.loads((out / "mqar_mamba2.json").read_text())["config"]["d_state"] == 8


def test_cli_training_flags_and_task_weight_decay(tmp_path):
    """--weight-decay / --warmup / --eval-interval / --num-heads reach run_task; without --weight-decay the task's
    default applies (induction heads: none)."""
    args = ["induction-heads", "--mixer", "attention", "--steps", "2", "--batch-size", "2", "--d-model", "16",
            "--n-layer", "1", "--seq-len", "12", "--vocab", "4", "--eval-samples", "2", "--eval-lengths",
            "--weight-decay", "0.05", "--warmup", "1", "--eval-interval", "1", "--num-heads", "2", "--threads", "1",
            "--out", str(tmp_path), "--no-progress"]
    assert tasks_main(args) == 0
    saved = json.loads((tmp_path / "induction-heads_attention.json").read_text())
    cfg = saved["config"]
    assert (cfg["weight_decay"], cfg["warmup"], cfg["eval_interval"]) == (0.05, 1, 1)
    assert cfg["model_config"]["attn_cfg"]["num_heads"] == 2 and saved["history"]["eval_step"] == [0, 1, 2]
    r = run_task("induction-heads", "mamba", steps=1, **{**TINY, "vocab": 4})
    assert r["config"]["weight_decay"] == TASK_DEFAULTS["induction-heads"]["weight_decay"]


def test_cli_parser_registration_and_sweep(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mambakit")
    add_tasks_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["tasks", "selective-copying", "--mixer", "s4", "mamba", "--steps", "1", "--batch-size",
                            "2", "--d-model", "8", "--n-layer", "1", "--seq-len", "8", "--eval-samples", "2",
                            "--vocab", "4", "--n-tokens", "2", "--threads", "1", "--out", str(tmp_path),
                            "--no-progress"])
    assert ns.func(ns) == 0
    assert (tmp_path / "selective-copying_sweep.png").exists()
    assert len(json.loads((tmp_path / "selective-copying_sweep.json").read_text())) == 2


@pytest.mark.parametrize("argv, flag", [
    (["nope"], "NAME"),
    (["mqar", "--mixer", "lstm"], "--mixer"),
    (["mqar", "--steps", "x"], "--steps"),
    (["mqar", "--steps", "-3"], "--steps"),
    (["mqar", "--lr", "0"], "--lr"),
    (["induction-heads", "--batch-size", "0"], "--batch-size"),
])
def test_cli_bad_arguments(argv, flag):
    with pytest.raises(MambaKitError, match=flag):
        tasks_main(argv)


def test_main_cli_exit_2(capsys):
    """Bad input through the whole command line is one error line, exit status 2."""
    assert main(["tasks", "mqar", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--steps" in err[0]


def test_keep_freed_memory_sets_glibc_thresholds():
    """Both mallopt calls succeed under glibc; elsewhere the setting is skipped (False), never an error."""
    made = keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert made is True
    else:
        assert made is False


def test_the_tasks_command_makes_the_allocator_setting(monkeypatch, tmp_path):
    """The CLI's tasks subcommand makes the process-wide allocator setting; the library's run_task does not."""
    calls = []
    monkeypatch.setattr(tasks_cli, "keep_freed_memory", lambda: calls.append(1) or True)
    run_task("mqar", "mamba", steps=1, n_pairs=2, vocab=8, **TINY)
    assert calls == []
    assert tasks_main(["mqar", "--steps", "1", "--batch-size", "2", "--d-model", "8", "--n-layer", "1", "--seq-len",
                       "12", "--n-pairs", "2", "--vocab", "8", "--eval-samples", "2", "--threads", "1", "--out",
                       str(tmp_path), "--no-progress"]) == 0
    assert calls == [1]


def _help_text(capsys, *argv: str) -> str:
    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line breaks undone


def test_help_names_every_task_the_readme_advertises_and_every_default(capsys):
    from pathlib import Path

    from mambakit.cli.tasks import ND_TASKS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    advertised = set(re.findall(r"mambakit tasks ([a-z][a-z0-9-]+)", readme))
    assert {"mqar", "mamba-nd-digits", "mamba-nd-video"} <= advertised
    text = _help_text(capsys, "tasks")
    for name in advertised | set(TASK_DEFAULTS) | set(ND_TASKS):
        assert name in text, name
    assert "TASK_DEFAULTS" not in text and "per task)" not in text
    for task, defaults in TASK_DEFAULTS.items():
        for key, value in defaults.items():
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
            assert f"{task} {shown or 'none'}" in text, (task, key)
    for task in ND_TASKS:  # the Mamba-ND tasks' own help states a default for each value option
        nd_text = _help_text(capsys, "tasks", task)
        options = re.findall(r"(--[a-z-]+) [A-Z_]+ ", nd_text)
        assert options and all(f"{opt} " in nd_text for opt in options)
        assert nd_text.count("(default:") >= len(set(options)) - 1  # --json PATH has no default


def test_list_prints_every_task_with_its_defaults(capsys):
    from mambakit.cli.tasks import ND_TASKS
    from mambakit.nd.train import TASK_DEFAULTS as ND_DEFAULTS

    assert main(["tasks", "--list"]) == 0
    text = capsys.readouterr().out
    joined = " ".join(text.split())
    for task in (*TASK_DEFAULTS, *ND_TASKS):
        assert re.search(rf"^{task}: ", text, re.M), task
    assert ("--steps 5000" in joined and "--n-pairs 32" in joined
            and "--eval-lengths 256 1024 4096 16384 65536" in joined)
    for task in ND_TASKS:
        section = joined.split(f"{task}: ")[1]
        assert f"--steps {ND_DEFAULTS[task]['steps']}" in section and "--mixer mamba2" in section
    assert "--patch 2,4,4" in joined and "--d-state (16 for mamba1, 64 for mamba2)" in joined
    assert main(["tasks"]) == 2 and "NAME is required" in capsys.readouterr().err
