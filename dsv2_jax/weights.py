"""Hugging Face tensor names <-> this library's parameter layout, and reading HF safetensors folders.

The HF checkpoints hold PyTorch `nn.Linear` weights ([out, in]) per layer and per expert. Here weights are
[in, out] with head and expert axes explicit and layers stacked: one table (`layer_specs`) says, for every HF
tensor of a layer, which parameter(s) it feeds and how. kv_b_proj feeds two parameters (k_b_proj, v_b_proj).

`hf_entries` expands the table over layers and experts; `read_block` builds any block of a parameter from the
HF tensors it needs, so a sharded load reads only what each device holds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig

IGNORED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One HF tensor kind of a layer (or of the top level) and the parameter(s) it maps to.

    transpose: HF holds [out, in]; `n_in` leading axes of our shape form `in`.
    parts: our parameter paths; several means our last axis is split (kv_b -> k_b, v_b).
    per_expert: the HF name has `{e}` and our parameter an expert axis after the layer axis.
    """

    hf: str
    parts: tuple[tuple[str, ...], ...]
    transpose: bool = False
    n_in: int = 1
    per_expert: bool = False


def layer_specs(config: ModelConfig, moe: bool) -> list[Spec]:
    c = config
    specs = [
        Spec("input_layernorm.weight", (("input_norm", "weight"),)),
        Spec("post_attention_layernorm.weight", (("post_attention_norm", "weight"),)),
        Spec("self_attn.kv_a_proj_with_mqa.weight", (("attn", "kv_a_proj"),), True),
        Spec("self_attn.kv_a_layernorm.weight", (("attn", "kv_a_norm"),)),
        Spec("self_attn.kv_b_proj.weight", (("attn", "k_b_proj"), ("attn", "v_b_proj")), True),
        Spec("self_attn.o_proj.weight", (("attn", "o_proj"),), True, n_in=2),
    ]
    if c.q_lora_rank is None:
        specs.append(Spec("self_attn.q_proj.weight", (("attn", "q_proj"),), True))
    else:
        specs += [
            Spec("self_attn.q_a_proj.weight", (("attn", "q_a_proj"),), True),
            Spec("self_attn.q_a_layernorm.weight", (("attn", "q_a_norm"),)),
            Spec("self_attn.q_b_proj.weight", (("attn", "q_b_proj"),), True),
        ]
    mlp = ("mlp",)
    if moe:
        specs += [
            Spec("mlp.gate.weight", (mlp + ("router",),), True),
            Spec("mlp.experts.{e}.gate_proj.weight", (mlp + ("gate_proj",),), True, per_expert=True),
            Spec("mlp.experts.{e}.up_proj.weight", (mlp + ("up_proj",),), True, per_expert=True),
            Spec("mlp.experts.{e}.down_proj.weight", (mlp + ("down_proj",),), True, per_expert=True),
        ]
        if c.n_shared_experts:
            mlp = mlp + ("shared_experts",)
        else:
            return specs
    specs += [
        Spec(f"mlp.{'shared_experts.' if moe else ''}gate_proj.weight", (mlp + ("gate_proj",),), True),
        Spec(f"mlp.{'shared_experts.' if moe else ''}up_proj.weight", (mlp + ("up_proj",),), True),
        Spec(f"mlp.{'shared_experts.' if moe else ''}down_proj.weight", (mlp + ("down_proj",),), True),
    ]
    return specs


def top_specs(config: ModelConfig) -> list[Spec]:
    specs = [
        Spec("model.embed_tokens.weight", (("embed_tokens", "embedding"),)),
        Spec("model.norm.weight", (("norm", "weight"),)),
    ]
    if not config.tie_word_embeddings:
        specs.append(Spec("lm_head.weight", (("lm_head",),), True))
    return specs


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor: its name and shape, and the block of our parameter(s) it fills."""

    name: str
    shape: tuple[int, ...]
    spec: Spec
    stack: str | None  # 'dense_layers' / 'moe_layers', None at top level
    layer: int | None  # index in that stack
    expert: int | None


def _slice_shapes(spec: Spec, shapes: dict, stack: str | None) -> list[tuple[int, ...]]:
    """Our per-(layer, expert) shape of each part of a spec."""
    lead = (1 if stack else 0) + (1 if spec.per_expert else 0)
    return [tuple(shapes[((stack,) if stack else ()) + p][lead:]) for p in spec.parts]


def _joined_shape(slice_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    *lead, _ = slice_shapes[0]
    return (*lead, sum(s[-1] for s in slice_shapes)) if len(slice_shapes) > 1 else slice_shapes[0]


def hf_shape(spec: Spec, slice_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    joined = _joined_shape(slice_shapes)
    if not spec.transpose:
        return joined
    return (math.prod(joined[spec.n_in:]), math.prod(joined[: spec.n_in]))


def hf_to_ours(spec: Spec, x: np.ndarray, slice_shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """An HF tensor -> the slice of each of our parameters it holds (views where possible)."""
    if spec.transpose:
        x = x.T
    x = x.reshape(_joined_shape(slice_shapes))
    if len(slice_shapes) == 1:
        return [x]
    bounds = np.cumsum([s[-1] for s in slice_shapes])[:-1]
    return np.split(x, bounds, axis=-1)


def ours_to_hf(spec: Spec, parts: list[np.ndarray]) -> np.ndarray:
    """The inverse of hf_to_ours: our slices -> one contiguous HF tensor."""
    shapes = [p.shape for p in parts]
    x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    if spec.transpose:
        x = x.reshape(hf_shape(spec, shapes)[::-1]).T
    return np.ascontiguousarray(x)


def hf_tensors(config: ModelConfig, shapes: dict) -> list[Tensor]:
    """Every HF tensor of a checkpoint of `config`, in file order, with its expected shape.

    shapes: our parameter path -> full (stacked) shape, as from `param_shapes`.
    """
    out = []
    for spec in top_specs(config):
        out.append(Tensor(spec.hf, hf_shape(spec, _slice_shapes(spec, shapes, None)), spec, None, None, None))
    index = {"dense": 0, "moe": 0}
    for i, kind in enumerate(config.layer_kinds):
        stack = f"{kind}_layers"
        for spec in layer_specs(config, kind == "moe"):
            shape = hf_shape(spec, _slice_shapes(spec, shapes, stack))
            experts = range(config.num_experts) if spec.per_expert else [None]
            for e in experts:
                name = f"model.layers.{i}." + (spec.hf.format(e=e) if e is not None else spec.hf)
                out.append(Tensor(name, shape, spec, stack, index[kind], e))
        index[kind] += 1
    return out


def param_shapes(model_or_state) -> dict[tuple[str, ...], tuple[int, ...]]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {tuple(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def check_hf_tensors(expected: list[Tensor], names: set[str], shape_of: Callable[[str], tuple]) -> None:
    """Missing, unexpected or mis-shaped tensors -> ValueError naming them and the expected shapes."""
    want = {t.name: t for t in expected}
    missing = [n for n in want if n not in names]
    unexpected = sorted(n for n in names if n not in want and not IGNORED_HF_TENSORS.match(n))
    problems = [f"missing tensor {n} (expected shape {list(want[n].shape)})" for n in missing[:10]]
    problems += [f"unexpected tensor {n}" for n in unexpected[:10]]
    for n in want:
        if n in names and tuple(shape_of(n)) != want[n].shape:
            problems.append(f"tensor {n} has shape {list(shape_of(n))}, expected {list(want[n].shape)}")
    if problems:
        more = len(missing) + len(unexpected) - min(len(missing), 10) - min(len(unexpected), 10)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise ValueError("the checkpoint does not match its config:\n  " + "\n  ".join(problems) + tail)


class BlockReader:
    """Builds any block of any of our parameters from the HF tensors that hold it."""

    def __init__(self, config: ModelConfig, shapes: dict, read: Callable[[str], np.ndarray]):
        self.shapes = shapes
        self.read = read
        self.by_param: dict[tuple[str, ...], dict] = {}
        for t in hf_tensors(config, shapes):
            for part, path in enumerate(t.spec.parts):
                full = ((t.stack,) if t.stack else ()) + path
                self.by_param.setdefault(full, {})[(t.layer, t.expert)] = (t, part)

    def block(self, path: tuple[str, ...], index: tuple[slice, ...] | None = None, dtype=None) -> np.ndarray:
        shape = self.shapes[path]
        index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
        tensors = self.by_param[path]
        t0, _ = next(iter(tensors.values()))
        lead = (1 if t0.stack else 0) + (1 if t0.spec.per_expert else 0)

        def piece(layer, expert):
            t, part = tensors[(layer, expert)]
            slices = _slice_shapes(t.spec, self.shapes, t.stack)
            x = hf_to_ours(t.spec, self.read(t.name), slices)[part][index[lead:]]
            return x if dtype is None else x.astype(dtype)

        if lead == 0:
            return piece(None, None)
        layers = range(shape[0])[index[0]]
        if lead == 1:
            return np.stack([piece(i, None) for i in layers])
        experts = range(shape[1])[index[1]]
        return np.stack([np.stack([piece(i, e) for e in experts]) for i in layers])


def iter_params(state: nnx.State) -> Iterator[tuple[tuple[str, ...], nnx.Variable]]:
    for path, var in nnx.to_flat_state(state):
        yield tuple(str(k) for k in path), var


def from_hf(hf_dir: str | os.PathLike, dtype=jnp.bfloat16, param_dtype=None, mesh=None):
    """Loads a Hugging Face DeepSeek-V2 folder (config.json + safetensors, or pytorch_model*.bin) into a model.

    dtype: compute dtype; param_dtype: storage dtype (default: dtype). With a mesh, each parameter is created
    directly in its sharding and each device reads only its own block.
    """
    from .convert import open_hf_weights
    from .model import abstract_model
    from .sharding import check_config, param_sharding

    config = ModelConfig.from_hf(hf_dir)
    if mesh is not None:
        check_config(config, mesh)  # make_mesh's axes, Auto types, sizes that divide
    param_dtype = param_dtype or dtype
    model = abstract_model(config, dtype, param_dtype)
    graphdef, state = nnx.split(model)
    shapes = param_shapes(state)
    weights = open_hf_weights(hf_dir)
    check_hf_tensors(hf_tensors(config, shapes), weights.names(), weights.shape)
    reader = BlockReader(config, shapes, weights.read)
    for path, var in iter_params(state):
        if mesh is None:
            value = jnp.asarray(reader.block(path, dtype=param_dtype))
        else:
            sharding = param_sharding(mesh, var)
            value = jax.make_array_from_callback(
                var.shape, sharding, lambda idx, p=path: reader.block(p, idx, dtype=param_dtype))
        var.set_value(value)
    return nnx.merge(graphdef, state)
