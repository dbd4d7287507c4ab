"""`mamba_ssm.modules`: the mixers `mamba_simple.Mamba`, `mamba2.Mamba2`, `mamba3.Mamba3` and `mha.MHA`,
`mlp.GatedMLP` and `block.Block`, with the official constructor and inference signatures, on mambakit's layers."""
