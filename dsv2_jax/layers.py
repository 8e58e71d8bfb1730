"""The small shared pieces: parameters with logical axis names, RMSNorm, SwiGLU MLP, embedding."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .grouped_matmul import (added_as_xla_adds, grouped_matmul_backend, interpreted, kernel_layer, layer_operand,
                             power_of_two, rms_normalised, rms_scale, stacked_matvec, tiles_fit, warn_if_installed)
from .sharding import constrain


def param(rngs: nnx.Rngs | None, shape, axes: tuple, dtype, std: float | None = None) -> nnx.Param:
    """A parameter carrying its logical axis names; normal(0, std) when std is given, else ones (norms)."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and axes {axes} differ in rank")
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


@functools.cache
def kernel_backend(env_var: str, fallback: str) -> str:
    """'tokamax' (its Hopper kernels; an optional dependency) on GPU where it imports, else `fallback`.

    The environment variable forces either: e.g. DSV2_ATTENTION=xla|tokamax.
    """
    choice = os.environ.get(env_var, "auto")
    if choice not in ("auto", fallback, "tokamax"):
        raise ValueError(f"{env_var} must be auto, {fallback} or tokamax, got {choice!r}")
    if choice != "auto":
        return choice
    if jax.default_backend() != "gpu":
        return fallback
    try:
        import tokamax  # noqa: F401
    except Exception as e:  # not installed (silently), or its imports fail on this machine (with a warning)
        warn_if_installed("tokamax", e)
        return fallback
    return "tokamax"


def kernel_backends() -> dict[str, str]:
    """The kernel paths this process takes, by role, as benchmark records report them: `attention` (xla | tokamax)
    and `grouped_matmul` (ragged_dot | pallas | tokamax; under the save_dots remat policy the differentiated
    products run on pallas where this says tokamax)."""
    return {"attention": kernel_backend("DSV2_ATTENTION", "xla"), "grouped_matmul": grouped_matmul_backend()}


def cast(p: nnx.Param, dtype) -> jnp.ndarray:
    return p[...].astype(dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) in float32, cast back to the compute dtype, times the weight."""

    def __init__(self, size: int, eps: float, *, dtype, param_dtype, axis_name: str = "norm"):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(None, (size,), (axis_name,), param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return rms_norm(x, self.weight[...], self.eps, self.dtype)


def rms_norm(x, weight, eps, dtype):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return xf.astype(dtype) * weight.astype(dtype)


def rms_norm_rows_fits(width: int) -> bool:
    """Whether `rms_norm_rows` takes rows of this width (a power of two: the kernel loads a row whole)."""
    return power_of_two(width)


def _rms_norm_rows_kernel(layer_ref, x_ref, w_ref, *refs, eps, router_block, added, at):
    """Program (b, g): row b of x normalised, times the weights of layer `kernel_layer(layer_ref, at)` (as
    `rms_norm`; written by the g = 0 programs). With a router: its float32 product over the normalised row's
    columns [g·router_block, (g+1)·router_block) (each program recomputing its slice after the row's scale). added
    (a number of partial sums): the row is x plus the sum of those float32 partials, rounded to x's type and added
    as XLA adds two arrays of that type; the g = 0 programs also write it (the last output)."""
    router_ref, parts_ref = refs[:bool(router_block)], refs[bool(router_block):bool(router_block) + bool(added)]
    o_ref, *outs = refs[bool(router_block) + bool(added):]
    b, layer, f32 = pl.program_id(0), kernel_layer(layer_ref, at), jnp.float32

    def row(cols):
        x = x_ref[b, cols]
        if not added:
            return x.astype(f32)
        total = parts_ref[0][0, b, cols]
        for i in range(1, added):
            total += parts_ref[0][i, b, cols]
        return added_as_xla_adds(x, total).astype(f32)

    def normed(x, cols, scale):
        return rms_normalised(x, scale, w_ref[layer, cols], o_ref.dtype)

    x = row(slice(None))
    scale = rms_scale(x, eps)

    @pl.when(pl.program_id(1) == 0)
    def _():
        o_ref[b, :] = normed(x, slice(None), scale)
        if added:
            outs[-1][b, :] = x.astype(outs[-1].dtype)

    if router_block:
        g = pl.program_id(1)
        cols = pl.ds(g * router_block, router_block)
        n = normed(row(cols), cols, scale).astype(f32)
        outs[0][g, b, :] = (n[:, None] * router_ref[0][layer, cols, :].astype(f32)).sum(axis=0)


ROUTER_ROWS = 128  # rms_norm_rows with a router: the router's contraction rows per program
ONE_ROW_ROUTER_ROWS = 64  # the same for one row: more programs (attention.ONE_ROW_TILES)


def rms_norm_rows_takes_router(width: int, experts: int) -> bool:
    """Whether `rms_norm_rows` takes a router of `experts` columns over rows of `width`."""
    return rms_norm_rows_fits(width) and power_of_two(experts)


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "interpret"))
def rms_norm_rows(x, weight, layer, router=None, added=None, *, eps: float, dtype, interpret: bool | None = None):
    """`rms_norm` of a decoding step's rows x [..., D] in one kernel (XLA runs a reduce and an apply kernel), with
    layer `layer` (an int32 scalar or a `LayerIndex`) of stacked weights [L, D], read by the kernel (a slice handed to
    a kernel would be copied). D a power of two (`rms_norm_rows_fits`). interpret: Pallas's interpreter (default:
    off GPU).
    router: stacked router weights [L, D, E] (E a power of two): the same kernel then also returns the router's
    float32 partial products [D / ROUTER_ROWS (ONE_ROW_ROUTER_ROWS for one row), T, E] of the T normalised rows
    (as rounded to dtype) with layer `layer` of it, for `moe.route_kernel`, where a `stacked_matvec` would take one
    more kernel.
    added: float32 partial sums [S, R >= T, D] of something to add to x first (a product's unsummed partials,
    `grouped_matmul.stacked_partials`): the kernel normalises x + that sum (rounded to x's type, as `x + sum` would
    be in XLA, where it takes a kernel of its own) and also returns the sum, last.
    Returns the normalised rows, then the router's partials (with a router), then x + added (with added)."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    T = rows.shape[0]
    block = 0 if router is None else min(ROUTER_ROWS if T > 1 else ONE_ROW_ROUTER_ROWS, D)
    if (weight.ndim != 2 or weight.shape[1] != D or not rms_norm_rows_fits(D) or
            (router is not None and (router.ndim != 3 or router.shape[1] != D
                                     or not rms_norm_rows_takes_router(D, router.shape[2]))) or
            (added is not None and (added.ndim != 3 or added.shape[1] < T or added.shape[2] != D))):
        raise ValueError(f"rms_norm_rows: rows of {D} (a power of two) against stacked weights {weight.shape}, "
                         f"router {None if router is None else router.shape} (a power of two of experts) and "
                         f"partials to add {None if added is None else added.shape} ([S, >= {T}, {D}])")
    extra = tuple(a for a in (router, added) if a is not None)
    out_shape = [jax.ShapeDtypeStruct(rows.shape, dtype)]
    if router is not None:
        out_shape.append(jax.ShapeDtypeStruct((D // block, T, router.shape[2]), jnp.float32))
    if added is not None:
        out_shape.append(jax.ShapeDtypeStruct(rows.shape, x.dtype))
    layer, at = layer_operand(layer)
    out = pl.pallas_call(
        functools.partial(_rms_norm_rows_kernel, eps=eps, router_block=block,
                          added=0 if added is None else added.shape[0], at=at),
        out_shape=out_shape,
        grid=(T, D // block if router is not None else 1),
        in_specs=[pl.no_block_spec] * (3 + len(extra)),
        out_specs=[pl.no_block_spec] * len(out_shape),
        name="rms_norm_rows",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpreted(interpret),
    )(layer, rows, weight, *extra)
    out = list(out)
    out[0] = out[0].reshape(x.shape)
    if added is not None:
        out[-1] = out[-1].reshape(x.shape)
    return out[0] if len(out) == 1 else tuple(out)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and the shared experts."""

    def __init__(self, hidden: int, intermediate: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.gate_proj = param(rngs, (hidden, intermediate), ("embed", "mlp"), param_dtype, std)
        self.up_proj = param(rngs, (hidden, intermediate), ("embed", "mlp"), param_dtype, std)
        self.down_proj = param(rngs, (intermediate, hidden), ("mlp", "embed"), param_dtype, std)

    @jax.named_scope("mlp")
    def __call__(self, x: jnp.ndarray, stacks: tuple | None = None) -> jnp.ndarray:
        """x [..., hidden]. stacks, for a decoding step: (gate, up, down, layer), the stacks [L, ...] this module
        was sliced from, in the compute dtype (gate and up may be None), and the layer's index. Their products
        then run on `stacked_matvec`, reading the layer out of the stacks, where XLA's products would copy the
        layer's slice first (and pad V2-Lite's dense 10,944-row down_proj for its split-K product every step)."""
        x = x.astype(self.dtype)
        gate_s, up_s, down_s, layer = stacks if stacks is not None else (None,) * 4
        if gate_s is not None and up_s is not None and tiles_fit(*gate_s.shape[1:], up_s.shape[2]):
            rows = x.reshape(-1, x.shape[-1])
            gate, up = (y.astype(self.dtype).reshape(*x.shape[:-1], -1)
                        for y in stacked_matvec(rows, (gate_s, up_s), layer))
        else:
            gate = x @ cast(self.gate_proj, self.dtype)
            up = x @ cast(self.up_proj, self.dtype)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        if down_s is not None and tiles_fit(*down_s.shape[1:]):
            rows = h.reshape(-1, h.shape[-1])
            return stacked_matvec(rows, down_s, layer).astype(self.dtype).reshape(*h.shape[:-1], -1)
        return h @ cast(self.down_proj, self.dtype)


@jax.custom_vjp
def embedding_lookup(table: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """table[ids]. The table's gradient sums the rows of repeated ids in float32 and rounds the sum once to the
    table's dtype, as torch's embedding backward does. Autodiff would scatter-add them in the table's dtype: in
    bf16 a frequent token's sum stops growing once it is ~2^8 times one row's contribution."""
    return jnp.take(table, ids, axis=0)


def _embedding_lookup_fwd(table, ids):
    return jnp.take(table, ids, axis=0), (table, ids)


def _embedding_lookup_bwd(residuals, d):
    table, ids = residuals
    rows = d.reshape(-1, d.shape[-1]).astype(jnp.float32)
    d_table = constrain(jnp.zeros(table.shape, jnp.float32), ("vocab", "embed")).at[ids.reshape(-1)].add(rows)
    return d_table.astype(table.dtype), None


embedding_lookup.defvjp(_embedding_lookup_fwd, _embedding_lookup_bwd)


class Embed(nnx.Module):
    def __init__(self, vocab: int, hidden: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, (vocab, hidden), ("vocab", "embed"), param_dtype, std)

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        return embedding_lookup(self.embedding[...], ids).astype(self.dtype)
