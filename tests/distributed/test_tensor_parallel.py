"""Mamba-2 tensor parallelism (gloo, 2 and 4 CPU processes): the sharded block's outputs and gradients equal the
unsharded block's (also with d_ssm < d_inner, a gated MLP part); checkpoints round-trip between sharded and
unsharded models; one all-reduce per block forward.

One spawn per world size runs every check; each rank returns its relative errors and communication counts.
"""
from __future__ import annotations

import copy

import pytest
import torch

from mambakit.distributed._testing import run_on_ranks
from mambakit.distributed.collectives import count_comm
from mambakit.distributed.tensor_parallel import (
    full_state_dict, load_full_state_dict, parallelize_mamba2, save_tensor_parallel_checkpoint, shard_mamba2,
    shard_mamba2_state_dict, unshard_mamba2,
)
from mambakit.errors import MambaKitError
from mambakit.layers.mamba2 import Mamba2
from mambakit.models.checkpoint import load_checkpoint
from mambakit.models.config import MambaConfig
from mambakit.models.lm import MambaLMHeadModel
from tests.conftest import rel_err

F64 = torch.float64
TOL = 1e-10
BATCH, SEQLEN, D_MODEL = 2, 13, 16

# (name, Mamba2 kwargs): 8 heads of headdim 4; ngroups = world or 2 * world (several norm groups per rank)
CASES = [
    ("groups_eq_world", dict(ngroups="w")),
    ("groups_2w_hdimD_bias", dict(ngroups="2w", D_has_hdim=True, bias=True)),
    ("norm_before_gate", dict(ngroups="w", norm_before_gate=True, dt_limit=(0.01, 2.0))),
    ("no_rmsnorm", dict(ngroups="2w", rmsnorm=False)),
    # d_ssm < d_inner: 4 SSM heads (16 channels) and a gated MLP on the other 16 of d_inner = 32
    ("d_ssm_mlp", dict(ngroups="w", d_ssm=16, D_has_hdim=True, bias=True)),
    ("d_ssm_mlp_no_rmsnorm", dict(ngroups="w", d_ssm=16, rmsnorm=False)),
]


def _block(world: int, kw: dict) -> Mamba2:
    kw = dict(kw)
    kw["ngroups"] = {"w": world, "2w": 2 * world}[kw["ngroups"]]
    torch.manual_seed(5)
    block = Mamba2(D_MODEL, d_state=6, headdim=4, chunk_size=8, **kw).to(F64)
    with torch.no_grad():
        for p in block.parameters():  # move the ones-initialised norm weight and D away from 1
            p.add_(0.1 * torch.randn_like(p))
    return block


def _block_case(rank: int, world: int, kw: dict) -> dict:
    block = _block(world, kw)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(BATCH, SEQLEN, D_MODEL, generator=gen, dtype=F64)
    weight = torch.randn(BATCH, SEQLEN, D_MODEL, generator=gen, dtype=F64)

    h_full = hidden.clone().requires_grad_(True)
    out_full = block(h_full)
    (out_full * weight).sum().backward()

    tp = shard_mamba2(copy.deepcopy(block))
    h_tp = hidden.clone().requires_grad_(True)
    with count_comm() as fwd:
        out_tp = tp(h_tp)
    with count_comm() as bwd:
        (out_tp * weight).sum().backward()
    errs = {"y": rel_err(out_tp, out_full), "grad_hidden": rel_err(h_tp.grad, h_full.grad)}
    full_grads = {k: p.grad for k, p in block.named_parameters()}
    local_ref = shard_mamba2_state_dict(full_grads, block, rank, world)
    for k, p in tp.named_parameters():
        errs[f"grad_{k}"] = rel_err(p.grad, local_ref[k])
    # decoding: step() through the sharded block equals the unsharded one
    s_full, s_tp = block.allocate_state(BATCH), tp.allocate_state(BATCH)
    with torch.no_grad():
        for t in range(3):
            errs["step"] = max(errs.get("step", 0.0), rel_err(tp.step(hidden[:, t], s_tp), block.step(hidden[:, t],
                                                                                                       s_full)))
    back = unshard_mamba2(tp)
    errs["unshard_state"] = max(rel_err(back.state_dict()[k], v) for k, v in block.state_dict().items())
    return {"errs": errs, "fwd": fwd.snapshot(), "bwd": bwd.snapshot()}


def _model_case(rank: int, world: int, ckpt_dir: str, extra: dict) -> dict:
    config = MambaConfig(d_model=D_MODEL, n_layer=2, vocab_size=32, ssm_cfg=dict(
        layer="Mamba2", d_state=6, headdim=4, ngroups=4, chunk_size=8, **extra))
    torch.manual_seed(1)
    model = MambaLMHeadModel(config)  # float32: a checkpoint loads in its stored dtypes only for float32 models
    ids = torch.randint(0, 32, (BATCH, SEQLEN), generator=torch.Generator().manual_seed(2))
    ref = model(ids).logits.detach()
    tp_model = parallelize_mamba2(copy.deepcopy(model))
    errs = {"logits": rel_err(tp_model(ids).logits, ref)}
    errs["generate_differs"] = float(not torch.equal(tp_model.generate(ids, 4, temperature=0),
                                                     model.generate(ids, 4, temperature=0)))
    state = full_state_dict(tp_model)
    errs["full_state_dict_exact"] = float(state.keys() != model.state_dict().keys()
                                          or any(not torch.equal(state[k], v) for k, v in model.state_dict().items()))
    # TP -> checkpoint -> unsharded
    save_tensor_parallel_checkpoint(tp_model, ckpt_dir)
    loaded = load_checkpoint(ckpt_dir)
    errs["ckpt_to_unsharded"] = max(rel_err(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # unsharded checkpoint -> TP (a model of fresh weights, loaded)
    fresh = parallelize_mamba2(MambaLMHeadModel(config))
    load_full_state_dict(fresh, loaded.state_dict())
    errs["ckpt_to_tp_logits"] = rel_err(fresh(ids).logits, ref)
    return {"errs": errs}


def _errors(rank: int, world: int) -> dict:
    try:
        shard_mamba2(Mamba2(D_MODEL, d_state=6, headdim=4, ngroups=1))  # 8 heads in one B/C group
    except MambaKitError as exc:
        return {"ngroups": str(exc)}
    return {}


def _worker(rank: int, world: int, ckpt_dir: str) -> dict:
    out = {name: _block_case(rank, world, kw) for name, kw in CASES}
    out["model"] = _model_case(rank, world, ckpt_dir, {})
    out["model_d_ssm"] = _model_case(rank, world, ckpt_dir + "_d_ssm", {"d_ssm": 16})
    out["errors"] = _errors(rank, world)
    return out


@pytest.fixture(scope="module", params=[2, 4])
def results(request, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp(f"tp{request.param}") / "ckpt")
    return request.param, run_on_ranks(_worker, request.param, ckpt)


def test_block_outputs_and_gradients_match_unsharded(results):
    world, per_rank = results
    bad = {(rank, case, k): v for rank, r in enumerate(per_rank) for case, res in r.items() if case in dict(CASES)
           for k, v in res["errs"].items() if not v < TOL}
    assert not bad, f"world={world}: relative errors above {TOL}: {bad}"
    for case in ("groups_2w_hdimD_bias", "d_ssm_mlp"):
        names = set(per_rank[0][case]["errs"])
        assert {"grad_in_proj.weight", "grad_in_proj.bias", "grad_conv1d.weight", "grad_norm.weight", "grad_D",
                "grad_out_proj.weight", "grad_out_proj.bias", "grad_A_log", "grad_dt_bias", "step"} <= names


def test_checkpoint_round_trip(results):
    world, per_rank = results
    for r in per_rank:
        for model in ("model", "model_d_ssm"):  # d_ssm = d_inner, and d_ssm < d_inner (a gated MLP part)
            errs = r[model]["errs"]
            assert errs["full_state_dict_exact"] == 0.0 and errs["generate_differs"] == 0.0, (model, errs)
            assert errs["ckpt_to_unsharded"] == 0.0, (model, errs)
            assert errs["logits"] < 1e-5 and errs["ckpt_to_tp_logits"] < 1e-5, (model, errs)  # float32


def test_one_all_reduce_per_block_forward(results):
    world, per_rank = results
    activation = BATCH * SEQLEN * D_MODEL * 8
    for r in per_rank:
        for case, _ in CASES:
            assert r[case]["fwd"]["bytes"] == {"all_reduce": activation}
            assert r[case]["fwd"]["calls"] == {"all_reduce": 1}
            assert r[case]["bwd"]["bytes"] == {"all_reduce": activation}  # the input gradient


def test_indivisible_heads_or_groups_are_refused(results):
    _, per_rank = results
    assert "ngroups must be divisible by the world size" in per_rank[0]["errors"]["ngroups"]
