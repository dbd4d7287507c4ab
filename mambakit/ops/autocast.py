"""Custom autograd Functions run their own precision (fp32 accumulation) whatever autocast region calls them."""
from __future__ import annotations

import functools

import torch


def autocast_off(fn):
    """Decorate a Function's forward/backward (ctx, *args) to run with autocast disabled on the args' device."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(ctx, *args)

    return wrapper
