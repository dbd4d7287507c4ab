"""Training and inference past one device on torch.distributed (gloo on CPU, NCCL on CUDA).

Data-parallel training (DDP / FSDP2, launched with torchrun or ``mambakit train --nproc N``) lives in
`data_parallel`, `sampler`, `launch` and `comm`; tensor and context parallelism in `tensor_parallel` and
`context_parallel`.
"""
# --- data-parallel and sharded training (DDP, FSDP2) ---
from mambakit.distributed.comm import CommCounter
from mambakit.distributed.data_parallel import (
    DataParallelConfig,
    consolidated_state,
    expected_comm_bytes,
    gradient_sync,
    shard_optimizer_state,
    unwrap,
    wrap_model,
)
from mambakit.distributed.launch import DistContext, launch, setup_distributed, teardown, torchrun_command
from mambakit.distributed.sampler import ShardedBatchSampler, check_batch_split

# --- tensor parallel and context parallel (tensor_parallel.py, context_parallel.py): names added below ---
