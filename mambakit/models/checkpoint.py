"""Old import path of mambakit's native checkpoints; the code lives in `mambakit.models.io.native` (and the file
names in `mambakit.models.io.names`)."""
from mambakit.models.io.names import CONFIG_NAME, EMBEDDING_KEY, META_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME
from mambakit.models.io.names import LM_HEAD_KEY as TIED_KEY
from mambakit.models.io.names import SAFETENSORS_NAME as WEIGHTS_NAME
from mambakit.models.io.native import (FORMAT_VERSION, load_checkpoint, load_config, load_optimizer_state,
                                       load_trainer_state, model_state_for_saving, save_checkpoint)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "META_NAME", "OPTIMIZER_NAME", "TRAINER_STATE_NAME", "FORMAT_VERSION",
           "TIED_KEY", "EMBEDDING_KEY", "model_state_for_saving", "save_checkpoint", "load_config", "load_checkpoint",
           "load_optimizer_state", "load_trainer_state"]
