"""Native checkpoints: a directory written atomically, read back with clear errors.

Layout of a checkpoint directory::

    config.json          MambaConfig.to_dict() (loadable by MambaConfig.load_json as is)
    model.safetensors    the state dict; with tied embeddings `lm_head.weight` is stored once, as
                         `backbone.embedding.weight`, and re-tied at load
    mambakit.json        {"format": "mambakit", "format_version": 1, "mambakit_version": ..., "dtype": ...}
    optimizer.pt         optional: optimizer.state_dict() (read with torch.load(weights_only=True))
    trainer_state.json   optional: step, seed, arguments, loss history (for ``mambakit train --resume``)

`save_checkpoint` writes every file into a temporary sibling directory, fsyncs, then renames it into place
(an existing checkpoint is renamed away first and deleted last), so an interrupted save leaves either the old
or the new checkpoint, never a mix.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.models.config import MambaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
META_NAME = "mambakit.json"
OPTIMIZER_NAME = "optimizer.pt"
TRAINER_STATE_NAME = "trainer_state.json"
FORMAT_VERSION = 1
TIED_KEY = "lm_head.weight"
EMBEDDING_KEY = "backbone.embedding.weight"


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mambakit")
    except Exception:  # not installed (run from a source tree)
        return "unknown"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (renames) to disk; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_default_modes(directory: Path) -> None:
    """Give the checkpoint the permissions of an ordinary mkdir/open (mkdtemp makes 0700, safetensors 0600)."""
    mask = _current_umask()
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _is_tied(model: torch.nn.Module) -> bool:
    """Whether the model's lm_head weight is the very tensor of its embedding (tied embeddings)."""
    sd = model.state_dict(keep_vars=True)
    head, emb = sd.get(TIED_KEY), sd.get(EMBEDDING_KEY)
    return head is not None and emb is not None and head is emb


def model_state_for_saving(
    model: torch.nn.Module, model_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict to store: contiguous CPU tensors, the tied lm_head weight left out.

    `model_state` replaces ``model.state_dict()`` when given (e.g. full tensors gathered from sharded ranks).
    """
    tied = bool(getattr(model.config, "tie_embeddings", False)) and _is_tied(model)
    state = {}
    source = model.state_dict() if model_state is None else model_state
    for key, tensor in source.items():
        if tied and key == TIED_KEY:
            continue
        state[key] = tensor.detach().to("cpu").contiguous()
    return state


def save_checkpoint(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and optionally optimizer and trainer state) to `directory`, atomically.

    `model_state` and `optimizer_state`, when given, are written instead of ``model.state_dict()`` and
    ``optimizer.state_dict()`` (distributed training passes the full tensors gathered from its ranks).

    All files go to a temporary directory beside `directory` (same filesystem), are fsynced, and the
    temporary directory is then renamed into place. An existing checkpoint at `directory` is replaced:
    renamed away, the new one renamed in, the old one deleted. On any error the temporary directory is
    removed and an existing checkpoint is left as it was. Returns the checkpoint path.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"checkpoint path {str(target)!r} exists and is not a directory")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        model.config.save_json(tmp / CONFIG_NAME)
        state = model_state_for_saving(model, model_state)
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if t.is_floating_point()})
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(
            tmp / META_NAME,
            {
                "format": "mambakit",
                "format_version": FORMAT_VERSION,
                "mambakit_version": _package_version(),
                "dtypes": dtypes,
                "tied_lm_head": TIED_KEY not in state and TIED_KEY in (model_state or model.state_dict()),
            },
        )
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_NAME)
        elif optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        if trainer_state is not None:
            _write_json(tmp / TRAINER_STATE_NAME, trainer_state)
        _apply_default_modes(tmp)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old: Path | None = None
    try:
        if target.exists():
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous checkpoint back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _leftover_backups(target: Path) -> list[Path]:
    """Previous checkpoints left beside `target` by a save interrupted between its two renames."""
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}.old-*"))


def _check_dir(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if not path.exists():
        hint = ""
        backups = _leftover_backups(path)
        if backups:
            hint = f"; an interrupted save left the previous checkpoint at {str(backups[-1])!r} (rename it to restore it)"
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist{hint}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is not a directory")
    return path


def load_config(directory: str | os.PathLike[str]) -> MambaConfig:
    """The `MambaConfig` stored in a checkpoint directory's config.json."""
    path = _check_dir(directory)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {CONFIG_NAME}")
    try:
        return MambaConfig.load_json(config_path)
    except (MambaKitError, TypeError) as exc:
        raise CheckpointError(f"invalid {CONFIG_NAME} in checkpoint {str(path)!r}: {exc}") from exc


def _describe_mismatch(
    stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], optional: set[str]
) -> list[str]:
    """Every problem between stored tensors and those the model expects, one string each."""
    problems = []
    missing = sorted(k for k in expected if k not in stored and k not in optional)
    unexpected = sorted(k for k in stored if k not in expected)
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(k for k in stored if k in expected):
        if tuple(stored[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"{key}: shape {tuple(stored[key].shape)} in the file, {tuple(expected[key].shape)} expected by config.json"
            )
    return problems


def load_checkpoint(
    directory: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Build a `MambaLMHeadModel` from a checkpoint directory and load its weights.

    Raises `CheckpointError` for a missing directory, a missing or invalid config.json, missing or unreadable
    weights, and weights that do not fit the configuration (all missing/unexpected keys and shape mismatches
    are listed in one message). Tied embeddings are re-tied (lm_head shares the embedding tensor).
    The model is returned in eval mode.
    """
    path = _check_dir(directory)
    config = load_config(path)
    from mambakit.models.lm import MambaLMHeadModel  # imported late: models/lm.py imports the layers and ops

    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {WEIGHTS_NAME}")
    try:
        stored = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {WEIGHTS_NAME} in checkpoint {str(path)!r}: {exc}") from exc

    try:
        model = MambaLMHeadModel(config, device=device, dtype=dtype)
    except (MambaKitError, TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"cannot build the model of checkpoint {str(path)!r} from its {CONFIG_NAME}: {exc}") from exc
    expected = model.state_dict()
    tied = config.tie_embeddings and _is_tied(model)
    optional = {TIED_KEY} if tied else set()
    problems = _describe_mismatch(stored, expected, optional)
    if problems:
        raise CheckpointError(
            f"weights in {str(weights_path)!r} do not match its {CONFIG_NAME}: " + "; ".join(problems)
        )
    if tied and TIED_KEY in stored:
        if not torch.equal(stored[TIED_KEY], stored[EMBEDDING_KEY]):
            raise CheckpointError(
                f"{str(weights_path)!r} holds an lm_head.weight that differs from the embedding, "
                "but config.json says tie_embeddings=true"
            )
        del stored[TIED_KEY]
    model.load_state_dict(stored, strict=False)
    if tied and not _is_tied(model):  # load_state_dict copies in place, so the tie survives; check anyway
        raise CheckpointError("internal error: lm_head weight lost its tie to the embedding after loading")
    model.eval()
    return model


def load_optimizer_state(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The optimizer state dict saved in a checkpoint, or None when it holds none (read with weights_only=True)."""
    path = _check_dir(directory) / OPTIMIZER_NAME
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"cannot read optimizer state {str(path)!r}: {exc}") from exc


def load_trainer_state(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The trainer state (step, seed, arguments, history) saved in a checkpoint, or None when it holds none."""
    path = _check_dir(directory) / TRAINER_STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read trainer state {str(path)!r}: {exc}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"trainer state {str(path)!r} must be a JSON object with an integer 'step'")
    return state
