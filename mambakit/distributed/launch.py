"""Process-group setup for data-parallel training, and the ``mambakit train --nproc N`` launcher.

A distributed run is one started by ``torchrun`` (or ``python -m torch.distributed.run``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every process. Each process
joins the default process group: gloo for CPU tensors, NCCL for CUDA ones (rank r uses ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from mambakit.errors import MambaKitError


@dataclass
class DistContext:
    """Where this process stands: its rank among `world_size`, its device and the collective backend.

    `distributed` is False for a plain single-process run (no process group; world_size 1, rank 0).
    `owns_group` says whether `setup_distributed` created the process group (and `teardown` must destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    distributed: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment holds WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise MambaKitError(f"environment variable {name} must be an integer (set by torchrun), "
                            f"got {value!r}") from None


def _rank_device(name: str, local_rank: int, distributed: bool) -> torch.device:
    """The device of this rank for --device `name`: CUDA ranks take cuda:LOCAL_RANK."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise MambaKitError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise MambaKitError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} CUDA "
                                "device(s) present; start fewer processes per node")
        return torch.device("cuda", local_rank)
    if distributed and name.startswith("cuda:"):
        raise MambaKitError(f"--device {name} names one GPU, but a distributed run gives each rank its own: "
                            "use --device cuda (rank r takes cuda:LOCAL_RANK) or --device cpu")
    raise MambaKitError(f"unknown device {name!r} for a distributed run; use cpu, cuda or auto")


def setup_distributed(device_name: str) -> DistContext:
    """Join the process group when started by torchrun (or when one exists already); else a single process.

    `device_name` is the --device option (cpu, cuda or auto). The backend follows the device: gloo on CPU,
    NCCL on CUDA. Returns the `DistContext` of this process; call `teardown` at the end.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = _rank_device(device_name, local_rank, True)
        return DistContext(rank, world, local_rank, device, dist.get_backend(), True, False)
    if not under_torchrun():
        return DistContext()
    if not dist.is_available():
        raise MambaKitError("this PyTorch build has no torch.distributed; distributed training is unavailable")
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    device = _rank_device(device_name, local_rank, True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world, device_id=device)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, device, backend, True, True)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group when `setup_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """`argv` without its ``--nproc N`` / ``--nproc=N`` option (what each launched worker receives)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``python -m mambakit <argv>`` in `nproc` processes on this machine.

    torchrun's ``--standalone`` mode picks a free port for its rendezvous, so several runs can share a host.
    """
    if nproc < 1:
        raise MambaKitError(f"--nproc must be a positive integer, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "mambakit", *strip_nproc(argv)]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mambakit <argv>`` under torchrun with `nproc` local processes; returns its exit status.

    OMP_NUM_THREADS defaults to 1 per process (torchrun's own default for several processes), so that the
    ranks do not oversubscribe the CPU cores.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(torchrun_command(nproc, argv), env=env)
