"""Bytes autograd saves for the backward in one LM training step (forward + fp32 cross-entropy + backward), per layer
and grouped by the code that saves them.

    python benchmarks/saved_activations.py --arch mamba2 --batch 1 --seqlen 512          # CPU, composition
    python benchmarks/saved_activations.py --arch mamba2 --inner fused --seqlen 256     # CPU, the fused Triton op
                                                                                          # on the interpreter
    python benchmarks/saved_activations.py --device cuda                                 # 130M shape, 8 x 2048
    python benchmarks/saved_activations.py --tiny                                        # smoke test
    python benchmarks/saved_activations.py --device cuda --loss fused                    # the fused loss only

Every tensor handed to autograd's saved-tensor machinery (`torch.autograd.graph.saved_tensors_hooks`: the
derivative formulas of the built-in ops and `ctx.save_for_backward` of custom functions) is recorded once per
storage (views and re-saves of one buffer count once, for the first saver), with the block it was saved in (a
forward hook on each block, the LM head; "backbone" for the embedding and the final norm, "loss" outside the model)
and the innermost frame of mambakit (or of this script) that saved it, with the torch.nn function under it where
there is one. Parameters are listed but not counted; the cast copies of weights (a tensor shaped like a parameter:
autocast's bf16 copies, A = -exp(A_log)) are counted apart as "weights" (they do not grow with the tokens).

`--scale-batch` / `--scale-seqlen` (default 8 x 2048) rescale the activations per token to that shape (they grow
linearly with the tokens when seqlen is a multiple of the SSD chunk). Besides the saved bytes the loss holds the
logits the caller keeps (bf16 under autocast: tokens * vocab * 2) and, while its forward runs, their fp32 copy
(tokens * vocab * 4, freed after log_softmax, whose fp32 output is what it saves); its backward makes two more
fp32 tensors of that size. On CUDA the step's peak allocated memory is printed too.

`--loss` (default both): "plain" is that loss from the logits; "fused" the loss without logits
(`forward(labels=..., return_logits=False)`, `mambakit.ops.loss`), which saves the gradients of the hidden states
(tokens * d_model in their dtype) and of the head's weight (float32, listed as "weights") instead, and keeps no
logits.

`--inner fused` sends the mixers to their fused Triton inner ops (`mambakit.ops.mamba2_inner`,
`mambakit.ops.mamba_inner`) on a CPU too, through the Triton interpreter (set here; slow: keep the shapes small;
bf16 values may be wrong there, the byte counts are not).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

_ARGS: Optional[argparse.Namespace] = None


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    ap.add_argument("--arch", dest="archs", action="store", type=lambda s: [s], help="one arch (same as --archs X)")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--scale-batch", type=int, default=8)
    ap.add_argument("--scale-seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--inner", default="auto", choices=["auto", "fused"])
    ap.add_argument("--save-states", action="store_true",
                    help="Mamba-2's fused op keeps its SSD chunk states (mambakit.ops.mamba2_inner.fused.SAVE_STATES, "
                         "the code before they were recomputed) instead of recomputing them")
    ap.add_argument("--loss", default="both", choices=["plain", "fused", "both"])
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.d_model, args.n_layer, args.batch, args.seqlen, args.vocab = 32, 2, 1, 48, 256
    return args


def _frame_label(frame) -> str:
    """'mambakit/ops/x.py:func' (+ ' > torch.nn <func>') of the innermost mambakit or benchmark frame."""
    import mambakit

    root = str(Path(mambakit.__file__).resolve().parent.parent)
    here = str(Path(__file__).resolve())
    torch_fn = None
    f = frame
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(root + os.sep + "mambakit") or name == here:
            label = f"{os.path.relpath(name, root)}:{f.f_code.co_name}"
            return label + (f" > torch.nn {torch_fn}" if torch_fn else "")
        if torch_fn is None and f"{os.sep}torch{os.sep}nn{os.sep}" in name:
            torch_fn = f.f_code.co_name
        f = f.f_back
    return "?"


class SavedRecorder:
    """Records the tensors autograd saves (see the module); `where` is the block being run."""

    def __init__(self, model) -> None:
        self.where = "loss"
        self.seen: dict[int, dict[str, Any]] = {}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.param_shapes = {tuple(p.shape) for p in model.parameters()}
        self.param_shapes |= {tuple(p.squeeze().shape) for p in model.parameters()}
        self.param_shapes |= {tuple(p.shape[::-1]) for p in model.parameters() if p.dim() == 2}  # transposed views
        self.handles: list[Any] = []
        self.outer: list[str] = []
        self._hook(model.backbone, "backbone")
        for i, layer in enumerate(model.backbone.layers):
            self._hook(layer, f"layer {i}")
        self._hook(model.lm_head, "lm_head")

    def _hook(self, module, name: str) -> None:
        def pre(_module, _args, name=name):
            self.outer.append(self.where)
            self.where = name

        def post(_module, _args, _out):
            self.where = self.outer.pop()

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.seen or storage.nbytes() == 0:
            return t
        if ptr in self.params:
            kind = "param"
        elif tuple(t.shape) in self.param_shapes:
            kind = "weights"
        else:
            kind = "activation"
        self.seen[ptr] = dict(where=self.where, saver=_frame_label(sys._getframe(1)), kind=kind,
                              bytes=storage.nbytes(), dtype=str(t.dtype).replace("torch.", ""),
                              shape=tuple(t.shape), keep=storage)  # kept: its address stays unique
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _force_fused(arch: str) -> dict:
    """ssm_cfg extras and layer patches that send the mixer to its fused Triton op off CUDA (interpreter)."""
    if arch == "mamba1":
        return {"scan_backend": "triton"}
    from mambakit.layers.mamba2 import Mamba2

    Mamba2._fused_inner_ok = lambda self, hidden_states, dt_transform: True  # this benchmark only
    return {}


def _check_shapes(model, args) -> None:
    """Weights are told from activations by their shapes: the token counts must not be a parameter's size."""
    sizes = {n for p in model.parameters() for n in p.shape}
    for name, n in (("batch * seqlen", args.batch * args.seqlen), ("seqlen", args.seqlen)):
        if n in sizes:
            raise SystemExit(f"{name} = {n} is also a parameter's size here (weights and activations would be told "
                             f"apart wrongly): pick another --seqlen or --batch")


def measure(arch: str, args: argparse.Namespace, fused: bool):
    import torch
    import torch.nn.functional as F
    from mambakit import MambaConfig, MambaLMHeadModel

    torch.manual_seed(0)
    ssm = {"layer": "Mamba2", "d_state": 128, "headdim": 64} if arch == "mamba2" else {}
    if args.tiny and arch == "mamba2":
        ssm.update(d_state=16, headdim=16)
    if args.inner == "fused":
        ssm.update(_force_fused(arch))
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab, ssm_cfg=ssm)
    model = MambaLMHeadModel(cfg, device=args.device)
    _check_shapes(model, args)
    if args.save_states:
        import mambakit.ops.mamba2_inner.fused as fused

        fused.SAVE_STATES = True
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen + 1), device=args.device)
    rec = SavedRecorder(model)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=not args.fp32):
            if fused:  # the loss inside the model's forward, after the backbone: recorded under "loss"
                out = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
                loss, logits_bytes = out.loss, 0
            else:
                logits = model(ids[:, :-1]).logits
                logits_bytes = int(logits.numel() * logits.element_size())
        if not fused:
            rec.where = "loss"
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    if not torch.isfinite(loss):
        print(f"# note: loss {loss.item()} is not finite (interpreted bf16 kernels?); the byte counts stand")
    rec.close()
    return list(rec.seen.values()), logits_bytes, peak


def summarise(arch: str, loss: str, entries: list[dict], logits_bytes: int, peak: Optional[float], args,
              rows) -> None:
    tokens = args.batch * args.seqlen
    scale = args.scale_batch * args.scale_seqlen / tokens
    groups: dict[tuple, dict[str, Any]] = defaultdict(lambda: dict(bytes=0, tensors=0, shapes=set()))
    for e in entries:
        g = groups[(e["where"], e["kind"], e["saver"], e["dtype"])]
        g["bytes"] += e["bytes"]
        g["tensors"] += 1
        g["shapes"].add(e["shape"])
    common = dict(arch=arch, d_model=args.d_model, batch=args.batch, seqlen=args.seqlen, vocab=args.vocab,
                  inner=args.inner, autocast=not args.fp32, loss=loss)
    print(f"\n## {arch}, {loss} loss: saved for the backward, {args.batch} x {args.seqlen} tokens (per token; scaled "
          f"to {args.scale_batch} x {args.scale_seqlen})")
    print(f"| where | kind | saver | dtype | shapes | bytes/token | MiB at {args.scale_batch}x{args.scale_seqlen} |")
    print("|---|---|---|---|---|---|---|")
    for (where, kind, saver, dtype), g in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[1]["bytes"])):
        if where not in ("layer 1", "lm_head", "loss", "backbone") and args.n_layer > 1:
            continue  # one representative layer in the table (layer 0 has no residual to add); rows have all
        per_tok = g["bytes"] / tokens
        at_scale = g["bytes"] * (scale if kind == "activation" else 1) / 2**20
        shapes = " ".join(str(list(sh)).replace(" ", "") for sh in sorted(g["shapes"]))
        print(f"| {where} | {kind} | {saver} | {dtype} | {shapes} | {per_tok:,.1f} | {at_scale:,.1f} |")
    for (where, kind, saver, dtype), g in groups.items():
        rows.add(**common, where=where, kind=kind, saver=saver, dtype=dtype, tensors=g["tensors"], bytes=g["bytes"],
                 bytes_per_token=g["bytes"] / tokens, shapes=sorted(str(s) for s in g["shapes"])[:4])
    layer_act = defaultdict(int)
    for e in entries:
        if e["kind"] == "activation":
            layer_act[e["where"]] += e["bytes"]
    rep = "layer 1" if args.n_layer > 1 else "layer 0"
    per_layer = layer_act.get(rep, 0)
    total = sum(layer_act.values())
    print(f"\n{arch}, {loss} loss: activations saved per layer ({rep}): {per_layer / tokens:,.1f} bytes/token = "
          f"{per_layer * scale / 2**20:,.1f} MiB at {args.scale_batch}x{args.scale_seqlen}; step total "
          f"{total / 2**20:,.1f} MiB here, loss part {layer_act.get('loss', 0) / tokens:,.1f} bytes/token; logits "
          f"kept by the caller {logits_bytes / tokens:,.1f} bytes/token" + (f"; CUDA peak {peak:.2f} GiB" if peak
                                                                             else ""))
    rows.add(**common, where="summary", per_layer_bytes_per_token=per_layer / tokens,
             per_layer_MiB_scaled=per_layer * scale / 2**20, step_MiB=total / 2**20,
             loss_bytes_per_token=layer_act.get("loss", 0) / tokens, logits_bytes_per_token=logits_bytes / tokens,
             peak_GiB=peak)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse(argv)
    if args.inner == "fused" and args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import Rows

    rows = Rows("saved_activations")
    losses = ["plain", "fused"] if args.loss == "both" else [args.loss]
    for arch in args.archs:
        for loss in losses:
            entries, logits_bytes, peak = measure(arch, args, fused=loss == "fused")
            summarise(arch, loss, entries, logits_bytes, peak, args, rows)
    rows.save()


if __name__ == "__main__":
    main()
