"""Mamba-ND: Mamba for images, video and other multi-dimensional data.

An unchanged 1-D Mamba / Mamba-2 layer is applied to N-D data by permuting the flattened tokens into a scan order
before it and back after it; the order changes from layer to layer (``orders``). ``model`` holds the patch embedding,
the ND block and the heads, ``vit`` the ViT baseline of equal parameter count, ``data`` the offline digit tasks,
``train`` :func:`run_nd_task`; the command line is :mod:`mambakit.cli.nd`.
"""
from mambakit.nd.model import MIXERS, MambaND, NDBlock, NDConfig, NDModel, PatchEmbed, make_mixer
from mambakit.nd.orders import (ORDER_MODES, ScanOrder, axis_orders, default_orders, from_scan_order,
                                inverse_permutation, layer_routes, scan_permutation, to_scan_order)
from mambakit.nd.train import ND_TASKS, run_nd_task
from mambakit.nd.vit import ViTND, vit_config_matching

__all__ = [
    "MIXERS", "MambaND", "NDBlock", "NDConfig", "NDModel", "PatchEmbed", "make_mixer", "ORDER_MODES", "ScanOrder",
    "axis_orders", "default_orders", "from_scan_order", "inverse_permutation", "layer_routes", "scan_permutation",
    "to_scan_order", "ND_TASKS", "run_nd_task", "ViTND", "vit_config_matching",
]
