"""Run a function on W local CPU processes joined in a gloo process group (for tests and the comm benchmark)."""
from __future__ import annotations

import os
import socket
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


#: how many times `run_on_ranks` repeats a run whose rank was killed by a signal
SIGNAL_RETRIES = 2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world, *args)`` on `world` spawned processes (gloo, one thread each); returns the results in
    rank order. `fn` must be importable (a module-level function) and return something picklable. A failure on any
    rank is raised here."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    for attempt in range(SIGNAL_RETRIES + 1):
        queue = ctx.SimpleQueue()
        try:
            mp.start_processes(_entry, args=(world, free_port(), fn, args, queue), nprocs=world, join=True,
                               start_method="spawn")
        except mp.ProcessExitedException as exc:
            # a rank killed by a signal, not by an exception of fn (those raise ProcessRaisedException): gloo's
            # loopback transport aborts now and then on a loaded machine ("terminate called without an active
            # exception"); the run is repeated on a fresh port, and the last failure is raised
            if exc.signal_name is None or attempt == SIGNAL_RETRIES:
                raise
            warnings.warn(f"run_on_ranks: rank {exc.error_index} died by {exc.signal_name}; running again")
            continue
        results = dict(queue.get() for _ in range(world))
        return [results[r] for r in range(world)]
    raise AssertionError("unreachable")
