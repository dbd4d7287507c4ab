"""Scan orders of Mamba-ND: permutations, their inverses, the paper's default cycle and the order modes."""
from __future__ import annotations

import itertools

import pytest
import torch

from mambakit.errors import MambaKitError
from mambakit.nd.orders import (ORDER_MODES, ScanOrder, axis_orders, default_orders, from_scan_order,
                                inverse_permutation, layer_routes, mixers_per_layer, scan_permutation, to_scan_order)

GRIDS = [(1,), (7,), (4, 4), (3, 5), (5, 2), (1, 6), (7, 1), (3, 3, 3), (2, 3, 4), (3, 1, 5), (5, 4, 3), (1, 1, 1)]


def all_orders(ndim):
    return [ScanOrder(p, r) for p in itertools.permutations(range(ndim)) for r in (False, True)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_every_order_is_a_permutation_and_round_trips(grid):
    n = 1
    for g in grid:
        n *= g
    x = torch.randn(2, n, 3)
    for order in all_orders(len(grid)):
        perm = scan_permutation(grid, order)
        assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(n))
        inv = inverse_permutation(perm)
        assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
        y = to_scan_order(x, grid, order)
        assert torch.equal(y, x[:, perm])
        assert torch.equal(from_scan_order(y, grid, order), x)
        assert torch.equal(to_scan_order(from_scan_order(x, grid, order), grid, order), x)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_scan_walks_the_inner_axis_in_row_major_order_of_axes(grid):
    """The k-th token of the scan has grid coordinates = the k-th multi-index of the permuted grid, row-major."""
    coords = list(itertools.product(*[range(g) for g in grid]))  # natural row-major order
    for order in all_orders(len(grid)):
        perm = scan_permutation(grid, order).tolist()
        permuted_shape = [grid[a] for a in order.axes]
        expected = []
        for idx in itertools.product(*[range(s) for s in permuted_shape]):
            c = [0] * len(grid)
            for a, i in zip(order.axes, idx):
                c[a] = i
            expected.append(tuple(c))
        if order.reverse:
            expected = expected[::-1]
        assert [coords[p] for p in perm] == expected


def test_2d_orders_explicitly():
    H, W = 3, 4
    raster = torch.arange(H * W)
    column = torch.tensor([h * W + w for w in range(W) for h in range(H)])
    assert torch.equal(scan_permutation((H, W), ScanOrder((0, 1))), raster)
    assert torch.equal(scan_permutation((H, W), ScanOrder((0, 1), True)), raster.flip(0))
    assert torch.equal(scan_permutation((H, W), ScanOrder((1, 0))), column)
    assert torch.equal(scan_permutation((H, W), ScanOrder((1, 0), True)), column.flip(0))


def test_default_cycles_match_the_paper():
    assert [str(o) for o in default_orders(1)] == ["(L)+", "(L)-"]
    assert [str(o) for o in default_orders(2)] == ["(H W)+", "(H W)-", "(W H)+", "(W H)-"]
    three = default_orders(3)
    assert [str(o) for o in three] == ["(T H W)+", "(T H W)-", "(T W H)+", "(T W H)-", "(H W T)+", "(H W T)-"]
    # the innermost scanned axis cycles W -> H -> T, each forward then reversed (H+ H- W+ W- T+ T-)
    assert [o.inner_axis for o in three] == [2, 2, 1, 1, 0, 0]
    assert [o.reverse for o in three] == [False, True] * 3
    assert axis_orders(4)[-1] == (1, 2, 3, 0)
    assert ScanOrder((1, 0), True).reversed() == ScanOrder((1, 0), False)
    assert ScanOrder((2, 0, 1)).name("THW") == "(W T H)+"


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("mode", ORDER_MODES)
def test_layer_routes(ndim, mode):
    depth = 7
    routes = layer_routes(ndim, depth, mode)
    assert len(routes) == depth
    cycle = default_orders(ndim)
    if mode == "alternate":
        assert [r[0] for r in routes] == [cycle[i % len(cycle)] for i in range(depth)]
        assert all(len(r) == 1 for r in routes)
        assert mixers_per_layer(mode, 1) == 1
    elif mode == "fixed":
        assert all(r == [ScanOrder(tuple(range(ndim)))] for r in routes)
    elif mode == "bidirectional":
        for i, r in enumerate(routes):
            assert r == [ScanOrder(axis_orders(ndim)[i % ndim]), ScanOrder(axis_orders(ndim)[i % ndim], True)]
        assert mixers_per_layer(mode, 2) == 1
    else:
        assert all(r == cycle for r in routes)
        assert mixers_per_layer(mode, len(cycle)) == 2 * ndim


def test_bad_input_raises():
    with pytest.raises(MambaKitError, match="permutation"):
        ScanOrder((0, 0))
    with pytest.raises(MambaKitError, match="permutation"):
        ScanOrder((1, 2))
    with pytest.raises(MambaKitError, match="axes"):
        scan_permutation((3, 4), ScanOrder((0, 1, 2)))
    with pytest.raises(MambaKitError, match="axes"):
        to_scan_order(torch.zeros(1, 12, 2), (3, 4), ScanOrder((0,)))
    with pytest.raises(MambaKitError, match="grid"):
        scan_permutation((3, 0), ScanOrder((0, 1)))
    with pytest.raises(MambaKitError, match="order mode"):
        layer_routes(2, 4, "spiral")
    with pytest.raises(MambaKitError, match="depth"):
        layer_routes(2, 0)
    with pytest.raises(MambaKitError, match="ndim"):
        default_orders(0)
