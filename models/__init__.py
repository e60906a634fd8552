"""Flax NNX models used by the llr_optax trainer: LLaMa, MoE LLaMa and GPT-2.

Every model is built as ``Model(config, rngs=nnx.Rngs(seed))`` and called as
``model(tokens)`` -> float32 logits, or ``model(tokens, return_aux=True)`` ->
``(logits, aux)`` where ``aux`` holds auxiliary losses to add to the training loss
(the MoE router losses; empty for the dense models). ``model_config(preset, ...)`` and
``create_model(config, rngs=...)`` cover every preset.
"""

from models.gpt2 import GPT2 as GPT2
from models.gpt2 import GPT2Config as GPT2Config
from models.llama import LOGICAL_AXIS_RULES as LOGICAL_AXIS_RULES
from models.llama import MLP as MLP
from models.llama import Attention as Attention
from models.llama import DecoderLayer as DecoderLayer
from models.llama import LLaMa as LLaMa
from models.llama import LlamaConfig as LlamaConfig
from models.llama import LlamaModel as LlamaModel
from models.llama import RMSNorm as RMSNorm
from models.llama import apply_rope as apply_rope
from models.llama import rope_tables as rope_tables
from models.moe import MoeConfig as MoeConfig
from models.moe import MoeLLaMa as MoeLLaMa
from models.presets import ALL_PRESETS as ALL_PRESETS
from models.presets import GPT2_PRESETS as GPT2_PRESETS
from models.presets import MOE_PRESETS as MOE_PRESETS
from models.presets import PRESETS as PRESETS
from models.presets import active_param_count as active_param_count
from models.presets import create_model as create_model
from models.presets import llama_config as llama_config
from models.presets import model_config as model_config
from models.presets import param_count as param_count

__all__ = [
    "ALL_PRESETS",
    "GPT2",
    "GPT2Config",
    "GPT2_PRESETS",
    "LOGICAL_AXIS_RULES",
    "MLP",
    "MOE_PRESETS",
    "Attention",
    "DecoderLayer",
    "LLaMa",
    "LlamaConfig",
    "LlamaModel",
    "MoeConfig",
    "MoeLLaMa",
    "PRESETS",
    "RMSNorm",
    "active_param_count",
    "apply_rope",
    "create_model",
    "llama_config",
    "model_config",
    "param_count",
    "rope_tables",
]
