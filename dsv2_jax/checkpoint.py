"""Orbax checkpoints of the model: a step directory with items `params` and `model_config`.

Layout (train.py writes the same items, plus its own, through an orbax CheckpointManager):
  STEP/params/        orbax PyTree (StandardSave) checkpoint of `nnx.state(model, nnx.Param).to_pure_dict()`
  STEP/model_config/  orbax JsonSave item holding `config.to_hf_dict()`

`load` accepts a step directory, a CheckpointManager directory (numeric step subdirectories: the latest
finalized one is used) or a train workdir (holding `checkpoints/`). With a mesh, each parameter is restored
directly into its sharding, so each device reads only its own slices.

Streaming writes: `save_params_in_pieces` writes parameters that are never whole in memory. Each leaf is a
`PieceArray` (shape, dtype, chunk shape and a generator of (index, block) pieces); `PieceArrayHandler` writes
the pieces with tensorstore into exactly the array that orbax's own ArrayHandler would write (same spec, zarr
chunks = one piece), and reports the type as a jax.Array, so orbax restore reads the result like any other
checkpoint. The orbax parts (tree metadata, OCDBT merge, commit, the staging rename) are orbax's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import socket
import threading
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.serialization import jax_array_handlers, ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry

from .config import ModelConfig

PARAMS = "params"
MODEL_CONFIG = "model_config"
CHECKPOINTS = "checkpoints"  # a train workdir's CheckpointManager directory

# Bytes of pieces buffered in one tensorstore transaction before it is committed: bounds the memory that
# streaming writes hold, while writing fewer, larger OCDBT data files than one commit per piece would.
WRITE_BATCH_BYTES = 32 << 20


# Parameters are stored in chunks of one layer of a stack (and one expert of an expert stack), of at most this
# many bytes: reading one Hugging Face tensor back (export, `StoredParams`) then decodes only its own chunks.
# orbax alone splits an array's widest axes first, into chunks that hold every layer and every expert.
STORAGE_CHUNK_BYTES = 32 << 20


def storage_args(config: ModelConfig) -> dict:
    """ocp.SaveArgs for each parameter of a `config` model, nested like its params' pure dict (see above)."""
    from .model import abstract_model
    from .weights import iter_params

    def args(var):
        axes = tuple(var.get_metadata()["axes"])
        return ocp.SaveArgs(chunk_byte_size=STORAGE_CHUNK_BYTES,
                            shard_axes=tuple(i for i, a in enumerate(axes) if a in ("layers", "experts")))

    return _nest({path: args(var) for path, var in iter_params(nnx.state(abstract_model(config), nnx.Param))})


# ---------------------------------------------------------------------- finding checkpoints
def _is_step_dir(path: epath.Path) -> bool:
    return (path / PARAMS / "_METADATA").exists() and (path / MODEL_CONFIG).is_dir()


def find_step_dir(path: str | os.PathLike) -> epath.Path:
    """The step directory that `path` names: itself, the latest finalized step of a CheckpointManager
    directory, or that of a train workdir's `checkpoints/`."""
    root = epath.Path(os.path.abspath(os.fspath(path)))  # orbax wants absolute paths
    if not root.exists():
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}: the path does not exist")
    if _is_step_dir(root):
        return root
    manager = root / CHECKPOINTS if (root / CHECKPOINTS).is_dir() else root
    steps = [p for p in ocp.path.step.checkpoint_steps_paths(manager) if _is_step_dir(p)]
    if steps:
        return max(steps, key=lambda p: ocp.path.step.step_from_checkpoint_name(p.name))
    raise FileNotFoundError(
        f"no checkpoint at {os.fspath(path)!r}: expected a step directory (holding {PARAMS}/ and "
        f"{MODEL_CONFIG}/), a checkpoint manager directory (numeric step subdirectories), or a train workdir "
        f"(holding {CHECKPOINTS}/)")


def read_config(step_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a step directory's `model_config` item."""
    item = epath.Path(os.fspath(step_dir)) / MODEL_CONFIG
    data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item, ocp.args.JsonRestore())
    if not isinstance(data, dict):
        raise ValueError(f"{item}: expected a config.json dict, got {type(data).__name__}")
    return ModelConfig.from_hf(data)


def _flat(tree: dict, prefix=()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _nest(flat: dict[tuple[str, ...], object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def stored_params(step_dir: str | os.PathLike) -> dict[tuple[str, ...], object]:
    """Parameter path -> orbax ArrayMetadata (name, shape, dtype) of a step directory's params item."""
    params = epath.Path(os.fspath(step_dir)) / PARAMS
    return _flat(dict(ocp.StandardCheckpointHandler().metadata(params).tree))


def check_params(config: ModelConfig, shapes: dict[tuple[str, ...], tuple], stored: dict, where: str) -> None:
    """Missing, unexpected or mis-shaped parameters -> ValueError naming them and the expected shapes."""
    problems = [f"missing parameter {'/'.join(p)} (expected shape {list(s)})" for p, s in shapes.items()
                if p not in stored]
    problems += [f"unexpected parameter {'/'.join(p)}" for p in stored if p not in shapes]
    problems += [f"parameter {'/'.join(p)} has shape {list(stored[p].shape)}, expected {list(s)}"
                 for p, s in shapes.items() if p in stored and tuple(stored[p].shape) != tuple(s)]
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{where}: the parameters do not match the stored model config "
                         f"({config.num_hidden_layers} layers, hidden_size {config.hidden_size}):\n  "
                         + "\n  ".join(problems[:20]) + more)


# ---------------------------------------------------------------------- atomic output
@contextlib.contextmanager
def staged_output(out: str | os.PathLike, force: bool = False) -> Iterator[str]:
    """Yields a fresh path to write the output to; renames it to `out` only when the block succeeds.

    The staging folder is a hidden sibling of `out`, removed on any error or interrupt, so a failed run
    leaves nothing that looks like a checkpoint. One left by a run that could not clean up (killed, or a
    writer thread still busy at exit) is removed by the next run on the same host writing `out`, once its
    process is gone.
    An existing `out` is an error unless `force`.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"output {out!r} already exists; pass force=True (--force) to overwrite it")
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}.partial-{socket.gethostname()}-"  # this host's: another's PIDs cannot be checked here
    for entry in os.listdir(parent):
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    staging = os.path.join(parent, f"{prefix}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        target = os.path.join(staging, name)
        yield target
        if not os.path.exists(target):
            raise RuntimeError(f"nothing was written to {target!r}")
        if os.path.lexists(out):
            old = os.path.join(staging, name + ".old")
            os.rename(out, old)
        os.rename(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---------------------------------------------------------------------- streaming writes
@dataclasses.dataclass
class PieceArray:
    """A parameter written piece by piece: `pieces()` yields (index, block) covering the array once.

    chunk: the shape of one piece (also the zarr chunk shape, so that no write touches two pieces' chunks).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...]
    pieces: Callable[[], Iterator[tuple[tuple, np.ndarray]]]

    @property
    def sharding(self):
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class PieceArrayHandler(jax_array_handlers.ArrayHandler):
    """Writes PieceArray leaves into the tensorstore arrays orbax's ArrayHandler would write; restores as
    jax.Array (the inherited typestr and deserialize)."""

    def __init__(self, on_piece: Callable[[int], None] | None = None):
        super().__init__(array_metadata_store=array_metadata_store.Store())
        self._on_piece = on_piece or (lambda nbytes: None)
        self._futures: list = []
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stops the writes in flight (after their current piece) and waits for them: the save was interrupted,
        and nothing may be written into its folder once it is removed."""
        self._cancelled.set()
        for future in self._futures:
            try:
                future.result()
            except BaseException:  # noqa: BLE001 -- the write's own error, or the cancellation's
                pass

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        # Like ArrayHandler, write in the commit future: the directories exist once its signals arrive.
        future = ocp.future.CommitFutureAwaitingContractedSignals(
            self._write(values, infos, args), name="piece_array_handler")
        self._futures.append(future)
        return [future]

    def _check(self):
        if self._cancelled.is_set():
            raise RuntimeError("the save was interrupted")

    async def _write(self, values, infos, args):
        metadatas = []
        for value, info, arg in zip(values, infos, args):
            self._check()
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=tuple(value.shape), local_shape=tuple(value.chunk),
                dtype=np.dtype(value.dtype), use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(info.is_ocdbt_checkpoint))
            array = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            txn, pending = ts.Transaction(), 0
            for index, block in value.pieces():
                self._check()
                await array.with_transaction(txn)[index].write(block)
                pending += block.nbytes
                self._on_piece(block.nbytes)
                if pending >= WRITE_BATCH_BYTES:
                    await txn.commit_async()
                    txn, pending = ts.Transaction(), 0
            await txn.commit_async()
            metadatas.append(spec.metadata)
        await self._array_metadata_store.write(checkpoint_dir=infos[0].parent_dir, array_metadatas=metadatas,
                                               process_index=multihost.process_index())
        await jax_array_handlers._async_serialize_shardings(  # the `_sharding` file, as ArrayHandler writes it
            shardings=[v.sharding for v in values], infos=infos, primary_host=0)


def save_params_in_pieces(step_dir: str | os.PathLike, params: dict, config: ModelConfig,
                          on_piece: Callable[[int], None] | None = None) -> None:
    """Writes a step directory whose params are PieceArray leaves (a nested dict like `to_pure_dict()`)."""
    pieces = PieceArrayHandler(on_piece)
    registry = type_handler_registry.create_type_handler_registry(
        *type_handler_registry._DEFAULT_TYPE_HANDLERS, (PieceArray, pieces))
    handler = ocp.CompositeCheckpointHandler(
        **{PARAMS: ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
           MODEL_CONFIG: ocp.JsonCheckpointHandler()})
    try:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(epath.Path(os.fspath(step_dir)), ocp.args.Composite(
                **{PARAMS: ocp.args.PyTreeSave(params), MODEL_CONFIG: ocp.args.JsonSave(config.to_hf_dict())}))
    except BaseException:  # an error or an interrupt (Ctrl-C, SIGTERM): stop the writer threads first
        pieces.cancel()
        raise


class StoredParams:
    """Reads any block of any parameter of a step directory, without restoring whole arrays."""

    def __init__(self, step_dir: str | os.PathLike):
        self.params_dir = epath.Path(os.fspath(step_dir)) / PARAMS
        self.meta = stored_params(step_dir)
        self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.params_dir)
        self._use_zarr3 = bool(ocp.StandardCheckpointHandler().metadata(self.params_dir).use_zarr3)
        self._context = ts_utils.get_ts_context(use_ocdbt=self._use_ocdbt)
        self._open: dict[tuple[str, ...], ts.TensorStore] = {}

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self.meta[path].dtype)

    def read(self, path: tuple[str, ...], index=()) -> np.ndarray:
        if path not in self._open:
            spec = ts_utils.ArrayReadSpec(self.params_dir.as_posix(), self.meta[path].name,
                                          use_zarr3=self._use_zarr3, use_ocdbt=self._use_ocdbt)
            self._open[path] = ts.open(spec.json, open=True, read=True, context=self._context).result()
        try:
            return self._open[path][index].read().result()
        except Exception as e:
            raise ValueError(f"{self.params_dir}: parameter {'/'.join(path)} could not be read ({e}); "
                             "is the checkpoint complete?") from None


# ---------------------------------------------------------------------- whole models
def _param_tree(model) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def save(model, path: str | os.PathLike, force: bool = False) -> None:
    """Writes `model` as a step directory (params in their stored dtype + model_config), atomically."""
    with staged_output(path, force) as target:
        handler = ocp.CompositeCheckpointHandler(
            **{PARAMS: ocp.StandardCheckpointHandler(), MODEL_CONFIG: ocp.JsonCheckpointHandler()})
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(epath.Path(target), ocp.args.Composite(
                **{PARAMS: ocp.args.StandardSave(_param_tree(model), save_args=storage_args(model.config)),
                   MODEL_CONFIG: ocp.args.JsonSave(model.config.to_hf_dict())}))


def load(path: str | os.PathLike, dtype=jnp.bfloat16, param_dtype=None, mesh=None):
    """A DeepseekV2 from an orbax checkpoint: the same object `from_hf` returns.

    path: a step directory, a CheckpointManager directory (latest finalized step) or a train workdir.
    dtype: compute dtype; param_dtype: storage dtype (default: dtype); stored values are cast to it.
    mesh: restore each parameter directly into its sharding (sharding.param_sharding), so each device
    reads only its own slices; without a mesh, parameters go to the default device.
    """
    from .model import abstract_model
    from .sharding import check_config, param_sharding
    from .weights import iter_params, param_shapes

    step = find_step_dir(path)
    config = read_config(step)
    if mesh is not None:
        check_config(config, mesh)  # make_mesh's axes, Auto types, sizes that divide
    param_dtype = param_dtype or dtype
    model = abstract_model(config, dtype, param_dtype)
    graphdef, state = nnx.split(model)
    check_params(config, param_shapes(state), stored_params(step), os.fspath(step / PARAMS))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for p, var in iter_params(state):
        sharding = param_sharding(mesh, var) if mesh is not None else device
        target[p] = jax.ShapeDtypeStruct(var.shape, param_dtype, sharding=sharding)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        restored = _flat(ckptr.restore(step / PARAMS, ocp.args.StandardRestore(_nest(target))))
    for p, var in iter_params(state):
        var.set_value(restored[p])
    return nnx.merge(graphdef, state)
