"""Data-parallel training (DDP and FSDP2) on 2 gloo CPU processes against the single-process run.

One module fixture runs everything once: single-process reference runs in this process, then 2 spawned ranks
(torch.multiprocessing, a file:// rendezvous, so no port is needed) train DDP, FSDP2, DDP with gradient
accumulation, and resume checkpoints written by 1 rank; finally a 2-rank checkpoint is resumed here by 1 rank.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mambakit.data import BatchSampler
from mambakit.distributed.data_parallel import expected_comm_bytes
from mambakit.distributed.launch import strip_nproc, torchrun_command
from mambakit.distributed.sampler import ShardedBatchSampler, check_batch_split
from mambakit.errors import MambaKitError
from mambakit.models.checkpoint import load_checkpoint, load_optimizer_state, load_trainer_state
from mambakit.train import TrainArgs, train

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD = 2
STEPS = 6
TINY = dict(steps=STEPS, d_model=32, n_layer=2, d_state=8, seq_len=32, batch_size=8, eval_interval=3,
            eval_batches=1, save_interval=3, sample_tokens=0, progress=False, device="cpu")


class Stop(Exception):
    """Stands for a crash right after the step-3 checkpoint."""


def stop_at(step_to_stop: int):
    def hook(step: int) -> None:
        if step == step_to_stop:
            raise Stop
    return hook


def run(out: Path, crash_at: int | None = None, **overrides: Any) -> dict[str, Any] | None:
    """One training run into `out`; with `crash_at`, stop right after that step's checkpoint (returns None)."""
    kwargs = dict(TINY, out=str(out))
    kwargs.update(overrides)
    args = TrainArgs(**kwargs)
    if crash_at is None:
        return train(args, log=lambda message: None)
    try:
        train(args, log=lambda message: None, on_checkpoint=stop_at(crash_at))
    except Stop:
        return None
    raise AssertionError("the run did not stop")


def _worker(rank: int, store: str, jobs: list[dict[str, Any]]) -> None:
    """Rank `rank` of 2: join the group, then run every job in order (rank 0 writes each summary)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        for job in jobs:
            job = dict(job)
            name, crash_at, expect_error = job.pop("name"), job.pop("crash_at", None), job.pop("expect_error", False)
            out = Path(job.pop("out"))
            result: dict[str, Any]
            if expect_error:
                try:
                    run(out, **job)
                    result = {"error": None}
                except MambaKitError as exc:
                    result = {"error": str(exc)}
            else:
                result = run(out, crash_at=crash_at, **job) or {"stopped": True}
            if rank == 0:
                (out.parent / f"{name}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dp")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400)))
    TINY["data"] = str(corpus)
    (root / "ref.json").write_text(json.dumps(run(root / "ref")))
    run(root / "single_crash", crash_at=3)  # a 1-rank checkpoint at step 3
    for name in ("r12", "r12_fsdp"):
        shutil.copytree(root / "single_crash", root / name)
    jobs = [
        {"name": "ddp", "out": str(root / "ddp")},
        {"name": "fsdp", "out": str(root / "fsdp"), "fsdp": True},
        {"name": "ddp_accum", "out": str(root / "ddp_accum"), "grad_accum": 2},
        {"name": "ddp_crash", "out": str(root / "ddp_crash"), "crash_at": 3},
        {"name": "r12", "out": str(root / "r12"), "resume": True},
        {"name": "r12_fsdp", "out": str(root / "r12_fsdp"), "resume": True, "fsdp": True},
        {"name": "bad_split", "out": str(root / "bad"), "batch_size": 6, "grad_accum": 2, "expect_error": True},
    ]
    for job in jobs:  # the spawned processes import this module afresh: TINY there has no "data"
        job["data"] = str(corpus)
    torch.multiprocessing.spawn(_worker, args=(str(root / "store"), jobs), nprocs=WORLD, join=True)
    shutil.copytree(root / "ddp_crash", root / "r21")
    (root / "r21.json").write_text(json.dumps(run(root / "r21", resume=True)))
    return root


def summary(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / f"{name}.json").read_text())


def losses(root: Path, name: str) -> list[float]:
    history = load_trainer_state(root / name / "checkpoint")["history"]["train"]
    assert [s for s, _ in history] == list(range(1, STEPS + 1))
    return [v for _, v in history]


def assert_same_curve(root: Path, name: str, rel: float) -> None:
    ref, got = losses(root, "ref"), losses(root, name)
    for step, (a, b) in enumerate(zip(ref, got), start=1):
        assert abs(a - b) <= rel * abs(a), f"{name} step {step}: loss {b!r} vs single-process {a!r}"


def assert_same_state(root: Path, name: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    ref = load_checkpoint(root / "ref" / "checkpoint").state_dict()
    got = load_checkpoint(root / name / "checkpoint").state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=rtol, atol=atol, msg=lambda m: f"{name} {key}: {m}")
    ref_opt = load_optimizer_state(root / "ref" / "checkpoint")
    got_opt = load_optimizer_state(root / name / "checkpoint")
    assert ref_opt["param_groups"] == got_opt["param_groups"]
    for pid, entry in ref_opt["state"].items():
        for k, v in entry.items():
            torch.testing.assert_close(got_opt["state"][pid][k], v, rtol=rtol, atol=atol)


def test_ddp_loss_curve_and_state_equal_single_process(runs: Path) -> None:
    assert summary(runs, "ddp")["parallel"] == "ddp" and summary(runs, "ddp")["world_size"] == WORLD
    assert_same_curve(runs, "ddp", rel=1e-6)
    assert_same_state(runs, "ddp")


def test_fsdp_loss_curve_and_state_equal_single_process(runs: Path) -> None:
    assert summary(runs, "fsdp")["parallel"] == "fsdp"
    assert_same_curve(runs, "fsdp", rel=1e-6)
    assert_same_state(runs, "fsdp")


def test_gradient_accumulation_equals_single_process(runs: Path) -> None:
    assert summary(runs, "ddp_accum")["grad_accum"] == 2
    assert_same_curve(runs, "ddp_accum", rel=1e-6)
    assert_same_state(runs, "ddp_accum")


@pytest.mark.parametrize("name", ["r21", "r12", "r12_fsdp"])
def test_resume_with_another_world_size_continues_the_run(runs: Path, name: str) -> None:
    """r21: saved by 2 DDP ranks, resumed by 1 process; r12 / r12_fsdp: saved by 1, resumed by 2 (DDP / FSDP2)."""
    assert summary(runs, name)["steps"] == STEPS
    assert_same_curve(runs, name, rel=1e-6)
    assert_same_state(runs, name)
    assert summary(runs, name)["final_val_loss"] == pytest.approx(summary(runs, "ref")["final_val_loss"], rel=1e-6)


def test_communication_volume_matches_design(runs: Path) -> None:
    from mambakit.models.lm import MambaLMHeadModel

    model = MambaLMHeadModel(load_checkpoint(runs / "ref" / "checkpoint").config)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())  # tied embedding/head counted once
    ddp = summary(runs, "ddp")["comm_per_step"]["bytes"]
    assert ddp == {"all_reduce": grad_bytes} == expected_comm_bytes(model, "ddp", WORLD)
    assert summary(runs, "ddp_accum")["comm_per_step"]["bytes"] == {"all_reduce": grad_bytes}  # no_sync
    fsdp = summary(runs, "fsdp")["comm_per_step"]["bytes"]
    assert fsdp == expected_comm_bytes(model, "fsdp", WORLD)
    assert grad_bytes <= fsdp["reduce_scatter"] <= grad_bytes * 1.01  # only dim-0 padding on top
    assert summary(runs, "ref")["comm_per_step"]["total_bytes"] == 0


def test_batch_not_divisible_is_a_clear_error(runs: Path) -> None:
    message = summary(runs, "bad_split")["error"]
    assert message and "--batch-size 6" in message and "world size 2" in message and "--grad-accum 2" in message
    with pytest.raises(MambaKitError, match=r"--batch-size 10 .* world size 4 × --grad-accum 1 = 4"):
        check_batch_split(10, 4, 1)


def test_fsdp_needs_a_distributed_launch(tmp_path: Path) -> None:
    with pytest.raises(MambaKitError, match="--fsdp needs a distributed launch"):
        run(tmp_path / "x", fsdp=True, data=str(Path(__file__)))


def test_bf16_is_off_on_cpu(tmp_path: Path) -> None:
    with pytest.raises(MambaKitError, match="--bf16 needs a CUDA device"):
        run(tmp_path / "x", bf16=True, data=str(Path(__file__)))


def test_sharded_sampler_splits_the_global_batch() -> None:
    data = torch.arange(1000, dtype=torch.int64).remainder(256).to(torch.uint8)
    sampler = BatchSampler(data, batch_size=8, seq_len=5, seed=3)
    x, y = sampler.batch(4)
    for world, accum in [(1, 1), (2, 1), (2, 2), (4, 2)]:
        parts = [mb for r in range(world) for mb in ShardedBatchSampler(sampler, r, world, accum).micro_batches(4)]
        assert len(parts) == world * accum and all(px.shape == (8 // (world * accum), 5) for px, _ in parts)
        assert torch.equal(torch.cat([px for px, _ in parts]), x) and torch.equal(torch.cat([py for _, py in parts]), y)


def test_launcher_command() -> None:
    argv = ["train", "--nproc", "2", "--steps", "3", "--nproc=4", "--fsdp"]
    assert strip_nproc(argv) == ["train", "--steps", "3", "--fsdp"]
    cmd = torchrun_command(2, argv)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert cmd[6:] == ["mambakit", "train", "--steps", "3", "--fsdp"]


def test_cli_nproc_checks_the_batch_split_before_launching(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mambakit.cli import main

    status = main(["train", "--nproc", "2", "--grad-accum", "2", "--batch-size", "6", "--out", str(tmp_path),
                   "--data", str(Path(__file__))])
    assert status == 2
    assert "--batch-size 6 (the global batch) must be a multiple of world size 2 × --grad-accum 2 = 4" in \
        capsys.readouterr().err


def test_cli_nproc_launches_torchrun(tmp_path: Path) -> None:
    """``mambakit train --nproc 2 --fsdp``: two ranks, one log, one consolidated checkpoint that loads anywhere."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"x{i} = {i} * {i % 5}\n" for i in range(3000)))
    out = tmp_path / "run"
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "mambakit", "train", "--nproc", "2", "--fsdp", "--device", "cpu",
           "--data", str(corpus),
           "--out", str(out), "--steps", "2", "--d-model", "16", "--n-layer", "1", "--d-state", "4", "--seq-len", "16",
           "--batch-size", "4", "--eval-batches", "1", "--sample-tokens", "8", "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("done: 2 steps") == 1 and proc.stdout.count("model: mamba1") == 1  # rank 0 logs only
    result = json.loads((out / "summary.json").read_text())
    assert result["world_size"] == 2 and result["parallel"] == "fsdp" and result["sample"].startswith("def ")
    assert load_checkpoint(out / "checkpoint").config.d_model == 16
