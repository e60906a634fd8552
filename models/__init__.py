"""Flax NNX LLaMa models used by the llr_optax trainer."""

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
from models.presets import PRESETS as PRESETS
from models.presets import llama_config as llama_config
from models.presets import param_count as param_count

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MLP",
    "Attention",
    "DecoderLayer",
    "LLaMa",
    "LlamaConfig",
    "LlamaModel",
    "PRESETS",
    "RMSNorm",
    "apply_rope",
    "llama_config",
    "param_count",
    "rope_tables",
]
