"""Every benchmark script runs its CPU smoke mode (tiny shapes) in a subprocess and exits 0; the scripts that write
JSON rows write them to $OUT, and results_table.py turns them into markdown. GPU-only scripts are skipped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

#: script -> (smoke arguments, the JSON lines files it writes to $OUT)
SMOKE = {
    "bench_conv1d.py": (["--tiny"], ["conv1d.jsonl"]),
    "bench_decode.py": (["--device", "cpu", "--tiny"], ["decode.jsonl"]),
    "bench_generate.py": (["--device", "cpu", "--tiny"], []),
    "bench_gemv.py": (["--device", "cpu", "--tiny"], ["gemv.jsonl"]),
    "sweep_mixer_step.py": (["--device", "cpu", "--tiny"], ["mixer_step.jsonl"]),
    "bench_ssd_forms.py": (["--device", "cpu", "--tiny", "--forms", "base", "z", "seq_idx"], ["ssd_forms.jsonl"]),
    "profile_train_step.py": (["--device", "cpu", "--tiny"], ["train_step.jsonl"]),
    "saved_activations.py": (["--tiny"], ["saved_activations.jsonl"]),
    "bench_cpu.py": (["--seqlens", "32", "--batch", "1", "--repeats", "1", "--max-slow-tokens", "32",
                      "--impls", "mambakit"], []),
    "bench_ssd_cpu.py": (["--threads", "1", "--seqlens", "64", "--batch", "1", "--nheads", "2", "--headdim", "8",
                          "--d-state", "8", "--chunk-size", "16", "--repeats", "1"], []),
    "interpret_sanity.py": (["--task", "all", "--steps", "3", "--n-eval", "8", "--batch", "4"], []),
    "remamba_kv.py": (["--d-model", "16", "--n-layer", "1", "--d-state", "4", "--n-keys", "4", "--base-len", "16",
                       "--base-pairs", "1", "--base-steps", "2", "--base-warmup", "1", "--batch", "4",
                       "--adapt-lens", "32", "--adapt-steps", "2", "--adapt-batch", "2", "--eval-lens", "32",
                       "--eval-samples", "4", "--eval-batch", "4"], []),
    "bench_distributed_comm.py": (["--worlds", "2", "--seqlens", "64"], []),
    "bench_cpu_accuracy.py": (["--tiny", "--threads", "1"], ["cpu_accuracy.jsonl"]),
    "bench_cpu_llamacpp.py": (["--tiny", "--threads", "1", "--rounds", "1"], ["cpu_llamacpp.jsonl"]),
    "bench_cpu_linear.py": (["--tiny", "--threads", "1", "--rounds", "1", "--reps", "1"], ["cpu_linear.jsonl"]),
    "bench_cpu_decode.py": (["--tiny", "--rounds", "1"], ["cpu_decode.jsonl"]),
    "bench_hybrid_gpu.py": (["--tiny"], ["hybrid_gpu.jsonl"]),
    "host_overhead.py": (["--count-ops", "--tiny"], ["op_count.jsonl"]),
    "bench_mamba3_cpu.py": (["--threads", "1", "--seqlens", "32", "--nheads", "2", "--headdim", "8", "--d-state",
                             "8", "--chunk-size", "16", "--repeats", "1"], []),
}

#: script -> why it has no CPU smoke mode here
SKIPPED = {
    "bench_data_parallel_comm.py": "starts a gloo process group per strategy (slow on a shared CPU); the same "
                                   "code paths run in tests/distributed/test_data_parallel.py",
    "bench_lm_gpu.py": "GPU only: times the Triton paths of a full LM",
    "bench_mamba3.py": "GPU only: times one Mamba-3 block (first call, forward, forward+backward) beside Mamba-2",
    "bench_norm.py": "GPU only: checks and times the Triton norm kernels (cold Triton cache)",
    "bench_selective_scan.py": "GPU only: times the Triton selective scan against copy bandwidth",
    "bench_ssd.py": "GPU only: checks and times the Triton SSD kernels",
    "first_call.py": "GPU only: cold-cache compile times of the Triton kernels",
    "gpu_check_selective_scan.py": "GPU only: large-shape checks of the Triton scan, conv and decode kernels",
    "sweep_selective_scan.py": "GPU only: sweeps the Triton selective scan's launch configurations",
    "sweep_ssd.py": "GPU only: sweeps the Triton SSD kernels' launch settings",
    "official_tests.py": "needs the official test files fetched into a folder (not in the project)",
}


def run(script: str, args: list[str], out: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=out, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_script_is_listed() -> None:
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.name != "results_table.py"}
    assert scripts == set(SMOKE) | set(SKIPPED)


@pytest.mark.parametrize("script", sorted(SMOKE) + sorted(SKIPPED))
def test_smoke(script: str, tmp_path: Path) -> None:
    if script in SKIPPED:
        pytest.skip(SKIPPED[script])
    args, jsonl = SMOKE[script]
    if script == "remamba_kv.py":
        args = [*args, "--out", str(tmp_path / "remamba")]
    proc = run(script, args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in jsonl:
        rows = (tmp_path / name).read_text().splitlines()
        assert rows, f"{script} wrote no rows to {name}"
        table = run("results_table.py", [str(tmp_path / name)], tmp_path)
        assert table.returncode == 0, table.stderr
        assert table.stdout.startswith(f"### {name}\n") and table.stdout.count("\n|") == len(rows) + 2


def test_mamba2_state_step_sweep_smoke(tmp_path: Path) -> None:
    proc = run("sweep_mixer_step.py", ["--device", "cpu", "--tiny", "--arch", "mamba2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "mamba2_state_step.jsonl").read_text().splitlines()


def test_results_table_refuses_a_missing_file(tmp_path: Path) -> None:
    proc = run("results_table.py", [str(tmp_path / "none.jsonl")], tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_hybrid_benchmark_runs_mambakit_alone_without_transformers(tmp_path: Path) -> None:
    stub = tmp_path / "stub" / "transformers"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('stubbed out by the test')\n")
    env = {**os.environ, "OUT": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(stub.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(BENCH / "bench_hybrid_gpu.py"), "--tiny", "--models", "nemotron_h",
                           "--skip-train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "transformers not importable (ImportError: stubbed out by the test); mambakit only" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "hybrid_gpu.jsonl").read_text().splitlines()]
    assert [r["measure"] for r in rows] == ["prefill", "prefill", "decode"]
    assert all(r["transformers_path"] == "not run" and isinstance(r["mambakit_ms"], float) for r in rows)


#: (arch, dtype) -> the most torch ops, the Triton launches and the most GPU kernels (launches + torch ops that are
#: not views or allocations) of one fused inner-path forward + backward (benchmarks/host_overhead.py --count-ops):
#: fewer host ops per layer is a faster eager training step.
OP_CEILINGS = {("mamba2", "float32"): (85, 15, 21), ("mamba2", "bfloat16"): (87, 15, 23),
               ("mamba1", "float32"): (109, 5, 18), ("mamba1", "bfloat16"): (116, 5, 25)}

#: The GPU kernels of one whole block's forward + backward (residual add + RMSNorm, in_proj, the fused inner op;
#: bf16 autocast over float32 parameters), by where they come from: a ceiling computed from the parts.
#: in_proj: the autocast cast of its weight and the product, then dX and dW and dW's cast back to float32; the
#: projections inside the op likewise (Mamba-1's dt_proj product once more: delta is recomputed); none for
#: A = -exp(A_log) (formed in the scan kernels, which also give A_log's gradient); the fixed-order reductions of
#: per-program partial sums: the add + norm's dweight, the gated norm's (Mamba-2), the conv's [dweight | dbias],
#: the SSD's [dA | dbias | dD] (Mamba-2) or the scan's [dA | dD | dbias] and its [dB | dC] (a sum and the cast into
#: x_proj's gradient).
BLOCK_KERNELS = {
    "mamba2": dict(triton=5 + 10 + 2, in_proj=2 + 3, out_proj=2 + 3, reductions=4),
    "mamba1": dict(triton=2 + 3 + 2, in_proj=2 + 3, x_proj=2 + 3, dt_proj=2 + 4, out_proj=2 + 3, reductions=3 + 2),
}
#: the most torch ops and autograd nodes of that block forward + backward (measured, branch m2host)
BLOCK_CEILINGS = {"mamba2": (123, 19), "mamba1": (152, 21)}


def test_op_counts_do_not_grow(tmp_path: Path) -> None:
    proc = run("host_overhead.py", ["--count-ops", "--tiny", "--scope", "inner", "block", "step"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "op_count.jsonl").read_text().splitlines()]
    inner = [r for r in rows if r["scope"] == "inner"]
    assert {(r["arch"], r["dtype"]) for r in inner} == set(OP_CEILINGS)
    for r in inner:
        most_ops, launches, most_kernels = OP_CEILINGS[r["arch"], r["dtype"]]
        assert r["fwd_triton"] + r["bwd_triton"] == launches, r
        assert 0 < r["fwd_torch"] + r["bwd_torch"] <= most_ops, r
        assert launches < r["kernels"] <= most_kernels, r
    blocks = {r["arch"]: r for r in rows if r["scope"] == "block"}
    assert set(blocks) == set(BLOCK_KERNELS)
    for arch, parts in BLOCK_KERNELS.items():
        r = blocks[arch]
        most_ops, most_nodes = BLOCK_CEILINGS[arch]
        assert r["fwd_triton"] + r["bwd_triton"] == parts["triton"], r
        assert parts["triton"] < r["kernels"] <= sum(parts.values()), r
        assert 0 < r["fwd_torch"] + r["bwd_torch"] <= most_ops, r
        assert 0 < r["autograd_nodes"] <= most_nodes, r
    steps = {r["arch"]: r for r in rows if r["scope"] == "step"}
    for arch, r in steps.items():  # 2 layers: at least two blocks' worth, and the same Triton launches per block
        assert r["kernels"] >= 2 * blocks[arch]["kernels"], r
        assert r["fwd_triton"] + r["bwd_triton"] == 2 * BLOCK_KERNELS[arch]["triton"] + 2, r  # + the final norm


#: (arch, batch) -> the GPU kernels of one block's decoding step (add + RMSNorm + the mixer's step; the CUDA paths
#: forced): batch 1 fuses the add + norm into the in_proj GEMV; batch 16 is add + norm, in_proj, the step, (the
#: gated norm,) out_proj. The Mamba-3 SISO step with its prep is one kernel (issue 23).
DECODE_KERNELS = {("mamba3", 1): 3, ("mamba3", 16): 4, ("mamba3_outproj_norm", 1): 3,
                  ("mamba3_outproj_norm", 16): 5, ("mamba2", 1): 4, ("mamba2", 16): 6}


def test_decode_op_counts(tmp_path: Path) -> None:
    proc = run("host_overhead.py", ["--count-ops", "--scope", "decode"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {(r["arch"], r["batch"]): r for r in map(json.loads, (tmp_path / "op_count.jsonl").read_text().splitlines())}
    assert set(rows) == set(DECODE_KERNELS)
    for key, most in DECODE_KERNELS.items():
        assert 0 < rows[key]["kernels"] <= most, rows[key]
