"""mambakit's own checkpoints: a directory written atomically, read back with clear errors.

Layout of a checkpoint directory::

    config.json          MambaConfig.to_dict() (loadable by MambaConfig.load_json as is)
    model.safetensors    the state dict; with tied embeddings `lm_head.weight` is stored once, as
                         `backbone.embedding.weight`, and re-tied at load
    mambakit.json        {"format": "mambakit", "format_version": 1, "mambakit_version": ..., "dtypes": ...}
    optimizer.pt         optional: optimizer.state_dict() (read with torch.load(weights_only=True))
    trainer_state.json   optional: step, seed, arguments, loss history (for ``mambakit train --resume``)

`save_checkpoint` writes through `atomic.write_folder`: an interrupted save leaves either the old or the new
checkpoint, never a mix, and a new save keeps no file of the old one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.models.config import MambaConfig
from mambakit.models.io.atomic import write_folder
from mambakit.models.io.folder import is_int, is_number, resolve_folder, write_json
from mambakit.models.io.names import (CONFIG_NAME, LM_HEAD_KEY, META_NAME, OPTIMIZER_NAME, SAFETENSORS_NAME,
                                      TRAINER_STATE_NAME)
from mambakit.models.io.state import cpu_state, is_tied, load_model
from mambakit.models.io.weights import WeightFiles, write_safetensors
from mambakit.models.lm import MambaLMHeadModel

FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mambakit")
    except Exception:  # not installed (run from a source tree)
        return "unknown"


def model_state_for_saving(
    model: torch.nn.Module, model_state: Optional[dict[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """The state dict to store: contiguous CPU tensors, the tied lm_head weight left out.

    `model_state` replaces ``model.state_dict()`` when given (e.g. full tensors gathered from sharded ranks).
    """
    tied = bool(getattr(model.config, "tie_embeddings", False)) and is_tied(model)
    state = cpu_state(model, model_state)
    if tied:
        state.pop(LM_HEAD_KEY, None)
    return state


def save_checkpoint(
    model: torch.nn.Module,
    directory: PathLike,
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainer_state: Optional[dict[str, Any]] = None,
    model_state: Optional[dict[str, torch.Tensor]] = None,
    optimizer_state: Optional[dict[str, Any]] = None,
) -> Path:
    """Write `model` (and optionally optimizer and trainer state) to `directory`, atomically.

    `model_state` and `optimizer_state`, when given, are written instead of ``model.state_dict()`` and
    ``optimizer.state_dict()`` (distributed training passes the full tensors gathered from its ranks).
    An existing checkpoint at `directory` is replaced as a whole; on any error it is left as it was. A full disk (or
    another failed write) raises `SaveError`, an OSError naming the step being saved and the step of the checkpoint
    left intact. Returns the checkpoint path.
    """
    def write(tmp: Path) -> None:
        model.config.save_json(tmp / CONFIG_NAME)
        state = model_state_for_saving(model, model_state)
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if t.is_floating_point()})
        write_safetensors(state, tmp / SAFETENSORS_NAME)
        write_json(tmp / META_NAME, {
            "format": "mambakit",
            "format_version": FORMAT_VERSION,
            "mambakit_version": _package_version(),
            "dtypes": dtypes,
            "tied_lm_head": LM_HEAD_KEY not in state and LM_HEAD_KEY in (model_state or model.state_dict()),
        })
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_NAME)
        elif optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        if trainer_state is not None:
            write_json(tmp / TRAINER_STATE_NAME, trainer_state)

    step = (trainer_state or {}).get("step")
    what = f"the checkpoint of step {step}" if step is not None else "the checkpoint"
    return write_folder(Path(directory), write, what=what, describe=_stored_step)


def _stored_step(directory: Path) -> str:
    """' (step N)' for a checkpoint folder whose trainer state records its step, else ''."""
    try:
        step = json.loads((directory / TRAINER_STATE_NAME).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (step {step})" if isinstance(step, int) else ""


def load_config(directory: PathLike) -> MambaConfig:
    """The `MambaConfig` stored in a checkpoint directory's config.json."""
    path = resolve_folder(directory)
    try:
        return MambaConfig.load_json(path / CONFIG_NAME)
    except (MambaKitError, TypeError) as exc:
        raise CheckpointError(f"invalid {CONFIG_NAME} in checkpoint {str(path)!r}: {exc}") from exc


def load_checkpoint(
    directory: PathLike,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[torch.dtype, str, None] = None,
    allow_non_finite: bool = False,
) -> MambaLMHeadModel:
    """Build a `MambaLMHeadModel` from a checkpoint directory and load its weights.

    dtype: a torch dtype, None (torch's default) or "auto" (the stored embedding's dtype). Raises
    `CheckpointError` for a missing directory, a missing or invalid config.json, missing or unreadable weights,
    and weights that do not fit the configuration (every missing / unexpected tensor and shape mismatch in one
    message, found from the file's header before the model is allocated). Tied embeddings are re-tied (lm_head
    shares the embedding tensor). Weights holding NaN or infinite values are refused (CheckpointError naming them)
    unless allow_non_finite is True. The model is returned in eval mode.
    """
    path = resolve_folder(directory)
    config = load_config(path)
    if not (path / SAFETENSORS_NAME).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {SAFETENSORS_NAME}")
    return load_model(config, WeightFiles(path, SAFETENSORS_NAME), repr(str(path)), device=device, dtype=dtype,
                      allow_non_finite=allow_non_finite)


def load_optimizer_state(directory: PathLike,
                         map_location: Union[str, torch.device] = "cpu") -> Optional[dict[str, Any]]:
    """The optimizer state dict saved in a checkpoint, or None when it holds none (read with weights_only=True)."""
    path = resolve_folder(directory, need_config=False) / OPTIMIZER_NAME
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"cannot read optimizer state {str(path)!r}: {exc}") from exc


def load_trainer_state(directory: PathLike) -> Optional[dict[str, Any]]:
    """The trainer state (step, seed, arguments, history) saved in a checkpoint, or None when it holds none."""
    path = resolve_folder(directory, need_config=False) / TRAINER_STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read trainer state {str(path)!r}: {exc}") from exc
    if not isinstance(state, dict) or not is_int(state.get("step")):
        raise CheckpointError(f"trainer state {str(path)!r} must be a JSON object with an integer 'step'")
    problems = _trainer_state_problems(state)
    if problems:
        raise CheckpointError.listing(f"trainer state {str(path)!r}", problems)
    return state


# Types of the trainer state's entries and of its stored arguments (None allowed for arguments: "the default").
_STATE_TYPES = {"train_time_s": ("a number >= 0", lambda v: is_number(v) and v >= 0),
                "tokens_seen": ("an integer >= 0", lambda v: is_int(v) and v >= 0),
                "args": ("a JSON object", lambda v: isinstance(v, dict)),
                "history": ("an object of 'train' and 'val' lists of [step, loss] pairs", lambda v: _is_history(v))}
_ARG_TYPES = {**{k: ("an integer", is_int) for k in (
    "steps", "d_model", "n_layer", "d_state", "seq_len", "batch_size", "grad_accum", "warmup_steps",
    "eval_interval", "eval_batches", "save_interval", "seed", "sample_tokens")},
    **{k: ("a number", is_number) for k in ("lr", "min_lr_ratio", "weight_decay", "grad_clip")},
    **{k: ("a string", lambda v: isinstance(v, str)) for k in ("data", "arch", "device", "sample_prompt")}}


def _is_history(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(v.get(k, []), list) and all(isinstance(p, list) and len(p) == 2 and is_int(p[0]) and
                                               is_number(p[1]) for p in v.get(k, [])) for k in ("train", "val"))


def _trainer_state_problems(state: dict[str, Any]) -> list[str]:
    problems = [] if state["step"] >= 0 else [f"'step' must be >= 0, got {state['step']}"]
    for key, (what, test) in _STATE_TYPES.items():
        if key in state and not test(state[key]):
            problems.append(f"{key!r} must be {what}, got {state[key]!r}"[:200])
    args = state.get("args")
    for key, (what, test) in (_ARG_TYPES.items() if isinstance(args, dict) else ()):
        if args.get(key) is not None and not test(args[key]):
            problems.append(f"'args.{key}' must be {what} or null, got {args[key]!r}")
    return problems
