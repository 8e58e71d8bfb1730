"""Logical axis names -> mesh axes: the one table, and the helpers that apply it.

Every parameter carries logical axis names in its `axes` metadata; activations are constrained with the same
names through `constrain`. Only this file maps those names to the mesh axes (data, fsdp, expert, tensor).
"""

from __future__ import annotations

import contextlib
import threading

import jax
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). Within one tensor a mesh axis is used
# once: a later logical axis that maps to an axis already taken stays replicated.
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


@contextlib.contextmanager
def activation_mesh(mesh):
    """Within this context `constrain` pins activations to `mesh` (None: no constraints)."""
    previous = getattr(_state, "mesh", None)
    _state.mesh = mesh
    try:
        yield
    finally:
        _state.mesh = previous


def constrain(x, axes: tuple):
    """with_sharding_constraint by logical names when a mesh is active; identity otherwise."""
    mesh = getattr(_state, "mesh", None)
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes)))


def param_sharding(mesh, var) -> NamedSharding:
    """The NamedSharding of a parameter (an nnx.Variable with `axes` metadata) on `mesh`."""
    return NamedSharding(mesh, logical_to_spec(var.get_metadata()["axes"]))
