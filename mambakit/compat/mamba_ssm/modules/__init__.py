"""`mamba_ssm.modules`: the mixers `mamba_simple.Mamba` and `mamba2.Mamba2` with the official constructor and
inference signatures, on mambakit's layers."""
