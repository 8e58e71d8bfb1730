"""Logical axis names -> mesh axes: the one table, the mesh, and the helpers that apply them.

Every parameter carries logical axis names in its `axes` metadata; activations are constrained with the same
names through `constrain`. Only this file maps those names to the mesh axes (data, fsdp, expert, tensor), plus
the MoE layer's shard_map body (moe.py), which names the expert and tensor axes it communicates over.

    mesh = make_mesh(fsdp=2, expert=4)             # 8 devices; one size may be -1 (the rest of the devices)
    model = init_model(config, mesh)               # random weights, created directly in their shardings
    with activation_mesh(mesh):                    # activations constrained; MoE runs expert-parallel
        logits = jax.jit(...)(...)

Mesh axes have Auto axis types: the model's einsums are partitioned by XLA from the parameter shardings and the
`constrain` calls; only the MoE layer is written per device (jax.shard_map).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Within one tensor a mesh axis is used
# once: a later logical axis that maps to an axis already taken stays replicated (so an activation
# ("batch", "seq", "embed") is split over data x fsdp x expert only, while a parameter's "embed" goes to fsdp).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "head_dim": None,
    "q_lora": None,
    "kv_lora": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "router": None,
    "norm": None,
    "layers": None,
}

_state = threading.local()


# ---------------------------------------------------------------------- the mesh
def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, expert, tensor) over all devices of all processes (or `devices`).

    The sizes must multiply to the number of devices; one of them may be -1 to take the rest. Axis types are
    Auto. With several processes, jax.devices() lists every process's devices, so the mesh spans all hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"make_mesh: {name} must be a positive integer or -1, got {size!r}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"make_mesh: only one size may be -1, got -1 for {', '.join(fill)}")
    given = " ".join(f"{k}={v}" for k, v in sizes.items())
    if fill:
        rest = math.prod(size for size in sizes.values() if size != -1)
        if n % rest:
            raise ValueError(f"make_mesh({given}): the fixed sizes multiply to {rest}, which does not divide "
                             f"the {n} devices, so {fill[0]}=-1 has no integer size")
        sizes[fill[0]] = n // rest
    if math.prod(sizes.values()) != n:
        raise ValueError(f"make_mesh({given}): the sizes multiply to {math.prod(sizes.values())} devices, but "
                         f"there are {n}; make them multiply to {n} or pass -1 for one axis")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_mesh(mesh: Mesh) -> None:
    """Raises a clear error unless `mesh` has the axes of make_mesh with Auto axis types."""
    missing = [a for a in MESH_AXES if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"the mesh has axes {tuple(mesh.axis_names)}, but the model needs {MESH_AXES} "
                         f"(missing {missing}); build it with dsv2_jax.make_mesh")
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = [a for a in MESH_AXES if types[a] != AxisType.Auto]
    if explicit:
        raise ValueError(f"mesh axes {explicit} are not of AxisType.Auto (jax.make_mesh makes Explicit axes by "
                         f"default); build the mesh with dsv2_jax.make_mesh")


def check_config(config, mesh: Mesh) -> None:
    """Raises a clear error naming the config field and mesh axis when a sharded size does not divide."""
    check_mesh(mesh)
    c = config
    checks = [("num_attention_heads", c.num_attention_heads, "heads"), ("vocab_size", c.vocab_size, "vocab"),
              ("hidden_size", c.hidden_size, "embed")]
    if c.num_dense_layers:
        checks.append(("intermediate_size", c.intermediate_size, "mlp"))
    if c.num_moe_layers:
        checks += [("n_routed_experts", c.num_experts, "experts"),
                   ("moe_intermediate_size", c.moe_intermediate_size, "expert_mlp")]
        if c.n_shared_experts:
            checks.append(("n_shared_experts * moe_intermediate_size", c.n_shared_experts * c.moe_intermediate_size,
                           "mlp"))
    for field, value, logical in checks:
        axes = spec_axes(logical_to_spec((logical,))[0])
        size = mesh_size(mesh, axes)
        if value % size:
            raise ValueError(f"{field}={value} is not divisible by the mesh's {' x '.join(axes)} axis "
                             f"size {size} ({logical!r} is split over {axes}); pick mesh sizes that divide it")


# ---------------------------------------------------------------------- logical names -> specs
def logical_to_spec(axes: tuple, rules: dict | None = None) -> PartitionSpec:
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        free = tuple(t for t in targets if t not in used)
        used.update(free)
        spec.append(None if not free else free[0] if len(free) == 1 else free)
    return PartitionSpec(*spec)


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_size(mesh: Mesh, entry) -> int:
    """How many devices the mesh axes of one PartitionSpec entry (None, an axis name or a tuple of them) span."""
    return math.prod(mesh.shape[a] for a in spec_axes(entry))


def batch_axes() -> tuple[str, ...]:
    """The mesh axes the batch (and the tokens of the MoE layer) is split over."""
    return spec_axes(logical_to_spec(("batch",))[0])


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways the batch axis is split on `mesh` (1 without a mesh)."""
    if mesh is None:
        return 1
    return mesh_size(mesh, batch_axes())


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
    """The sharding of a data array [*leading dims, rows, seq, ...]: rows split over the batch axes, the sequence by
    the 'seq' rule, everything else (e.g. a leading micro-batch axis) whole."""
    rest = ndim - leading
    return NamedSharding(mesh, logical_to_spec((None,) * leading + ("batch", "seq", *(None,) * rest)[:rest]))


def parse_mesh(spec: str) -> dict:
    """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}, for make_mesh(**sizes); a clear error naming what is wrong."""
    sizes = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in MESH_AXES:
            raise ValueError(f"--mesh {spec!r}: expected AXIS=N pairs with AXIS in {', '.join(MESH_AXES)}")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {spec!r}: size of {name.strip()!r} is not an integer") from None
    return sizes


def _check_divisible(shape, spec: PartitionSpec, mesh: Mesh, what: str) -> None:
    for dim, (size, entry) in enumerate(zip(shape, spec)):
        axes = spec_axes(entry)
        n = mesh_size(mesh, axes)
        if size % n:
            raise ValueError(f"{what}: dimension {dim} of shape {tuple(shape)} (size {size}) is split over mesh "
                             f"axes {axes} of size {n}, which does not divide it; pick mesh sizes that divide it")


def param_sharding(mesh: Mesh, var, name: str | None = None) -> NamedSharding:
    """The NamedSharding of a parameter (an nnx.Variable with `axes` metadata) on `mesh`."""
    axes = tuple(var.get_metadata()["axes"])
    spec = logical_to_spec(axes)
    _check_divisible(var.shape, spec, mesh, f"parameter {name or ''} with axes {axes}".replace("  ", " "))
    return NamedSharding(mesh, spec)


def state_shardings(state, mesh: Mesh):
    """A pytree like `state` (an nnx.State, abstract or not, or a module) with each Variable replaced by its
    NamedSharding: from the `axes` metadata for parameters, replicated for variables without it.

    Usable as jit in/out_shardings for the state, or with jax.device_put.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)

    def one(path, var):
        if not isinstance(var, nnx.Variable):
            raise TypeError(f"state_shardings expects an nnx.State of Variables; {jax.tree_util.keystr(path)} "
                            f"is a {type(var).__name__}")
        if "axes" not in var.get_metadata():
            return NamedSharding(mesh, PartitionSpec())
        return param_sharding(mesh, var, ".".join(str(getattr(k, "key", k)) for k in path))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_model(config, mesh: Mesh | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0):
    """A randomly initialised DeepseekV2: the weights of DeepseekV2(config, rngs=nnx.Rngs(seed)) (up to float
    rounding of the jit-compiled initialisers).

    With a mesh, initialisation runs under jit with out_shardings, so each device creates only its own blocks:
    no full copy of the model is ever made on one device.
    """
    from .model import DeepseekV2, abstract_model

    def make():
        return nnx.state(DeepseekV2(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)))

    if mesh is not None:
        check_config(config, mesh)
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype, param_dtype))
    if mesh is None:
        state = jax.jit(make)()
    else:
        state = jax.jit(make, out_shardings=state_shardings(abstract_state, mesh))()
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------- activations
@contextlib.contextmanager
def activation_mesh(mesh):
    """Within this context `constrain` pins activations to `mesh` (None: no constraints) and the MoE layers run
    expert-parallel over it."""
    if mesh is not None:
        check_mesh(mesh)
    previous = getattr(_state, "mesh", None)
    _state.mesh = mesh
    try:
        yield
    finally:
        _state.mesh = previous


def current_mesh() -> Mesh | None:
    """The mesh of the innermost `activation_mesh`, or None."""
    return getattr(_state, "mesh", None)


def per_shard(fn, in_axes: tuple, out_axes, unsplit=None):
    """fn, run on each device's shard inside jax.shard_map when a mesh is active (identity otherwise).

    For kernels XLA cannot partition (custom calls such as tokamax's flash attention): given batch-sharded operands
    XLA would gather them and run the whole batch on every device. in_axes: logical axes of each argument; out_axes:
    those of the result (or a tuple of them, one per result). fn must be independent across every axis these map to
    a mesh axis (batch, heads). Arguments that do not split evenly (e.g. one sequence decoded on a mesh) run fn
    unsplit, or `unsplit` where given (an equivalent that XLA can partition: the loss's Pallas kernel in interpret
    mode, unsplit inside a partitioned program on CPU, gave a loss 2e-4 off).
    """
    mesh = current_mesh()
    if mesh is None:
        return fn
    in_specs = tuple(logical_to_spec(a) for a in in_axes)
    several = bool(out_axes) and isinstance(out_axes[0], tuple)
    out_specs = tuple(map(logical_to_spec, out_axes)) if several else logical_to_spec(out_axes)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def run(*args):
        even = all(size % mesh_size(mesh, entry) == 0
                   for x, spec in zip(args, in_specs) for size, entry in zip(x.shape, spec))
        return mapped(*args) if even else (fn if unsplit is None else unsplit)(*args)

    return run


def constrain(x, axes: tuple):
    """with_sharding_constraint by logical names when a mesh is active; identity otherwise."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes)))


def xla_flag(name: str, environ=None) -> str | None:
    """The value XLA_FLAGS gives XLA's flag `name` (e.g. "xla_gpu_enable_triton_gemm"): its last setting, "true"
    for a bare `--name`; None where XLA_FLAGS does not set it."""
    value = None
    for flag in (os.environ if environ is None else environ).get("XLA_FLAGS", "").split():
        key, eq, setting = flag.lstrip("-").partition("=")
        if key == name:
            value = setting if eq else "true"
    return value
