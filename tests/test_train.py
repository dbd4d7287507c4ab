"""Tests of mambakit.train: schedule, parameter groups, argument resolution, a tiny run and exact resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import mambakit.train as train_module
from mambakit.errors import MambaKitError
from mambakit.models.checkpoint import load_checkpoint, load_trainer_state
from mambakit.train import (
    DEFAULTS,
    TrainArgs,
    build_config,
    lr_at,
    param_groups,
    resolve_args,
    train,
)

TINY = dict(steps=6, d_model=16, n_layer=1, d_state=4, seq_len=16, batch_size=2, eval_interval=3, eval_batches=1,
            sample_tokens=4, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400)]
    path.write_text("".join(lines))
    return path


def tiny_args(corpus: Path, out: Path, **overrides) -> TrainArgs:
    kwargs = dict(TINY, data=str(corpus), out=str(out))
    kwargs.update(overrides)
    return TrainArgs(**kwargs)


def test_lr_schedule_warmup_then_cosine() -> None:
    args = resolve_args(TrainArgs(steps=1000, warmup_steps=100, lr=1e-3))
    assert lr_at(0, args) == pytest.approx(1e-5)
    assert lr_at(99, args) == pytest.approx(1e-3)
    assert lr_at(100, args) == pytest.approx(1e-3)
    assert lr_at(550, args) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(1000, args) == pytest.approx(1e-4)
    lrs = [lr_at(s, args) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_resolve_args_defaults_and_derived_values() -> None:
    args = resolve_args(TrainArgs())
    assert args.steps == DEFAULTS["steps"] and args.d_state == 16
    assert args.warmup_steps == min(100, args.steps // 10) and args.save_interval == args.eval_interval
    assert resolve_args(TrainArgs(arch="mamba2")).d_state == 64
    assert resolve_args(TrainArgs(), {"lr": 0.5}).lr == 0.5  # stored values fill the gaps on resume


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("d_model", -1), ("batch_size", 0), ("seq_len", 0), ("lr", 0.0), ("lr", float("nan")),
     ("eval_interval", 0), ("arch", "mamba9"), ("warmup_steps", -1)],
)
def test_invalid_args(field: str, value) -> None:
    with pytest.raises(MambaKitError, match=field.replace("_", "-") if field != "arch" else "arch"):
        resolve_args(TrainArgs(**{field: value}))


def test_build_config_mamba1_and_mamba2() -> None:
    c1 = build_config(resolve_args(TrainArgs(d_model=32, d_state=8)))
    assert c1.ssm_cfg == {"layer": "Mamba1", "d_state": 8} and c1.vocab_size == 256
    c2 = build_config(resolve_args(TrainArgs(arch="mamba2", d_model=48)))
    assert c2.ssm_cfg["layer"] == "Mamba2" and c2.ssm_cfg["d_state"] == 64
    assert (2 * 48) % c2.ssm_cfg["headdim"] == 0
    with pytest.raises(MambaKitError, match="multiple of 8"):
        build_config(resolve_args(TrainArgs(arch="mamba2", d_model=12)))


def test_param_groups_decay_matrices_only() -> None:
    from mambakit.models.lm import MambaLMHeadModel

    model = MambaLMHeadModel(build_config(resolve_args(TrainArgs(d_model=16, n_layer=1, d_state=4))))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any(names[id(p)].endswith(("A_log", ".D")) for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_old_import_paths_are_the_engine_s() -> None:
    import mambakit.training as training

    assert train_module.resolve_device is training.resolve_device
    assert train_module.param_groups is training.param_groups
    args = resolve_args(TrainArgs(steps=50, warmup_steps=5, lr=2e-3, min_lr_ratio=0.2))
    assert [lr_at(s, args) for s in range(51)] == [training.lr_at(s, 50, 2e-3, 5, 0.2) for s in range(51)]


def test_tiny_run_writes_everything(corpus: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    summary = train(tiny_args(corpus, tmp_path / "run"), log=logs.append)
    assert summary["steps"] == 6
    assert math.isfinite(summary["initial_val_loss"]) and math.isfinite(summary["final_val_loss"])
    assert summary["initial_val_loss"] == pytest.approx(math.log(256), rel=0.1)  # untrained ~ uniform over bytes
    assert summary["tokens_per_s"] > 0 and summary["wall_time_s"] > 0
    assert summary["sample"].startswith("def ")
    state = load_trainer_state(tmp_path / "run" / "checkpoint")
    assert state["step"] == 6 and [s for s, _ in state["history"]["val"]] == [0, 3, 6]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_resume_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = lambda message: None  # noqa: E731
    straight = train(tiny_args(corpus, tmp_path / "a"), log=quiet)

    class Stop(Exception):
        """Stands for a crash right after the step-3 checkpoint."""

    real_save = train_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Stop):
        train(tiny_args(corpus, tmp_path / "b"), log=quiet)
    monkeypatch.undo()
    assert load_trainer_state(tmp_path / "b" / "checkpoint")["step"] == 3

    resumed = train(TrainArgs(out=str(tmp_path / "b"), resume=True, progress=False), log=quiet)
    assert resumed["steps"] == 6
    a = load_checkpoint(tmp_path / "a" / "checkpoint").state_dict()
    b = load_checkpoint(tmp_path / "b" / "checkpoint").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)
    assert resumed["final_val_loss"] == pytest.approx(straight["final_val_loss"])
    assert resumed["sample"] == straight["sample"]
    history = load_trainer_state(tmp_path / "b" / "checkpoint")["history"]
    assert [s for s, _ in history["train"]] == list(range(1, 7))
    assert [s for s, _ in history["val"]] == [0, 3, 6]


def test_fused_loss_trains_as_the_plain_loss(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = lambda message: None  # noqa: E731
    fused = train(tiny_args(corpus, tmp_path / "fused", sample_tokens=0), log=quiet)
    real_loss = train_module.lm_loss
    monkeypatch.setattr(train_module, "lm_loss", lambda model, x, y: real_loss(model, x, y, fused=False))
    plain = train(tiny_args(corpus, tmp_path / "plain", sample_tokens=0), log=quiet)
    histories = [load_trainer_state(tmp_path / run / "checkpoint")["history"] for run in ("fused", "plain")]
    for key in ("train", "val"):
        (f_steps, f_losses), (p_steps, p_losses) = (zip(*h[key]) for h in histories)
        assert f_steps == p_steps and len(f_steps) >= 3
        assert f_losses == pytest.approx(p_losses, rel=1e-5)
    assert fused["final_val_loss"] == pytest.approx(plain["final_val_loss"], rel=1e-5)


def test_resume_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(MambaKitError, match="--resume"):
        train(TrainArgs(out=str(tmp_path / "none"), resume=True, progress=False), log=lambda s: None)
    train(tiny_args(corpus, tmp_path / "run", steps=2, sample_tokens=0), log=lambda s: None)
    with pytest.raises(MambaKitError, match="does not match"):
        train(TrainArgs(out=str(tmp_path / "run"), resume=True, d_model=32, progress=False), log=lambda s: None)
    logs: list[str] = []
    summary = train(TrainArgs(out=str(tmp_path / "run"), resume=True, progress=False, sample_tokens=0), log=logs.append)
    assert summary["steps"] == 2 and any("nothing to train" in m for m in logs)


def test_validation_split_too_small(tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n" * 40)
    with pytest.raises(MambaKitError, match="validation split"):
        train(tiny_args(small, tmp_path / "run", seq_len=64), log=lambda s: None)


def test_tiny_mamba2_run(corpus: Path, tmp_path: Path) -> None:
    summary = train(tiny_args(corpus, tmp_path / "run", arch="mamba2", steps=2, d_state=8), log=lambda s: None)
    assert math.isfinite(summary["final_val_loss"])
    model = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert model.config.ssm_cfg["layer"] == "Mamba2" and model.config.ssm_cfg["d_state"] == 8


def test_resume_of_a_finished_run_changes_nothing(corpus: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A --resume at --steps trains nothing: summary.json (wall time, comm_per_step), the checkpoint and the plot
    stay as the finished run wrote them, and no progress bar is drawn."""
    run = tmp_path / "run"
    first = train(tiny_args(corpus, run, steps=2, sample_tokens=0), log=lambda s: None)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".mambakit.lock"}
    capfd.readouterr()
    logs: list[str] = []
    again = train(TrainArgs(out=str(run), resume=True), log=logs.append)
    err = capfd.readouterr().err
    assert again == json.loads((run / "summary.json").read_text())
    assert again["wall_time_s"] == first["wall_time_s"] and again["comm_per_step"] == first["comm_per_step"]
    assert {p: p.read_bytes() for p in files} == files
    assert "train:" not in err and "it/s" not in err and "step/s" not in err
    assert any("nothing to train" in m for m in logs) and not any("saved checkpoint" in m for m in logs)
