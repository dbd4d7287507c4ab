"""Old import path of the transformers / mamba_ssm / native loading and saving; the code lives in
`mambakit.models.io` (`formats`, `transformers`, `mamba_ssm`, `weights`, `names`)."""
from mambakit.models.io.formats import detect_format, from_pretrained, save_pretrained
from mambakit.models.io.mamba_ssm import OFFICIAL_NORM_EPS, config_from_mamba_ssm, config_to_mamba_ssm
from mambakit.models.io.names import (BIN_INDEX_NAME, BIN_NAME, CONFIG_NAME, EMBEDDING_KEY, HF_EMBEDDING_KEY,
                                      LM_HEAD_KEY, SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME)
from mambakit.models.io.names import META_NAME as NATIVE_META_NAME
from mambakit.models.io.transformers import (HF_ARCHITECTURES, HF_MODEL_TYPES, HF_RELATED_TYPES, config_from_hf,
                                             config_to_hf)
from mambakit.models.io.weights import read_weights

__all__ = ["from_pretrained", "save_pretrained", "detect_format", "config_from_hf", "config_to_hf",
           "config_from_mamba_ssm", "config_to_mamba_ssm", "read_weights", "CONFIG_NAME", "SAFETENSORS_NAME",
           "SAFETENSORS_INDEX_NAME", "BIN_NAME", "BIN_INDEX_NAME", "NATIVE_META_NAME", "EMBEDDING_KEY",
           "HF_EMBEDDING_KEY", "LM_HEAD_KEY", "HF_MODEL_TYPES", "HF_ARCHITECTURES", "HF_RELATED_TYPES",
           "OFFICIAL_NORM_EPS"]
