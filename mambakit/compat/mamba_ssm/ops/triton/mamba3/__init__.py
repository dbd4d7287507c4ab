"""`mamba_ssm.ops.triton.mamba3`: the Mamba-3 SISO op (`mamba3_siso_combined`) and its decode step
(`mamba3_siso_step`) with the official signatures, computed by :mod:`mambakit.ops.mamba3` (on any device)."""
