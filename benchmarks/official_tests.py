"""Run the official test suites of mamba_ssm and causal_conv1d against mambakit.compat, on CPU.

Usage (the folder holds the fetched official trees, e.g. state-spaces/mamba's and Dao-AILab/causal-conv1d's
``tests/`` folders anywhere below it; their files are never copied into this project)::

    PYTHONPATH=$PWD python benchmarks/official_tests.py /tmp/official_tests --work /tmp/official_run \
        [--deps /tmp/official_deps] [--stride 1] [--stride-for NAME=N] [--k-for NAME=EXPR] [--file-timeout 900] \
        [--only test_ssd.py ...]

What it does, mechanically, to each official ``test_*.py`` (into the --work folder):

* the imports stay as written; this module, loaded as a pytest plugin, puts every module of
  ``mambakit.compat.mamba_ssm`` in ``sys.modules`` as ``mamba_ssm.<same path>`` and ``mambakit.compat.causal_conv1d``
  as ``causal_conv1d.<same path>``, so ``from mamba_ssm.ops.triton.ssd_combined import ...`` imports mambakit's;
* the device moves to the CPU: the strings ``"cuda"`` / ``'cuda'`` become ``"cpu"``, ``.cuda()`` becomes ``.cpu()``,
  ``torch.cuda.is_available()`` becomes ``True`` (tests skipped "without CUDA" then run on the CPU), and
  ``torch.cuda.synchronize`` / ``torch.cuda.manual_seed_all`` / ``torch.cuda.empty_cache`` do nothing;
* tolerances and sizes are unchanged. ``--stride N`` runs every N-th parametrisation of each test function (the
  first always), for suites whose full grid is too long on a small CPU; the counts say how many were collected and
  how many ran.

Results: one line per file (passed, failed, errors, skipped, not run by the stride) and ``summary.json`` in --work
with every failure's first message line, grouped by message.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

#: official top-level package -> the mambakit.compat package that mirrors it
ALIASES = {"mamba_ssm": "mambakit.compat.mamba_ssm", "causal_conv1d": "mambakit.compat.causal_conv1d"}

#: (pattern, replacement) applied to every official test file: the move to the CPU, nothing else
REWRITES = [
    (r"([\"'])cuda\1", r"\1cpu\1"),
    (r"\.cuda\(\)", ".cpu()"),
    (r"torch\.cuda\.is_available\(\)", "True"),
]


# ----------------------------------------------------------------------------------------------------------------------
# The pytest plugin (loaded with -p official_tests inside the --work folder)
# ----------------------------------------------------------------------------------------------------------------------
def install_aliases() -> list[str]:
    """Register mambakit.compat's modules under the official names; returns the modules that failed to import."""
    failed = []
    for official, ours in ALIASES.items():
        package = importlib.import_module(ours)
        sys.modules[official] = package
        for info in pkgutil.walk_packages(package.__path__, prefix=ours + "."):
            try:
                module = importlib.import_module(info.name)
            except Exception as exc:  # noqa: BLE001 - reported, the rest still aliased
                failed.append(f"{info.name}: {exc}")
                continue
            sys.modules[official + info.name[len(ours):]] = module
    return failed


def _cpu_cuda_stubs() -> None:
    import torch

    for name in ("synchronize", "manual_seed_all", "empty_cache", "reset_peak_memory_stats"):
        setattr(torch.cuda, name, lambda *args, **kwargs: None)


def pytest_addoption(parser) -> None:
    parser.addoption("--stride", type=int, default=1, help="run every N-th parametrisation of each test function")


def pytest_configure(config) -> None:
    failed = install_aliases()
    if failed:
        print("mambakit.compat modules that did not import:", *failed, sep="\n  ", file=sys.stderr)
    _cpu_cuda_stubs()


def pytest_collection_modifyitems(config, items) -> None:
    stride = config.getoption("--stride")
    if stride <= 1:
        return
    seen: Counter = Counter()
    keep, drop = [], []
    for item in items:
        key = (item.nodeid.split("[")[0])
        (keep if seen[key] % stride == 0 else drop).append(item)
        seen[key] += 1
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


# ----------------------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------------------
def prepare(source: Path, work: Path) -> list[Path]:
    """Copy the official test files below `source` into `work`, rewritten for the CPU; returns the copies."""
    out = []
    for path in sorted(source.rglob("test_*.py")):
        rel = path.relative_to(source)
        text = path.read_text()
        for pattern, repl in REWRITES:
            text = re.sub(pattern, repl, text)
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        out.append(target)
    return out


def _counts(junit: Path) -> tuple[dict, list[str]]:
    counts = Counter(passed=0, failed=0, errors=0, skipped=0)
    messages = []
    if not junit.exists():
        return dict(counts), messages
    for case in ET.parse(junit).getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed" if child.tag == "failure" else "errors"
                first = (child.get("message") or child.text or "").strip().splitlines()
                messages.append(first[0][:200] if first else child.tag)
            elif child.tag == "skipped":
                status = "skipped"
        counts[status] += 1
    return dict(counts), messages


def _counts_from_log(log: str) -> Counter:
    """Outcome counts from pytest's -v lines (``path::test[id] PASSED``), for a file stopped by its timeout."""
    counts = Counter(passed=0, failed=0, errors=0, skipped=0)
    names = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "skipped"}
    for match in re.finditer(r"^\S+::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL)", log, re.M):
        counts[names[match.group(1)]] += 1
    return counts


def run_file(test: Path, work: Path, stride: int, timeout: float, env: dict, keyword: str = "") -> dict:
    junit = work / "junit" / (str(test.relative_to(work)).replace(os.sep, "__") + ".xml")
    junit.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "official_tests", "-p", "no:cacheprovider",
           f"--stride={stride}", f"--junitxml={junit}", "--rootdir", str(work), str(test)] + (["-k", keyword] if keyword
                                                                                            else [])
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        tail, timed_out = proc.stdout + proc.stderr[-2000:], False
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        tail, timed_out = out, True
    counts, messages = _counts(junit)
    if timed_out:  # the junit file is not written: count the finished tests from the -v lines
        counts = dict(_counts_from_log(tail))
        messages = ["(file timed out; failures not detailed)"] * counts["failed"]
    deselected = re.search(r"(\d+) deselected", tail)
    collected = re.search(r"collected (\d+) item", tail)
    return {"file": str(test.relative_to(work)), "counts": counts, "collected": int(collected.group(1))
            if collected else 0, "deselected": int(deselected.group(1)) if deselected else 0, "timed_out": timed_out,
            "seconds": round(time.time() - start, 1),
            "messages": Counter(messages).most_common(), "tail": tail[-1500:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder holding the fetched official test trees")
    parser.add_argument("--work", type=Path, default=Path("/tmp/official_run"))
    parser.add_argument("--deps", type=Path, help="extra import folder for the official tests' own needs (einops)")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--stride-for", action="append", default=[], metavar="NAME=N",
                        help="a stride for one file (by file name), e.g. test_causal_conv1d.py=20")
    parser.add_argument("--k-for", action="append", default=[], metavar="NAME=EXPR",
                        help="a pytest -k expression for one file, e.g. 'test_mamba3_siso.py=not step' (too large for a"
                             " CPU: the counts then say what was deselected)")
    parser.add_argument("--file-timeout", type=float, default=900.0)
    parser.add_argument("--only", nargs="*", help="file names to run (default: all)")
    args = parser.parse_args(argv)
    strides = {k: int(v) for k, v in (s.split("=") for s in args.stride_for)}
    keywords = dict(s.split("=", 1) for s in args.k_for)
    tests = prepare(args.source, args.work)
    if args.only:
        tests = [t for t in tests if t.name in args.only]
    here = Path(__file__).resolve().parent
    root = here.parent
    env = dict(os.environ)
    paths = [str(here), str(root)] + ([str(args.deps)] if args.deps else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    results = []
    for test in tests:
        res = run_file(test, args.work, strides.get(test.name, args.stride), args.file_timeout, env,
                       keywords.get(test.name, ""))
        results.append(res)
        c = res["counts"]
        print(f"{res['file']}: {res['collected']} collected, {c['passed']} passed, {c['failed']} failed, "
              f"{c['errors']} errors, {c['skipped']} skipped, {res['deselected']} not run (stride or -k), "
              f"{res['seconds']} s"
              + (" TIMED OUT" if res["timed_out"] else ""), flush=True)
        for message, n in res["messages"][:8]:
            print(f"    {n} x {message}")
    (args.work / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
