"""dsv2_jax: DeepSeek-V2 (Multi-head Latent Attention + DeepSeekMoE) in JAX/Flax."""

from .checkpoint import load, save
from .config import ModelConfig
from .model import DeepseekV2, abstract_model, count_params
from .weights import from_hf

__all__ = ["ModelConfig", "DeepseekV2", "abstract_model", "count_params", "from_hf", "load", "save"]
