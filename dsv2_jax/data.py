"""The input pipeline (grain): documents -> tokens -> packed fixed-length rows with segment ids and positions.

Sources: text files and globs (one document per file), JSONL files (one document per line, a text field), and
pre-tokenized .npy arrays (1-D token ids, documents separated by the EOS id). With no source given, the text of the
Python standard library's own source files on this machine: a default corpus that needs no download.

Documents are split into train and held-out sets deterministically, shuffled by seed (a new order every epoch),
sharded by process (each host reads its own documents), tokenized (BOS + ids + EOS), packed with grain's
concat-then-split and batched. The iterator state is a small JSON dict that checkpoints save and restore.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
from typing import Iterator

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from .tokenizer import load_tokenizer

FORMATS = ("text", "jsonl", "tokens")


@dataclasses.dataclass
class DataConfig:
    sources: list[str] = dataclasses.field(default_factory=list)  # files / globs; empty = Python stdlib sources
    format: str = "text"  # text | jsonl | tokens
    text_field: str = "text"  # for jsonl
    tokenizer: str = "byte"  # 'byte' or a tokenizer.json / folder holding one
    seq_len: int = 256
    eval_fraction: float = 0.05
    seed: int = 0


def stdlib_sources() -> list[str]:
    """The .py files of this Python's standard library (site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"no Python sources under {root!r} to use as the default corpus")
    return files


def expand_sources(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"data source {pattern!r} matches no file")
        files += matches
    return files


class Documents:
    """Random access to the documents of a source list: (kind, location) records, read lazily."""

    def __init__(self, cfg: DataConfig, eos_id: int | None):
        if cfg.format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {cfg.format!r}")
        self.cfg = cfg
        files = expand_sources(cfg.sources) if cfg.sources else stdlib_sources()
        self.records: list[tuple] = []
        self._arrays: dict[str, np.ndarray] = {}
        for path in files:
            if cfg.format == "text":
                self.records.append((path, None, None))
            elif cfg.format == "jsonl":
                self.records += [(path, offset, None) for offset in _line_offsets(path)]
            else:
                self.records += self._token_documents(path, eos_id)
        if not self.records:
            raise ValueError(f"no documents found in {cfg.sources or 'the standard library'}")

    def _token_documents(self, path, eos_id):
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as e:
            raise ValueError(f"{path}: not a .npy array of token ids ({e})") from None
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{path}: expected a 1-D integer array of token ids, got {array.dtype}{list(array.shape)}")
        self._arrays[path] = array
        ends = np.flatnonzero(array == eos_id) + 1 if eos_id is not None else np.array([], int)
        bounds = [0] + [int(e) for e in ends if e < len(array)] + [len(array)]
        return [(path, a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def __len__(self):
        return len(self.records)

    def read(self, index: int):
        """A document: text (str) or token ids (np.ndarray) for the tokens format."""
        path, a, b = self.records[index]
        if self.cfg.format == "text":
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        if self.cfg.format == "jsonl":
            with open(path, "rb") as f:
                f.seek(a)
                line = f.readline()
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} at byte {a}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(self.cfg.text_field), str):
                raise ValueError(f"{path} at byte {a}: no string field {self.cfg.text_field!r}")
            return record[self.cfg.text_field]
        return np.asarray(self._arrays[path][a:b])


def _line_offsets(path: str) -> list[int]:
    offsets, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic train / held-out split of n documents (at least one of each when n >= 2)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


class Pipeline:
    """Packed batches for one split: dicts of int32 [rows, seq_len] arrays `tokens`, `segment_ids`, `positions`.

    rows = the per-process batch. Iterate with `iter()`; `state()` / `restore(state)` checkpoint the position.
    """

    def __init__(self, cfg: DataConfig, rows: int, split: str = "train", *, process_index: int = 0,
                 process_count: int = 1, repeat: bool = True, model_config=None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer, model_config)
        if model_config is not None and self.tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{model_config.vocab_size}")
        bos_id, eos_id = self.tokenizer.bos_id, self.tokenizer.eos_id
        if cfg.format == "tokens" and model_config is not None:  # ids made by the model's tokenizer, not data.tokenizer
            bos_id, eos_id = model_config.bos_token_id, model_config.eos_token_id
            eos_id = eos_id[0] if isinstance(eos_id, (tuple, list)) else eos_id
        vocab = model_config.vocab_size if model_config is not None else None
        docs = Documents(cfg, eos_id)
        train, held_out = split_indices(len(docs), cfg.eval_fraction, cfg.seed)
        indices = {"train": train, "eval": held_out}[split]
        if len(indices) < process_count:
            raise ValueError(f"the {split} split has {len(indices)} documents, fewer than {process_count} processes")
        ds = grain.MapDataset.source(indices)
        if split == "train":
            ds = ds.shuffle(seed=cfg.seed)
        ds = ds[process_index::process_count]
        if repeat:
            ds = ds.repeat(None)
        tokenizer = self.tokenizer

        def tokenize(i):
            doc = docs.read(int(i))
            ids = doc if isinstance(doc, np.ndarray) else tokenizer.encode(doc)
            if isinstance(doc, np.ndarray) and vocab and len(ids) and not 0 <= ids.min() <= ids.max() < vocab:
                path, a, _ = docs.records[int(i)]
                raise ValueError(f"{path}: the document at token {a} has ids in [{ids.min()}, {ids.max()}], outside "
                                 f"the model's vocabulary [0, {vocab})")
            pieces = ([[bos_id]] if bos_id is not None else []) + [ids]
            if eos_id is not None and not (len(ids) and ids[-1] == eos_id):
                pieces.append([eos_id])
            return {"tokens": np.concatenate([np.asarray(p, np.int32) for p in pieces])}

        packed = ConcatThenSplitIterDataset(ds.map(tokenize).to_iter_dataset(),
                                            length_struct={"tokens": cfg.seq_len})
        self.dataset = packed.batch(rows, drop_remainder=True).map(_rename)
        self._iterator = iter(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        return self._iterator

    def __next__(self) -> dict:
        return next(self._iterator)

    def restart(self) -> None:
        """Back to the split's first batch (a new iterator over the same documents; nothing is read again)."""
        self._iterator = iter(self.dataset)

    def state(self) -> dict:
        return json.loads(json.dumps(self._iterator.get_state()))

    def restore(self, state: dict) -> None:
        self._iterator.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state):
    """A `state()` (JSON types) as grain wrote it: its packing's remainder slices are tuples. As JSON lists, an
    empty slice [-1, -1] no longer equals grain's (-1, -1), and a restore at a row that ended a document would
    take the next document for a remainder and skip it."""
    if not isinstance(state, dict):
        return state
    return {k: ({f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices" else _slices_as_tuples(v))
            for k, v in state.items()}


def _rename(batch: dict) -> dict:
    return {"tokens": batch["tokens"], "segment_ids": batch["tokens_segment_ids"],
            "positions": batch["tokens_positions"]}

