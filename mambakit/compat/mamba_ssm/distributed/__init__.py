"""`mamba_ssm.distributed`: the tensor-parallel linears (`tensor_parallel`), on mambakit's collectives."""
