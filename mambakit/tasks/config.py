"""The options of one synthetic-task run (`TaskConfig`), their per-task defaults, and the task model's config.

`TaskConfig` holds what `run_task` takes; fields left None take the task's value in `TASK_DEFAULTS` (d_state: the
mixer's default in `mambakit.layers.registry`) when `resolve_task_config` fills and checks them. Errors name the
command-line flag (``--seq-len``), as the ``tasks`` command prints them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mambakit.errors import MambaKitError
from mambakit.layers.registry import default_d_state, default_headdim, mixer_spec
from mambakit.models.config import MambaConfig
from mambakit.tasks.generators import STATE_TRACKING, TASKS
from mambakit.tasks.state_tracking import BRACKET_FORMS, MODULUS, ORDERS, SUPERVISIONS

#: The mixers the ``tasks`` command lists (any spelling of `mambakit.layers.registry` is accepted by `run_task`).
MIXERS = ("s4", "mamba", "mamba2", "mamba3", "attention")
#: State size per mixer when d_state is not given (attention has none): S4's usual 64, Mamba-1's 16, Mamba-2's 64.
DEFAULT_D_STATE = {m: default_d_state(m) for m in MIXERS}

#: Per-task defaults of `run_task`, sized so that one default run of each mixer the task compares takes ten minutes or
#: less of CPU time on one thread (measured times: benchmarks/RESULTS.md, "Synthetic tasks"). They are smaller than the
#: papers' settings (selective copying: 16 tokens in 4096, here 4 tokens in 256; MQAR: here 32 pairs in 128 with 256
#: token ids, d_model 32); pass seq_len, n_tokens, ... to change them. The same values serve every mixer of a task.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "selective-copying": {"steps": 2000, "batch": 16, "lr": 4e-3, "d_model": 64, "n_layer": 2, "seq_len": 256,
                          "vocab": 16, "n_tokens": 4, "weight_decay": 0.1, "eval_lengths": ()},
    "copying": {"steps": 1500, "batch": 32, "lr": 2e-3, "d_model": 64, "n_layer": 2, "seq_len": 128,
                "vocab": 16, "n_tokens": 16, "weight_decay": 0.1, "eval_lengths": ()},
    "induction-heads": {"steps": 2000, "batch": 16, "lr": 2e-3, "d_model": 64, "n_layer": 2, "seq_len": 256,
                        "vocab": 16, "weight_decay": 0.0, "eval_lengths": (256, 1024, 4096, 16384, 65536)},
    "mqar": {"steps": 5000, "batch": 32, "lr": 3e-3, "d_model": 32, "n_layer": 2, "seq_len": 128, "vocab": 256,
             "n_pairs": 32, "weight_decay": 0.1, "eval_lengths": ()},
    # state tracking: trained at about 40, evaluated up to 256 (length generalisation); vocab: the answers
    "parity": {"steps": 800, "batch": 64, "lr": 1e-2, "d_model": 32, "n_layer": 1, "seq_len": 40, "vocab": 2,
               "weight_decay": 0.0, "supervision": "running", "eval_lengths": (40, 64, 128, 256)},
    # Deletang et al.'s task (* before + -; nested + - brackets); heads of 8 (8 per layer, each with its own step
    # and so its own rotation speeds) and a larger initial step (rotations of 2 pi k / 5 need step * tanh(omega) near
    # 0.4-0.8), the same for every mixer; 1600 steps: Mamba-3's onset comes late (steps 800-1200)
    "modular-arithmetic": {"steps": 1600, "batch": 64, "lr": 1e-2, "d_model": 32, "n_layer": 2, "seq_len": 41,
                           "vocab": MODULUS, "weight_decay": 0.0, "supervision": "running", "headdim": 8,
                           "dt_init": (0.1, 1.0), "order": "precedence", "bracket_form": "nested",
                           "eval_lengths": (41, 65, 129, 257)},  # odd: no PAD (unseen in training at 41)
}
#: Values of the fields that TASK_DEFAULTS may leave out (headdim, dt_init: None, the mixer's own).
_FALLBACKS = {"n_tokens": 16, "n_pairs": 8, "weight_decay": 0.1, "supervision": "final", "order": None,
              "bracket_form": None}


@dataclass
class TaskConfig:
    """One run of `run_task`: task `name`, sequence `mixer`, model and training sizes, evaluation, stopping.

    None: the task's default (`TASK_DEFAULTS`), or derived: d_state the mixer's, warmup min(100, steps // 10),
    eval_interval max(1, steps // 10). eval_lengths: extra lengths evaluated after training, each with
    max(min_long_eval_samples, long_eval_tokens // length) sequences (capped at eval_samples). stop_at: stop once the
    held-out accuracy reaches it. max_time: stop after this many seconds of training. threads: torch CPU threads
    during the run (None: leave torch's setting). ssm_kwargs: extra `ssm_cfg` entries of the SSM mixer. dt_init:
    (dt_min, dt_max), the range of the SSM mixers' initial step Δ (None: the mixer's own, 0.001-0.1). order:
    modular-arithmetic's evaluation order, ``"precedence"`` (``*`` first) or ``"left"`` (`ORDERS`).
    bracket_form: how its expressions with brackets are made, ``"nested"`` (Deletang et al.'s) or ``"chain"``.
    """

    name: str
    mixer: str = "mamba"
    steps: Optional[int] = None
    batch: Optional[int] = None
    lr: Optional[float] = None
    d_model: Optional[int] = None
    n_layer: Optional[int] = None
    d_state: Optional[int] = None
    seq_len: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    eval_lengths: Optional[Sequence[int]] = None
    out: Optional[Any] = None  # str | Path: folder for the JSON and the PNG
    vocab: Optional[int] = None
    n_tokens: Optional[int] = None
    n_pairs: Optional[int] = None
    headdim: Optional[int] = None
    num_heads: Optional[int] = None
    attn_mlp: bool = True
    warmup: Optional[int] = None
    weight_decay: Optional[float] = None
    grad_clip: float = 1.0
    eval_interval: Optional[int] = None
    eval_samples: int = 256
    long_eval_tokens: int = 1 << 19
    min_long_eval_samples: int = 4
    eval_chunk: int = 4096
    max_attention_len: int = 16384
    max_full_len: int = 65536
    stop_at: Optional[float] = None
    max_time: Optional[float] = None
    threads: Optional[int] = None
    ssm_kwargs: Optional[dict[str, Any]] = None
    progress: bool = True
    brackets: bool = False
    supervision: Optional[str] = None
    dt_init: Optional[Sequence[float]] = None
    order: Optional[str] = None
    bracket_form: Optional[str] = None


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        flag = "--" + name.replace("_", "-")
        raise MambaKitError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, positive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        flag = "--" + name.replace("_", "-")
        raise MambaKitError(f"{flag} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


def resolve_task_config(cfg: TaskConfig) -> TaskConfig:
    """A copy of `cfg` with the task's defaults filled in (d_state, warmup and eval_interval stay None when not
    given: they depend on the mixer and the steps); raises MambaKitError naming the first bad option."""
    if cfg.name not in TASKS:
        raise MambaKitError(f"task NAME must be one of {list(TASKS)}, got {cfg.name!r}")
    mixer_spec(cfg.mixer, arg="--mixer")
    d = TASK_DEFAULTS[cfg.name]
    filled = {key: d.get(key, _FALLBACKS.get(key)) for key in ("steps", "batch", "lr", "d_model", "n_layer",
                                                               "seq_len", "vocab", "n_tokens", "n_pairs",
                                                               "weight_decay", "eval_lengths", "supervision",
                                                               "headdim", "dt_init", "order",
                                                               "bracket_form")
              if getattr(cfg, key) is None}
    cfg = dataclasses.replace(cfg, **filled)
    cfg.eval_lengths = list(cfg.eval_lengths)
    for key, value in (("steps", cfg.steps), ("batch_size", cfg.batch), ("d_model", cfg.d_model),
                       ("n_layer", cfg.n_layer), ("seq_len", cfg.seq_len), ("vocab", cfg.vocab),
                       ("eval_samples", cfg.eval_samples), ("eval_chunk", cfg.eval_chunk),
                       ("n_tokens", cfg.n_tokens), ("n_pairs", cfg.n_pairs),
                       ("min_long_eval_samples", cfg.min_long_eval_samples),
                       ("long_eval_tokens", cfg.long_eval_tokens), ("max_attention_len", cfg.max_attention_len),
                       ("max_full_len", cfg.max_full_len)):
        _check_int(key, value)
    _check_int("seed", cfg.seed, 0)
    for key, minimum in (("d_state", 1), ("eval_interval", 1), ("warmup", 0), ("threads", 1)):
        if getattr(cfg, key) is not None:
            _check_int(key, getattr(cfg, key), minimum)
    for length in cfg.eval_lengths:
        _check_int("eval_lengths", length, 3)
    _check_float("lr", cfg.lr)
    _check_float("weight_decay", cfg.weight_decay, positive=False)
    _check_float("grad_clip", cfg.grad_clip)
    if cfg.headdim is not None:
        _check_int("headdim", cfg.headdim)
    if cfg.dt_init is not None:
        _check_dt_init(cfg.dt_init)
        cfg.dt_init = tuple(float(v) for v in cfg.dt_init)
    if cfg.max_time is not None:
        _check_float("max_time", cfg.max_time)
    if cfg.stop_at is not None and not (isinstance(cfg.stop_at, (int, float)) and 0 < cfg.stop_at <= 1):
        raise MambaKitError(f"--stop-at must lie in (0, 1], got {cfg.stop_at!r}")
    _check_task_sizes(cfg)
    return cfg


def _check_dt_init(value: Any) -> None:
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value)
    if not ok or value[0] > value[1]:
        raise MambaKitError(f"--dt-init must be two positive numbers MIN <= MAX, got {value!r}")


def _check_task_sizes(cfg: TaskConfig) -> None:
    """The sequence must hold what the task puts in it."""
    if cfg.name in ("selective-copying", "copying") and cfg.seq_len < 2 * cfg.n_tokens:
        raise MambaKitError(f"--seq-len must be >= 2 * n_tokens = {2 * cfg.n_tokens} for {cfg.name}, "
                            f"got {cfg.seq_len}")
    if cfg.name == "mqar" and cfg.seq_len < 3 * cfg.n_pairs:
        raise MambaKitError(f"--seq-len must be >= 3 * n_pairs = {3 * cfg.n_pairs} for mqar, got {cfg.seq_len}")
    if cfg.name == "mqar" and cfg.n_pairs > cfg.vocab // 2 - 1:
        raise MambaKitError(f"--n-pairs must be <= vocab/2 - 1 = {cfg.vocab // 2 - 1} for mqar, got {cfg.n_pairs}")
    if cfg.name in STATE_TRACKING:
        fixed = TASK_DEFAULTS[cfg.name]["vocab"]
        if cfg.vocab != fixed:
            raise MambaKitError(f"--vocab of {cfg.name} is fixed at {fixed} (its answers), got {cfg.vocab}")
        if cfg.supervision not in SUPERVISIONS:
            raise MambaKitError(f"--supervision must be one of {SUPERVISIONS}, got {cfg.supervision!r}")
        if cfg.seq_len < 3:
            raise MambaKitError(f"--seq-len must be >= 3 for {cfg.name}, got {cfg.seq_len}")
    if cfg.name == "modular-arithmetic" and cfg.order not in ORDERS:
        raise MambaKitError(f"--order must be one of {ORDERS}, got {cfg.order!r}")
    if cfg.name == "modular-arithmetic" and cfg.bracket_form not in BRACKET_FORMS:
        raise MambaKitError(f"--bracket-form must be one of {BRACKET_FORMS}, got {cfg.bracket_form!r}")
    for key in ("order", "bracket_form"):
        if getattr(cfg, key) is not None and cfg.name != "modular-arithmetic":
            flag = "--" + key.replace("_", "-")
            raise MambaKitError(f"{flag} applies to modular-arithmetic only, got task {cfg.name!r}")
    if cfg.brackets and cfg.name != "modular-arithmetic":
        raise MambaKitError(f"--brackets applies to modular-arithmetic only, got task {cfg.name!r}")
    if cfg.name == "induction-heads" and cfg.seq_len < 3:
        raise MambaKitError(f"--seq-len must be >= 3 for induction-heads, got {cfg.seq_len}")


def task_label(cfg: TaskConfig) -> str:
    """The task's name in results and file names: modular-arithmetic with brackets is modular-arithmetic-brackets."""
    return cfg.name + ("-brackets" if cfg.brackets else "")


def task_kwargs(cfg: TaskConfig, held_out: bool = False) -> dict[str, Any]:
    """The `make_batch` keywords of a run: the training batches', or the held-out sets' (final targets only)."""
    return {"vocab": None if cfg.name in STATE_TRACKING else cfg.vocab, "n_tokens": cfg.n_tokens,
            "n_pairs": cfg.n_pairs, "brackets": cfg.brackets,
            **({"order": cfg.order, "bracket_form": cfg.bracket_form} if cfg.order else {}),
            "supervision": "final" if held_out or cfg.supervision is None else cfg.supervision}


def mamba2_headdim(d_model: int, expand: int = 2) -> int:
    """Head size used for Mamba-2 when not given: the registry's rule, the first of 64, 32, 16, 8 dividing d_inner
    (as ``mambakit train``)."""
    return default_headdim(expand * d_model)


def build_model_config(mixer: str, vocab_size: int, d_model: int, n_layer: int, d_state: Optional[int] = None,
                       headdim: Optional[int] = None, num_heads: Optional[int] = None,
                       attn_mlp: bool = True) -> MambaConfig:
    """The `MambaConfig` of a task model with mixer s4 | mamba | mamba2 | attention (or another registry spelling)."""
    spec = mixer_spec(mixer, arg="--mixer")
    if not spec.ssm:
        heads = num_heads or max(1, d_model // 16)
        if d_model % heads:
            raise MambaKitError(f"--d-model {d_model} must be divisible by the number of heads {heads}")
        return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                           attn_layer_idx=list(range(n_layer)), attn_cfg={"num_heads": heads},
                           d_intermediate=2 * d_model if attn_mlp else 0)
    ssm_cfg: dict[str, Any] = {"layer": spec.name, "d_state": d_state or spec.d_state}
    if spec.has_heads:
        hd = headdim or mamba2_headdim(d_model)
        if (2 * d_model) % hd:
            raise MambaKitError(f"Mamba-2 head size {hd} must divide d_inner = 2 * d_model = {2 * d_model}")
        ssm_cfg["headdim"] = hd
    return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, ssm_cfg=ssm_cfg)
