"""`mamba_ssm.models`: `config_mamba.MambaConfig` (official defaults) and `mixer_seq_simple.MambaLMHeadModel`."""
