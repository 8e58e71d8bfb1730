"""dsv2_jax: DeepSeek-V2 (Multi-head Latent Attention + DeepSeekMoE) in JAX/Flax."""

from .checkpoint import load, save
from .config import ModelConfig
from .generate import generate, init_cache
from .model import DeepseekV2, abstract_model, count_params
from .sharding import init_model, make_mesh
from .weights import from_hf

__all__ = ["ModelConfig", "DeepseekV2", "abstract_model", "count_params", "from_hf", "init_model", "load",
           "make_mesh", "save"]
__all__ += ["generate", "init_cache"]
