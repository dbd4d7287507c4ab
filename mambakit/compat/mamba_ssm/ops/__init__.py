"""`mamba_ssm.ops`: the selective scan interface and the Triton-module functions (`triton/`)."""
