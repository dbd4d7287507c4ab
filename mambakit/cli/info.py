"""``mambakit info FOLDER``: what a checkpoint folder holds and what it can be used for, read from its config and
the weights' headers (nothing is built or loaded)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from mambakit.cli.args import add_threads_argument
from mambakit.cli.loading import MAX_BYTE_VOCAB, find_checkpoint
from mambakit.errors import CheckpointError
from mambakit.models.config import MambaConfig
from mambakit.models.hybrid import HybridConfig
from mambakit.models.io.folder import read_json, resolve_folder
from mambakit.models.io.formats import detect_format
from mambakit.models.io.hybrid import HYBRID_MODEL_TYPES, config_from_hybrid_hf
from mambakit.models.io.mamba_ssm import config_from_mamba_ssm
from mambakit.models.io.names import CONFIG_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME
from mambakit.models.io.native import load_config
from mambakit.models.io.transformers import config_from_hf
from mambakit.models.io.weights import find_weights

FORMAT_NAMES = {"mambakit": "mambakit (native)", "hf": "transformers", "mamba_ssm": "mamba_ssm"}


def _config(folder: Path, fmt: str) -> MambaConfig | HybridConfig:
    if fmt == "mambakit":
        return load_config(folder)
    raw = read_json(folder / CONFIG_NAME)
    where = str(folder / CONFIG_NAME)
    if fmt == "hf" and raw.get("model_type") in HYBRID_MODEL_TYPES:
        return config_from_hybrid_hf(raw, where)
    return config_from_hf(raw, where) if fmt == "hf" else config_from_mamba_ssm(raw, where)


def describe(path: str) -> dict[str, Any]:
    """The facts `info` prints, as a dict (JSON-ready)."""
    folder = resolve_folder(find_checkpoint(path))
    fmt = detect_format(folder)
    config = _config(folder, fmt)
    weights = find_weights(folder)
    headers = weights.headers()
    dtypes = sorted({str(h.dtype).replace("torch.", "") for h in headers.values()})
    n_params = sum(math.prod(h.shape) for h in headers.values())
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    hybrid = isinstance(config, HybridConfig)
    if hybrid:
        kinds = sorted({f"{s['mixer'] or '-'}+{s['mlp'] or '-'}" for s in config.layers})
        shared = [i for i, s in enumerate(config.layers) if "shared" in s]
        uses = (f"; shared blocks ({config.shared.get('num_blocks', 1)}) used at layers {shared}" if shared else "")
        mixers = (f"hybrid (mixer+mlp per layer: {', '.join(kinds)}; attention at layers {config.attn_layer_idx}"
                  f"{uses})")
        ssm, d_intermediate = dict(config.mamba2 or config.mamba), config.mlp.get("d_intermediate", 0)
    else:
        mixers = "attention" if config.attn_layer_idx and len(config.attn_layer_idx) == config.n_layer else \
            config.mixer_layer + (f" + attention at layers {config.attn_layer_idx}" if config.attn_layer_idx else "")
        ssm, d_intermediate = {k: v for k, v in config.ssm_cfg.items() if k != "layer"}, config.d_intermediate
    has_tokenizer = (folder / "tokenizer.json").is_file()
    tokenizer = "tokenizer.json" if has_tokenizer else (
        "bytes (no tokenizer.json)" if config.padded_vocab_size <= MAX_BYTE_VOCAB
        else "missing: the vocabulary needs its model family's tokenizer.json")
    uses = [f"mambakit generate --checkpoint {folder} --prompt ..."]
    if not hybrid:
        uses.append(f"mambakit explain --checkpoint {folder} ...")
    if fmt == "mambakit":
        uses.append("mambakit train --out <its run folder> --resume (continue training)")
    uses.append("python: mambakit.models.io.from_pretrained(folder), then save_pretrained(model, out, format='hf'" +
                (")" if hybrid else " or 'mamba_ssm')"))
    info: dict[str, Any] = {
        "folder": str(folder), "format": FORMAT_NAMES[fmt], "weights": weights.source,
        "mixer": mixers, "d_model": config.d_model, "n_layer": config.n_layer, "vocab_size": config.vocab_size,
        "ssm_cfg": ssm, "d_intermediate": d_intermediate, "tie_embeddings": config.tie_embeddings,
        "stored_tensors": len(headers), "stored_parameters": n_params, "dtypes": dtypes, "bytes_on_disk": size,
        "tokenizer": tokenizer, "can_be_used_for": uses,
    }
    if fmt == "mambakit":
        if (folder / TRAINER_STATE_NAME).is_file():
            try:
                info["trainer_state"] = read_json(folder / TRAINER_STATE_NAME)
            except CheckpointError as exc:
                info["trainer_state"] = f"unreadable: {exc}"
        info["optimizer_state"] = (folder / OPTIMIZER_NAME).is_file()
    return info


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def info_main(ns: argparse.Namespace) -> int:
    info = describe(ns.folder)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key in ("stored_parameters", "bytes_on_disk"):
            value = f"{value:,} ({_human(value)})"
        elif key == "can_be_used_for":
            value = "\n  " + "\n  ".join(value)
        elif key == "trainer_state" and isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, (dict, list)))
        print(f"{key}: {value}")
    return 0


def add_info_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``info``; its handler is :func:`info_main`."""
    p = subparsers.add_parser("info", help="describe a checkpoint folder",
                              description="Print a checkpoint folder's format, configuration, parameter count, "
                              "dtypes, tokenizer and what it can be used for, without loading the model.")
    p.add_argument("folder", help="checkpoint folder (or a training --out folder holding checkpoint/)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    add_threads_argument(p)
    p.set_defaults(func=info_main)
    return p
