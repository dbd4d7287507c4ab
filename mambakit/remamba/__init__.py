"""ReMamba (Yuan et al., 2024): selective compression of a long prompt span and selective adaptation of delta in a
second forward pass, on top of a frozen Mamba / Mamba-2 LM.

* :mod:`~mambakit.remamba.config` -- :class:`ReMambaConfig` (p, rho, s) and the span plan;
* :mod:`~mambakit.remamba.adaptation` -- the delta hooks (w * delta + b at the compressed positions);
* :mod:`~mambakit.remamba.model` -- :class:`ReMambaAdapter` (Q, K, V, b) and :class:`ReMambaLM` (both stages);
* :mod:`~mambakit.remamba.generation` -- :func:`remamba_generate`;
* :mod:`~mambakit.remamba.lora` and :mod:`~mambakit.remamba.train` -- training the added parameters;
* :mod:`~mambakit.remamba.io` -- saving and loading the added parameters beside a checkpoint.
"""
from mambakit.remamba.config import ReMambaConfig, SpanPlan
from mambakit.remamba.generation import remamba_generate
from mambakit.remamba.model import Compression, ReMambaAdapter, ReMambaLM

__all__ = ["Compression", "ReMambaAdapter", "ReMambaConfig", "ReMambaLM", "SpanPlan", "remamba_generate"]
