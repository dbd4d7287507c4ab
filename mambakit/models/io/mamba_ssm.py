"""The official `mamba_ssm` format: config.json in its field names (``d_model``, ``n_layer``, ``ssm_cfg``, ...) and
pytorch_model.bin with the official key names (those of mambakit), lm_head.weight stored and the vocabulary padded.

Mamba-3 (``ssm_cfg["layer"] = "Mamba3"``, the official main branch's `mamba_ssm.modules.mamba3.Mamba3`): its A is
the heavy-tail activation and its config has no field for another one, so a mambakit model with
``A_activation="softplus"`` (the 2.3.2.post1 release's A) is refused rather than written as a different model; a
config.json that names ``A_activation`` (mambakit's superset) is read as written.

Mamba-3 MIMO: the official training kernels (TileLang ``mamba3_mimo_fwd/bwd``) and the official module's own decode
step rotate state dim i with dim i + d_state/2; mambakit's MIMO rotates the pairs (2i, 2i+1) as its SISO does. The
two are the same model up to a permutation of the d_state axis, so an official MIMO checkpoint is read with that
axis reordered (the B and C rows of in_proj, B_bias, C_bias, B_norm.weight, C_norm.weight) and written back in the
official order (:func:`mimo_from_official`, :func:`mimo_to_official`); docs/pretrained.md names the sources.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mambakit.errors import CheckpointError, MambaKitError
from mambakit.layers.mamba3 import Mamba3
from mambakit.models.config import MambaConfig
from mambakit.models.io.folder import json_float, write_json
from mambakit.models.io.names import BIN_NAME, CONFIG_NAME, RUNTIME_SSM_KEYS
from mambakit.models.io.state import check_tie, cpu_state

# ssm_cfg entries of the official package that only matter for initialisation or for its CUDA kernels.
_IGNORED_SSM_KEYS = ("use_fast_path", "use_mem_eff_path", "conv_init", "process_group", "sequence_parallel")
_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg", "rms_norm",
           "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")
# ... and those the official Mamba3 accepts and ignores (dropout, n_layer) or that only pick a fused kernel.
_IGNORED_MAMBA3_KEYS = ("dropout", "n_layer", "fuse_pregate_headwise_norm")
OFFICIAL_NORM_EPS = 1e-5  # mamba_ssm hard-codes the epsilon of its RMSNorms (no config field)
OFFICIAL_MAMBA3_A = "heavy_tail"  # the official main branch's A activation (no config field)



def _official_order(d_state: int) -> torch.Tensor:
    """(d_state,) long: mambakit's state dim m is the official dim order[m] (official pair (i, i + d_state/2) ->
    mambakit pair (2i, 2i + 1)); d_state even."""
    half = torch.arange(d_state // 2)
    return torch.stack((half, half + d_state // 2), 1).flatten()


def _mimo_indices(mixer: Mamba3, to_official: bool) -> dict[str, tuple[int, torch.Tensor]]:
    """{parameter name in the mixer: (axis, index)}: ``t.index_select(axis, index)`` reorders the d_state axis from
    the official order to mambakit's (or back with to_official)."""
    order = _official_order(mixer.d_state)
    if to_official:
        order = torch.argsort(order)
    rows = torch.arange(mixer.in_proj.weight.shape[0])
    blocks = mixer.mimo_rank * mixer.ngroups  # B then C: (rank, group, d_state) each, after z and x
    start = 2 * mixer.d_inner
    within = (torch.arange(2 * blocks)[:, None] * mixer.d_state + order).flatten()
    rows[start:start + within.numel()] = start + within
    return {"in_proj.weight": (0, rows), "B_bias": (2, order), "C_bias": (2, order), "B_norm.weight": (0, order),
            "C_norm.weight": (0, order)}


def _mimo_mixers(model: torch.nn.Module) -> list[tuple[str, Mamba3]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Mamba3) and m.is_mimo]


def mimo_from_official(model: torch.nn.Module) -> None:
    """Reorder, in place, the d_state axis of every Mamba-3 MIMO mixer of `model` loaded from official tensors."""
    with torch.no_grad():
        for _, mixer in _mimo_mixers(model):
            for name, (axis, index) in _mimo_indices(mixer, to_official=False).items():
                param = mixer.get_parameter(name)
                param.copy_(param.index_select(axis, index.to(param.device)))


def mimo_to_official(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (model's state dict, CPU) with the Mamba-3 MIMO mixers' d_state axis in the official order."""
    state = dict(state)
    for prefix, mixer in _mimo_mixers(model):
        for name, (axis, index) in _mimo_indices(mixer, to_official=True).items():
            key = f"{prefix}.{name}"
            state[key] = state[key].index_select(axis, index).contiguous()
    return state


def config_from_mamba_ssm(raw: dict[str, Any], where: str = CONFIG_NAME) -> MambaConfig:
    """MambaConfig from a config.json in mamba_ssm field names (mambakit's own config is a superset)."""
    problems: list[str] = []
    data = dict(raw)
    known = set(MambaConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        problems.append(f"unknown fields {unknown} (known: {sorted(known)})")
    ssm = data.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        problems.append(f"ssm_cfg must be an object, got {ssm!r}")
        ssm = {}
    ssm = dict(ssm)
    for key in _IGNORED_SSM_KEYS:
        ssm.pop(key, None)
    if str(ssm.get("layer", "")).lower() == "mamba3":
        for key in _IGNORED_MAMBA3_KEYS:
            ssm.pop(key, None)
        if ssm.get("is_mimo") and isinstance(ssm.get("d_state"), int) and ssm["d_state"] % 2:
            problems.append(f"ssm_cfg d_state={ssm['d_state']!r}: the official Mamba-3 MIMO needs an even d_state")
    if "d_ssm" in ssm and ssm["d_ssm"] is None:
        del ssm["d_ssm"]  # the default (d_inner); a given d_ssm goes to the Mamba2 layer, which checks it
    if isinstance(ssm.get("dt_limit"), list):
        try:
            ssm["dt_limit"] = tuple(json_float(x) for x in ssm["dt_limit"])
        except ValueError as exc:
            problems.append(f"ssm_cfg dt_limit {ssm['dt_limit']!r}: {exc}")
    if isinstance(ssm.get("A_init_range"), list):
        ssm["A_init_range"] = tuple(ssm["A_init_range"])
    data["ssm_cfg"] = ssm
    if data.get("rms_norm", True) is not True:
        problems.append("rms_norm=false (LayerNorm blocks) is not supported; mambakit blocks use RMSNorm")
    if problems:
        raise CheckpointError.listing(f"unsupported {where}", problems)
    try:
        return MambaConfig(**{k: v for k, v in data.items() if k in known})
    except (MambaKitError, TypeError) as exc:
        raise CheckpointError(f"unsupported {where}: {exc}") from exc


def config_to_mamba_ssm(model: torch.nn.Module) -> dict[str, Any]:
    """The official mamba_ssm config.json of `model` (its MambaConfig fields; no norm_epsilon field there)."""
    config: MambaConfig = model.config
    problems = []
    if config.mixer_layer not in ("Mamba1", "Mamba2", "Mamba3"):
        problems.append(f"mixer {config.mixer_layer!r}: mamba_ssm has only Mamba1, Mamba2 and Mamba3")
    if config.norm_epsilon != OFFICIAL_NORM_EPS:
        problems.append(f"norm_epsilon={config.norm_epsilon} (mamba_ssm hard-codes {OFFICIAL_NORM_EPS})")
    if not config.rms_norm:
        problems.append("rms_norm=False")
    ssm = {k: v for k, v in config.ssm_cfg.items() if k not in RUNTIME_SSM_KEYS}
    if config.mixer_layer == "Mamba2":
        eps = ssm.pop("norm_eps", OFFICIAL_NORM_EPS)
        if eps != OFFICIAL_NORM_EPS:
            problems.append(f"ssm_cfg norm_eps={eps} (mamba_ssm hard-codes {OFFICIAL_NORM_EPS} in the gated norm)")
        if "dt_limit" in ssm:
            lo, hi = (float(x) for x in ssm["dt_limit"])
            if (lo, hi) == (0.0, float("inf")):
                del ssm["dt_limit"]  # official compares with the tuple (0, inf); a JSON list would miss its fast path
            else:
                ssm["dt_limit"] = [lo, hi]
        if "A_init_range" in ssm:
            ssm["A_init_range"] = list(ssm["A_init_range"])
    if config.mixer_layer == "Mamba3":
        odd = sorted({m.d_state for _, m in _mimo_mixers(model) if m.d_state % 2})
        if odd:
            problems.append(f"ssm_cfg d_state={odd[0]}: the official Mamba-3 MIMO needs an even d_state (save in "
                            "mambakit format)")
        activation = ssm.pop("A_activation", OFFICIAL_MAMBA3_A)
        if activation != OFFICIAL_MAMBA3_A:
            problems.append(f"ssm_cfg A_activation={activation!r}: mamba_ssm's Mamba3 computes A with "
                            f"{OFFICIAL_MAMBA3_A!r} and has no field for another activation (save in mambakit format)")
    if problems:
        raise CheckpointError.listing("cannot save this model in mamba_ssm format", problems)
    out = {k: getattr(config, k) for k in _FIELDS}
    out["ssm_cfg"] = ssm
    return out


def mamba_ssm_writer(model: torch.nn.Module) -> Callable[[Path], None]:
    """What writes `model` in the official layout into a folder (lm_head.weight included, even when tied); every
    reason it cannot is raised here, before any file is written."""
    ssm_config = config_to_mamba_ssm(model)
    check_tie(model)
    state = mimo_to_official(model, cpu_state(model))

    def write(tmp: Path) -> None:
        write_json(tmp / CONFIG_NAME, ssm_config)
        torch.save(state, tmp / BIN_NAME)

    return write
