"""Rotary position embedding for MLA's decoupled key/query: plain, linear and YaRN frequencies.

RoPE acts on interleaved pairs (x[2i], x[2i+1]) of the rope dims, as in the released checkpoints.
Frequencies are computed in float64 and rounded once to float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, yarn_mscale


def yarn_correction_range(dim: int, spec) -> tuple[float, float]:
    """The [low, high] band of frequency indices over which YaRN ramps from extrapolation to interpolation."""

    def correction_dim(num_rotations):
        orig = spec.original_max_position_embeddings
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [qk_rope_head_dim // 2] float32, attention_factor applied to cos and sin)."""
    spec = config.rope
    dim = config.qk_rope_head_dim
    pos_freqs = spec.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # float64, rounded once at the end
    inv_freq = 1.0 / pos_freqs
    if spec.rope_type == "default":
        return inv_freq.astype(np.float32), 1.0
    if spec.rope_type == "linear":
        return (inv_freq / spec.factor).astype(np.float32), 1.0
    # yarn: ramp from extrapolation (original frequencies) to interpolation (frequencies / factor)
    low, high = yarn_correction_range(dim, spec)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    inv_freq = ((inv_freq / spec.factor) * ramp + inv_freq * (1 - ramp)).astype(np.float32)
    if spec.attention_factor is not None:
        attention_factor = float(spec.attention_factor)
    else:
        attention_factor = yarn_mscale(spec.factor, spec.mscale) / yarn_mscale(spec.factor, spec.mscale_all_dim)
    return inv_freq, attention_factor


def rope_cos_sin(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [*positions.shape, qk_rope_head_dim // 2] in float32, scaled by the YaRN attention factor."""
    inv_freq, attention_factor = rope_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates interleaved pairs of x [..., S, (heads,) d] by cos/sin [..., S, d/2]; computes in float32."""
    if x.ndim == cos.ndim + 1:  # a heads axis sits between positions and features
        cos, sin = cos[..., None, :], sin[..., None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
