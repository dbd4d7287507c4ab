"""`mamba_ssm.utils`: `generation` (InferenceParams, the official decode loop). Not provided yet: `utils.hf`."""
