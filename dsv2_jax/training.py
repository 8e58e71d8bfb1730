"""Training: the recipe, optimizer and schedules, the loss with the paper's balance losses, the train step, the loop.

The step is a pure jitted function of (params, opt_state, batch) over plain pytrees; it runs unchanged on one device
or under a mesh (parameters and optimizer state keep their shardings, the batch is split over the batch axes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .config import ModelConfig
from .data import FORMATS, DataConfig, Pipeline
from .grouped_matmul import _env_choice, interpreted
from .model import REMAT_POLICIES, count_params
from .moe import RouterOutput
from .sharding import (MESH_AXES, activation_mesh, batch_sharding, batch_shards, constrain, current_mesh,
                       logical_to_spec, mesh_size, per_shard, xla_flag)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Dense bf16 peak FLOP/s per chip by jax device_kind prefix, for MFU.
PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H800": 989e12, "NVIDIA A100": 312e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


# XLA options the training step compiles with (`jit_steps`): on GPUs, XLA's own Triton GEMM fusions off, so those
# products go to cuBLAS (bench/RESULTS.md §36: 0.9-2.5% less step time in six pairs of processes at 12 × 4096
# tokens, V2-Lite widths, for 1.1 GiB more peak memory; no change at 2 × 4096). They apply to the train and eval
# steps' compilations only: decoding at batch 1 runs 28% slower without those fusions (§38, §39).
TRAINING_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def training_compiler_options(environ=None, platform: str | None = None) -> dict:
    """TRAINING_COMPILER_OPTIONS for a compilation on `platform` (default: JAX's default backend): the `xla_gpu_*`
    ones only on 'gpu', and none that XLA_FLAGS sets (the user's value wins, e.g.
    `XLA_FLAGS=--xla_gpu_enable_triton_gemm=true`; a compiler option would override XLA_FLAGS)."""
    platform = platform or jax.default_backend()
    return {name: value for name, value in TRAINING_COMPILER_OPTIONS.items()
            if xla_flag(name, environ) is None and (platform == "gpu" or not name.startswith("xla_gpu_"))}


# ---------------------------------------------------------------------------------------------------- recipe
@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 2.4e-4
    warmup_steps: int = 2000
    schedule: str = "step"  # step: ×decay_factor at each fraction of decay_at (the paper's); or cosine
    decay_at: list = dataclasses.field(default_factory=lambda: [0.6, 0.9])
    decay_factor: float = 0.316
    min_lr_ratio: float = 0.1  # cosine: final lr / peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass
class BalanceConfig:
    alpha1: float = 0.0  # expert-level
    alpha2: float = 0.0  # device-level
    alpha3: float = 0.0  # communication
    device_groups: int | None = None  # D: default the expert mesh axis if > 1, else n_group
    device_limit: int | None = None  # M: default topk_group (group_limited_greedy) or min(K, D)


@dataclasses.dataclass
class Recipe:
    model: Any = "tiny"  # preset name, config.json path / folder, or a dict of config fields
    model_overrides: dict = dataclasses.field(default_factory=dict)
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"  # master weights
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8  # global rows per optimizer step
    grad_accum: int = 1
    remat: str = "none"
    scan_layers: bool = True  # False: layers unrolled (longer compiles, no scan copies of the kept activations)
    capacity_factor: float | None = None  # None: dropless
    loss_chunk: int = 1024  # sequence positions per chunk of the cross-entropy: [rows, chunk, vocab] fp32 logits
    logits_dtype: str = "float32"  # the head's product as stored; bfloat16 as transformers and MaxText (CE in fp32)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)
    mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1})
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 8
    peak_tflops: float | None = None  # per device; default from the device kind

    def model_config(self) -> ModelConfig:
        if isinstance(self.model, dict):
            config = ModelConfig.from_hf(self.model)
        elif os.path.exists(str(self.model)):
            config = ModelConfig.from_hf(self.model)
        else:
            config = ModelConfig.from_preset(str(self.model))
        return config.replace(**self.model_overrides) if self.model_overrides else config

    def validate(self):
        """Every key's type and range, so that a bad value is an error naming its key before anything runs."""
        def fail(field, msg):
            raise ValueError(f"recipe {field}: {msg}")

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def check(field, value, ok: bool, what: str):
            if not ok:
                fail(field, f"must be {what}, got {value!r}")

        for name in ("dtype", "param_dtype", "logits_dtype"):
            check(name, getattr(self, name), getattr(self, name) in DTYPES, f"one of {list(DTYPES)}")
        check("remat", self.remat, self.remat in REMAT_POLICIES, f"one of {list(REMAT_POLICIES)}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                     "eval_every", "eval_batches", "loss_chunk"):
            value = getattr(self, name)
            check(name, value, integer(value) and value > 0, "a positive integer")
        check("seed", self.seed, integer(self.seed), "an integer")
        if self.batch_size % self.grad_accum:
            fail("grad_accum", f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        check("scan_layers", self.scan_layers, isinstance(self.scan_layers, bool), "true or false")
        check("capacity_factor", self.capacity_factor,
              self.capacity_factor is None or (number(self.capacity_factor) and self.capacity_factor > 0),
              "a number > 0 or null")
        check("peak_tflops", self.peak_tflops,
              self.peak_tflops is None or (number(self.peak_tflops) and self.peak_tflops > 0), "a number > 0 or null")
        check("mesh", self.mesh, isinstance(self.mesh, dict), f"a mapping of {MESH_AXES} to sizes")
        for axis, size in self.mesh.items():
            check("mesh", axis, axis in MESH_AXES, f"one of the axes {MESH_AXES}")
            check(f"mesh.{axis}", size, integer(size) and (size > 0 or size == -1), "a positive integer or -1")

        d = self.data
        check("data.sources", d.sources, isinstance(d.sources, list) and all(isinstance(x, str) for x in d.sources),
              "a list of files or globs")
        check("data.format", d.format, d.format in FORMATS, f"one of {list(FORMATS)}")
        for name in ("text_field", "tokenizer"):
            check(f"data.{name}", getattr(d, name), isinstance(getattr(d, name), str), "a string")
        check("data.seq_len", d.seq_len, integer(d.seq_len) and d.seq_len > 1, "an integer > 1")
        check("data.eval_fraction", d.eval_fraction, number(d.eval_fraction) and 0 <= d.eval_fraction < 1,
              "a number in [0, 1)")
        check("data.seed", d.seed, integer(d.seed), "an integer")

        o = self.optimizer
        check("optimizer.schedule", o.schedule, o.schedule in ("step", "cosine"), "'step' or 'cosine'")
        check("optimizer.warmup_steps", o.warmup_steps, integer(o.warmup_steps) and o.warmup_steps >= 0,
              "an integer >= 0")
        for name in ("lr", "min_lr_ratio", "eps", "weight_decay"):
            check(f"optimizer.{name}", getattr(o, name), number(getattr(o, name)) and getattr(o, name) >= 0,
                  "a number >= 0")
        for name in ("decay_factor", "clip_norm"):
            check(f"optimizer.{name}", getattr(o, name), number(getattr(o, name)) and getattr(o, name) > 0,
                  "a number > 0")
        for name in ("b1", "b2"):
            check(f"optimizer.{name}", getattr(o, name), number(getattr(o, name)) and 0 <= getattr(o, name) < 1,
                  "a number in [0, 1)")
        check("optimizer.decay_at", o.decay_at, isinstance(o.decay_at, list) and all(
            number(f) and 0 < f <= 1 for f in o.decay_at), "a list of fractions of the steps in (0, 1]")

        b = self.balance
        for name in ("alpha1", "alpha2", "alpha3"):
            check(f"balance.{name}", getattr(b, name), number(getattr(b, name)) and getattr(b, name) >= 0,
                  "a number >= 0")
        for name in ("device_groups", "device_limit"):
            value = getattr(b, name)
            check(f"balance.{name}", value, value is None or (integer(value) and value > 0),
                  "a positive integer or null")

        check("model_overrides", self.model_overrides, isinstance(self.model_overrides, dict), "a mapping")
        unknown = sorted(set(self.model_overrides) - {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"})
        if unknown:
            fail("model_overrides", f"unknown model config field(s) {unknown}")
        try:
            self.model_config()
        except (ValueError, TypeError, FileNotFoundError, OSError) as e:
            fail("model" if not self.model_overrides else "model / model_overrides", str(e))


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown recipe key(s) {', '.join(where + k for k in unknown)}; known: {sorted(fields)}")
    defaults = cls()
    kwargs = {}
    for k, v in values.items():
        sub = {"data": DataConfig, "optimizer": OptimizerConfig, "balance": BalanceConfig}.get(k) if cls is Recipe else None
        if sub:
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"recipe {where}{k}: expected a mapping of its keys, got {v!r}")
            v = _build(sub, v or {}, f"{where}{k}.")
        elif cls is DataConfig and k == "sources" and isinstance(v, str):
            v = [v]  # one file or glob
        elif isinstance(getattr(defaults, k), float) and isinstance(v, (str, int)) and not isinstance(v, bool):
            try:  # YAML reads 5e-3 (no dot) as a string
                v = float(v)
            except ValueError:
                raise ValueError(f"recipe {where}{k}: expected a number, got {v!r}") from None
        kwargs[k] = v
    return cls(**kwargs)


def load_recipe(path: str | None, overrides: list[str] = ()) -> Recipe:
    """A YAML recipe with `key=value` overrides (dotted keys, YAML values: optimizer.lr=1e-3, data.sources=[a.txt])."""
    values: dict = {}
    if path:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a recipe is a YAML mapping")
        if isinstance(values.get("model"), str) and not os.path.isabs(values["model"]):
            candidate = os.path.join(os.path.dirname(os.path.abspath(path)), values["model"])
            if os.path.exists(candidate):
                values["model"] = candidate
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = values
        *parents, last = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a mapping of keys")
        node[last] = yaml.safe_load(raw)
    recipe = _build(Recipe, values, "")
    recipe.validate()
    return recipe


# ---------------------------------------------------------------------------------------------------- optimizer
def learning_rate_schedule(opt: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warm-up, then the paper's step decay (×decay_factor at each fraction in decay_at) or cosine."""
    warmup = min(opt.warmup_steps, steps)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, max(steps, warmup + 1),
                                                  end_value=opt.lr * opt.min_lr_ratio)
    boundaries = {}  # a fraction given twice decays twice there
    for f in opt.decay_at:
        b = int(round(f * steps)) - warmup
        boundaries[b] = boundaries.get(b, 1.0) * opt.decay_factor
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.lr, warmup), optax.piecewise_constant_schedule(opt.lr, boundaries)], [warmup])


def decay_mask(params: dict) -> dict:
    """Weight decay on matrices only: not on norm weights (1-D per layer)."""
    def is_decayed(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not (name.endswith("norm/weight") or name.endswith("_norm"))

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def global_norm(tree, by_layer: bool = False) -> jnp.ndarray:
    """√(Σ x²) over every leaf, squared and summed in float32 (optax.global_norm squares bf16 gradients in bf16 and
    rounds each leaf's sum to bf16: 1e-4 to 2e-3 off where measured). by_layer (for unrolled layers): a leaf stacked
    by layer whose layer slices are large is summed one layer at a time. With the layers unrolled its gradient is the
    sum of one padded gradient per layer, and XLA's single reduction over that sum read at a third of the bandwidth
    (a [3, 64, 2048, 1408] bf16 expert stack on an H200: 1.37 ms, against 0.50 ms by layer; bench/RESULTS.md §20).
    A scanned stack's gradient is one array, read at full bandwidth as it is."""
    def sum_squares(x):
        x = jnp.asarray(x)
        split = by_layer and x.ndim >= 3 and x.size // x.shape[0] >= 2**24
        return sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in (list(x) if split else [x]))

    return jnp.sqrt(sum(sum_squares(x) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float, by_layer: bool = False) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (the same rule and empty state) with `global_norm`'s float32 norm."""
    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, by_layer)
        clip = lambda t: jnp.where(norm < max_norm, t, (t / norm.astype(t.dtype)) * max_norm)  # noqa: E731
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt: OptimizerConfig, steps: int, scan_layers: bool = True) -> optax.GradientTransformation:
    """Clipping by the global norm, then AdamW on `learning_rate_schedule`. scan_layers: the step's layer loop (the
    recipe's), which decides how the clipping's norm reads layer-stacked gradients (`global_norm`)."""
    return optax.chain(
        clip_by_global_norm(opt.clip_norm, by_layer=not scan_layers),
        optax.adamw(learning_rate_schedule(opt, steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=decay_mask),
    )


# ---------------------------------------------------------------------------------------------------- losses
def next_token_targets(tokens, segment_ids):
    """Targets = the next token of the same document; mask is False across document boundaries, at the end of a
    row and on padding (segment 0)."""
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    same_doc = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (0, 1)))
    return targets, same_doc & (segment_ids > 0)


def logsumexp_once(x):
    """log Σ exp over the last axis, reading x once: one reduction of (running max, sum of exp below it) pairs.
    jax.nn.logsumexp reads x twice (its max, then the sum), which for the head's logits is a pass over
    B × chunk × vocab float32 values. Not for differentiation (the cross-entropy has its own VJP)."""
    def combine(a, b):  # one exp per element: the smaller max's sum is scaled down to the larger max
        (m1, s1), (m2, s2) = a, b
        scale = jnp.where(m1 == m2, 1.0, jnp.exp(-jnp.abs(m1 - m2)))  # equal maxes: 1, also where both are ±inf
        return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * scale, s1 * scale + s2)

    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.array(-jnp.inf, x.dtype), jnp.array(0, x.dtype)), combine,
                          (x.ndim - 1,))
    return m + jnp.log(s)


# The loss's kernel (`softmax_rows`) by the logits' dtype: rows a program, vocabulary columns a step of its loops,
# warps and pipeline stages. One row a program ran fastest on the H200 ([2, 1024, 102400] logits; bench/RESULTS.md
# §42).
LOSS_KERNEL_TILES = {"float32": dict(block_r=1, block_v=2048, num_warps=4, num_stages=3),
                     "bfloat16": dict(block_r=1, block_v=4096, num_warps=4, num_stages=3)}
LOSS_KERNEL_CHOICES = ("auto", "pallas", "xla")


def _softmax_rows_kernel(logits_ref, targets_ref, weights_ref, lse_ref, *grad_ref, block_r, block_v):
    """Program i: rows [i·block_r, (i+1)·block_r) of the logits. Their log-sum-exp in one sweep over the vocabulary
    in blocks of block_v columns, the running sum rescaled once per block (as flash attention does); then, given
    grad_ref, a second sweep writes (softmax − onehot(target)) · weight in grad_ref's dtype."""
    rows = pl.ds(pl.program_id(0) * block_r, block_r)
    blocks = logits_ref.shape[1] // block_v

    def block(j):
        return logits_ref[rows, pl.ds(pl.multiple_of(j * block_v, block_v), block_v)].astype(jnp.float32)

    def stats(j, carry):
        m, s = carry
        x = block(j)
        m_new = jnp.maximum(m, x.max(axis=1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all -inf so far: the sum stays 0
        return m_new, s * jnp.exp(m - shift) + jnp.exp(x - shift[:, None]).sum(axis=1)

    m, s = jax.lax.fori_loop(0, blocks, stats, (jnp.full((block_r,), -jnp.inf, jnp.float32),
                                                jnp.zeros((block_r,), jnp.float32)))
    lse = jnp.where(jnp.isfinite(m), m + jnp.log(s), m)  # ±inf rows: the max, as logsumexp_once gives them
    lse_ref[rows] = lse
    if grad_ref:
        targets, weights = targets_ref[rows], weights_ref[rows]

        def grads(j, _):
            cols = j * block_v + jax.lax.broadcasted_iota(jnp.int32, (block_r, block_v), 1)
            p = jnp.exp(block(j) - lse[:, None]) - (cols == targets[:, None]).astype(jnp.float32)
            grad_ref[0][rows, pl.ds(pl.multiple_of(j * block_v, block_v), block_v)] = (
                p * weights[:, None]).astype(grad_ref[0].dtype)

        jax.lax.fori_loop(0, blocks, grads, None)


def _largest_block(n: int, limit: int) -> int:
    """The largest power of two <= limit dividing n."""
    block = limit
    while n % block:
        block //= 2
    return block


@functools.partial(jax.jit, static_argnames=("grad_dtype", "block_r", "block_v", "num_warps", "num_stages",
                                             "interpret"))
def softmax_rows(logits, targets, weights, grad_dtype=None, *, block_r: int, block_v: int, num_warps: int,
                 num_stages: int, interpret: bool | None = None):
    """logits [..., V] (float32 or bf16, read as float32) -> (log-sum-exp float32 [...], and with grad_dtype
    (softmax − onehot(targets)) · weights in grad_dtype [..., V]), on one Pallas (Triton) kernel: each row read once
    for its log-sum-exp, once more for the gradient. V must be a multiple of 128 (`loss_kernel`); the blocks are
    the largest powers of two up to block_r rows and block_v columns that divide the rows and V."""
    lead, V = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, V)
    R = x.shape[0]
    block_r, block_v = _largest_block(R, block_r), _largest_block(V, block_v)
    if block_v < 128:
        raise ValueError(f"softmax_rows: the vocabulary ({V}) must be a multiple of 128")
    out_shape = [jax.ShapeDtypeStruct((R,), jnp.float32)]
    if grad_dtype is not None:
        out_shape.append(jax.ShapeDtypeStruct((R, V), grad_dtype))
    out = pl.pallas_call(
        functools.partial(_softmax_rows_kernel, block_r=block_r, block_v=block_v),
        out_shape=out_shape,
        grid=(R // block_r,),
        in_specs=[pl.no_block_spec] * 3, out_specs=[pl.no_block_spec] * len(out_shape),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpreted(interpret), name="softmax_rows",
    )(x, targets.reshape(R).astype(jnp.int32), weights.reshape(R).astype(jnp.float32))
    lse = out[0].reshape(lead)
    return (lse, out[1].reshape(logits.shape)) if grad_dtype is not None else lse


def loss_kernel(vocab: int) -> bool:
    """Whether the cross-entropy's passes over the logits run on `softmax_rows` (else XLA's fusions, reading them
    through `logsumexp_once`). DSV2_LOSS_KERNEL=auto (on GPU) | pallas | xla. The kernel needs the vocabulary a
    multiple of 128 and whole on each device (not split over a tensor axis); where it is not, XLA's path runs."""
    choice = _env_choice("DSV2_LOSS_KERNEL", LOSS_KERNEL_CHOICES)
    mesh = current_mesh()
    fits = vocab % 128 == 0 and (mesh is None or mesh_size(mesh, logical_to_spec(("vocab",))[0]) == 1)
    return fits and (choice == "pallas" or (choice == "auto" and jax.default_backend() == "gpu"))


def _ce_logits(x, w, logits_dtype: str):
    """One chunk's head product as stored in logits_dtype."""
    stored = DTYPES[logits_dtype]
    logits = jnp.einsum("bcd,dv->bcv", x, w, preferred_element_type=stored)
    if stored != jnp.float32 and not x.dtype == w.dtype == stored:
        # Operands wider than the stored product: XLA builds it at their width and converts, a round trip its
        # excess-precision rewrites may drop (on GPU they did); keep it. Operands of the stored dtype make a GEMM that
        # writes it itself; there the pin only cost time (~3 ms of a batch-12 step, bench/RESULTS.md §20).
        f = jnp.finfo(stored)
        logits = jax.lax.reduce_precision(logits, exponent_bits=f.nexp, mantissa_bits=f.nmant)
    return logits


def _softmax_passes(logits, targets, weights, grad_dtype=None):
    """XLA's `softmax_rows`: the log-sum-exp of logits [..., V] read as float32 (`logsumexp_once`) and, with
    grad_dtype, (softmax − onehot(targets)) · weights in that dtype."""
    logits = logits.astype(jnp.float32)
    lse = logsumexp_once(logits)
    if grad_dtype is None:
        return lse
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    return lse, ((jnp.exp(logits - lse[..., None]) - onehot) * weights[..., None]).astype(grad_dtype)


def _ce_chunk(x, w, targets, weights, logits_dtype: str = "float32", grad_dtype=None):
    """One chunk's Σ weight · NLL (the product stored in logits_dtype, then read as float32) and, with grad_dtype,
    d logits = (softmax − onehot) · weight in that dtype (else None)."""
    logits = _ce_logits(x, w, logits_dtype)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    xla = functools.partial(_softmax_passes, grad_dtype=grad_dtype)
    if loss_kernel(logits.shape[-1]):  # each device's rows on the kernel (XLA's passes where they do not split)
        rows = ("batch", "seq")
        tiles = LOSS_KERNEL_TILES[jnp.dtype(logits.dtype).name]
        passes = per_shard(functools.partial(softmax_rows, grad_dtype=grad_dtype, **tiles),
                           (rows + ("vocab",), rows, rows), rows if grad_dtype is None else (rows, rows + ("vocab",)),
                           unsplit=xla)
    else:
        passes = xla
    out = passes(logits, targets, weights)
    lse, g = (out, None) if grad_dtype is None else out
    return jnp.sum((lse - picked) * weights), g


def _ce_chunks(x, targets, weights, chunk: int):
    """Pads the sequence to a multiple of the chunk (weight 0) and returns (x, targets, weights, chunk, count)."""
    S = x.shape[1]
    chunk = min(chunk, S)
    pad = -S % chunk
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
    return x, targets, weights, chunk, (S + pad) // chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def linear_cross_entropy(x, w, targets, weights, chunk: int = 1024, logits_dtype: str = "float32"):
    """Σ_{b,s} weights[b,s] · −log softmax(x[b,s] · w)[targets[b,s]], without all the logits at once.

    x [B, S, D] final hidden states (compute dtype); w [D, V] the output projection; targets int [B, S];
    weights float32 [B, S] (0 where no loss; not differentiated). The sequence runs in chunks of `chunk` positions,
    so only [B, chunk, V] float32 logits exist at a time. Under differentiation each chunk's gradients are made in
    the same pass, d logits = (softmax − onehot) · weight in the compute dtype (as for any matmul in that dtype),
    and x's and w's gradients come from two matmuls of it; nothing is recomputed in the backward pass.
    logits_dtype "bfloat16": the head's product is stored rounded to bf16 (half the bytes written and read per
    chunk), and the log-softmax reads it in float32, as transformers' and MaxText's bf16 training computes the loss.
    Where x or w is wider than bf16 the rounding is pinned with `reduce_precision`: on GPU, XLA's excess-precision
    rewrites otherwise drop the round trip through bf16 where they fuse the product with its readers, and the loss
    becomes the float32 one. With bf16 operands (the compute dtype) the GEMM itself writes bf16.
    """
    x, targets, weights, chunk, n = _ce_chunks(x, targets, weights, chunk)

    def body(i, total):
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)  # noqa: E731
        return total + _ce_chunk(sl(x), w, sl(targets), sl(weights), logits_dtype)[0]

    return jax.lax.fori_loop(0, n, body, jnp.float32(0.0))


def _linear_cross_entropy_fwd(x, w, targets, weights, chunk, logits_dtype):
    S = x.shape[1]
    x, targets, weights, chunk, n = _ce_chunks(x, targets, weights, chunk)

    def chunk_grads(i):
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)  # noqa: E731
        x_c, t_c, w_c = sl(x), sl(targets), sl(weights)
        loss, g = _ce_chunk(x_c, w, t_c, w_c, logits_dtype, x.dtype)
        dx_c = jnp.einsum("bcv,dv->bcd", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
        dw_c = constrain(jnp.einsum("bcd,bcv->dv", x_c, g, preferred_element_type=jnp.float32), ("embed", "vocab"))
        return loss, dx_c, dw_c

    def body(i, carry):
        total, dx, dw = carry
        loss, dx_c, dw_c = chunk_grads(i)
        return total + loss, jax.lax.dynamic_update_slice_in_dim(dx, dx_c, i * chunk, axis=1), dw + dw_c

    # The first chunk outside the loop starts the sums: w's float32 gradient is its product, not a zeroed
    # [D, V] buffer added to (one write of 4·D·V bytes less; in one chunk, no float32 sum at all).
    loss, dx_c, dw = chunk_grads(0)
    dx = jax.lax.dynamic_update_slice_in_dim(constrain(jnp.zeros_like(x), ("batch", "seq", "embed")), dx_c, 0, axis=1)
    total, dx, dw = jax.lax.fori_loop(1, n, body, (loss, dx, dw))
    return total, (dx[:, :S], dw.astype(w.dtype))


def _linear_cross_entropy_bwd(chunk, logits_dtype, residuals, ct):
    dx, dw = residuals
    return (ct * dx).astype(dx.dtype), (ct * dw).astype(dw.dtype), None, None


linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def balance_losses(router: RouterOutput, token_mask, num_experts: int, top_k: int, groups: int, limit: int):
    """The three balance losses of DeepSeek-V2 §2.2.3, per sequence, averaged over sequences, summed over layers.

    router: stacked over L MoE layers, T = B*S tokens. token_mask: [B, S] valid tokens.
    Returns (L_exp, L_dev, L_comm) before their α weights, and the per-layer expert load [L, E] (share of pairs).
    """
    L = router.experts.shape[0]
    B, S = token_mask.shape
    E, K, D, M = num_experts, top_k, groups, limit
    m = token_mask.astype(jnp.float32)
    n_tok = jnp.maximum(m.sum(-1), 1.0)  # T per sequence
    scores = router.scores.reshape(L, B, S, E)
    chosen = jax.nn.one_hot(router.experts, E, dtype=jnp.float32).sum(-2).reshape(L, B, S, E)
    chosen = jax.lax.stop_gradient(chosen)
    P = jnp.einsum("lbse,bs->lbe", scores, m) / n_tok[:, None]  # P_i
    counts = jnp.einsum("lbse,bs->lbe", chosen, m)
    f = counts * (E / (K * n_tok))[:, None]  # f_i
    l_exp = (f * P).sum(-1).mean(-1).sum()
    P_dev = P.reshape(L, B, D, E // D).sum(-1)
    f_dev = f.reshape(L, B, D, E // D).mean(-1)
    l_dev = (f_dev * P_dev).sum(-1).mean(-1).sum()
    sent = chosen.reshape(L, B, S, D, E // D).max(-1)  # token t sent to device group d
    f_comm = jnp.einsum("lbsd,bs->lbd", sent, m) * (D / (M * n_tok))[:, None]
    l_comm = (f_comm * P_dev).sum(-1).mean(-1).sum()
    load = counts.sum(1) / jnp.maximum(counts.sum((1, 2))[:, None], 1.0)
    return (l_exp, l_dev, l_comm), load


def balance_groups(config: ModelConfig, balance: BalanceConfig, mesh) -> tuple[int, int]:
    """(D, M): device groups from the expert mesh axis (or n_group on one device) and the device limit."""
    D = balance.device_groups
    if D is None:
        expert_axis = dict(zip(mesh.axis_names, mesh.devices.shape)).get("expert", 1) if mesh is not None else 1
        D = expert_axis if expert_axis > 1 else config.num_groups
    if config.num_experts % D:
        raise ValueError(f"balance.device_groups={D} does not divide n_routed_experts={config.num_experts}")
    M = balance.device_limit
    if M is None:
        M = config.topk_group if config.topk_method == "group_limited_greedy" else min(config.num_experts_per_tok, D)
    return D, M


# ---------------------------------------------------------------------------------------------------- the step
@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the jitted step needs to know besides arrays (static)."""

    remat: str
    capacity_factor: float | None
    alphas: tuple[float, float, float]
    groups: int
    limit: int
    loss_chunk: int = 1024  # sequence positions per chunk of the cross-entropy (linear_cross_entropy)
    scan_layers: bool = True
    logits_dtype: str = "float32"  # the head's product as the cross-entropy stores it (linear_cross_entropy)


def _forward(graphdef, params, batch, settings: StepSettings):
    model = nnx.merge(graphdef, params)
    kwargs = {"remat": settings.remat, "scan": settings.scan_layers}
    if settings.capacity_factor is not None:
        kwargs["capacity_factor"] = settings.capacity_factor
    return model, model.forward(batch["tokens"], batch["positions"], batch["segment_ids"], logits=False, **kwargs)


def _nll_sum(model, out, batch, settings: StepSettings, token_weights=None):
    """Σ NLL of the next-token targets (times token_weights, default 1 on every target), and the target mask."""
    targets, mask = next_token_targets(batch["tokens"], batch["segment_ids"])
    weights = mask.astype(jnp.float32) if token_weights is None else mask * token_weights
    with jax.named_scope("cross_entropy"):
        nll = linear_cross_entropy(out.hidden, model.head_weight(), targets, weights, settings.loss_chunk,
                                   settings.logits_dtype)
    return nll, mask


def microbatch_loss(params, batch, n_tokens, n_rows, *, graphdef, settings: StepSettings):
    """This micro-batch's share of the full batch's loss: CE summed / all target tokens, balance losses summed over
    its rows / all rows. Summing over micro-batches gives exactly the loss (and gradient) of the whole batch."""
    model, out = _forward(graphdef, params, batch, settings)
    ce, _ = _nll_sum(model, out, batch, settings, 1.0 / n_tokens)
    metrics = {"ce": ce}
    loss = ce
    c = model.config
    rows = batch["tokens"].shape[0]
    if out.router is not None:
        (l_exp, l_dev, l_comm), load = balance_losses(out.router, batch["segment_ids"] > 0, c.num_experts,
                                                      c.num_experts_per_tok, settings.groups, settings.limit)
        a1, a2, a3 = settings.alphas
        share = rows / n_rows
        metrics.update(expert_balance=a1 * l_exp * share, device_balance=a2 * l_dev * share,
                       comm_balance=a3 * l_comm * share, expert_load=load * share)
        loss = loss + metrics["expert_balance"] + metrics["device_balance"] + metrics["comm_balance"]
        dropped = getattr(out, "dropped", None)
        if dropped is not None:
            metrics["dropped_fraction"] = dropped * share
    return loss, metrics


def train_step(params, opt_state, batch, *, graphdef, optimizer, settings: StepSettings):
    """One optimizer step over a batch of [grad_accum, rows, seq] arrays. Returns new params, opt_state, metrics."""
    _, mask = jax.vmap(next_token_targets)(batch["tokens"], batch["segment_ids"])
    n_tokens = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    n_rows = batch["tokens"].shape[0] * batch["tokens"].shape[1]
    grad_fn = jax.value_and_grad(functools.partial(microbatch_loss, graphdef=graphdef, settings=settings), has_aux=True)

    def accumulate(carry, micro):
        (loss, metrics), grads = grad_fn(params, micro, n_tokens, n_rows)
        if carry is None:
            return loss, metrics, grads
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads))

    if batch["tokens"].shape[0] == 1:
        loss, metrics, grads = accumulate(None, jax.tree.map(lambda x: x[0], batch))
    else:
        first = accumulate(None, jax.tree.map(lambda x: x[0], batch))
        (loss, metrics, grads), _ = jax.lax.scan(lambda c, m: (accumulate(c, m), None), first,
                                                 jax.tree.map(lambda x: x[1:], batch))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics.update(loss=loss, grad_norm=global_norm(grads, by_layer=not settings.scan_layers), tokens=n_tokens)
    return params, opt_state, metrics


def eval_step(params, batch, *, graphdef, settings: StepSettings):
    """(sum of next-token NLL, number of target tokens) of one batch, dropless."""
    settings = dataclasses.replace(settings, capacity_factor=None, remat="none")
    model, out = _forward(graphdef, params, batch, settings)
    nll, mask = _nll_sum(model, out, batch, settings)
    return nll, jnp.sum(mask)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × activated non-embedding parameters (lm_head included) plus causal attention,
    3 × (2 matmuls × S/2 keys × H × (d_qk + d_v)) per layer."""
    _, activated = count_params(config)
    attention = 3 * config.num_hidden_layers * config.num_attention_heads * (
        config.qk_head_dim + config.v_head_dim) * seq_len
    return 6.0 * activated + attention


def peak_flops(recipe: Recipe) -> float | None:
    if recipe.peak_tflops:
        return recipe.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def to_global(batch: dict, mesh) -> dict:
    """Process-local numpy rows -> global arrays split over the batch axes (or plain device arrays)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, leading=v.ndim - 2), v)
            for k, v in batch.items()}


def jit_steps(graphdef, optimizer, settings: StepSettings, mesh, params=None, opt_state=None,
              compiler_options: dict | None = None):
    """The jitted train and eval steps; under a mesh, traced inside activation_mesh so activations are constrained,
    and the new params / optimizer state keep the shardings of the given ones (gradients are reduced into them).
    compiler_options: XLA's options for both compilations; None: `training_compiler_options()`."""
    if compiler_options is None:
        compiler_options = training_compiler_options()
    train = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, settings=settings)
    evaluate = functools.partial(eval_step, graphdef=graphdef, settings=settings)

    def under_mesh(fn):
        def wrapped(*args):
            with activation_mesh(mesh):
                return fn(*args)
        return wrapped

    out_shardings = None
    if mesh is not None and params is not None:
        keep = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        out_shardings = (keep(params), keep(opt_state), None)
    train_jit = jax.jit(under_mesh(train), donate_argnums=(0, 1), out_shardings=out_shardings,
                        compiler_options=compiler_options)
    return train_jit, jax.jit(under_mesh(evaluate), compiler_options=compiler_options)


def init_train_state(config: ModelConfig, recipe: Recipe, optimizer, mesh):
    """(graphdef, params, opt_state), params in param_dtype, created directly in their shardings under a mesh."""
    from . import sharding

    dtype, param_dtype = DTYPES[recipe.dtype], DTYPES[recipe.param_dtype]
    model = sharding.init_model(config, mesh=mesh, dtype=dtype, param_dtype=param_dtype, seed=recipe.seed)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    opt_state = on_mesh(jax.jit(optimizer.init)(params), mesh)
    return graphdef, params, opt_state


def on_mesh(tree, mesh):
    """Leaves not yet laid out on the mesh (e.g. the optimizer's step counters) -> replicated over it."""
    if mesh is None:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), tree)


# ---------------------------------------------------------------------------------------------------- checkpoints
class TrainCheckpoints:
    """orbax CheckpointManager over WORKDIR/checkpoints: params, opt_state, data iterator, step, model config.

    Saves are asynchronous; a step directory becomes visible only once complete, so a save killed midway leaves
    the previous checkpoint as the latest.
    """

    def __init__(self, workdir: str, every: int, keep: int):
        import orbax.checkpoint as ocp
        from .checkpoint import CHECKPOINTS

        self.ocp = ocp
        self.every = every
        self._save_args = None  # the params' storage_args, made at the first save
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether save(step) would write a checkpoint (without force): every `every` steps. (orbax's own
        interval would also save the first step of a run.)"""
        return step % self.every == 0 and step != self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state: dict, config: ModelConfig, force=False) -> bool:
        from .checkpoint import MODEL_CONFIG, PARAMS, storage_args

        if not (self.due(step) or (force and step != self.manager.latest_step())):
            return False
        if self._save_args is None:
            self._save_args = storage_args(config)
        a = self.ocp.args
        return self.manager.save(step, force=True, args=a.Composite(**{
            PARAMS: a.StandardSave(params, save_args=self._save_args), "opt_state": a.StandardSave(opt_state),
            "data": a.JsonSave(data_state), "train_state": a.JsonSave({"step": step}),
            MODEL_CONFIG: a.JsonSave(config.to_hf_dict())}))

    def restore(self, step: int, params, opt_state):
        """Restores into the structure, dtypes and shardings of the given (live or abstract) params/opt_state."""
        from .checkpoint import PARAMS

        a = self.ocp.args
        abstract = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
        out = self.manager.restore(step, args=a.Composite(**{
            PARAMS: a.StandardRestore(abstract(params)), "opt_state": a.StandardRestore(abstract(opt_state)),
            "data": a.JsonRestore(), "train_state": a.JsonRestore()}))
        return out[PARAMS], out["opt_state"], out["data"], out["train_state"]["step"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


# ---------------------------------------------------------------------------------------------------- the loop
class NonFiniteLoss(RuntimeError):
    pass


def build_mesh(recipe: Recipe):
    """The recipe's mesh, or None for a single device."""
    sizes = dict(recipe.mesh or {})
    if all(v == 1 for v in sizes.values()) or (jax.device_count() == 1 and all(v in (1, -1) for v in sizes.values())):
        return None
    from .sharding import make_mesh
    return make_mesh(**sizes)


def check_same_model(workdir: str, config: ModelConfig) -> list[str]:
    """The model config fields in which the recipe differs from a workdir's latest checkpoint. An error naming
    them where the parameters' shapes differ too (another model); otherwise (e.g. a longer context or other
    rope settings) the run may go on with the recipe's."""
    from .checkpoint import find_step_dir, read_config
    from .model import abstract_model
    from .weights import param_shapes

    stored_config = read_config(find_step_dir(workdir))
    stored, wanted = stored_config.to_hf_dict(), config.to_hf_dict()
    differ = [f"{k} {stored.get(k)!r} there, {wanted.get(k)!r} in the recipe"
              for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if differ and param_shapes(abstract_model(stored_config)) != param_shapes(abstract_model(config)):
        raise ValueError(f"{workdir} holds a checkpoint of another model: {', '.join(differ)}; use a new workdir, "
                         "or the recipe of that run")
    return differ


def train(recipe: Recipe, workdir: str, *, stop_after: int | None = None, progress: bool = True) -> list[dict]:
    """Trains (or resumes) in workdir. Returns the logged records of this invocation.

    stop_after: leave after this many steps of this invocation (saving a checkpoint), without changing the
    schedule; a later call resumes from it.
    """
    from tqdm import tqdm
    from .metrics import MetricsWriter

    os.makedirs(workdir, exist_ok=True)
    config = recipe.model_config()
    mesh = build_mesh(recipe)
    is_main = jax.process_index() == 0
    n_proc = jax.process_count()
    if recipe.batch_size % (recipe.grad_accum * n_proc):
        raise ValueError(f"batch_size={recipe.batch_size} must divide into grad_accum={recipe.grad_accum} × "
                         f"{n_proc} processes")
    rows = recipe.batch_size // n_proc  # per process, all micro-batches
    if (recipe.batch_size // recipe.grad_accum) % (shards := batch_shards(mesh)):
        raise ValueError(f"batch_size={recipe.batch_size} / grad_accum={recipe.grad_accum} rows a micro-batch "
                         f"do not split over the mesh's {shards} batch shards (data × fsdp × expert)")
    data = Pipeline(recipe.data, rows, "train", process_index=jax.process_index(), process_count=n_proc,
                    model_config=config)
    eval_data = None if recipe.data.eval_fraction <= 0 else EvalData(recipe, config)
    optimizer = make_optimizer(recipe.optimizer, recipe.steps, recipe.scan_layers)
    schedule = learning_rate_schedule(recipe.optimizer, recipe.steps)
    graphdef, params, opt_state = init_train_state(config, recipe, optimizer, mesh)
    groups, limit = balance_groups(config, recipe.balance, mesh) if config.num_moe_layers else (1, 1)
    settings = StepSettings(recipe.remat, recipe.capacity_factor,
                            (recipe.balance.alpha1, recipe.balance.alpha2, recipe.balance.alpha3), groups, limit,
                            recipe.loss_chunk, recipe.scan_layers, recipe.logits_dtype)
    train_fn, eval_fn = jit_steps(graphdef, optimizer, settings, mesh, params, opt_state)
    ckpt = TrainCheckpoints(workdir, recipe.checkpoint_every, recipe.keep_checkpoints)
    step = 0
    if ckpt.latest_step() is not None:
        changed = check_same_model(workdir, config)
        params, opt_state, data_state, step = ckpt.restore(ckpt.latest_step(), params, opt_state)
        data.restore(data_state)
        if is_main:
            print(f"resumed from {workdir} at step {step}" + (f"; model settings changed: {', '.join(changed)}"
                                                              if changed else ""))
    writer = MetricsWriter(workdir, enabled=is_main, after_step=step)
    fpt = flops_per_token(config, recipe.data.seq_len)
    peak = peak_flops(recipe)
    last = recipe.steps if stop_after is None else min(recipe.steps, step + stop_after)
    bar = tqdm(total=recipe.steps, initial=step, disable=not (progress and is_main), dynamic_ncols=True,
               desc="train")
    records, window, t0 = [], [], time.perf_counter()

    def check(checked_step, metrics):
        loss = float(metrics["loss"])  # waits for that step
        if not math.isfinite(loss):
            kept = ckpt.latest_step()
            raise NonFiniteLoss(f"loss is {loss} at step {checked_step}; stopping. " + (
                f"The last good checkpoint (step {kept}) is kept in {workdir}" if kept is not None else
                f"No checkpoint was saved before it in {workdir}"))

    # A step's loss is checked once the next step is queued behind it, so the host prepares and dispatches step
    # n + 1 while the device runs step n; before a log, an evaluation or a save the step is checked at once, so
    # nothing after a non-finite loss is logged or saved.
    unchecked = None
    try:
        while step < last:
            batch = next(data)
            batch = {k: v.reshape(recipe.grad_accum, rows // recipe.grad_accum, -1) for k, v in batch.items()}
            params, opt_state, metrics = train_fn(params, opt_state, to_global(batch, mesh))
            step += 1
            if unchecked is not None:
                check(*unchecked)
            unchecked = (step, metrics)
            window.append(metrics)
            eval_now = step % recipe.eval_every == 0 or step == recipe.steps
            log_now = step % recipe.log_every == 0 or step == last or eval_now
            if log_now or ckpt.due(step):
                check(*unchecked)
                unchecked = None
            if log_now:
                record = _log_record(window, step, schedule, time.perf_counter() - t0, fpt, peak)
                window = []
                if eval_now:
                    record.update(evaluate(recipe, config, eval_fn, params, mesh, eval_data))
                t0 = time.perf_counter()
                writer.write(record)
                records.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_sec']:.0f}")
            bar.update(1)
            ckpt.save(step, params, opt_state, data.state(), config, force=(step == last))
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    return records


def _log_record(window: list[dict], step: int, schedule, seconds: float, fpt: float, peak: float | None) -> dict:
    host = jax.device_get(window)
    mean = lambda key: float(np.mean([m[key] for m in host]))  # noqa: E731
    tokens = float(np.sum([m["tokens"] for m in host]))
    record = {"step": step, "loss": mean("loss"), "ce_loss": mean("ce"), "lr": float(schedule(step - 1)),
              "grad_norm": mean("grad_norm"), "tokens_per_sec": tokens / max(seconds, 1e-9)}
    record["mfu"] = record["tokens_per_sec"] * fpt / (peak * jax.device_count()) if peak else None
    if "expert_balance" in host[-1]:
        for key in ("expert_balance", "device_balance", "comm_balance"):
            record[key] = mean(key)
        record["dropped_fraction"] = mean("dropped_fraction") if "dropped_fraction" in host[-1] else 0.0
        load = np.mean([m["expert_load"] for m in host], axis=0)  # [L, E]
        record["expert_load"] = np.round(load, 5).tolist()
        record["expert_load_max_over_mean"] = np.round(load.max(-1) / load.mean(-1), 4).tolist()
    return record


class EvalData:
    """The held-out split's batches of the same rows as the train step's micro-batches, built once: `batches()`
    yields the first `eval_batches` × grad_accum of them, from the split's start each time."""

    def __init__(self, recipe: Recipe, config: ModelConfig):
        self.count = recipe.eval_batches * recipe.grad_accum
        rows = recipe.batch_size // jax.process_count() // recipe.grad_accum
        try:
            self.pipeline = Pipeline(recipe.data, rows, "eval", process_index=jax.process_index(),
                                     process_count=jax.process_count(), model_config=config)
        except ValueError as e:
            if "eval split" not in str(e):
                raise
            raise ValueError(f"{e} (data.eval_fraction={recipe.data.eval_fraction}; set data.eval_fraction=0 to "
                             "train without a held-out loss)") from None

    def batches(self):
        self.pipeline.restart()
        for _ in range(self.count):
            yield next(self.pipeline)


def evaluate(recipe: Recipe, config: ModelConfig, eval_fn, params, mesh, data: EvalData | None = None) -> dict:
    """Mean next-token loss and perplexity over the first eval_batches batches of the held-out split, each in
    grad_accum micro-batches as the train step takes them."""
    if recipe.data.eval_fraction <= 0:
        return {}
    data = data or EvalData(recipe, config)
    # every batch dispatched before the first result is read: one wait, not one per batch
    sums = jax.device_get([eval_fn(params, to_global(batch, mesh)) for batch in data.batches()])
    total, count = sum(float(nll) for nll, _ in sums), sum(float(n) for _, n in sums)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
