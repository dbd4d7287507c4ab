"""Scan orders: how the tokens of an N-D grid are laid out as the 1-D sequence a Mamba layer reads.

Tokens are stored flattened in the grid's natural row-major order: for a grid (T, H, W) token (t, h, w) sits at index
``(t * H + h) * W + w``. A :class:`ScanOrder` names another row-major flattening: ``axes`` lists the grid axes from the
outermost (slowest) to the innermost (fastest, the one the scan walks along), and ``reverse`` reads that sequence
back to front. ``scan_permutation(grid, order)`` gives the index ``perm`` with ``tokens_in_scan_order =
tokens[:, perm]``; ``inverse_permutation(perm)`` undoes it.

The paper's notation (Li et al., "Mamba-ND", 2024) maps onto ScanOrder as follows, for a 2-D grid (H, W):

    (H W)+ = "H+"  ScanOrder(axes=(0, 1), reverse=False)   raster scan, inner axis W
    (H W)- = "H-"  ScanOrder(axes=(0, 1), reverse=True)
    (W H)+ = "W+"  ScanOrder(axes=(1, 0), reverse=False)   column scan, inner axis H
    (W H)- = "W-"  ScanOrder(axes=(1, 0), reverse=True)

and for a 3-D grid (T, H, W), the six layer orders H+ H- W+ W- T+ T- the paper uses for video are, in our layout,
(the letter names the order as in 2-D; what it means here is the innermost scanned axis, which cycles W -> H -> T):

    H+  (T H W)+  ScanOrder(axes=(0, 1, 2), reverse=False)   inner axis W
    H-  (T H W)-  ScanOrder(axes=(0, 1, 2), reverse=True)
    W+  (T W H)+  ScanOrder(axes=(0, 2, 1), reverse=False)   inner axis H
    W-  (T W H)-  ScanOrder(axes=(0, 2, 1), reverse=True)
    T+  (H W T)+  ScanOrder(axes=(1, 2, 0), reverse=False)   inner axis T
    T-  (H W T)-  ScanOrder(axes=(1, 2, 0), reverse=True)

The general rule of :func:`default_orders` for any number of axes: the innermost axis cycles from the last grid axis to
the first; the other axes keep their natural order (outer to inner); each axis order is scanned forward, then reversed.
(The paper fixes only the innermost axis of the 3-D orders; for T-innermost we keep H outside W.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mambakit.errors import MambaKitError

#: How the layers of a Mamba-ND stack use scan orders (see :func:`layer_routes`).
ORDER_MODES = ("alternate", "fixed", "bidirectional", "multi")

_AXIS_NAMES = {1: "L", 2: "HW", 3: "THW"}


@dataclass(frozen=True)
class ScanOrder:
    """A row-major flattening of a grid: ``axes`` from outermost to innermost (a permutation of 0..ndim-1), read
    backwards when ``reverse``."""

    axes: Tuple[int, ...]
    reverse: bool = False

    def __post_init__(self):
        axes = tuple(self.axes)
        if sorted(axes) != list(range(len(axes))) or not axes:
            raise MambaKitError(f"ScanOrder axes must be a permutation of 0..ndim-1, got {self.axes!r}")
        object.__setattr__(self, "axes", axes)

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def inner_axis(self) -> int:
        """The axis the scan walks along (neighbouring tokens in the sequence are neighbours along it)."""
        return self.axes[-1]

    def reversed(self) -> "ScanOrder":
        return ScanOrder(self.axes, not self.reverse)

    def name(self, axis_names: Optional[str] = None) -> str:
        """Paper-style name, e.g. '(H W)+' for a 2-D raster scan or '(T W H)-'."""
        names = axis_names or _AXIS_NAMES.get(self.ndim)
        letters = [names[a] for a in self.axes] if names and len(names) == self.ndim else [f"A{a}" for a in self.axes]
        return f"({' '.join(letters)}){'-' if self.reverse else '+'}"

    def __str__(self) -> str:
        return self.name()


def _check_grid(grid: Sequence[int]) -> Tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    if not grid or any(g <= 0 for g in grid):
        raise MambaKitError(f"grid must be a non-empty tuple of positive sizes, got {grid!r}")
    return grid


_PERM_CACHE: Dict[Tuple[Tuple[int, ...], ScanOrder, str], Tuple[Tensor, Tensor]] = {}


def _permutations(grid: Tuple[int, ...], order: ScanOrder, device=None) -> Tuple[Tensor, Tensor]:
    """(perm, inverse) for this grid and order on `device`, cached (they are small and reused by every step)."""
    key = (grid, order, str(device or "cpu"))
    hit = _PERM_CACHE.get(key)
    if hit is None:
        if order.ndim != len(grid):
            raise MambaKitError(f"scan order {order} has {order.ndim} axes but the grid {grid} has {len(grid)}")
        n = 1
        for g in grid:
            n *= g
        perm = torch.arange(n).reshape(grid).permute(order.axes).reshape(-1)
        if order.reverse:
            perm = perm.flip(0)
        hit = (perm.to(device), inverse_permutation(perm).to(device))
        if len(_PERM_CACHE) < 1024:
            _PERM_CACHE[key] = hit
    return hit


def scan_permutation(grid: Sequence[int], order: ScanOrder) -> Tensor:
    """Index (prod(grid),) int64 with ``x[:, perm]`` = the tokens x (batch, prod(grid), d), stored in natural row-major
    order, rearranged into the scan order."""
    return _permutations(_check_grid(grid), order)[0].clone()


def inverse_permutation(perm: Tensor) -> Tensor:
    """The index ``inv`` with ``y[:, inv]`` undoing ``y = x[:, perm]``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def to_scan_order(x: Tensor, grid: Sequence[int], order: ScanOrder) -> Tensor:
    """x (batch, prod(grid), d) in natural order -> the same tokens in scan order."""
    perm, _ = _permutations(_check_grid(grid), order, x.device)
    return x.index_select(1, perm)


def from_scan_order(y: Tensor, grid: Sequence[int], order: ScanOrder) -> Tensor:
    """Inverse of :func:`to_scan_order`: y (batch, prod(grid), d) in scan order -> natural order."""
    _, inv = _permutations(_check_grid(grid), order, y.device)
    return y.index_select(1, inv)


def axis_orders(ndim: int) -> List[Tuple[int, ...]]:
    """One axis order per grid axis, innermost axis cycling from the last axis to the first, the others in natural
    order: 2-D [(0, 1), (1, 0)]; 3-D [(0, 1, 2), (0, 2, 1), (1, 2, 0)]."""
    if not isinstance(ndim, int) or ndim < 1:
        raise MambaKitError(f"ndim must be a positive integer, got {ndim!r}")
    out = []
    for inner in reversed(range(ndim)):
        out.append(tuple(a for a in range(ndim) if a != inner) + (inner,))
    return out


def default_orders(ndim: int) -> List[ScanOrder]:
    """The cycle of layer orders of the paper: for each axis order of :func:`axis_orders`, forward then reversed.
    1-D: +, -. 2-D: (H W)+ (H W)- (W H)+ (W H)-. 3-D: (T H W)± (T W H)± (H W T)± (= H± W± T± of the paper)."""
    return [ScanOrder(axes, rev) for axes in axis_orders(ndim) for rev in (False, True)]


def layer_routes(ndim: int, depth: int, mode: str = "alternate") -> List[List[ScanOrder]]:
    """For each of ``depth`` layers, the scan orders its mixer(s) read; the outputs of all routes of a layer are
    summed. Modes:

    - ``alternate`` (Mamba-ND): layer i scans in ``default_orders(ndim)[i % (2 * ndim)]`` with one mixer.
    - ``fixed`` (ablation, no alternation): every layer scans in the raster order ``(H W)+`` (axes natural, forward).
    - ``bidirectional`` (Bi-SSM style, inside one layer): layer i uses axis order ``axis_orders(ndim)[i % ndim]``,
      scanned forward and reversed by the SAME mixer (shared weights), the two outputs summed.
    - ``multi`` (ND-SSM style, one mixer per direction): every layer scans all 2 * ndim orders of
      ``default_orders(ndim)``, each with its own mixer, the outputs summed.

    ``bidirectional`` returns two routes per layer that share the mixer; ``multi`` returns 2 * ndim routes with one
    mixer each; see :func:`mixers_per_layer`.
    """
    if mode not in ORDER_MODES:
        raise MambaKitError(f"order mode must be one of {', '.join(ORDER_MODES)}, got {mode!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise MambaKitError(f"depth must be a positive integer, got {depth!r}")
    cycle = default_orders(ndim)
    if mode == "alternate":
        return [[cycle[i % len(cycle)]] for i in range(depth)]
    if mode == "fixed":
        return [[cycle[0]] for _ in range(depth)]
    if mode == "bidirectional":
        axes = axis_orders(ndim)
        return [[ScanOrder(axes[i % ndim], False), ScanOrder(axes[i % ndim], True)] for i in range(depth)]
    return [list(cycle) for _ in range(depth)]


def mixers_per_layer(mode: str, n_routes: int) -> int:
    """How many independent mixers a layer with ``n_routes`` routes owns in this mode (1 unless ``multi``)."""
    return n_routes if mode == "multi" else 1
