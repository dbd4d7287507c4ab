"""Training and evaluation of Mamba-ND (and its ViT baseline) on the offline N-D tasks.

:func:`run_nd_task` is the one entry point: ``run_nd_task("mamba-nd-digits", mixer="mamba2", steps=600)`` builds
the data and the model, trains with AdamW (betas 0.9/0.98, linear warmup, cosine decay to lr/10) on the training
engine (`mambakit.training.run_loop`), evaluates on the fixed test split and returns a dict of results (test accuracy,
parameter count, wall time, the resolved options).
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambakit.errors import MambaKitError
from mambakit.layers.registry import mixer_spec
from mambakit.models.config import MambaConfig
from mambakit.models.memory import check_fits, training_bytes
from mambakit.nd.data import NDTaskData, digits_task, video_task
from mambakit.nd.model import HEADS, MIXER_NAMES, MambaND, NDConfig
from mambakit.nd.orders import ORDER_MODES
from mambakit.nd.vit import ViTND, vit_config_matching
from mambakit.training import LoopConfig, adamw, lr_at, param_groups, resolve_device, run_loop  # noqa: F401 (lr_at)

ND_TASKS = ("mamba-nd-digits", "mamba-nd-video")
#: The model families: "mamba" = Mamba-ND (its mixer chosen by the `mixer` option), "vit" = the ViT baseline.
MODELS = ("mamba", "vit")
#: AdamW of Mamba-ND; parameter names never decayed beyond the vectors and the `_no_weight_decay` ones.
BETAS = (0.9, 0.98)
NO_DECAY_SUFFIXES = ("pos_embed",)

#: Defaults per task; every key can be overridden by a keyword of run_nd_task.
TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "mamba-nd-digits": dict(image_size=16, patch=2, steps=600, batch_size=64, lr=2e-3),
    "mamba-nd-video": dict(frames=8, canvas=16, patch=(2, 4, 4), steps=600, batch_size=64, lr=2e-3),
}
COMMON_DEFAULTS: Dict[str, Any] = dict(
    model="mamba", head="classify", mixer="mamba2", order_mode="alternate", d_model=64, depth=6, d_state=None, seed=0,
    weight_decay=0.05, warmup_steps=None, grad_clip=1.0, augment=True, device="cpu", threads=1, progress=True,
    eval_batch_size=256, vit_heads=4,
)


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MambaKitError(f"{name} must be a positive integer, got {value!r}")
    return value


def _resolve(name: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """Defaults merged with options, checked; MambaKitError names the bad option."""
    if name not in ND_TASKS:
        raise MambaKitError(f"unknown Mamba-ND task {name!r}; choose one of {', '.join(ND_TASKS)}")
    opts = {**COMMON_DEFAULTS, **TASK_DEFAULTS[name]}
    unknown = set(options) - set(opts)
    if unknown:
        raise MambaKitError(f"unknown option(s) for {name}: {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(opts))}")
    opts.update({k: v for k, v in options.items() if v is not None or k in ("d_state", "warmup_steps", "threads")})
    mixer_spec(opts["mixer"], allowed=MIXER_NAMES)
    for key, allowed in (("model", MODELS), ("head", HEADS), ("order_mode", ORDER_MODES)):
        if opts[key] not in allowed:
            raise MambaKitError(f"{key} must be one of {', '.join(allowed)}, got {opts[key]!r}")
    for key in ("steps", "batch_size", "d_model", "depth", "eval_batch_size", "vit_heads"):
        _positive_int(key, opts[key])
    if not isinstance(opts["seed"], int) or isinstance(opts["seed"], bool) or opts["seed"] < 0:
        raise MambaKitError(f"seed must be an integer >= 0, got {opts['seed']!r}")
    for key in ("d_state", "threads"):
        if opts[key] is not None:
            _positive_int(key, opts[key])
    if opts["warmup_steps"] is not None and (not isinstance(opts["warmup_steps"], int) or opts["warmup_steps"] < 0):
        raise MambaKitError(f"warmup_steps must be an integer >= 0, got {opts['warmup_steps']!r}")
    for key in ("lr", "weight_decay", "grad_clip"):
        v = opts[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or \
                (key == "lr" and v == 0):
            raise MambaKitError(f"{key} must be a {'positive' if key == 'lr' else 'non-negative'} number, got {v!r}")
    return opts


def build_task(name: str, opts: Dict[str, Any]) -> Tuple[NDTaskData, NDConfig]:
    """The data and the Mamba-ND config for a resolved option dict."""
    mixer_kwargs = {} if opts["d_state"] is None else {"d_state": opts["d_state"]}
    if name == "mamba-nd-digits":
        data = digits_task(image_size=_positive_int("image_size", opts["image_size"]),
                           augment_shift=1 if opts["augment"] else 0)
    else:
        canvas = opts["canvas"]
        canvas = (canvas, canvas) if isinstance(canvas, int) else tuple(canvas)
        data = video_task(frames=_positive_int("frames", opts["frames"]), canvas=canvas)
    config = NDConfig(input_size=data.input_size, patch_size=opts["patch"], in_channels=data.in_channels,
                      num_outputs=data.num_classes, d_model=opts["d_model"], depth=opts["depth"], head=opts["head"],
                      mixer=opts["mixer"], order_mode=opts["order_mode"], mixer_kwargs=mixer_kwargs)
    return data, config


def build_model(config: NDConfig, model: str = "mamba", vit_heads: int = 4) -> Tuple[nn.Module, NDConfig]:
    """A MambaND for the config, or (model='vit') the ViTND of the same depth whose width matches the MambaND's
    parameter count. Returns (module, the config it was built from)."""
    mamba = MambaND(config)
    if model == "mamba":
        return mamba, config
    vit_config, _ = vit_config_matching(config, mamba.num_params(), n_heads=vit_heads)
    return ViTND(vit_config, n_heads=vit_heads), vit_config


def _targets(logits: Tensor, y: Tensor) -> Tensor:
    """The sample labels y (batch,), repeated on every token for a dense head's logits (batch, classes, *grid)."""
    if logits.dim() == 2:
        return y
    return y.view(-1, *([1] * (logits.dim() - 2))).expand(y.shape[0], *logits.shape[2:])


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tuple[float, float]:
    """(accuracy, mean cross-entropy) of model on (x, y), in batches on the model's device. For a dense head every
    token predicts its sample's label and both numbers are means over tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, loss, count = 0, 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb).float()
        target = _targets(logits, yb)
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    return correct / count, loss / count


def run_nd_task(name: str, **options: Any) -> Dict[str, Any]:
    """Train and evaluate one model on a Mamba-ND task; returns a dict of results.

    name: ``mamba-nd-digits`` (2-D, sklearn digits upsampled to image_size x image_size, 10 classes) or
    ``mamba-nd-video`` (3-D, moving digits, frames x canvas x canvas, 40 classes = digit x direction).
    Options (defaults in COMMON_DEFAULTS and TASK_DEFAULTS): model 'mamba' | 'vit' (ViT of equal parameter count,
    same depth and patching), head 'classify' (one prediction per sample) | 'dense' (every token predicts its
    sample's label: each position needs context from the whole grid, which a single scan order cannot give the
    tokens at its start; accuracy is then per token), mixer 'mamba1' | 'mamba2', order_mode 'alternate' | 'fixed' |
    'bidirectional' |
    'multi', steps, batch_size, lr, weight_decay, warmup_steps, grad_clip, d_model, depth, d_state (mixer state
    size; None = the mixer's default), patch, image_size / frames / canvas, augment (random shifts for digits),
    seed, device ('cpu', 'cuda', 'auto'), threads (torch CPU threads during the run, restored afterwards; default 1:
    these models are small, and on a CPU shared with other processes more threads ran much slower than one; None =
    leave torch's setting), progress (tqdm bar on stderr).

    Returns: task, model, mixer, order_mode, seed, steps, batch_size, params, d_model (of the model built),
    test_accuracy, test_loss, final_train_loss (mean of the last 50 steps), wall_time_s (training + evaluation),
    train_time_s, scan_orders (per layer, Mamba-ND only), config (NDConfig as a dict), device, options (all resolved
    options, defaults included).
    Bad options raise MambaKitError.
    """
    opts = _resolve(name, options)
    device = resolve_device(opts["device"])
    previous_threads = torch.get_num_threads()
    if opts["threads"] is not None:
        torch.set_num_threads(opts["threads"])
    try:
        return _train_and_evaluate(name, opts, device)
    finally:
        torch.set_num_threads(previous_threads)


def _check_memory(name: str, opts: Dict[str, Any], device: torch.device) -> None:
    """Refuse, before the data or the model is built, sizes this device cannot hold (`mambakit.models.memory`; the
    model as a Mamba LM of the same width and depth, one token per patch, and the upsampled digit images)."""
    if name == "mamba-nd-digits":
        grid = (opts["image_size"],) * 2 if isinstance(opts["image_size"], int) else None
        data_bytes = 1797 * 4 * math.prod(grid) if grid else 0  # the 1797 sklearn digits, float32
    else:
        canvas = opts["canvas"]
        canvas = (canvas,) * 2 if isinstance(canvas, int) else tuple(canvas)
        grid, data_bytes = (opts["frames"], *canvas), 0
    patch = opts["patch"] if isinstance(opts["patch"], tuple) else (opts["patch"],) * len(grid or ())
    if not grid or len(patch) != len(grid) or not all(isinstance(v, int) and v > 0 for v in (*grid, *patch)):
        return  # NDConfig and the data builders name the bad option
    tokens = math.prod(-(-g // p) for g, p in zip(grid, patch))
    proxy = MambaConfig(d_model=opts["d_model"], n_layer=opts["depth"], vocab_size=1)
    need = training_bytes(proxy, opts["batch_size"], tokens) + data_bytes
    check_fits(need, device, f"{name} with d_model {opts['d_model']}, depth {opts['depth']} on batches of "
               f"{opts['batch_size']} x {tokens} patches", hint="lower --d-model, --depth, --batch-size or the "
               "input size")


def _train_and_evaluate(name: str, opts: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    _check_memory(name, opts, device)
    data, config = build_task(name, opts)
    torch.manual_seed(opts["seed"])
    model, built_config = build_model(config, opts["model"], opts["vit_heads"])
    model.to(device).train()
    steps, batch_size = opts["steps"], opts["batch_size"]
    warmup = opts["warmup_steps"] if opts["warmup_steps"] is not None else min(100, steps // 10)
    optimizer = adamw(param_groups(model, opts["weight_decay"], NO_DECAY_SUFFIXES), lr=opts["lr"], betas=BETAS)
    g = torch.Generator().manual_seed(opts["seed"] + 12345)

    def loss_fn(batch: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        logits = model(x).float()
        return F.cross_entropy(logits, _targets(logits, y))

    label = f"{name} {opts['model'] if opts['model'] == 'vit' else opts['mixer'] + '/' + opts['order_mode']}"
    loop = LoopConfig(steps=steps, lr=opts["lr"], warmup_steps=warmup, min_lr_ratio=0.1, grad_clip=opts["grad_clip"],
                      check_finite=False, progress=opts["progress"], desc=label)
    losses: list[float] = []
    t0 = time.perf_counter()
    run_loop(loop, optimizer, micro_batches=lambda step: [data.sample_train(batch_size, g)], loss_fn=loss_fn,
             clip_params=model.parameters, after_step=lambda r: losses.append(r.loss),
             postfix=lambda r: {"loss": f"{sum(losses[-20:]) / len(losses[-20:]):.3f}"})
    train_time = time.perf_counter() - t0
    accuracy, test_loss = evaluate(model, data.x_test, data.y_test, opts["eval_batch_size"])
    wall = time.perf_counter() - t0
    tail = losses[-50:]
    return {
        "task": name, "model": opts["model"], "head": opts["head"],
        "mixer": opts["mixer"] if opts["model"] == "mamba" else None,
        "order_mode": opts["order_mode"] if opts["model"] == "mamba" else None, "seed": opts["seed"],
        "steps": steps, "batch_size": batch_size, "params": sum(p.numel() for p in model.parameters()),
        "d_model": built_config.d_model, "depth": built_config.depth,
        "test_accuracy": accuracy, "test_loss": test_loss, "n_test": int(data.y_test.numel()),
        "chance_accuracy": 1.0 / data.num_classes,
        "final_train_loss": sum(tail) / len(tail), "train_time_s": train_time, "wall_time_s": wall,
        "scan_orders": [[str(o) for o in b.routes] for b in model.blocks] if isinstance(model, MambaND) else None,
        "config": built_config.to_dict(), "device": str(device),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
    }
