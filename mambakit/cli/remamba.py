"""The ReMamba options of ``mambakit generate``: --remamba-p, --remamba-rho, --remamba-s, --remamba-adapter."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from mambakit.errors import MambaKitError
from mambakit.remamba.config import ReMambaConfig
from mambakit.remamba.io import load_remamba

_FLAGS = {"p": "--remamba-p", "rho": "--remamba-rho", "s": "--remamba-s"}


def add_remamba_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options on the `generate` parser."""
    g = p.add_argument_group("ReMamba (two-pass prefill; any of these turns it on)")
    default = ReMambaConfig()
    g.add_argument("--remamba-p", type=float, help=f"span length as a fraction of the prompt, in (0, 1] "
                   f"(default with ReMamba on: {default.p})")
    g.add_argument("--remamba-rho", type=float, help=f"fraction of the span kept, in (0, 1] (default: {default.rho})")
    g.add_argument("--remamba-s", type=float, help=f"span start as a fraction of the prompt, in [0, 1) "
                   f"(default: {default.s})")
    g.add_argument("--remamba-adapter", help="the trained ReMamba parameters: a remamba_adapter.pt file or a folder "
                   "holding one (default: the checkpoint folder)")


def remamba_config(ns: argparse.Namespace) -> Optional[ReMambaConfig]:
    """The ReMambaConfig asked for on the command line, or None when no --remamba-* option is given."""
    given = {k: getattr(ns, f"remamba_{k}", None) for k in _FLAGS}
    if all(v is None for v in given.values()) and getattr(ns, "remamba_adapter", None) is None:
        return None
    values = {k: v for k, v in given.items() if v is not None}
    for name, value in values.items():  # check here to name the flag rather than the dataclass field
        try:
            ReMambaConfig(**{name: value})
        except MambaKitError as exc:
            raise MambaKitError(f"{_FLAGS[name]}: {exc}") from None
    return ReMambaConfig(**values)


def load_for_generate(ns: argparse.Namespace, model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """The ReMambaLM of the command line: `model` with the adapter from --remamba-adapter or the checkpoint."""
    return load_remamba(model, ns.remamba_adapter or checkpoint)
