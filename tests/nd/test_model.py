"""Mamba-ND model: patch embedding, the ND block around an unchanged mixer, heads, the ViT baseline, data, training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mambakit.errors import MambaKitError
from mambakit.layers.mamba import Mamba
from mambakit.nd.data import DIRECTIONS, render_moving_digits, split_indices, video_task
from mambakit.nd.model import MambaND, NDBlock, NDConfig, PatchEmbed
from mambakit.nd.orders import ORDER_MODES, ScanOrder, default_orders, layer_routes, scan_permutation
from mambakit.nd.train import run_nd_task
from mambakit.nd.vit import ViTND, vit_config_matching

SMALL = {"d_state": 8}
CASES = [  # (input_size, patch_size)
    ((12,), (3,)),
    ((6, 10), (2, 2)),  # non-square grid 3 x 5
    ((7, 5), (1, 1)),  # odd sizes
    ((4, 6, 10), (2, 3, 2)),  # 3-D grid 2 x 2 x 5
    ((3, 3, 5), (1, 1, 1)),  # odd 3-D grid
]


def small_config(input_size, patch_size, **kw):
    base = dict(input_size=input_size, patch_size=patch_size, in_channels=2, num_outputs=3, d_model=16, depth=2,
                mixer_kwargs=SMALL)
    base.update(kw)
    return NDConfig(**base)


class PrefixSum(nn.Module):
    """A causal 'mixer': y_t = sum_{s <= t} x_s. Makes the scan order visible in the output."""

    def forward(self, x):
        return x.cumsum(dim=1)


# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_size,patch", CASES, ids=str)
def test_patch_embed_shapes(input_size, patch):
    pe = PatchEmbed(2, 8, patch)
    tokens, grid = pe(torch.randn(3, 2, *input_size))
    assert grid == tuple(s // p for s, p in zip(input_size, patch))
    assert tokens.shape == (3, math.prod(grid), 8)
    if max(patch) > 1:
        with pytest.raises(MambaKitError, match="multiple of patch_size"):
            pe(torch.randn(3, 2, *[s + 1 for s in input_size]))
    with pytest.raises(MambaKitError, match="multiple of patch_size"):
        pe(torch.randn(3, 2, *input_size)[..., :0])
    with pytest.raises(MambaKitError, match="shape"):
        pe(torch.randn(3, 1, *input_size))


@pytest.mark.parametrize("mode", ORDER_MODES)
@pytest.mark.parametrize("input_size,patch", CASES, ids=str)
def test_shapes_every_mode_and_head(input_size, patch, mode):
    x = torch.randn(2, 2, *input_size)
    grid = tuple(s // p for s, p in zip(input_size, patch))
    for head in ("classify", "dense"):
        model = MambaND(small_config(input_size, patch, order_mode=mode, head=head))
        y = model(x)
        assert y.shape == ((2, 3) if head == "classify" else (2, 3, *grid))
        assert torch.isfinite(y).all()
    orders = model.scan_orders()
    assert orders == layer_routes(len(input_size), 2, mode)
    n_mixers = [len(b.mixers) for b in model.blocks]
    assert n_mixers == [2 * len(input_size) if mode == "multi" else 1] * 2


def test_mamba2_mixer_and_3d_dense():
    model = MambaND(small_config((4, 6, 10), (2, 3, 2), mixer="mamba2", head="dense", depth=3,
                                 mixer_kwargs={"d_state": 8, "headdim": 8}))
    y = model(torch.randn(2, 2, 4, 6, 10))
    assert y.shape == (2, 3, 2, 2, 5)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_position_embedding_resized_for_other_sizes():
    model = MambaND(small_config((6, 10), (2, 2)))
    assert model(torch.randn(1, 2, 8, 4)).shape == (1, 3)
    dense = MambaND(small_config((6, 10), (2, 2), head="dense"))
    assert dense(torch.randn(1, 2, 8, 4)).shape == (1, 3, 4, 2)


# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(5,), (3, 4), (4, 1), (2, 3, 5)], ids=str)
def test_identity_mixer_block_is_identity_on_round_trip(grid):
    L = math.prod(grid)
    x = torch.randn(2, L, 6)
    for order in default_orders(len(grid)):
        block = NDBlock(6, [nn.Identity()], [order])
        assert torch.equal(block.mix(x, grid), x)
        assert torch.allclose(block(x, grid), x + block.norm(x))
    orders = default_orders(len(grid))
    shared = NDBlock(6, [nn.Identity()], orders[:2], [0, 0])
    assert torch.allclose(shared.mix(x, grid), 2 * x)
    multi = NDBlock(6, [nn.Identity() for _ in orders], orders, list(range(len(orders))))
    assert torch.allclose(multi.mix(x, grid), len(orders) * x)


def test_prefix_sum_mixer_follows_the_scan_order():
    H, W = 3, 4
    x = torch.randn(1, H * W, 2, dtype=torch.float64)
    xg = x.view(H, W, 2)
    for order in default_orders(2):
        out = NDBlock(2, [PrefixSum()], [order]).mix(x, (H, W)).view(H, W, 2)
        for h in range(H):
            for w in range(W):
                if order.axes == (0, 1):
                    before = (lambda hh, ww: (hh, ww) <= (h, w))
                else:
                    before = (lambda hh, ww: (ww, hh) <= (w, h))
                if order.reverse:
                    keep = [(hh, ww) for hh in range(H) for ww in range(W) if not before(hh, ww) or (hh, ww) == (h, w)]
                else:
                    keep = [(hh, ww) for hh in range(H) for ww in range(W) if before(hh, ww)]
                expected = sum(xg[hh, ww] for hh, ww in keep)
                assert torch.allclose(out[h, w], expected), (order, h, w)


def test_real_mixer_is_used_unchanged_and_is_causal_along_the_order():
    torch.manual_seed(0)
    grid = (3, 4)
    mixer = Mamba(8, d_state=4).double()
    h = torch.randn(1, 12, 8, dtype=torch.float64)
    # raster forward order = natural order: the block's mix is exactly the 1-D layer
    assert torch.allclose(NDBlock(8, [mixer], [ScanOrder((0, 1))]).mix(h, grid), mixer(h))
    assert torch.allclose(NDBlock(8, [mixer], [ScanOrder((0, 1), True)]).mix(h, grid), mixer(h.flip(1)).flip(1))
    # along the column-major order (W H)+, token k depends only on tokens at or before it in that order
    order = ScanOrder((1, 0))
    block = NDBlock(8, [mixer], [order]).double()
    jac = torch.autograd.functional.jacobian(lambda t: block.mix(t, grid), h)  # (1, 12, 8, 1, 12, 8)
    dep = jac.abs().sum(dim=(0, 2, 3, 5)) > 0  # dep[i, j]: output token i depends on input token j
    rank = torch.empty(12, dtype=torch.long)
    rank[scan_permutation(grid, order)] = torch.arange(12)
    allowed = rank[None, :] <= rank[:, None]
    assert not (dep & ~allowed).any()
    assert dep[allowed].float().mean() > 0.9


def test_config_round_trip_and_errors():
    cfg = small_config((6, 10), (2, 2), order_mode="multi", mixer="mamba2")
    assert NDConfig.from_dict(cfg.to_dict()) == cfg
    assert NDConfig(input_size=16, patch_size=4).patch_size == (4,)
    assert NDConfig(input_size=(16, 8), patch_size=4).grid == (4, 2)
    for bad, match in [(dict(head="segment"), "head"), (dict(mixer="s4"), "mixer"), (dict(order_mode="x"), "order"),
                       (dict(patch_size=(4, 4)), "multiple"), (dict(d_model=0), "d_model"),
                       (dict(patch_size=(2, 2, 2)), "entries"), (dict(input_size=(2, 2, 2, 2)), "entries")]:
        kw = dict(input_size=(6, 10), patch_size=(2, 2))
        kw.update(bad)
        with pytest.raises(MambaKitError, match=match):
            NDConfig(**kw)
    with pytest.raises(MambaKitError, match="unknown"):
        NDConfig.from_dict({**cfg.to_dict(), "colour": 1})


# ----------------------------------------------------------------------------------------------------------------------
def test_vit_matches_params_and_attends_everywhere():
    cfg = small_config((6, 10), (2, 2), d_model=32, depth=2)
    target = MambaND(cfg).num_params()
    vcfg, n = vit_config_matching(cfg, target)
    vit = ViTND(vcfg)
    assert vit.num_params() == n and abs(n - target) / target < 0.15
    assert vcfg.depth == cfg.depth and vcfg.patch_size == cfg.patch_size
    assert vit(torch.randn(2, 2, 6, 10)).shape == (2, 3)
    dense = ViTND(NDConfig((6, 10), (2, 2), 2, 3, d_model=16, depth=1, head="dense")).double()
    x = torch.randn(1, 2, 6, 10, dtype=torch.float64, requires_grad=True)
    dense(x)[0, :, 0, 0].sum().backward()  # first token's output depends on the last patch (non-causal)
    assert x.grad[..., -2:, -2:].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
def test_split_is_deterministic_stratified_and_disjoint():
    labels = torch.arange(10).repeat_interleave(20)
    tr, te = split_indices(labels, 0.2, seed=0)
    tr2, te2 = split_indices(labels, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert set(tr.tolist()).isdisjoint(te.tolist()) and len(tr) + len(te) == 200
    assert torch.bincount(labels[te]).tolist() == [4] * 10


def test_moving_digits_move():
    img = torch.zeros(4, 8, 8)
    img[:, 3, 3] = 1.0
    directions = torch.arange(4)
    starts = torch.tensor([[4, 0], [4, 7], [0, 4], [7, 4]])
    v = render_moving_digits(img, directions, starts, frames=8, canvas=(15, 15))
    assert v.shape == (4, 1, 8, 15, 15)
    for k, name in enumerate(DIRECTIONS):
        pos = [divmod(int(v[k, 0, t].flatten().argmax()), 15) for t in range(8)]
        dy, dx = pos[1][0] - pos[0][0], pos[1][1] - pos[0][1]
        assert (dy, dx) == {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}[name]
        assert all((pos[t + 1][0] - pos[t][0], pos[t + 1][1] - pos[t][1]) == (dy, dx) for t in range(7))
    with pytest.raises(MambaKitError, match="canvas"):
        render_moving_digits(img, directions, starts, frames=9, canvas=(15, 15))


def test_video_task_labels():
    data = video_task(frames=4, canvas=(12, 12))
    assert data.x_test.shape[1:] == (1, 4, 12, 12) and data.num_classes == 40
    assert data.y_test.min() >= 0 and data.y_test.max() < 40
    assert torch.bincount(data.y_test % 4).tolist() == [data.y_test.numel() // 4] * 4
    x, y = data.sample_train(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 4, 12, 12) and y.shape == (5,)


# ----------------------------------------------------------------------------------------------------------------------
def test_tiny_training_beats_chance():
    r = run_nd_task("mamba-nd-digits", steps=60, batch_size=32, lr=1e-2, warmup_steps=5, d_model=16, depth=2,
                    d_state=16, image_size=8, patch=2, augment=False, progress=False, seed=0, threads=1)
    assert r["test_accuracy"] > 0.5, r  # chance is 0.1
    assert r["params"] > 0 and r["scan_orders"] == [["(H W)+"], ["(H W)-"]]


def test_dense_training_runs_and_threads_are_restored():
    before = torch.get_num_threads()
    r = run_nd_task("mamba-nd-video", head="dense", steps=2, batch_size=4, d_model=8, depth=1, d_state=4, frames=2,
                    canvas=9, patch=(1, 3, 3), progress=False, model="vit", vit_heads=2, threads=1)
    assert r["head"] == "dense" and 0 <= r["test_accuracy"] <= 1 and r["scan_orders"] is None
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("options,match", [
    (dict(mixer="s6"), "mixer"), (dict(order_mode="zigzag"), "order_mode"), (dict(steps=0), "steps"),
    (dict(model="cnn"), "model"), (dict(head="boxes"), "head"), (dict(lr=-1.0), "lr"),
    (dict(colour="red"), "unknown option"),
    (dict(patch=3), "multiple"), (dict(seed=-1), "seed"),
    (dict(d_state=0), "d_state"), (dict(threads=0), "threads"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(MambaKitError, match=match):
        run_nd_task("mamba-nd-digits", progress=False, **options)
    with pytest.raises(MambaKitError, match="unknown Mamba-ND task"):
        run_nd_task("mamba-nd-audio")

