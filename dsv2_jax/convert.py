"""Weight conversion both ways, streaming: Hugging Face folder <-> orbax checkpoint in this library's layout.

HF -> checkpoint (`hf_to_checkpoint`): every parameter of the model is written in pieces of one HF tensor
each (one layer, or one layer and expert), read just before it is written; the orbax checkpoint is built by
checkpoint.save_params_in_pieces, so no stacked tensor is ever whole in memory.

checkpoint -> HF (`checkpoint_to_hf`): every HF tensor is assembled from the slices of our parameters that
hold it (read from the checkpoint with tensorstore) and streamed into safetensors shards of at most
`max_shard_size`, with model.safetensors.index.json and a config.json in the released files' style.

Safetensors files are read and written here with plain positioned file I/O on the documented format (an
8-byte header length, a JSON header, the raw bytes), not through memory maps: mapped pages count as resident
memory, and the library's writer needs a whole shard in memory. Output goes to a staging folder renamed at
the end (checkpoint.staged_output); every mismatch is an error naming the tensor and its expected shape.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from typing import Iterator

import ml_dtypes
import numpy as np

from . import checkpoint
from .config import ModelConfig
from .weights import INDEX_FILE, IGNORED_HF_TENSORS, BlockReader, Tensor, _slice_shapes, check_hf_tensors, \
    hf_tensors, hf_to_ours, ours_to_hf, param_shapes

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
ST_CODES = {"F32": DTYPES["float32"], "BF16": DTYPES["bfloat16"], "F16": DTYPES["float16"],
            "F64": np.dtype(np.float64)}
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def parse_dtype(name) -> np.dtype | None:
    if name is None:
        return None
    key = name if isinstance(name, str) else np.dtype(name).name
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


def parse_size(size) -> int:
    """'5GB', '500MB', '2GiB', '123' (bytes) -> bytes (GB = 10^9 as transformers counts, GiB = 2^30)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max shard size must look like '5GB', '500MB' or a number of bytes, got {size!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"max shard size must be positive, got {size!r}")
    return value


# ---------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar of bytes written, with a count of tensors (or tensor pieces); silent when disabled."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool, unit: str = "tensors"):
        self.tensors, self.total_tensors, self.unit = 0, total_tensors, unit
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            file=sys.stderr, dynamic_ncols=True)

    def update(self, nbytes: int, tensors: int = 1):
        self.tensors += tensors
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} {self.unit}", refresh=False)
            self.bar.update(nbytes)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- reading HF folders
class SafetensorsFolder:
    """The tensors of *.safetensors files (one file, or shards listed in model.safetensors.index.json),
    read one at a time with positioned reads. Headers are checked against the file sizes when opened, so a
    truncated file fails before anything is written."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_FILE)
        weight_map = None
        if os.path.isfile(index_path):
            weight_map = _read_weight_map(index_path)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        self.entries: dict[str, tuple[str, int, tuple[int, ...], np.dtype]] = {}  # name -> file, offset, shape, dtype
        for file in files:
            for name, entry in _safetensors_header(os.path.join(folder, file), INDEX_FILE).items():
                if name in self.entries:
                    raise ValueError(f"tensor {name!r} appears in both {self.entries[name][0]} and {file}")
                self.entries[name] = (file,) + entry
        if weight_map is not None:
            _check_weight_map(weight_map, {n: e[0] for n, e in self.entries.items()}, INDEX_FILE)

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][3]

    def read(self, name: str) -> np.ndarray:
        return self.read_rows(name, 0, self.shape(name)[0])

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's first axis."""
        file, offset, shape, dtype = self.entries[name]
        row_shape = tuple(shape[1:])
        out = np.empty((stop - start,) + row_shape, dtype)
        with open(os.path.join(self.folder, file), "rb") as f:
            f.seek(offset + start * math.prod(row_shape) * dtype.itemsize)
            got = f.readinto(out.reshape(-1).view(np.uint8))
        if got != out.nbytes:
            raise ValueError(f"tensor {name!r} in {file}: read {got} of {out.nbytes} bytes; is the file truncated?")
        return out


def _read_weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: no 'weight_map' dict")
    for file in set(weight_map.values()):
        if not os.path.isfile(os.path.join(os.path.dirname(index_path), file)):
            raise FileNotFoundError(f"weights file {os.path.join(os.path.dirname(index_path), file)!r} "
                                    f"(listed in {os.path.basename(index_path)}) is missing")
    return weight_map


def _check_weight_map(weight_map: dict, file_of: dict, index_name: str):
    for name, file in weight_map.items():
        if file_of.get(name) != file:
            raise ValueError(f"{index_name} lists tensor {name!r} in {file}, but that file does not hold it")


def _safetensors_header(path: str, index_name: str) -> dict[str, tuple[int, tuple[int, ...], np.dtype]]:
    """name -> (absolute byte offset, shape, dtype), checked against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (bad header length); is the file truncated?")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            shape, begin, end = tuple(int(d) for d in shape), int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r} (a safetensors entry "
                             "holds dtype, shape and data_offsets)") from None
        if code not in ST_CODES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code}; supported: {sorted(ST_CODES)}")
        dtype = ST_CODES[code]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} of shape {list(shape)} {code} has {end - begin} bytes, "
                             f"expected {math.prod(shape) * dtype.itemsize}")
        if 8 + n + end > size:
            raise ValueError(f"{path}: tensor {name!r} ends at byte {8 + n + end} but the file has {size} bytes; "
                             "is the file truncated?")
        out[name] = (8 + n + begin, shape, dtype)
    return out


class TorchBinFolder:
    """The tensors of pytorch_model*.bin files, loaded with torch.load(weights_only=True, mmap=True) so that a
    tensor's bytes are read when it is converted."""

    def __init__(self, folder: str):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{folder} holds PyTorch .bin weights: reading them needs torch installed "
                              "(or convert them to safetensors first)") from None
        self._torch = torch
        index_path = os.path.join(folder, BIN_INDEX_FILE)
        weight_map = _read_weight_map(index_path) if os.path.isfile(index_path) else None
        files = sorted(set(weight_map.values())) if weight_map else sorted(
            f for f in os.listdir(folder) if re.fullmatch(r"pytorch_model.*\.bin", f))
        self.tensors: dict[str, object] = {}
        self.file_of: dict[str, str] = {}
        for file in files:
            path = os.path.join(folder, file)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"{path}: not a readable PyTorch weights file ({e}); is the file truncated?") from None
            for name, t in state.items():
                if name in self.tensors:
                    raise ValueError(f"tensor {name!r} appears in both {self.file_of[name]} and {file}")
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
                self.tensors[name], self.file_of[name] = t, file
        if weight_map is not None:
            _check_weight_map(weight_map, self.file_of, BIN_INDEX_FILE)

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        t = self.tensors[name]
        return DTYPES["bfloat16"] if t.dtype == self._torch.bfloat16 else np.dtype(str(t.dtype).split(".")[-1])

    def read(self, name: str) -> np.ndarray:
        return self.read_rows(name, 0, None)

    def read_rows(self, name: str, start: int, stop: int | None) -> np.ndarray:
        t = self.tensors[name]
        t = (t if start == 0 and stop is None else t[start:stop]).contiguous()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(DTYPES["bfloat16"]).copy()
        return t.numpy().copy()


def open_hf_weights(folder: str | os.PathLike):
    """The weights of an HF folder: safetensors if present, else PyTorch .bin files."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no Hugging Face folder at {folder!r}")
    listing = os.listdir(folder)
    if INDEX_FILE in listing or any(f.endswith(".safetensors") for f in listing):
        return SafetensorsFolder(folder)
    if BIN_INDEX_FILE in listing or any(re.fullmatch(r"pytorch_model.*\.bin", f) for f in listing):
        return TorchBinFolder(folder)
    raise FileNotFoundError(f"no weights in {folder!r}: expected *.safetensors (with {INDEX_FILE} when sharded) "
                            f"or pytorch_model*.bin files")


# ---------------------------------------------------------------------- writing safetensors
ST_CODE_OF = {v: k for k, v in ST_CODES.items()}


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], np.dtype]],
                      arrays: Iterator, metadata: dict | None = None) -> None:
    """Writes a safetensors file whose tensors (name, shape, dtype) come one at a time from `arrays`: each
    an array, or an iterable of row blocks (consecutive pieces along the first axis)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": ST_CODE_OF[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), blocks in zip(entries, arrays, strict=True):
            rows = 0
            for block in [blocks] if isinstance(blocks, np.ndarray) else blocks:
                if block.dtype != np.dtype(dtype) or block.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"tensor {name}: got a block {block.dtype}{list(block.shape)}, "
                                     f"expected {np.dtype(dtype)}{list(shape)}")
                f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
                rows += block.shape[0] if block.ndim else 1
            if rows != (shape[0] if shape else 1):
                raise ValueError(f"tensor {name}: wrote {rows} rows, expected {list(shape)}")


def plan_shards(entries: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int) -> list[list[int]]:
    """Consecutive entries grouped into shards of at most max_bytes (a bigger tensor gets a shard alone)."""
    shards: list[list[int]] = []
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


# ---------------------------------------------------------------------- HF -> checkpoint
def _abstract_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from .model import abstract_model

    return param_shapes(abstract_model(config))


def hf_to_checkpoint(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype=None, force: bool = False,
                     progress: bool = False) -> str:
    """Converts an HF folder (config.json + safetensors or pytorch_model*.bin) into a step directory at `out`
    that `dsv2_jax.load` reads. dtype: 'float32' / 'bfloat16' / 'float16' for every parameter (default: each
    parameter its source tensors' own)."""
    hf_dir = os.fspath(hf_dir)
    out = os.fspath(out)
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"output {out!r} already exists; pass --force to overwrite it")
    config = ModelConfig.from_hf(hf_dir)
    weights = open_hf_weights(hf_dir)
    shapes = _abstract_shapes(config)
    expected = hf_tensors(config, shapes)
    check_hf_tensors(expected, weights.names(), weights.shape)
    sources = BlockReader(config, shapes, weights.read).by_param  # our param -> {(layer, expert): (tensor, part)}
    # Each parameter keeps its tensors' dtype (the widest, should its layers differ): transformers saves the
    # router (mlp.gate) in float32 beside bf16 weights.
    targets = {path: parse_dtype(dtype) or np.result_type(*{weights.dtype(t.name) for t, _ in sources[path].values()})
               for path in shapes}
    for path, target in targets.items():
        if target not in DTYPES.values():
            raise ValueError(f"source dtype {target} of {'/'.join(path)} is not supported; pass dtype (--dtype) "
                             "float32/bfloat16/float16")
    pieces = {path: list(_pieces(weights, path, sources[path], shapes, targets[path])) for path in shapes}
    total = sum(math.prod(s) * targets[p].itemsize for p, s in shapes.items())
    bar = Progress(total, sum(map(len, pieces.values())), "hf -> checkpoint", progress, unit="pieces")
    params = {p: _piece_array(shapes[p], targets[p], pieces[p]) for p in shapes}
    try:
        with checkpoint.staged_output(out, force) as staging:
            checkpoint.save_params_in_pieces(staging, checkpoint._nest(params), config, on_piece=bar.update)
    finally:
        bar.close()
    return out


# Top-level tensors (embedding, lm_head) are converted in row blocks of about this many bytes.
ROW_BLOCK_BYTES = 32 << 20


def _row_blocks(t: Tensor, itemsize: int) -> list[tuple[int, int]]:
    step = max(1, ROW_BLOCK_BYTES // (math.prod(t.shape[1:]) * itemsize))
    return [(r, min(r + step, t.shape[0])) for r in range(0, t.shape[0], step)]


def _pieces(weights, path, entries: dict, shapes: dict, dtype: np.dtype):
    """(index into our parameter, thunk giving the block) for every piece of `path`, in storage order.

    A stacked parameter has one piece per HF tensor: [1, ...] per layer, [1, 1, ...] per layer and expert.
    A top-level one (no layer axis; never split over parts) has one piece per row block of its HF tensor:
    our rows when it is stored as is, our columns when transposed (lm_head)."""
    for (layer, expert), (t, part) in sorted(entries.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1] or 0)):
        slices = _slice_shapes(t.spec, shapes, t.stack)
        lead = (1 if t.stack else 0) + (1 if t.spec.per_expert else 0)
        if lead:
            index = tuple(slice(i, i + 1) for i in (layer, expert)[:lead])
            yield index, lambda t=t, part=part, slices=slices, lead=lead: hf_to_ours(
                t.spec, weights.read(t.name), slices)[part].astype(dtype, copy=False)[(None,) * lead]
            continue
        if len(t.spec.parts) != 1 or (t.spec.transpose and (len(t.shape) != 2 or t.spec.n_in != 1)):
            raise NotImplementedError(f"no row-block conversion for {t.name}")
        for r0, r1 in _row_blocks(t, dtype.itemsize):
            index = (slice(None), slice(r0, r1)) if t.spec.transpose else (slice(r0, r1),)
            yield index, lambda t=t, r0=r0, r1=r1: _read_rows(weights, t, r0, r1, dtype)


def _read_rows(weights, t: Tensor, r0: int, r1: int, dtype: np.dtype) -> np.ndarray:
    x = weights.read_rows(t.name, r0, r1)
    return (x.T if t.spec.transpose else x).astype(dtype, copy=False)


def _piece_array(shape: tuple[int, ...], dtype: np.dtype, pieces: list) -> checkpoint.PieceArray:
    first, _ = pieces[0]
    chunk = tuple(len(range(n)[i]) if isinstance(i, slice) else 1 for i, n in zip(first, shape))
    chunk += tuple(shape[len(first):])

    def generate():
        for index, read in pieces:
            yield index, read()

    return checkpoint.PieceArray(tuple(shape), dtype, chunk, generate)


# ---------------------------------------------------------------------- checkpoint -> HF
def hf_config_dict(config: ModelConfig, dtype: np.dtype) -> dict:
    """config.json in the released files' style (rope_scaling + rope_theta), with the weights' dtype."""
    out = config.to_hf_dict(rope_style="rope_scaling")
    out.setdefault("architectures", ["DeepseekV2ForCausalLM"])
    out["torch_dtype"] = np.dtype(dtype).name
    if "dtype" in out:
        out["dtype"] = np.dtype(dtype).name
    return out


def checkpoint_to_hf(ckpt: str | os.PathLike, out_hf: str | os.PathLike, dtype=None,
                     max_shard_size="5GB", force: bool = False, progress: bool = False) -> str:
    """Exports a checkpoint (step dir, CheckpointManager dir or train workdir; see checkpoint.find_step_dir) to
    an HF folder: safetensors shards of at most max_shard_size + index + config.json. dtype: for every tensor;
    default each tensor its parameter's stored dtype (float32 for train.py checkpoints)."""
    out_hf = os.fspath(out_hf)
    if os.path.lexists(out_hf) and not force:
        raise FileExistsError(f"output {out_hf!r} already exists; pass --force to overwrite it")
    max_bytes = parse_size(max_shard_size)
    step = checkpoint.find_step_dir(ckpt)
    config = checkpoint.read_config(step)
    shapes = _abstract_shapes(config)
    stored = checkpoint.StoredParams(step)
    checkpoint.check_params(config, shapes, stored.meta, os.fspath(step / checkpoint.PARAMS))
    target = parse_dtype(dtype)
    tensors = hf_tensors(config, shapes)
    entries = [(t.name, t.shape, target or np.result_type(*(stored.dtype(((t.stack,) if t.stack else ()) + p)
                                                            for p in t.spec.parts))) for t in tensors]
    shards = plan_shards(entries, max_bytes)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(math.prod(s) * d.itemsize for _, s, d in entries)
    bar = Progress(total, len(tensors), "checkpoint -> hf", progress)

    def blocks(i: int):
        for block in _hf_tensor_blocks(stored, tensors[i]):
            block = block.astype(entries[i][2], copy=False)
            bar.update(block.nbytes, tensors=0)
            yield block
        bar.update(0)

    def arrays(indices):
        for i in indices:
            yield blocks(i)

    try:
        with checkpoint.staged_output(out_hf, force) as staging:
            os.makedirs(staging)
            for file, indices in zip(files, shards):
                write_safetensors(os.path.join(staging, file), [entries[i] for i in indices], arrays(indices))
            if n > 1:
                index = {"metadata": {"total_size": total},
                         "weight_map": {entries[i][0]: file for file, idx in zip(files, shards) for i in idx}}
                with open(os.path.join(staging, INDEX_FILE), "w") as f:
                    json.dump(index, f, indent=2)
            with open(os.path.join(staging, "config.json"), "w") as f:
                json.dump(hf_config_dict(config, target or stored.dtype(("embed_tokens", "embedding"))), f, indent=2)
    finally:
        bar.close()
    return out_hf


def _hf_tensor_blocks(stored: checkpoint.StoredParams, t: Tensor) -> Iterator[np.ndarray]:
    """One HF tensor from the slices of our parameter(s) that hold it; top-level ones in row blocks."""
    if t.stack is None:
        (path,) = t.spec.parts
        for r0, r1 in _row_blocks(t, stored.dtype(path).itemsize):
            yield stored.read(path, (slice(None), slice(r0, r1))).T if t.spec.transpose else \
                stored.read(path, (slice(r0, r1),))
        return
    index = tuple(i for i in (t.layer, t.expert) if i is not None)
    parts = [stored.read((t.stack,) + p, index) for p in t.spec.parts]
    yield ours_to_hf(t.spec, parts)


# ---------------------------------------------------------------------- comparing folders (tests, checks)
def hf_tensor_names(folder: str | os.PathLike) -> list[str]:
    return sorted(n for n in open_hf_weights(folder).names() if not IGNORED_HF_TENSORS.match(n))


def iter_hf_tensors(folder: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of an HF folder, one at a time, in name order."""
    weights = open_hf_weights(folder)
    for name in hf_tensor_names(folder):
        yield name, weights.read(name)

