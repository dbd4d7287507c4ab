"""CPU prefill and decode, mambakit float32 / bfloat16 / float16 against transformers float32 / bfloat16 and
llama.cpp f32 / f16 on the same weights, in one run.

    pip download llama-cpp-python --no-deps --no-binary :all: && tar xzf llama_cpp_python-*.tar.gz
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python            # builds llama.cpp (a while on 2 cores)
    python benchmarks/bench_cpu_llamacpp.py --llama-src llama_cpp_python-*/vendor/llama.cpp
    python benchmarks/bench_cpu_llamacpp.py --llama-src DIR --llama-site VENV/lib/python3.11/site-packages  # a venv's

One random-weight model per architecture (130M shape: d_model 768, 24 layers, vocabulary 50280; Mamba-2 with d_state
128, headdim 64; the official initialisation, seed 0) is saved in transformers format (`save_pretrained(...,
format="hf")`, plus `pad_vocab_size_multiple` in config.json, which llama.cpp's Mamba-2 conversion reads) and
converted to GGUF f32 and f16 by llama.cpp's own `convert_hf_to_gguf.py` (`--llama-src`: the llama.cpp folder of the
llama-cpp-python source tarball). mambakit reads the same folder with `from_pretrained` (float32, `dtype="bfloat16"`
and `dtype="float16"`, the last like for like with llama.cpp f16). For each thread count the engines run one after
the other, `--rounds` times: prefill of a `--prompt`-token random prompt (tok/s), then `--new-tokens` one-token
steps fed the tokens that mambakit float32 picks greedily (tok/s). Every engine's logits at those steps are compared
with mambakit float32's: median |difference| and how many argmax agree. The best round of each is reported (the
machine is shared). transformers (`AutoModelForCausalLM.from_pretrained` of the same folder, its own cache, float32
and bfloat16) runs too when it imports (`--no-transformers` leaves it out). Without --llama-src, or when llama_cpp
does not import, llama.cpp is left out (and it says so): the smoke test's `--tiny` run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from _common import Rows, table
from mambakit import MambaConfig, MambaLMHeadModel
from mambakit.models.pretrained import from_pretrained, save_pretrained

SHAPES = {"130m": (768, 24, 50280), "tiny": (64, 2, 50280)}


def make_checkpoint(arch: str, shape: str, folder: Path) -> Path:
    d_model, n_layer, vocab = SHAPES[shape]
    ssm = {"layer": "Mamba2", "d_state": 128, "headdim": 64} if arch == "mamba2" else {"layer": "Mamba1"}
    if shape == "tiny" and arch == "mamba2":
        ssm = {"layer": "Mamba2", "d_state": 16, "headdim": 16}
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm))
    save_pretrained(model, folder, format="hf")
    config = json.loads((folder / "config.json").read_text())
    config["pad_vocab_size_multiple"] = 8  # llama.cpp pads Mamba-2's vocabulary to 16 without it (50288 rows)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def convert(llama_src: Path, folder: Path, outtype: str) -> Path:
    out = folder.with_name(f"{folder.name}-{outtype}.gguf")
    cmd = [sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
           "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return out


class Mambakit:
    """One engine: prefill(prompt ids) then step(token) -> logits (vocab,) float32."""

    def __init__(self, folder: Path, dtype: str):
        self.model = from_pretrained(folder, dtype=dtype).eval()

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        self.cache = self.model.allocate_cache(batch_size=1)
        with torch.inference_mode():
            return self.model(torch.tensor([prompt]), cache=self.cache).logits[0, -1].float()

    def step(self, token: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.step(torch.tensor([token]), self.cache)[0].float()


class Transformers:
    """transformers' own model of the folder and its cache: prefill(prompt ids) then step(token) -> logits (vocab,)."""

    def __init__(self, folder: Path, dtype: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def _run(self, ids: list[int], **cache: Any) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), use_cache=True, **cache)
        # 4.x returns and takes `cache_params`, 5.x `cache`
        key = next(k for k in ("cache", "cache_params", "past_key_values") if k in out)
        self.cache = {key: out[key]}
        return out.logits[0, -1].float()

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        self.pos = len(prompt)
        return self._run(prompt)

    def step(self, token: int) -> torch.Tensor:
        logits = self._run([token], cache_position=torch.tensor([self.pos]), **self.cache)
        self.pos += 1
        return logits


class LlamaCpp:
    def __init__(self, gguf: Path, n_ctx: int, n_batch: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, verbose=False)

    def threads(self, n: int) -> None:
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)

    def _last(self) -> torch.Tensor:
        import numpy as np

        # Llama.eval no longer keeps the logits (sampling moved into its sampler): read the context's last row
        return torch.from_numpy(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy())

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        self.llm.reset()  # also clears a recurrent model's state
        self.llm.eval(prompt)
        return self._last()

    def step(self, token: int) -> torch.Tensor:
        self.llm.eval([token])
        return self._last()


def run_engine(engine: Any, prompt: list[int], tokens: list[int] | None,
               new_tokens: int) -> tuple[float, float, list[int], torch.Tensor]:
    """Prefill and decode once: (prefill s, decode s, the tokens fed, the logits before each (new_tokens, vocab)).
    tokens None: feed the argmax (greedy)."""
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    t1 = time.perf_counter()
    fed, rows = [], []
    for i in range(new_tokens):
        rows.append(logits)
        token = int(logits.argmax()) if tokens is None else tokens[i]
        fed.append(token)
        if i + 1 < new_tokens:
            logits = engine.step(token)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, fed, torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-src", type=Path,
                        help="llama.cpp's folder (with convert_hf_to_gguf.py), e.g. the sdist's vendor/llama.cpp")
    parser.add_argument("--llama-site", help="a site-packages folder to import llama_cpp from (appended to sys.path)")
    parser.add_argument("--arch", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers' own model out")
    parser.add_argument("--fp32-accumulation", action=argparse.BooleanOptionalAction, default=True,
                        help="mambakit's 16-bit decode products through mambakit.ops.cpu_linear (float32 "
                             "accumulation, the library's default); --no-fp32-accumulation: torch's 16-bit products")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer d_model 64 model, prompt 16 + 8 (smoke)")
    parser.add_argument("--json", help="rows as JSON lines (default: $OUT/cpu_llamacpp.jsonl)")
    args = parser.parse_args()
    from mambakit.ops import cpu_linear

    cpu_linear.ENABLED = args.fp32_accumulation
    if args.llama_site:
        sys.path.append(args.llama_site)
    llama = args.llama_src is not None and (args.llama_src / "convert_hf_to_gguf.py").is_file()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama = False
    if not llama:
        print("# llama.cpp left out: no --llama-src with convert_hf_to_gguf.py, or llama_cpp does not import")
    hf = not args.no_transformers
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        hf = False
        print("# transformers left out: it does not import")
    shape, prompt_len, new_tokens = ("tiny", 16, 8) if args.tiny else ("130m", args.prompt, args.new_tokens)
    rows = Rows("cpu_llamacpp", args.json)
    print(f"# load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            folder = make_checkpoint(arch, shape, Path(tmp) / arch)
            engines: dict[str, Any] = {"mambakit fp32": Mambakit(folder, "float32"),
                                       "mambakit bf16": Mambakit(folder, "bfloat16"),
                                       "mambakit fp16": Mambakit(folder, "float16")}
            for dtype, name in (("float32", "fp32"), ("bfloat16", "bf16")) if hf else ():
                engines[f"transformers {name}"] = Transformers(folder, dtype)
            for kind in ("f32", "f16") if llama else ():
                engines[f"llama.cpp {kind}"] = LlamaCpp(convert(args.llama_src, folder, kind),
                                                        prompt_len + new_tokens + 8, prompt_len)
            vocab = SHAPES[shape][2]
            prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
            for threads in args.threads:
                torch.set_num_threads(threads)
                for e in engines.values():
                    if isinstance(e, LlamaCpp):
                        e.threads(threads)
                _, _, ref_tokens, ref = run_engine(engines["mambakit fp32"], prompt, None, new_tokens)
                best: dict[str, tuple[float, float]] = {}
                diffs: dict[str, torch.Tensor] = {}
                for _ in range(args.rounds):
                    for name, e in engines.items():
                        pre, dec, _, logits = run_engine(e, prompt, ref_tokens, new_tokens)
                        b = best.get(name, (float("inf"), float("inf")))
                        best[name] = (min(b[0], pre), min(b[1], dec))
                        diffs[name] = logits[:, :vocab]
                load = os.getloadavg()[0]
                for name, (pre, dec) in best.items():
                    d = (diffs[name] - ref[:, :vocab]).abs()
                    rows.add(arch=arch, engine=name, threads=threads, prompt=prompt_len, new_tokens=new_tokens,
                             prefill_tok_s=prompt_len / pre, decode_tok_s=(new_tokens - 1) / dec,
                             median_abs_diff_vs_fp32=float(d.median()), max_abs_diff_vs_fp32=float(d.max()),
                             argmax_agree=int((diffs[name].argmax(-1) == torch.tensor(ref_tokens)).sum()),
                             load_1min=load)
            del engines
    rows.save()
    shown = [{k: f"{v:.2e}" if "diff" in k else v for k, v in r.items()} for r in rows.rows]
    print(table(shown, ["arch", "engine", "threads", "prefill_tok_s", "decode_tok_s", "median_abs_diff_vs_fp32",
                        "max_abs_diff_vs_fp32", "argmax_agree", "load_1min"]))


if __name__ == "__main__":
    main()
