"""Tokenizers: an HF tokenizer.json through `tokenizers`, or byte-level for the tiny model.

Both expose encode(text) -> list[int], decode(ids) -> str, bos_id, eos_id, pad_id and vocab_size.
"""

from __future__ import annotations

import os
import warnings


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS 256, EOS 257, PAD 258 (the tiny preset's ids)."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer.json; special ids from the model config when it has them."""

    def __init__(self, path: str, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None):
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        odd = [f"{what} {i} ({self._tok.id_to_token(i)!r})" for what, i in (("bos", bos_id), ("eos", eos_id))
               if i is not None and i not in special]
        if odd:
            warnings.warn(f"{path}: the model's {' and '.join(odd)} {'is' if len(odd) == 1 else 'are'} not special "
                          "tokens of this tokenizer, yet documents are marked with them (set bos_token_id / "
                          "eos_token_id in the model config)", stacklevel=2)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str | os.PathLike | None = None, config=None):
    """None or 'byte' -> ByteTokenizer; a tokenizer.json, or a folder holding one -> HFTokenizer.

    config (a ModelConfig) supplies bos/eos/pad ids for HF tokenizers.
    """
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    path = os.fspath(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path!r} (expected a tokenizer.json, a folder holding one, or 'byte')")
    eos = config.eos_token_id if config is not None else None
    if isinstance(eos, (tuple, list)):
        eos = eos[0]
    return HFTokenizer(path, bos_id=getattr(config, "bos_token_id", None), eos_id=eos,
                       pad_id=getattr(config, "pad_token_id", None))
