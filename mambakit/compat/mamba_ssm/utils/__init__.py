"""`mamba_ssm.utils`: `generation` (InferenceParams, the official decode loop) and `hf` (load_config_hf,
load_state_dict_hf for local checkpoint folders)."""
