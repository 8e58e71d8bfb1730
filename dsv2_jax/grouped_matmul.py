"""The grouped matmul of the routed experts, and its GPU kernels.

`grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]`: rows sorted by group, row block g times
rhs[g]. Rows past the groups (sum(group_sizes) < M) come out as zeros from ragged_dot and the Pallas kernels and
unspecified from tokamax: callers mask them. Its backward has two products: the input gradient (the same row-ragged
product with rhs transposed) and the weight gradient (each group's lhs rows transposed times its output-gradient
rows: the contraction runs over the ragged rows).

Backends, one picked per call (DSV2_GROUPED_MATMUL=auto|pallas|tokamax|ragged_dot forces one):
- `pallas`: two Pallas kernels (Triton lowering, any CUDA GPU): `ragged_matmul` for the forward and input gradient,
  `weight_gradient` for the weight gradient, joined by a custom VJP;
- `tokamax`: tokamax's Mosaic Hopper kernels for the forward and input gradient with tiles tuned on an H100 (from
  4,096 rows the input gradient runs on `_transposed_rhs_product`, the same kernel design reading the weights as
  they lie, where tokamax's op transposes them first), and for the weight gradient from 2,048 rows an expert jax's
  Mosaic GPU `transposed_ragged_dot` (jax.experimental.pallas.ops.gpu), below that or where that is missing this
  module's Pallas `weight_gradient` (tokamax's own was 2-8% wrong with its default tiles);
- `ragged_dot`: jax.lax.ragged_dot (CPU; float32 everywhere, which the bf16 kernels would compute at lower precision).
`auto` is ragged_dot off GPU and, on GPU, tokamax where it imports (else pallas), except inside `outputs_saved()`
(scanned layers under the save_dots remat policy, which keeps the experts' outputs for the backward pass): there the
forward and input gradient of differentiated calls run on the Pallas kernels. Inside a `lax.scan` the recomputation
in the backward pass keeps tokamax's kernels even when their outputs are kept (they are `plgpu.kernel`s, effectful;
measured: the same kernels run under save_dots as under full remat), while the Pallas kernels' recomputation is
dropped (bench/RESULTS.md §1: 94.5 → 90.5 ms per training step). With the layers unrolled (`forward(scan=False)`)
JAX drops tokamax's recomputed kernels too, and the model stays on tokamax there (RESULTS §15: 6% faster than Pallas
at 295k rows, ~2-3 GiB less peak memory). Undifferentiated calls (prefill, decoding) run on tokamax in every case.
The GPU kernels take bf16/f16 operands of one dtype whose widths are whole 128-column tiles (all DeepSeek-V2 models);
anything else goes to ragged_dot.

Decoding steps of a few tokens skip the grouped matmul: `chosen_experts_mlp` (two more Pallas kernels) reads each
token's chosen experts, and the shared experts, straight from the expert stacks (`use_chosen_experts` decides;
DSV2_DECODE_EXPERTS=auto|chosen|sorted forces a path).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import inspect
import itertools
import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BACKENDS = ("auto", "pallas", "tokamax", "ragged_dot")
_OUTPUTS_SAVED = contextvars.ContextVar("dsv2_grouped_matmul_outputs_saved", default=False)


@contextlib.contextmanager
def outputs_saved():
    """While tracing inside: the caller's remat policy keeps these grouped matmuls' outputs for the backward pass
    (model.remat_policy's save_dots) inside a lax.scan, so `auto` differentiates them with kernels whose
    recomputation JAX can drop there (the Pallas kernels; model.scan_layers enters it for scanned stacks only)."""
    token = _OUTPUTS_SAVED.set(True)
    try:
        yield
    finally:
        _OUTPUTS_SAVED.reset(token)


def grouped_matmul(lhs: jnp.ndarray, rhs: jnp.ndarray, group_sizes: jnp.ndarray) -> jnp.ndarray:
    """lhs [M, K] rows sorted by group, rhs [G, K, N], group_sizes [G] -> [M, N] (lhs.dtype): row block g times
    rhs[g]; rows past sum(group_sizes) are not specified (see the module docstring)."""
    group_sizes = group_sizes.astype(jnp.int32)
    K, N = rhs.shape[1:]
    low_precision = lhs.dtype == rhs.dtype and lhs.dtype in (jnp.bfloat16, jnp.float16)
    whole_tiles = K % 128 == 0 and N % 128 == 0
    backend = _backend(_OUTPUTS_SAVED.get()) if low_precision and whole_tiles else "ragged_dot"
    if backend == "pallas":
        return _pallas_grouped_matmul(lhs, rhs, group_sizes)
    if backend == "tokamax":
        return _tokamax_grouped_matmul(lhs, rhs, group_sizes)
    if backend == "tokamax+pallas":
        return _tokamax_pallas_grouped_matmul(lhs, rhs, group_sizes)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=lhs.dtype)


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The environment variable `name` (default "auto"), one of `choices`."""
    choice = os.environ.get(name, "auto")
    if choice not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {choice!r}")
    return choice


def warn_if_installed(package: str, error: Exception) -> None:
    """Warn that an optional `package` is installed but failed to import (`error`), so that the slower fallback its
    caller takes is never silent; say nothing where it is not installed. Callers cache their import attempts, so
    this runs once per caller."""
    try:
        installed = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken package can fail even to be found
        installed = True
    if installed:
        warnings.warn(f"{package} is installed but does not import ({type(error).__name__}: {error}); its GPU "
                      "kernels are not used and the fallback kernels run instead", RuntimeWarning, stacklevel=3)


@functools.cache
def _backend(outputs_saved: bool = False) -> str:
    """auto: on GPU, tokamax where it imports with the kernel classes this module configures (under
    `outputs_saved()`, "tokamax+pallas": tokamax undifferentiated, Pallas differentiated), else pallas; off GPU,
    ragged_dot."""
    choice = _env_choice("DSV2_GROUPED_MATMUL", BACKENDS)
    if choice == "tokamax" and _tokamax_ragged_dots() is None:
        raise ValueError("DSV2_GROUPED_MATMUL=tokamax, but tokamax (0.0.17's Hopper ragged-dot kernels) "
                         "does not import here")
    if choice != "auto":
        return choice
    if jax.default_backend() != "gpu":
        return "ragged_dot"
    if _tokamax_ragged_dots() is None:
        return "pallas"
    return "tokamax+pallas" if outputs_saved else "tokamax"


def grouped_matmul_backend() -> str:
    """The backend `grouped_matmul` takes here outside `outputs_saved()`: ragged_dot, pallas or tokamax."""
    return _backend()


# ---------------------------------------------------------------------------------------------------------------
# Pallas kernels (Triton lowering). Each program computes one [block_m, block_n] output tile in float32.

FORWARD_TILES = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
SMALL_FORWARD_TILES = dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)  # M <= 64: decoding
WEIGHT_GRADIENT_TILES = dict(block_k=128, block_n=128, block_rows=32, num_warps=4, num_stages=4)


def _row_tiles(group_sizes, M: int, block_m: int):
    """The work items of the row-ragged product: one per (group, block of block_m rows it touches).

    Rows past the groups are one more group (G), whose items write zeros. Returns (group [T], block [T],
    bounds [G + 2]) for a static T = cdiv(M, block_m) + G; items past the last have group G + 1 and no rows.
    """
    G = group_sizes.shape[0]
    sizes = jnp.concatenate([group_sizes, (M - group_sizes.sum())[None]])
    ends = jnp.cumsum(sizes)
    first = (ends - sizes) // block_m
    count = jnp.where(sizes > 0, (ends - 1) // block_m - first + 1, 0)
    item_end = jnp.cumsum(count)
    t = jnp.arange(pl.cdiv(M, block_m) + G, dtype=jnp.int32)
    group = jnp.searchsorted(item_end, t, side="right").astype(jnp.int32)
    g = jnp.minimum(group, G)
    block = first[g] + t - (item_end[g] - count[g])
    return group, block.astype(jnp.int32), jnp.concatenate([jnp.zeros(1, jnp.int32), ends]).astype(jnp.int32)


def _ragged_matmul_kernel(group_ref, block_ref, bounds_ref, x_ref, w_ref, o_ref, *, num_groups, block_m, block_n,
                          block_k, transpose_rhs):
    ni, t = pl.program_id(0), pl.program_id(1)
    g = jnp.minimum(group_ref[t], num_groups)  # items past the last: no rows of the tail in their block
    M, K = x_ref.shape
    r0 = block_ref[t] * block_m
    rows = r0 + jnp.arange(block_m)
    mine = ((rows >= bounds_ref[g]) & (rows < bounds_ref[g + 1]))[:, None]  # rows of this block in group g
    ns = pl.ds(ni * block_n, block_n)
    out = o_ref.at[pl.ds(r0, block_m), ns]

    @pl.when(g < num_groups)
    def _():
        in_rows = (rows < M)[:, None]

        def body(i, acc):
            ks = pl.ds(i * block_k, block_k)
            x = plgpu.load(x_ref.at[pl.ds(r0, block_m), ks], mask=in_rows, other=0.0)
            if transpose_rhs:
                return acc + plgpu.dot(x, plgpu.load(w_ref.at[g, ns, ks]), trans_b=True)
            return acc + plgpu.dot(x, plgpu.load(w_ref.at[g, ks, ns]))

        acc = jax.lax.fori_loop(0, K // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        plgpu.store(out, acc.astype(o_ref.dtype), mask=mine)

    @pl.when(g == num_groups)
    def _():
        plgpu.store(out, jnp.zeros((block_m, block_n), o_ref.dtype), mask=mine)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "block_m", "block_n", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def ragged_matmul(x, w, group_sizes, *, transpose_rhs: bool = False, block_m: int = 128, block_n: int = 128,
                  block_k: int = 64, num_warps: int = 4, num_stages: int = 4, interpret: bool = False):
    """x [M, K] rows sorted by group, w [G, K, N] ([G, N, K] with transpose_rhs), group_sizes [G] -> [M, N]
    (x.dtype), fp32 accumulation; rows past the groups are zeros. K % block_k == N % block_n == 0.

    One program per (block_n columns, work item), the work items being each (group, block of block_m rows) pair: a
    block that two groups share is computed twice, each program storing only its group's rows.
    """
    M, K = x.shape
    G = w.shape[0]
    N = w.shape[1] if transpose_rhs else w.shape[2]
    if K % block_k or N % block_n:
        raise ValueError(f"ragged_matmul: K={K}, N={N} must be multiples of block_k={block_k}, block_n={block_n}")
    group, block, bounds = _row_tiles(group_sizes.astype(jnp.int32), M, block_m)
    kernel = functools.partial(_ragged_matmul_kernel, num_groups=G, block_m=block_m, block_n=block_n,
                               block_k=block_k, transpose_rhs=transpose_rhs)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
        grid=(N // block_n, group.shape[0]),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=pl.no_block_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(group, block, bounds, x, w)


def _weight_gradient_kernel(bounds_ref, x_ref, dy_ref, o_ref, *, block_rows):
    ki, ni, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_k, block_n = o_ref.shape
    lo, hi = bounds_ref[g], bounds_ref[g + 1]
    ks, ns = pl.ds(ki * block_k, block_k), pl.ds(ni * block_n, block_n)

    def body(i, acc):
        r0 = lo + i * block_rows
        mask = (r0 + jnp.arange(block_rows) < hi)[:, None]
        x = plgpu.load(x_ref.at[pl.ds(r0, block_rows), ks], mask=mask, other=0.0)
        dy = plgpu.load(dy_ref.at[pl.ds(r0, block_rows), ns], mask=mask, other=0.0)
        return acc + plgpu.dot(x, dy, trans_a=True)

    acc = jax.lax.fori_loop(0, pl.cdiv(hi - lo, block_rows), body, jnp.zeros((block_k, block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_k", "block_n", "block_rows", "num_warps", "num_stages",
                                             "interpret"))
def weight_gradient(x, dy, group_sizes, *, block_k: int = 128, block_n: int = 128, block_rows: int = 32,
                    num_warps: int = 4, num_stages: int = 4, interpret: bool = False):
    """x [M, K], dy [M, N] rows sorted by group, group_sizes [G] -> [G, K, N] (x.dtype): x[rows of g]ᵀ dy[rows of g],
    accumulated in fp32 and rounded once; zeros for empty groups. K % block_k == N % block_n == 0.

    One program per (output tile, group), walking its group's rows block_rows at a time (masked at both ends), with
    the programs of one group adjacent so that its rows stay in L2.
    """
    K, N, G = x.shape[1], dy.shape[1], group_sizes.shape[0]
    if K % block_k or N % block_n:
        raise ValueError(f"weight_gradient: K={K}, N={N} must be multiples of block_k={block_k}, block_n={block_n}")
    bounds = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(group_sizes.astype(jnp.int32))])
    return pl.pallas_call(
        functools.partial(_weight_gradient_kernel, block_rows=block_rows),
        out_shape=jax.ShapeDtypeStruct((G, K, N), x.dtype),
        grid=(K // block_k, N // block_n, G),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.BlockSpec((None, block_k, block_n), lambda k, n, g: (g, k, n)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="grouped_matmul_weight_gradient",
    )(bounds, x, dy.astype(x.dtype))


def interpreted(interpret: bool | None = None) -> bool:
    """Where a Pallas kernel runs: `interpret` when given, else compiled on GPU and in Pallas's interpreter elsewhere
    (tests)."""
    return jax.default_backend() != "gpu" if interpret is None else interpret


def _kernel_args(tiles: dict) -> dict:
    """Tiles plus where the kernel runs (`interpreted`)."""
    return dict(tiles, interpret=interpreted())


def _forward_tiles(M: int) -> dict:
    return _kernel_args(SMALL_FORWARD_TILES if M <= 64 else FORWARD_TILES)


def _pallas_weight_gradient(lhs, dout, group_sizes):
    return weight_gradient(lhs, dout, group_sizes, **_kernel_args(WEIGHT_GRADIENT_TILES))


def _with_vjp(product, differentiated=None, product_weight_gradient=_pallas_weight_gradient):
    """The grouped matmul as a custom VJP over `product(lhs, rhs, group_sizes, transpose_rhs)` (the forward and the
    input gradient; `differentiated` in their place where given, when the call is differentiated) and
    `product_weight_gradient(lhs, dout, group_sizes)`. Its residuals are its inputs, so a remat policy that keeps its
    output (model.remat_policy's save_dots) does not run the forward product again in the backward pass, where JAX
    can drop the kernel (the Pallas kernels; not tokamax's, see the module docstring)."""
    differentiated = differentiated or product

    @jax.custom_vjp
    def matmul(lhs, rhs, group_sizes):
        return product(lhs, rhs, group_sizes, False)

    def fwd(lhs, rhs, group_sizes):
        return differentiated(lhs, rhs, group_sizes, False), (lhs, rhs, group_sizes)

    def bwd(res, dout):
        lhs, rhs, group_sizes = res
        dlhs = differentiated(dout, rhs, group_sizes, True)
        drhs = product_weight_gradient(lhs, dout, group_sizes)
        return dlhs, drhs.astype(rhs.dtype), None

    matmul.defvjp(fwd, bwd)
    return matmul


def _pallas_product(lhs, rhs, group_sizes, transpose_rhs: bool):
    return ragged_matmul(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, **_forward_tiles(lhs.shape[0]))


_pallas_grouped_matmul = _with_vjp(_pallas_product)


# ---------------------------------------------------------------------------------------------------------------
# tokamax (optional dependency)

@functools.cache
def _tokamax_ragged_dots():
    """tokamax's Hopper ragged-dot kernels with tile configs checked on an H100: (small, large) for M < / >= 4096
    rows; None where tokamax or those kernel classes are missing (tokamax 0.0.17's layout).

    Large: 128×128×64 tiles, 4 stages, persistent: 1.7× tokamax's default tiles (V2-Lite expert shapes); small:
    tokamax's default (decoding and small batches). Only their forward and input-gradient kernels are used (the
    large input gradient on `_transposed_rhs_product`, with the large config's tiles): tokamax's
    weight-gradient kernel returned gradients 2-8% off (relative norm) with its default tiles and inf or a few %
    error with most others (bench/RESULTS.md); this module's `weight_gradient` is right on every routing checked and
    2.9× faster than its one right config.
    """
    try:
        from tokamax._src import mosaic_gpu
        from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_common as common
        from tokamax._src.ops.ragged_dot.pallas_mosaic_gpu import PallasMosaicGpuRaggedDot
        from tokamax._src.ops.ragged_dot.pallas_mosaic_gpu_common import Config, MatmulDimension

        _ = (mosaic_gpu.tiled_swizzled_block_spec, mosaic_gpu.tiled_swizzled_smem,  # what _transposed_rhs_product
             common.GroupInfo.create_aligned, common.copy_ragged_smem_to_gmem)  # builds on
    except Exception as e:  # not installed, another layout, or its imports fail on this machine
        warn_if_installed("tokamax", e)
        return None
    large = Config(block_m=128, block_n=128, block_k=64, num_stages=4, split_k=1, persistent=True,
                   grid_minor_dim=MatmulDimension.M, grid_tile_width=1)
    return PallasMosaicGpuRaggedDot(), PallasMosaicGpuRaggedDot(config=large)


def _tokamax_product(lhs, rhs, group_sizes, transpose_rhs: bool):
    """lhs [M, K] × rhs [G, K, N] (× rhs [G, N, K]ᵀ with transpose_rhs) by tokamax's kernels, which take whole tiles
    of rows (below a tile, whole 16-byte rows): rows past the groups are padding that belongs to no group."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2 if transpose_rhs else 1]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    M = lhs.shape[0]
    pad = -M % (8 if M <= 64 else 128)
    lhs = jnp.pad(lhs, ((0, pad), (0, 0))) if pad else lhs
    small, large = _tokamax_ragged_dots()
    tiles = large.config
    if transpose_rhs and M >= 4096 and rhs.shape[1] % tiles.block_n == 0 and rhs.shape[2] % tiles.block_k == 0:
        out = _transposed_rhs_product(lhs, rhs, group_sizes, tiles)
    else:
        out = (large if M >= 4096 else small)(lhs, rhs, group_sizes=group_sizes, ragged_dot_dimension_numbers=dims,
                                              preferred_element_type=lhs.dtype)
    return out[:M] if pad else out


def _transposed_rhs_product(lhs, rhs, group_sizes, config):
    """lhs [M, K] times rhs[g] [N, K] transposed, for each group g's rows: tokamax's sm90 ragged-dot design (its
    persistent grid, group blocks aligned to 8 rows, power-of-two ragged stores, built from its helpers) with rhs's
    [N, K] tiles read as they lie and handed to wgmma transposed. tokamax's own op transposes rhs in XLA first,
    a pass over the expert weights before each input gradient (3 per MoE layer, ~0.6 ms a layer at V2-Lite
    widths, bench/RESULTS.md §20)."""
    from jax.experimental.pallas import mosaic_gpu as mgpu
    from jax.extend import backend
    from tokamax._src import mosaic_gpu as mgpu_lib
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_common as common

    m, k = lhs.shape
    g, n, _ = rhs.shape
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    m_blocks, n_iters, k_iters = pl.cdiv(m, bm) + g - 1, pl.cdiv(n, bn), pl.cdiv(k, bk)
    spec = functools.partial(mgpu_lib.tiled_swizzled_block_spec, delay_release=1)

    def kernel(lhs_gmem, rhs_gmem, group_id_gmem, start_gmem, size_gmem, block_start_gmem, o_gmem):
        def tile(m_offset, m_count, loop_info):
            mi, ni = mgpu.planar_snake(loop_info.index[0], (m_count, n_iters), config.grid_minor_dim,
                                       config.grid_tile_width)
            mi += m_offset
            gi, start, size = group_id_gmem[mi], start_gmem[mi], size_gmem[mi]
            block_start = pl.multiple_of(block_start_gmem[mi], 8)

            @pl.when(size > 0)
            def _():
                def accumulate(acc):
                    def step(_, lhs_smem, rhs_smem):
                        mgpu.wgmma(acc, lhs_smem, rhs_smem.T)
                        mgpu.wgmma_wait(1)

                    mgpu.emit_pipeline(
                        step, grid=(k_iters,), max_concurrent_steps=config.num_stages,
                        in_specs=(spec((pl.Element(bm), bk), lhs.dtype, lambda ki: (block_start, ki), "lhs"),
                                  spec((bn, bk), rhs.dtype, lambda ki: (ni, ki), "rhs")),
                    )(lhs_gmem, rhs_gmem.at[gi])
                    return acc[...]

                acc = pl.run_scoped(accumulate, mgpu.ACC((bm, bn)))
                out_smem = mgpu_lib.tiled_swizzled_smem((bm, bn), o_gmem.dtype, tiling_prefix=(1,), what="out")

                @functools.partial(pl.run_scoped, o_smem=out_smem)
                def _(o_smem):
                    o_smem[...] = acc.astype(o_smem.dtype)
                    mgpu.commit_smem()
                    common.copy_ragged_smem_to_gmem(o_smem, o_gmem, block_start=block_start, start_within_block=start,
                                                    actual_size=size, ns=pl.ds(ni * bn, bn), max_rows=min(bm, m))

        # blocks that surely hold rows first, then those that may be empty (tokamax's order, spreading the no-ops)
        full = pl.cdiv(m, bm)
        for m_offset, m_count in ((0, full), (full, m_blocks - full)):
            mgpu.nd_loop((m_count * n_iters,), collective_axes="sm")(functools.partial(tile, m_offset, m_count))

    info = common.GroupInfo.create_aligned(group_sizes, bm, m_blocks, 8)
    return mgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m, n), lhs.dtype), grid=(backend.get_default_device().core_count,),
        grid_names=("sm",), kernel_name="ragged_dot_transposed_rhs_sm90",
        compiler_params=mgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True),
    )(lhs, rhs, info.group_id, info.start_within_block, info.actual_size, info.block_start)


# jax's Mosaic GPU weight-gradient kernel (Hopper): 128×128 output tiles, 64 rows a step, 4 stages. At batch 12's
# size (294,912 rows over 64 experts, V2-Lite widths) 2.76 / 2.86 ms (gate/up, down) against the Pallas kernel's
# ~3.1-3.3 ms (a dense product of down's FLOPs: 2.82 ms); from ~2,048 rows an expert it is the faster one, below that
# the Pallas kernel (768 rows an expert, batch 2: 0.78 / 0.95 ms against 0.71 / 0.73; bench/RESULTS.md §37).
MOSAIC_WEIGHT_GRADIENT_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
MOSAIC_WEIGHT_GRADIENT_MIN_ROWS = 2048  # rows per group (on average) from which tokamax's backend takes it


@functools.cache
def _mosaic_transposed_ragged_dot():
    """jax.experimental.pallas.ops.gpu's `transposed_ragged_dot` (Mosaic GPU, Hopper), or None where that module is
    missing or takes other arguments than this module passes (an older or newer jax)."""
    try:
        from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

        op = transposed_ragged_dot_mgpu.transposed_ragged_dot
        if not {"group_sizes", *MOSAIC_WEIGHT_GRADIENT_TILES} <= set(inspect.signature(op).parameters):
            return None
    except Exception:  # the module is experimental: absent, renamed, or failing to import here
        return None
    return op


def _mosaic_weight_gradient(lhs, dout, group_sizes):
    """The weight gradient on jax's Mosaic GPU kernel where it imports and the widths are whole tiles, else on the
    Pallas kernel. The Mosaic kernel reads whole blocks of rows and zeroes the other groups' rows by multiplying
    them by 0, so a non-finite value in one group's rows also reaches its neighbours' gradients (the Pallas kernel's
    masked loads skip them); it takes a multiple of 8 rows, so others are padded with zero rows of no group."""
    op, tiles = _mosaic_transposed_ragged_dot(), MOSAIC_WEIGHT_GRADIENT_TILES
    if op is None or lhs.shape[1] % tiles["block_m"] or dout.shape[1] % tiles["block_n"]:
        return _pallas_weight_gradient(lhs, dout, group_sizes)
    pad = ((0, -lhs.shape[0] % 8), (0, 0))
    return op(jnp.pad(lhs, pad), jnp.pad(dout.astype(lhs.dtype), pad), group_sizes=group_sizes, **tiles)


def _tokamax_weight_gradient(lhs, dout, group_sizes):
    """The weight gradient beside tokamax's kernels: jax's Mosaic kernel from MOSAIC_WEIGHT_GRADIENT_MIN_ROWS rows a
    group on average, the Pallas kernel below, where it measured faster (bench/RESULTS.md §37)."""
    if lhs.shape[0] >= MOSAIC_WEIGHT_GRADIENT_MIN_ROWS * group_sizes.shape[0]:
        return _mosaic_weight_gradient(lhs, dout, group_sizes)
    return _pallas_weight_gradient(lhs, dout, group_sizes)


_tokamax_grouped_matmul = _with_vjp(_tokamax_product, product_weight_gradient=_tokamax_weight_gradient)
_tokamax_pallas_grouped_matmul = _with_vjp(_tokamax_product, _pallas_product,  # auto under outputs_saved()
                                           product_weight_gradient=_tokamax_weight_gradient)


# ---------------------------------------------------------------------------------------------------------------
# Decoding: the chosen experts of a few tokens, read straight from the expert stacks (Pallas, Triton lowering)

TILE = 16  # the rows, and the smallest width, of a tensor-core tile in the decoding kernels
DECODE_BACKENDS = ("auto", "chosen", "sorted")
CHOSEN_MAX_COPIES = 1.5  # auto takes the chosen-experts kernels up to this many (token, expert) copies per expert


@functools.cache
def _decode_backend() -> str:
    return _env_choice("DSV2_DECODE_EXPERTS", DECODE_BACKENDS)


def tiles_fit(*widths: int) -> bool:
    """Whether every width is a whole number of TILE-wide tiles, as the decoding kernels need."""
    return all(w % TILE == 0 for w in widths)


def power_of_two(n: int) -> bool:
    """Whether n is a power of two, as a Triton block that a kernel loads whole must be."""
    return n > 0 and n & (n - 1) == 0


def dot_precision(dtype):
    """A decoding kernel's dot precision for operands of `dtype`: float32 exact (Triton would use TF32)."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def use_chosen_experts(copies: int, num_experts: int, hidden: int, width: int) -> bool:
    """Whether a decoding step with `copies` (token, expert) pairs runs its experts on `chosen_experts_mlp`.

    DSV2_DECODE_EXPERTS=auto (on GPU, when copies <= CHOSEN_MAX_COPIES × num_experts: on V2-Lite the kernels were
    faster than the sorted path up to batch 16, 1.5 copies per expert, though some experts are then read more than
    once) | chosen | sorted (the grouped matmul over the copies sorted by expert). The kernels need hidden and
    expert widths that are multiples of 16; auto runs the sorted path otherwise.
    """
    choice = _decode_backend()
    if choice == "sorted":
        return False
    if not tiles_fit(hidden, width):
        if choice == "chosen":
            raise ValueError(f"DSV2_DECODE_EXPERTS=chosen: hidden {hidden} and expert width {width} must be "
                             "multiples of 16")
        return False
    return choice == "chosen" or (jax.default_backend() == "gpu" and copies <= CHOSEN_MAX_COPIES * num_experts)


def decode_block(block: int, *dims: int) -> int:
    """The largest power of two <= block dividing every dim (the kernels' tiles); at least TILE."""
    while block > TILE and any(d % block for d in dims):
        block //= 2
    if any(d % block for d in dims):
        raise ValueError(f"decoding kernels: widths {dims} must be multiples of {TILE}")
    return block


@struct.dataclass
class LayerIndex:
    """The layer of stacked weights (or of the cache) that a decoding kernel reads: counter · scale + offset, taken
    inside the kernel. counter is an int32 scalar, a layer loop's counter; scale and offset are static. A loop that
    runs `scale` layers an iteration hands each of them its counter as it is (offset k for the k-th), so that XLA
    computes no index of its own for them (each would be a kernel; bench/RESULTS.md §22)."""

    counter: jax.Array
    scale: int = struct.field(pytree_node=False, default=1)
    offset: int = struct.field(pytree_node=False, default=0)

    def value(self) -> jax.Array:
        """The index as an XLA value, for what runs outside the kernels."""
        return self.counter * self.scale + self.offset

    def plus(self, offset: int) -> "LayerIndex":
        return self.replace(offset=self.offset + offset)


def layer_operand(layer, offset: int = 0) -> tuple[jax.Array, tuple[int, int]]:
    """A kernel's layer argument (an int, an int32 scalar or a `LayerIndex`), plus a static offset: the int32 [1]
    operand and the static (scale, offset) with which `kernel_layer` reads it."""
    if isinstance(layer, LayerIndex):
        return jnp.asarray(layer.counter, jnp.int32).reshape(1), (layer.scale, layer.offset + offset)
    return jnp.asarray(layer, jnp.int32).reshape(1), (1, offset)


def kernel_layer(ref, at: tuple[int, int]):
    """Inside a kernel: the layer that `layer_operand` passed as ref and at."""
    scale, offset = at
    return ref[0] * scale + offset


def rms_scale(row, eps: float):
    """Inside a kernel: the RMSNorm scale of a float32 row (its whole width), as `layers.rms_norm` takes it."""
    return jax.lax.rsqrt((row * row).sum() / row.shape[0] + eps)


def rms_normalised(x, scale, weight, dtype):
    """Inside a kernel: float32 x times its row's `rms_scale`, rounded to dtype, times the norm weights in dtype:
    `layers.rms_norm`'s rounding, shared by the kernels that normalise rows themselves."""
    return (x * scale).astype(dtype) * weight.astype(dtype)


def added_as_xla_adds(x, total):
    """Inside a kernel: x + a float32 sum, the sum rounded to x's type first and the two added as XLA adds two arrays
    of that type (in float32, rounded back): the residual adds that kernels take over from XLA."""
    f32 = jnp.float32
    return (x.astype(f32) + total.astype(x.dtype).astype(f32)).astype(x.dtype)


def matvecs(x_of, w_ofs, length: int, block_k: int, block_n: int, rows: int = 1):
    """x · w for each w in w_ofs, in one loop over the contraction: x_of(ks) [block_k] (or [16, block_k] with
    rows=16) and w_of(ks) [block_k, block_n] for ks the pl.ds blocks of [0, length) -> one [block_n] (or
    [16, block_n]) float32 per w.

    On tensor cores: one row is broadcast to the 16 rows a dot needs and the rows' max (all equal) is the product;
    the weight tiles then stream through shared memory, which Triton's pipeliner overlaps (measured on an H100: 88
    vs 114 µs per V2-Lite MoE layer with the multiply-and-reduce form)."""
    def body(i, accs):
        ks = pl.ds(i * block_k, block_k)
        x = x_of(ks)
        tile = jnp.broadcast_to(x[None, :], (TILE, block_k)) if rows == 1 else x
        return tuple(acc + jnp.dot(tile, w_of(ks).astype(x.dtype), precision=dot_precision(x.dtype),
                                   preferred_element_type=jnp.float32) for acc, w_of in zip(accs, w_ofs))

    zeros = tuple(jnp.zeros((TILE, block_n), jnp.float32) for _ in w_ofs)
    accs = jax.lax.fori_loop(0, length // block_k, body, zeros)
    return tuple(acc.max(axis=0) for acc in accs) if rows == 1 else accs


class GreedyRouting(NamedTuple):
    """Greedy top-k routing (`moe.route`'s "greedy"), for the kernels that take it themselves from the router's
    float32 partial products: top_k experts, their weights renormalised (norm) or times scaling."""
    top_k: int
    norm: bool
    scaling: float


def greedy_top_k(logits, routing: GreedyRouting):
    """Inside a kernel: the softmax of float32 logits [E] (E a power of two), then its greedy top-k (the highest
    score first, the lowest expert id among equal scores, as jax.lax.top_k) -> (scores [E], [top_k expert ids],
    [top_k weights])."""
    e = jnp.exp(logits - logits.max())
    scores = e / e.sum()
    ids = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    rest, experts, chosen = scores, [], []
    for _ in range(routing.top_k):  # argmax: one (value, index) reduction, the lowest index among equal values
        expert = jnp.argmax(rest).astype(jnp.int32)
        experts.append(expert)
        chosen.append(rest.max())
        rest = jnp.where(ids == expert, -1.0, rest)  # scores are >= 0
    total = functools.reduce(jnp.add, chosen) + 1e-20
    return scores, experts, [w / total if routing.norm else w * routing.scaling for w in chosen]


def _chosen_gate_up_kernel(layer_ref, experts_ref, x_ref, gate_ref, up_ref, *rest, num_routed, width, block_k,
                           block_n, at, routing=None):
    """Program (t, j, n): columns n of silu(x_t W_gate) * (x_t W_up) for token t's j-th expert (routed for
    j < num_routed, else the shared chunk j - num_routed of `width` columns), in layer `kernel_layer(layer_ref, at)`
    of the stacks.
    routing (a GreedyRouting): experts_ref holds the router's float32 partial products [S, >= T, E] instead of
    expert ids, and each routed program takes token t's routing from them itself (`greedy_top_k` of their sum, as
    `moe.route_kernel`); programs (t, 0, 0) also write its scores, weights and expert ids (the last three outputs)."""
    outputs = 4 if routing else 1
    shared, (h_ref, *routed) = rest[:len(rest) - outputs], rest[len(rest) - outputs:]
    t, j, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, D = kernel_layer(layer_ref, at), x_ref.shape[1]
    x_of = lambda ks: x_ref[t, ks]  # noqa: E731

    def store(w_gate, w_up):
        g, u = (p.astype(h_ref.dtype).astype(jnp.float32)
                for p in matvecs(x_of, (w_gate, w_up), D, block_k, block_n))
        h_ref[t, j, pl.ds(n * block_n, block_n)] = (g / (1.0 + jnp.exp(-g)) * u).astype(h_ref.dtype)

    @pl.when(j < num_routed)
    def _():
        if routing is None:
            e = experts_ref[t, j]
        else:
            scores, experts, weights = greedy_top_k(experts_ref[:, t, :].sum(axis=0), routing)
            e = functools.reduce(lambda e, k: jnp.where(j == k, experts[k], e), range(1, num_routed), experts[0])
            scores_ref, weights_ref, ids_ref = routed

            @pl.when((j == 0) & (n == 0))
            def _():
                scores_ref[t, :] = scores
                for k in range(num_routed):
                    weights_ref[t, k] = weights[k]
                    ids_ref[t, k] = experts[k]

        ns = pl.ds(n * block_n, block_n)
        store(lambda ks: gate_ref[layer, e, ks, ns], lambda ks: up_ref[layer, e, ks, ns])

    if shared:
        shared_gate_ref, shared_up_ref = shared

        @pl.when(j >= num_routed)
        def _():
            cols = pl.ds((j - num_routed) * width + n * block_n, block_n)
            store(lambda ks: shared_gate_ref[layer, ks, cols], lambda ks: shared_up_ref[layer, ks, cols])


def _chosen_down_kernel(layer_ref, experts_ref, h_ref, down_ref, *rest, num_routed, width, block_k, block_n, at,
                        combine=False, barriers=True):
    """Program (t, j, n): columns n of h[t, j] W_down for token t's j-th expert, float32.
    combine: the inputs end with the routing weights [T, K], the residual [T, D] and arrival counters
    [T, >= D / block_n] int32 (zeros), and the outputs with the new residual and the counters (the same buffer).
    Each program adds one to its column block's counter once its product is written; the last of the block's
    programs writes the block of residual + Σ_j coef_j · y_j (coef: j's weight, 1 for a shared chunk; j in order,
    the sum rounded to the residual's type before the add, as `moe.chosen_experts` and the residual add round) and
    sets the counter back to zero. barriers: the CTA barriers around the arrival (not in Pallas's interpreter,
    which runs one program at a time)."""
    inputs, outputs = (3, 3) if combine else (0, 1)
    shared = rest[:len(rest) - inputs - outputs]
    weights_ref, residual_ref, _ = rest[len(shared):len(shared) + inputs] if combine else (None,) * 3
    y_ref, *combined = rest[len(rest) - outputs:]
    t, j, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, ns = kernel_layer(layer_ref, at), pl.ds(n * block_n, block_n)
    h_of = lambda ks: h_ref[t, j, ks]  # noqa: E731

    @pl.when(j < num_routed)
    def _():
        e = experts_ref[t, j]
        (y_ref[t, j, ns],) = matvecs(h_of, (lambda ks: down_ref[layer, e, ks, ns],), width, block_k, block_n)

    if shared:
        (shared_down_ref,) = shared

        @pl.when(j >= num_routed)
        def _():
            r0 = (j - num_routed) * width
            (y_ref[t, j, ns],) = matvecs(
                h_of, (lambda ks: shared_down_ref[layer, pl.ds(r0 + ks.start, block_k), ns],), width, block_k, block_n)

    if combine:
        out_ref, counts_ref = combined
        if barriers:
            plgpu.debug_barrier()  # every thread's part of the product is written before the arrival (a release)
        arrived = plgpu.atomic_add(counts_ref, (t, n), jnp.ones((), jnp.int32))

        @pl.when(arrived == y_ref.shape[1] - 1)
        def _():
            if barriers:
                plgpu.debug_barrier()
            total = None
            for i in range(y_ref.shape[1]):  # the products (volatile: from L2, never a stale L1 line)
                y = plgpu.load(y_ref.at[t, jnp.int32(i), ns], volatile=True)
                y = y * weights_ref[t, i] if i < num_routed else y
                total = y if total is None else total + y
            out_ref[t, ns] = added_as_xla_adds(residual_ref[t, ns], total)
            counts_ref[t, n] = 0


class DecodeTiles(NamedTuple):
    """One decoding kernel's tiles: contraction block, column block, warps and pipeline stages per program."""
    block_k: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


DECODE_TILES = DecodeTiles()
# by the step's tokens, where they differ from DECODE_TILES (`python bench/decode_experts.py --sweep`, V2-Lite):
# 2 tokens: 2 pipeline stages (H100, gate/up 57.0 -> 52.8 µs; 4 tokens slower with 2, 99.5 -> 106.2); 1 token: 2
# warps, 128-wide gate/up tiles, 4-stage down (H200: 54.9 -> 50.7 µs per MoE layer for gate/up, 54.1 -> 50.5 down)
FEW_TOKEN_TILES = {1: dict(gate_up=DecodeTiles(128, 128, 2, 3), down=DecodeTiles(128, 64, 2, 4)),
                   2: dict(gate_up=DecodeTiles(num_stages=2), down=DecodeTiles(num_stages=2))}


def decode_tiles(kernel: str, tokens: int) -> DecodeTiles:
    """The chosen-experts kernel's ("gate_up" or "down") default tiles for a step of `tokens` tokens."""
    return FEW_TOKEN_TILES.get(tokens, {}).get(kernel, DECODE_TILES)


@functools.partial(jax.jit, static_argnames=("gate_up_tiles", "down_tiles", "interpret"))
def chosen_experts_mlp(x, experts, gate, up, down, shared=None, layer=None, *, gate_up_tiles: DecodeTiles | None = None,
                       down_tiles: DecodeTiles | None = None, interpret: bool | None = None):
    """The SwiGLU of each token through each of its chosen experts, read straight from the stacks (no sorting):
    for decoding, where a step has few tokens and each weight tile is read by one program per (token, expert).

    x [T, D]; experts [T, K] int32 expert ids; gate/up [E, D, I], down [E, I, D]; shared: optional (gate [D, S*I],
    up [D, S*I], down [S*I, D]) of the shared experts, computed as S more experts of width I per token.
    layer: with it, every weight has a leading layer axis ([L, E, D, I], [L, D, S*I], ...) and the kernels read
    layer `layer` (an int32 scalar or a `LayerIndex`) themselves: a slice of the stacks handed to a kernel would
    first be copied whole (measured: 0.9 ms per V2-Lite layer).
    Returns [T, K + S, D] float32: each expert's output, unweighted. Two kernels: gate/up with the activation
    (its output rounded to x.dtype, as the grouped path rounds), then down, each with its DecodeTiles (default
    `decode_tiles`); the blocks shrink to powers of two dividing D and I (multiples of 16).
    interpret: run in Pallas's interpreter (default: off GPU).
    """
    return _experts_kernels(x, experts.astype(jnp.int32), experts.shape[1], gate, up, down, shared, layer,
                            gate_up_tiles=gate_up_tiles, down_tiles=down_tiles, interpret=interpret)[0]


@functools.partial(jax.jit, static_argnames=("routing", "gate_up_tiles", "down_tiles", "interpret"))
def routed_experts_mlp(x, partials, residual, counts, gate, up, down, shared=None, layer=None, *,
                       routing: GreedyRouting, gate_up_tiles: DecodeTiles | None = None,
                       down_tiles: DecodeTiles | None = None, interpret: bool | None = None):
    """A decoding step's whole MoE layer after the router's product, added to the residual, in the two kernels of
    `chosen_experts_mlp` (same arguments, tiles and rounding) with two more jobs, which would otherwise take a
    kernel each: the gate/up kernel takes each token's greedy routing from the router's float32 partial products
    partials [S, R >= T, E] itself (as `moe.route_kernel`: E a power of two), and the down kernel adds the
    experts' weighted sum to the residual [T, D] (as `moe.chosen_experts` and then the residual add round it).
    counts: int32 zeros [T, >= D / 16] (`arrival_counts`), the down kernel's counters: the last of the programs
    that write a column block of a token sums it. They come back as zeros, in the same buffer (aliased), for the
    next layer's call.
    Returns (residual + the layer's output [T, D], counts, scores [T, E], weights [T, K], experts [T, K] int32)."""
    T, D = x.shape
    if (partials.ndim != 3 or partials.shape[1] < T or not power_of_two(partials.shape[2])
            or not power_of_two(partials.shape[0]) or routing.top_k > partials.shape[2]
            or residual.shape != x.shape or counts.dtype != jnp.int32 or counts.shape[0] != T
            or counts.shape[1] * TILE < D):
        raise ValueError(f"routed_experts_mlp: router partials [S, >= {T}, E] (S and E powers of two, E >= "
                         f"{routing.top_k}), a residual {x.shape} and int32 counts [{T}, >= {D // TILE}]; got "
                         f"{partials.shape}, {residual.shape} and {counts.dtype} {counts.shape}")
    return _experts_kernels(x, partials.astype(jnp.float32), routing.top_k, gate, up, down, shared, layer,
                            routing=routing, combine=(residual, counts), gate_up_tiles=gate_up_tiles,
                            down_tiles=down_tiles, interpret=interpret)


def arrival_counts(tokens: int, hidden: int) -> jax.Array:
    """`routed_experts_mlp`'s counters for steps of `tokens` tokens of width `hidden`: zeros, carried from one
    layer's call to the next."""
    return jnp.zeros((tokens, hidden // TILE), jnp.int32)


def _experts_kernels(x, experts, K: int, gate, up, down, shared, layer, *, routing: GreedyRouting | None = None,
                     combine=None, gate_up_tiles, down_tiles, interpret):
    """chosen_experts_mlp's and routed_experts_mlp's two kernels. experts: expert ids [T, K], or router partials
    with routing; combine: (residual, counts) for the down kernel to add the weighted sum to. Returns the down
    kernel's outputs, then the gate/up kernel's routing outputs (with routing)."""
    if layer is None:
        gate, up, down = gate[None], up[None], down[None]
        shared = None if shared is None else tuple(a[None] for a in shared)
        layer = 0
    T, D = x.shape
    I = gate.shape[3]
    S = 0 if shared is None else shared[0].shape[2] // I
    shared = () if shared is None else tuple(shared)
    layer, at = layer_operand(layer)

    def call(kernel, tiles, name, out_shape, columns, *args, **options):
        block_k, block_n = decode_block(tiles.block_k, D, I), decode_block(tiles.block_n, D, I)
        aliases = {len(args) - 1: len(out_shape) - 1} if options.get("combine") else {}
        return pl.pallas_call(
            functools.partial(kernel, num_routed=K, width=I, block_k=block_k, block_n=block_n, at=at, **options),
            out_shape=out_shape,
            grid=(T, K + S, columns // block_n),
            in_specs=[pl.no_block_spec] * len(args),
            out_specs=[pl.no_block_spec] * len(out_shape),
            input_output_aliases=aliases,
            name=name,
            compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
            interpret=interpreted(interpret),
        )(*args)

    f32, i32 = jnp.float32, jnp.int32
    routed = [] if routing is None else [jax.ShapeDtypeStruct((T, experts.shape[2]), f32),
                                         jax.ShapeDtypeStruct((T, K), f32), jax.ShapeDtypeStruct((T, K), i32)]
    h, *routed = call(_chosen_gate_up_kernel, gate_up_tiles or decode_tiles("gate_up", T),
                      "chosen_experts_gate_up" + ("_routing" if routing else ""),
                      [jax.ShapeDtypeStruct((T, K + S, I), x.dtype), *routed], I, layer, experts, x, gate, up,
                      *shared[:2], **({"routing": routing} if routing else {}))
    out_shape = [jax.ShapeDtypeStruct((T, K + S, D), f32)]
    extra = ()
    if combine is not None:
        residual, counts = combine
        out_shape += [jax.ShapeDtypeStruct(residual.shape, residual.dtype), jax.ShapeDtypeStruct(counts.shape, i32)]
        extra = (routed[1], residual, counts)
    out = call(_chosen_down_kernel, down_tiles or decode_tiles("down", T),
               "chosen_experts_down" + ("_residual" if combine is not None else ""), out_shape, D, layer,
               routed[2] if routing else experts, h, down, *shared[2:], *extra,
               **({"combine": True, "barriers": not interpreted(interpret)} if combine is not None else {}))
    return (*out[1:], *routed) if combine is not None else (out[0], *routed)


# The dense projections of a decoding step: a few tokens times one layer of a stacked weight (Pallas, Triton)

# programs: one token's products split further (measured on an H100, V2-Lite: q_proj 7.1 -> 6.3 µs, o_proj 5.2 -> 4.8)
MATVEC_TILES = dict(block_k=128, block_n=64, num_warps=4, num_stages=3, programs=256, one_token_programs=1024)
# steps of 33-64 tokens (every program multiplies 64 rows): a deeper pipeline over fewer programs. H200, V2-Lite, 64
# tokens, a MoE layer's input, o_proj and shared experts' products: 60.8 -> 55.9 µs (`bench/decode_projections.py
# --tokens 64 --sweep`, bench/RESULTS.md §26; 2-32 tokens not swept)
MATVEC_64_ROW_TILES = dict(num_stages=4, programs=128)
# a decoding step's projection products by (product, tokens), where their tiles differ from matvec_tiles'. One
# token: narrower programs over longer contraction spans, so that fewer float32 partial sums follow. "input" (q_proj
# or q_a_proj with kv_a_proj, one kernel): absorbed_query adds 4 instead of 16 (H200, V2-Lite, per MoE layer: the
# products 6.3 -> 6.0 µs, absorbed_query 4.0 -> 3.7 µs); "o_proj": XLA adds 4 instead of 16 with the residual (the
# product 4.3 -> 4.5 µs, the add 2.3 -> 1.7 µs). bench/RESULTS.md §11.
PROJECTION_TILES = {("input", 1): dict(block_n=32, num_warps=2, programs=512),
                    ("o_proj", 1): dict(block_n=32, num_warps=2, programs=256)}
# the most tokens of a step whose products run on stacked_matvec (auto's too): every program takes all of them, in
# 16-row tiles. The layer's weights and cache are then read in place, where XLA's products and attention on the
# layer's slices copy each weight and the cache's layer first (H200, V2-Lite, with the latent kernels' 16-row
# programs: batch 32 12.34 -> 11.38 ms a step in one process; bench/RESULTS.md §24-25)
MATVEC_MAX_TOKENS = 64
MATVEC_BACKENDS = ("auto", "pallas", "xla")


def matvec_tiles(tokens: int) -> dict:
    """`stacked_partials`' default tiles (block_k, block_n, num_warps, num_stages, programs) for `tokens` rows:
    MATVEC_TILES, with one_token_programs for one token and MATVEC_64_ROW_TILES' from 33 (PROJECTION_TILES may
    refine them per product)."""
    tiles = {k: v for k, v in MATVEC_TILES.items() if k != "one_token_programs"}
    if tokens == 1:
        tiles["programs"] = MATVEC_TILES["one_token_programs"]
    elif tokens > 32:
        tiles.update(MATVEC_64_ROW_TILES)
    return tiles


@functools.cache
def _matvec_backend() -> str:
    return _env_choice("DSV2_DECODE_PROJECTIONS", MATVEC_BACKENDS)


def reread_decode_choices() -> None:
    """Read DSV2_DECODE_EXPERTS and DSV2_DECODE_PROJECTIONS again (they are read once), and drop jax's compiled
    functions that were traced under the old choices."""
    _decode_backend.cache_clear()
    _matvec_backend.cache_clear()
    jax.clear_caches()


def use_stacked_matvec(tokens: int) -> bool:
    """Whether a decoding step of `tokens` tokens runs its attention projections and router on `stacked_matvec`.

    DSV2_DECODE_PROJECTIONS=auto (on GPU, up to MATVEC_MAX_TOKENS) | pallas (forced, up to MATVEC_MAX_TOKENS; in
    the interpreter off GPU) | xla (XLA's products on the layer's slices). Weights whose widths do not fit
    (`tiles_fit`) stay on XLA.
    """
    choice = _matvec_backend()
    if choice == "pallas" and tokens > MATVEC_MAX_TOKENS:
        raise ValueError(f"DSV2_DECODE_PROJECTIONS=pallas: {tokens} tokens per step, at most {MATVEC_MAX_TOKENS}")
    return choice == "pallas" or (choice == "auto" and jax.default_backend() == "gpu" and tokens <= MATVEC_MAX_TOKENS)


def _stacked_matvec_kernel(layer_ref, x_ref, *refs, rows, block_k, block_n, dtype, blocks, eps, at):
    """Program (n, s): columns n of x · w[layer] over the contraction rows [s·rows, (s+1)·rows), float32, the
    operands in `dtype`, w the weight whose column blocks [blocks[i], blocks[i + 1]) hold n, for all of x's rows (a
    power of two of at least 16: Triton's blocks) at once. One token: its row is broadcast to the 16 rows of a
    tensor-core tile (as in `matvecs`). eps (one token, with the norm's stacked weights first among refs): x's row
    is first normalised as `layers.rms_norm_rows` does, each program taking the row's scale from the whole row."""
    norm_ref, *w_refs, o_ref = refs if eps is not None else (None, *refs)
    n, s = pl.program_id(0), pl.program_id(1)
    layer, ns = kernel_layer(layer_ref, at), pl.ds(n * block_n, block_n)
    one = x_ref.shape[0] == 1
    if norm_ref is not None:
        scale = rms_scale(x_ref[0, :].astype(jnp.float32), eps)

    def product(w_ref, first):
        def body(i, acc):
            ks = pl.ds(s * rows + i * block_k, block_k)
            x = x_ref[:, ks]
            if norm_ref is not None:
                x = rms_normalised(x.astype(jnp.float32), scale, norm_ref[layer, ks], dtype)
            x = x.astype(dtype)
            x = jnp.broadcast_to(x, (TILE, block_k)) if one else x
            w = w_ref[layer, ks, pl.ds((n - first) * block_n, block_n)]
            return acc + jnp.dot(x, w.astype(dtype), precision=dot_precision(dtype),
                                 preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, rows // block_k, body, jnp.zeros((max(x_ref.shape[0], TILE), block_n),
                                                                    jnp.float32))
        if one:
            o_ref[s, 0, ns] = acc.max(axis=0)  # the 16 equal rows
        else:
            o_ref[s, :, ns] = acc

    if len(w_refs) == 1:
        product(w_refs[0], 0)
    else:
        for w_ref, first, end in zip(w_refs, blocks, blocks[1:]):
            pl.when((n >= first) & (n < end))(functools.partial(product, w_ref, first))


def stacked_matvec(x, w, layer=None, *, dtype=None, **options):
    """x [T, K] (T <= MATVEC_MAX_TOKENS tokens) times w [K, N], or times layer `layer` (an int32 scalar or a
    `LayerIndex`) of w [L, K, N] read by the kernel itself (a slice handed to a kernel would first be copied whole):
    [T, N] float32.
    w a tuple of such weights (one K): one kernel for all, a tuple of products.

    For decoding, where XLA turns such products into multiply-and-reduce fusions: `stacked_partials`' products
    (options: its tiles) with their float32 partial sums added by XLA. dtype: the operands' type in the products
    (default x's; float32: exact float32 products, x and w converted in the kernel).
    """
    several = isinstance(w, (tuple, list))
    ws = tuple(w) if several else (w,)
    out = stacked_partials(x, ws, layer, dtype=dtype, **options).sum(axis=0)[:x.shape[0]]
    ends = tuple(itertools.accumulate(a.shape[-1] for a in ws))
    parts = tuple(out[..., end - a.shape[-1]:end] for a, end in zip(ws, ends))
    return parts if several else parts[0]


@functools.partial(jax.jit, static_argnames=("dtype", "eps", "block_k", "block_n", "num_warps", "num_stages",
                                             "programs", "interpret"))
def stacked_partials(x, w, layer=None, norm=None, *, dtype=None, eps: float = 0.0,
                     block_k: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, programs: int | None = None, interpret: bool | None = None):
    """`stacked_matvec`'s kernel, returning its partial sums [S, R, N1 + N2 + ...] float32 (the products' columns
    side by side, in the order of the weights w (one, or a tuple); R >= T rows, the tokens first), for a kernel
    that adds them itself. Programs of block_n columns each split the contraction into S = up to `programs` /
    (N / block_n) parts of whole blocks of block_k (S is a power of two where K / block_k is). Tiles left None
    are `matvec_tiles(T)`'s.
    norm (one token): stacked RMSNorm weights [L, K] of which x's row is first normalised, with eps, in `dtype`
    (default x's) as `layers.rms_norm_rows` normalises it, so that a decoding layer's input norm takes no kernel of
    its own."""
    ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    if layer is None:
        ws, layer = tuple(a[None] for a in ws), 0
        norm = None if norm is None else norm[None]
    T, K = x.shape
    widths = [a.shape[2] for a in ws]
    if (T > MATVEC_MAX_TOKENS or any(a.shape[1] != K for a in ws)
            or (norm is not None and (T != 1 or norm.ndim != 2 or norm.shape[1] != K))):
        raise ValueError(f"stacked_matvec: x {x.shape} (at most {MATVEC_MAX_TOKENS} rows; one with a norm) against "
                         f"w {[a.shape for a in ws]} and norm weights {None if norm is None else norm.shape} "
                         f"([L, {K}])")
    given = dict(block_k=block_k, block_n=block_n, num_warps=num_warps, num_stages=num_stages, programs=programs)
    tiles = {**matvec_tiles(T), **{k: v for k, v in given.items() if v is not None}}
    block_k, block_n = decode_block(tiles["block_k"], K), decode_block(tiles["block_n"], *widths)
    blocks = tuple(itertools.accumulate((n // block_n for n in widths), initial=0))
    programs = tiles["programs"]
    # the most parts of whole blocks that fit the programs (a power of two where K / block_k is one)
    splits = max((d for d in range(2, K // block_k + 1) if (K // block_k) % d == 0 and d * blocks[-1] <= programs),
                 default=1)
    rows = 1 if T == 1 else max(TILE, 1 << (T - 1).bit_length())  # a power of two of whole tensor-core tiles
    x = jnp.pad(x, ((0, rows - T), (0, 0)))
    layer, at = layer_operand(layer)
    return pl.pallas_call(
        functools.partial(_stacked_matvec_kernel, rows=K // splits, block_k=block_k, block_n=block_n,
                          dtype=jnp.dtype(dtype or x.dtype), blocks=blocks, eps=None if norm is None else eps, at=at),
        out_shape=jax.ShapeDtypeStruct((splits, rows, sum(widths)), jnp.float32),
        grid=(blocks[-1], splits),
        in_specs=[pl.no_block_spec] * (2 + (norm is not None) + len(ws)),
        out_specs=pl.no_block_spec,
        name="stacked_matvec",
        compiler_params=plgpu.CompilerParams(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"]),
        interpret=interpreted(interpret),
    )(layer, x, *(() if norm is None else (norm,)), *ws)
