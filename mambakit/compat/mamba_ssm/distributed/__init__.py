"""`mamba_ssm.distributed`: the tensor-parallel linears (`tensor_parallel`) and the dim-0 collectives
(`distributed_utils`), on mambakit's collectives."""
