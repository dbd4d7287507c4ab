"""mamba_ssm.distributed.distributed_utils on 2 gloo CPU processes: the raw collectives' values, the autograd
functions' forward and backward (against the sums written out by hand), the shared / sequence-parallel parameter
helpers; get_dim_for_local_rank without processes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mambakit.compat.mamba_ssm.distributed import distributed_utils as du
from mambakit.distributed._testing import run_on_ranks
from mambakit.errors import MambaKitError


def _rows(rank: int) -> torch.Tensor:
    return torch.arange(6, dtype=torch.float64).view(2, 3) + 10 * rank


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    group = dist.group.WORLD
    x = _rows(rank)
    everyone = torch.cat([_rows(r) for r in range(world)])
    total = sum(_rows(r) for r in range(world))
    out = {}
    g, h = du.all_gather_raw(x, group, async_op=True)
    h.wait()
    out["gather"] = torch.equal(g, everyone)
    big = torch.cat([x, 2 * x])  # (world * 2, 3) on each rank
    want = sum(torch.cat([_rows(r), 2 * _rows(r)]) for r in range(world)).chunk(world)[rank]
    out["reduce_scatter"] = torch.equal(du.reduce_scatter_raw(big, group)[0], want)
    out["all_reduce"] = torch.equal(du.all_reduce_raw(x.clone(), group)[0], total)
    # autograd: d/dx of <w_r, all_gather(x)> summed over ranks is sum_r w_r's rows of this rank
    w = [torch.full((2 * world, 3), float(r + 1), dtype=torch.float64) * torch.arange(1, 2 * world + 1)[:, None]
         for r in range(world)]
    xr = x.clone().requires_grad_()
    (du.all_gather(xr, group) * w[rank]).sum().backward()
    out["gather_grad"] = torch.equal(xr.grad, sum(wr for wr in w).chunk(world)[rank])
    br = big.clone().requires_grad_()
    v = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
    (du.reduce_scatter(br, group) * v).sum().backward()
    out["reduce_scatter_grad"] = torch.equal(br.grad, torch.cat([torch.full((2, 3), float(r + 1), dtype=torch.float64)
                                                                for r in range(world)]))
    ar = x.clone().requires_grad_()
    (du.all_reduce(ar, group) * 3).sum().backward()
    out["all_reduce_grad"] = torch.equal(ar.grad, torch.full_like(x, 3.0)) and torch.equal(ar.detach(), x)
    model = nn.Linear(3, 2, dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(rank + 1.0)
        model.bias.fill_(rank + 5.0)
    model.weight._shared_params = True
    du.sync_shared_params(model, group)
    out["shared"] = bool((model.weight == 1.0).all()) and bool((model.bias == rank + 5.0).all())
    model.weight._sequence_parallel = True
    model(x[:, :3]).sum().backward()
    local = model.weight.grad.clone()
    du.allreduce_sequence_parallel_grad(model, group)
    out["seq_grad"] = torch.allclose(model.weight.grad, du.all_reduce_raw(local, group)[0], rtol=0, atol=0)
    try:
        du.reduce_scatter_raw(torch.zeros(3, 2), group)
        out["odd_rows_refused"] = False
    except MambaKitError as e:
        out["odd_rows_refused"] = "divisible by the world size 2" in str(e)
    return out


def test_collectives_on_two_ranks():
    for rank, result in enumerate(run_on_ranks(_worker, 2)):
        assert all(result.values()), (rank, {k: v for k, v in result.items() if not v})


@pytest.mark.parametrize("dim,world,multiple_of,want", [(10, 3, 1, [4, 3, 3]), (24, 4, 4, [8, 8, 4, 4]),
                                                        (64, 2, 16, [32, 32]), (5, 4, 2, [2, 2, 0, 0])])
def test_get_dim_for_local_rank(dim, world, multiple_of, want):
    assert [du.get_dim_for_local_rank(dim, world, r, multiple_of) for r in range(world)] == want


def test_needs_initialised_process_group():
    with pytest.raises(MambaKitError, match="torch.distributed must be initialised"):
        du.all_gather_raw(torch.zeros(2), None)
