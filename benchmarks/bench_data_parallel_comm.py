"""Communication volume per optimizer step of data-parallel training (DDP and FSDP2), on gloo CPU processes.

Runs real `mambakit.train.train` steps on W local processes and reads what each rank handed to the gradient and
parameter collectives in the last step (`summary["comm_per_step"]`: DDP's comm hook sees every all-reduced gradient
bucket, FSDP2's custom all-gather / reduce-scatter see every parameter gather and gradient scatter), next to the
design (`mambakit.distributed.expected_comm_bytes`). CPU processes measure no speed.

    python benchmarks/bench_data_parallel_comm.py [--worlds 2 4] [--d-model 256] [--n-layer 2]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mambakit.distributed._testing import run_on_ranks


def _train_on_rank(rank: int, world: int, out: str, data: str, d_model: int, n_layer: int, fsdp: bool,
                   grad_accum: int) -> dict:
    from mambakit.train import TrainArgs, train

    args = TrainArgs(out=out, data=data, steps=2, d_model=d_model, n_layer=n_layer, seq_len=64, batch_size=8,
                     grad_accum=grad_accum, eval_interval=2, eval_batches=1, sample_tokens=0, progress=False,
                     device="cpu", fsdp=fsdp)
    return train(args, log=lambda message: None)


def _ring_wire(kind: str, n: int, world: int) -> float:
    """Bytes one rank sends for a ring collective of logical size n."""
    return (2 if kind == "all_reduce" else 1) * (world - 1) / world * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=2)
    ns = parser.parse_args()

    from mambakit.distributed import expected_comm_bytes
    from mambakit.models.lm import MambaLMHeadModel
    from mambakit.train import TrainArgs, build_config, resolve_args

    model = MambaLMHeadModel(build_config(resolve_args(TrainArgs(d_model=ns.d_model, n_layer=ns.n_layer))))
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    print(f"Mamba-1 LM, d_model {ns.d_model}, n_layer {ns.n_layer}: {param_bytes // 4:,} parameters = "
          f"{param_bytes / 2**10:.1f} KiB fp32 (tied embedding once)\n")
    print("| mode | W | grad-accum | measured per step (logical bytes, calls) | design | ring: sent per rank | "
          "÷ gradient bytes |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.txt"
        data.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(4000)))
        for world in ns.worlds:
            for fsdp in (False, True):
                for accum in (1, 2):
                    if 8 % (world * accum):
                        continue
                    out = str(Path(tmp) / f"run-{world}-{fsdp}-{accum}")
                    summary = run_on_ranks(_train_on_rank, world, out, str(data), ns.d_model, ns.n_layer, fsdp,
                                           accum)[0]
                    comm = summary["comm_per_step"]
                    mode = "fsdp" if fsdp else "ddp"
                    design = expected_comm_bytes(model, mode, world, accum)
                    measured = ", ".join(f"{k} {v / 2**10:.1f} KiB ×{comm['calls'][k]}"
                                         for k, v in comm["bytes"].items())
                    match = "= design" if comm["bytes"] == design else f"design {design}"
                    wire = sum(_ring_wire(k, v, world) for k, v in comm["bytes"].items())
                    print(f"| {mode.upper() if not fsdp else 'FSDP2'} | {world} | {accum} | {measured} | {match} | "
                          f"{wire / 2**10:.1f} KiB | {wire / param_bytes:.2f} |")


if __name__ == "__main__":
    main()
