"""Several processes (hosts): starting the runtime, and feeding each process's share of a global batch.

    dsv2_jax.distributed.initialize()        # before any other JAX call; reads the usual environment variables
    mesh = dsv2_jax.make_mesh(fsdp=-1)       # spans the devices of every process
    start, stop = host_rows(global_batch, mesh)   # the rows of the global batch this process reads
    batch = global_array(local_rows, mesh)        # this process's rows -> one global array split over the batch axes

With one process all of this degrades to the ordinary single-host case: initialize() does nothing, host_rows
returns the whole batch and global_array places it on the mesh.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from .sharding import batch_axes, batch_sharding

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str = "gloo", **kwargs) -> None:
    """jax.distributed.initialize with the arguments taken from, in order: this call, the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or JAX's own cluster detection (TPU pods,
    Slurm, Open MPI), which needs none of them.

    Does nothing when there is nothing to initialise (one process, no cluster detected) or when it already ran.
    cpu_collectives: the CPU collectives backend ('gloo' or 'mpi'), so that multi-process CPU runs work.
    Other keyword arguments go to jax.distributed.initialize.
    """
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes ({ENV_NUM_PROCESSES}) must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id ({ENV_PROCESS_ID}) must lie in [0, {num_processes}), got {process_id}")
    detect = coordinator_address is None and num_processes in (None, 1) and process_id is None
    if not detect and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError(f"a multi-process run needs the coordinator address, the number of processes and this "
                         f"process's id (arguments or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                         f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if detect:
        try:  # JAX's cluster detection (TPU pod, Slurm, Open MPI, Kubernetes); none found: a single process
            jax.distributed.initialize(**kwargs)
        except ValueError as e:
            if "coordinator_address" not in str(e):
                raise
        return
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def host_rows(global_batch_size: int, mesh) -> tuple[int, int]:
    """The rows [start, stop) of a global batch that this process's devices hold when the batch is split over
    the mesh's batch axes: the rows this process should read (its data shard)."""
    sharding = batch_sharding(mesh, 1)
    n = np.prod([mesh.shape[a] for a in batch_axes()])
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} batch shards "
                         f"({' x '.join(batch_axes())} of the mesh)")
    rows = sorted({idx[0].indices(global_batch_size)[:2]
                   for idx in sharding.addressable_devices_indices_map((global_batch_size,)).values()})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])):
        raise ValueError(f"this process's batch rows {rows} are not contiguous; order the mesh so that the "
                         f"batch axes' devices of one process are adjacent (dsv2_jax.make_mesh does)")
    return start, stop


def global_array(local_rows, mesh, global_batch_size: int | None = None) -> jax.Array:
    """This process's rows of a batch (as from host_rows) -> the global jax.Array split over the batch axes.

    global_batch_size defaults to local rows x number of processes holding distinct rows.
    """
    local_rows = np.asarray(local_rows)
    sharding = batch_sharding(mesh, local_rows.ndim)
    shape = None
    if global_batch_size is not None:
        shape = (global_batch_size, *local_rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local_rows, shape)
