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
from mambakit.distributed.collectives import count_comm
from mambakit.distributed.context_parallel import (
    ContextParallelMamba,
    ContextParallelMamba2,
    context_parallel,
    context_parallel_selective_scan,
    context_parallel_ssd,
    sequence_shard,
)
from mambakit.distributed.tensor_parallel import (
    TensorParallelMamba2,
    full_state_dict,
    load_full_state_dict,
    parallelize_mamba2,
    save_tensor_parallel_checkpoint,
    shard_mamba2,
    unshard_mamba2,
)
