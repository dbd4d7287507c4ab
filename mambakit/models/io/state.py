"""Stored tensors against the model a config describes: one check, one mismatch report, one tie rule, for every
format.

`load_model` checks the shapes and dtypes in the file's headers against a model built on the meta device (no
memory, no random init) BEFORE any tensor is allocated, so a small config.json that describes a huge model fails at
once with the mismatch instead of allocating it; only then are the tensors read and assigned.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Union

import torch

from mambakit.errors import CheckpointError, MambaKitError, name_list
from mambakit.models.config import MambaConfig
from mambakit.models.io.names import CONFIG_NAME, EMBEDDING_KEY, LM_HEAD_KEY
from mambakit.models.io.weights import TensorInfo, WeightFiles
from mambakit.models.hybrid import HybridConfig, HybridLM
from mambakit.models.lm import MambaLMHeadModel
from mambakit.models.memory import check_fits

_LAYER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.")


def is_tied(model: torch.nn.Module) -> bool:
    """Whether the model's lm_head weight is the very tensor of its embedding."""
    sd = model.state_dict(keep_vars=True)
    head, emb = sd.get(LM_HEAD_KEY), sd.get(EMBEDDING_KEY)
    return head is not None and emb is not None and head is emb


def check_tie(model: torch.nn.Module) -> bool:
    """Whether lm_head is tied to the embedding (config.tie_embeddings); CheckpointError when the config ties them but
    the values differ."""
    if not model.config.tie_embeddings:
        return False
    head, emb = model.lm_head.weight, model.backbone.embedding.weight
    if head is not emb and not torch.equal(head.detach().cpu(), emb.detach().cpu()):
        raise CheckpointError("config.tie_embeddings is true but lm_head.weight differs from the embedding "
                              "(call model.tie_weights() or set tie_embeddings=False)")
    return True


def cpu_state(model: torch.nn.Module, state: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """`state` (default: model.state_dict()) as detached contiguous CPU tensors, ready to be written."""
    source = model.state_dict() if state is None else state
    return {k: t.detach().to("cpu").contiguous() for k, t in source.items()}


def _layer_count_problem(stored: Mapping[str, TensorInfo], n_layer: int, file_name: Callable[[str], str]) -> list[str]:
    """The config's n_layer against the layers the file holds, checked before a model of n_layer blocks is built."""
    held = {int(m.group(1)) for k in stored if (m := _LAYER_KEY.match(k))}
    count = max(held) + 1 if held else 0
    if n_layer <= count:
        return []
    first = file_name(f"backbone.layers.{count}.").rstrip(".")
    last = file_name(f"backbone.layers.{n_layer - 1}.").rstrip(".")
    return [f"{CONFIG_NAME} says n_layer={n_layer} but the file holds tensors of {count} layer(s): {first} to {last} "
            "are missing"]


def mismatches(stored: Mapping[str, TensorInfo], expected: Mapping[str, torch.Tensor], tied: bool,
               file_name: Callable[[str], str]) -> list[str]:
    """Every difference between the stored tensors and those the model expects (keys in mambakit names; messages in
    the file's names): missing, unexpected, mis-shaped, and integer tensors where floats are expected."""
    problems = []
    missing = [file_name(k) for k in expected if k not in stored and not (tied and k == LM_HEAD_KEY)]
    unexpected = [file_name(k) for k in stored if k not in expected]
    if missing:
        problems.append(f"missing tensors {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (not used by this config) {name_list(unexpected)}")
    for k in sorted(k for k in stored if k in expected):
        info, want = stored[k], expected[k]
        if info.shape != tuple(want.shape):
            problems.append(f"{file_name(k)}: shape {info.shape} in the file, {tuple(want.shape)} expected by "
                            f"{CONFIG_NAME}")
        elif (want.is_floating_point() or want.is_complex()) and not (
                info.dtype is not None and (info.dtype.is_floating_point or info.dtype.is_complex)):
            problems.append(f"{file_name(k)}: dtype {info.dtype} in the file, a floating dtype expected")
    return problems


def _materialise(model: MambaLMHeadModel, stored: Mapping[str, torch.Tensor], tied: bool,
                 device: Union[str, torch.device], mapped: bool) -> None:
    """Replace every meta tensor of `model` by its stored value (on `device`, in the model's dtype). mapped: the
    stored tensors are views of the file (safetensors maps it): copy them, so that the model never changes with it."""
    expected = model.state_dict()
    attrs = {name: dict(vars(p)) for name, p in model.named_parameters(remove_duplicate=False)}
    state = {}
    for k, ref in expected.items():
        src = stored[EMBEDDING_KEY] if (tied and k == LM_HEAD_KEY) else stored[k]
        state[k] = src.to(device=device, dtype=ref.dtype, copy=mapped)
    model.load_state_dict(state, strict=True, assign=True)
    for name, p in model.named_parameters(remove_duplicate=False):
        for a, v in attrs.get(name, {}).items():
            if not hasattr(p, a):
                setattr(p, a, v)  # _no_weight_decay, _no_reinit, ... markers survive the assignment
    model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover and torch.device(device).type != "meta":
        raise CheckpointError(f"internal error: tensors left unloaded: {leftover}")


def non_finite(model: torch.nn.Module, file_name: Callable[[str], str] = lambda k: k) -> list[str]:
    """'name (count of numel)' of every floating parameter or buffer of `model` holding a NaN or an infinity (one
    device sync for all tensors)."""
    named = [(k, t) for k, t in model.state_dict().items() if t.is_floating_point() and not t.is_meta and t.numel()]
    if not named:
        return []
    bad = torch.stack([(~torch.isfinite(t)).sum() for _, t in named]).tolist()
    return [f"{file_name(k)} ({n} of {t.numel()})" for (k, t), n in zip(named, bad) if n]


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def resolve_dtype(dtype: object) -> Union[torch.dtype, str, None]:
    """A torch dtype, None, or "auto", from what the loaders accept (a dtype, its name such as "bfloat16", "auto",
    None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise MambaKitError(f"dtype must be a torch floating dtype, one of {sorted(_DTYPES)}, 'auto' or None; "
                        f"got {dtype!r}")


def load_model(config: Union[MambaConfig, HybridConfig], weights: WeightFiles, where: str,
               device: Union[str, torch.device] = "cpu",
               dtype: Union[torch.dtype, str, None] = None,
               rename: Optional[Callable[[list[str]], dict[str, str]]] = None,
               to_file: Callable[[str], str] = lambda k: k,
               allow_non_finite: bool = False) -> Union[MambaLMHeadModel, HybridLM]:
    """A `MambaLMHeadModel` (a `HybridLM` for a HybridConfig) of `config` holding the tensors of `weights`, in eval
    mode.

    rename(file keys) maps the file's keys to mambakit's (default: the same names); to_file(key) names a mambakit
    key as the format would (for tensors the file lacks). dtype: a torch dtype, None (torch's default) or "auto"
    (the stored embedding's dtype). `where` names the checkpoint in messages. Raises CheckpointError naming every
    mismatch, found from the headers before any tensor is read (safetensors) or allocated, and naming the tensors
    that hold NaN or infinite values unless allow_non_finite is True.
    """
    where = f"{where} ({weights.source})"
    headers = weights.headers()
    names = (rename or (lambda keys: {k: k for k in keys}))(list(headers))
    stored_info = {names[k]: v for k, v in headers.items()}
    back = {ours: k for k, ours in names.items()}
    file_name = lambda k: back.get(k, to_file(k))  # noqa: E731
    fail = f"weights of {where} do not match its {CONFIG_NAME}"
    problems = _layer_count_problem(stored_info, config.n_layer, file_name)
    if problems:
        raise CheckpointError.listing(fail, problems)
    dtype = resolve_dtype(dtype)
    if isinstance(dtype, str) and dtype == "auto":
        emb = stored_info.get(EMBEDDING_KEY)
        dtype = emb.dtype if emb is not None and emb.dtype is not None and emb.dtype.is_floating_point else None
    try:
        with torch.device("meta"):  # also catches a layer that creates a tensor without its device argument
            model_cls = HybridLM if isinstance(config, HybridConfig) else MambaLMHeadModel
            model = model_cls(config, device="meta", dtype=dtype)
    except Exception as exc:  # MambaKitError, TypeError for an unknown kwarg, ImportError, ...
        raise CheckpointError(f"{where}: cannot build the model its {CONFIG_NAME} describes: {exc}") from exc
    tied = bool(config.tie_embeddings)
    problems = mismatches(stored_info, model.state_dict(), tied, file_name)
    if problems:
        raise CheckpointError.listing(fail, problems)

    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    check_fits(size, device, f"loading {where}", hint="load it on another device or in a smaller dtype")
    stored = {names.get(k, k): t for k, t in weights.tensors().items()}
    if tied and LM_HEAD_KEY in stored and not torch.equal(stored[LM_HEAD_KEY], stored[EMBEDDING_KEY]):
        raise CheckpointError.listing(fail, [
            f"{LM_HEAD_KEY} differs from the embedding {file_name(EMBEDDING_KEY)}, but the config ties them "
            "(tie_word_embeddings / tie_embeddings is true)"])
    _materialise(model, stored, tied, device, mapped=weights.safetensors)
    if not allow_non_finite:
        bad = non_finite(model, file_name)
        if bad:
            raise CheckpointError(f"weights of {where} hold NaN or infinite values in {name_list(bad)} (values per "
                                  "tensor); pass allow_non_finite=True to load them anyway")
    model.eval()
    return model
