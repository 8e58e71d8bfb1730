"""The grain pipeline: packing, splits, per-process shards, determinism, checkpointed position, formats."""

import json

import numpy as np
import pytest

from dsv2_jax import ModelConfig
from dsv2_jax.data import DataConfig, Pipeline, split_indices, stdlib_sources
from dsv2_jax.tokenizer import ByteTokenizer


def write_docs(tmp_path, n=12):
    paths = []
    for i in range(n):
        p = tmp_path / f"doc{i:02d}.txt"
        p.write_text(f"document {i} " + "x" * (5 + 3 * i))
        paths.append(str(p))
    return paths


def unpack(batches):
    """The documents of packed rows, reassembled from segment ids (rows may split a document)."""
    docs, current = [], []
    for b in batches:
        for tokens, segs, pos in zip(b["tokens"], b["segment_ids"], b["positions"]):
            for t, s, p in zip(tokens, segs, pos):
                if t == ByteTokenizer.bos_id and current:
                    docs.append(current)
                    current = []
                current.append(int(t))
    return docs + ([current] if current else [])


def test_packing_segments_and_positions(tmp_path):
    write_docs(tmp_path)
    cfg = DataConfig(sources=[str(tmp_path / "*.txt")], seq_len=32, eval_fraction=0.0)
    batches = [next(Pipeline(cfg, 4, repeat=False))]
    b = batches[0]
    assert b["tokens"].shape == (4, 32) and b["tokens"].dtype == np.int32
    for tokens, segs, pos in zip(b["tokens"], b["segment_ids"], b["positions"]):
        starts = np.flatnonzero(np.diff(segs, prepend=0))
        for s in starts:  # a new segment starts at position 0 and positions then count up
            assert pos[s] == 0
        assert np.all((np.diff(pos) == 1) | (np.diff(segs) != 0))
        assert segs.min() >= 1
    text = ByteTokenizer().decode(b["tokens"].reshape(-1))
    assert "document" in text


def test_every_document_once_per_epoch_and_shuffled_by_seed(tmp_path):
    paths = write_docs(tmp_path)
    want = sorted(ByteTokenizer().encode(open(p).read()) for p in paths)

    def epoch(seed):
        cfg = DataConfig(sources=paths, seq_len=16, eval_fraction=0.0, seed=seed)
        rows = []
        for b in Pipeline(cfg, 1, repeat=False):
            rows.append(b)
        docs = [d[1:-1] for d in unpack(rows)]  # drop BOS / EOS
        return docs

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert a == b and a != c
    complete = a[:-1]  # the last document may be cut by the dropped partial row at the epoch's end
    assert len(set(map(tuple, complete))) == len(complete) == len(want) - 1
    assert all(d in want for d in complete)


def test_processes_read_disjoint_shards(tmp_path):
    paths = write_docs(tmp_path, 16)
    cfg = DataConfig(sources=paths, seq_len=8, eval_fraction=0.0)
    seen = []
    for rank in range(2):
        rows = list(Pipeline(cfg, 1, process_index=rank, process_count=2, repeat=False))
        seen.append({tuple(d) for d in unpack(rows) if len(d) > 8})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_held_out_split_is_disjoint():
    train, held = split_indices(100, 0.1, 0)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100
    assert split_indices(100, 0.1, 0)[1].tolist() == held.tolist()


def test_iterator_state_restores_the_exact_position(tmp_path):
    paths = write_docs(tmp_path)
    cfg = DataConfig(sources=paths, seq_len=16, eval_fraction=0.0)
    a = Pipeline(cfg, 2)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state()))
    want = [next(a) for _ in range(4)]
    b = Pipeline(cfg, 2)
    b.restore(state)
    got = [next(b) for _ in range(4)]
    for x, y in zip(want, got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_state_at_a_row_that_ends_a_document_restores_exactly(tmp_path):
    """Documents of one row each (BOS + 6 bytes + EOS = 8 tokens): every saved state has no remainder."""
    for i in range(10):
        (tmp_path / f"d{i}.txt").write_text("abcde" + "ABCDEFGHIJ"[i])
    cfg = DataConfig(sources=[str(tmp_path / "*.txt")], seq_len=8, eval_fraction=0.0)
    for skip in (0, 1, 3):  # 0: the state before the first batch
        a = Pipeline(cfg, 2)
        for _ in range(skip):
            next(a)
        state = json.loads(json.dumps(a.state()))  # as the checkpoint stores it
        want = [next(a)["tokens"] for _ in range(3)]
        b = Pipeline(cfg, 2)
        b.restore(state)
        np.testing.assert_array_equal(np.stack(want), np.stack([next(b)["tokens"] for _ in range(3)]))


def test_jsonl_and_token_arrays(tmp_path):
    lines = [json.dumps({"text": f"line {i}", "id": i}) for i in range(6)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    b = next(Pipeline(DataConfig(sources=[str(tmp_path / "d.jsonl")], format="jsonl", seq_len=64,
                                 eval_fraction=0.0, seed=3), 1))
    assert "line" in ByteTokenizer().decode(b["tokens"][0])
    eos = ByteTokenizer.eos_id
    stream = np.array([1, 2, 3, eos, 4, 5, eos, 6, 7, 8, 9, eos], np.int32)
    np.save(tmp_path / "t.npy", stream)
    cfg = DataConfig(sources=[str(tmp_path / "t.npy")], format="tokens", seq_len=6, eval_fraction=0.0)
    rows = list(Pipeline(cfg, 1, repeat=False))
    docs = sorted(tuple(d) for d in unpack(rows))
    assert (ByteTokenizer.bos_id, 1, 2, 3, eos) in docs
    # with a model, token arrays are that model's ids: its BOS and EOS, not data.tokenizer's (bytes by default)
    config = ModelConfig.from_preset("tiny").replace(vocab_size=1000, bos_token_id=900, eos_token_id=901)
    np.save(tmp_path / "m.npy", np.array([1, 2, 3, 901, 4, 5, 257, 6, 901], np.int32))
    cfg = DataConfig(sources=[str(tmp_path / "m.npy")], format="tokens", seq_len=6, eval_fraction=0.0)
    stream = [int(t) for b in Pipeline(cfg, 1, repeat=False, model_config=config)
              for t, seg in zip(b["tokens"].ravel(), b["segment_ids"].ravel()) if seg]
    docs = sorted(" ".join(map(str, stream)).replace("901 900", "901|900").split("|"))
    assert docs == ["900 1 2 3 901", "900 4 5 257 6 901"]
    # ids outside the model's vocabulary: an error naming the file and the ids, not a NaN loss later
    np.save(tmp_path / "bad.npy", np.array([1, 2, 1000, 901, -1, 4], np.int32))
    cfg = DataConfig(sources=[str(tmp_path / "bad.npy")], format="tokens", seq_len=6, eval_fraction=0.0)
    with pytest.raises(ValueError, match=r"bad.npy.*\[1, 1000\].*vocabulary \[0, 1000\)"):
        list(Pipeline(cfg, 1, repeat=False, model_config=config))


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nomatch"):
        Pipeline(DataConfig(sources=[str(tmp_path / "nomatch*.txt")]), 1)
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="no string field 'text'"):
        next(Pipeline(DataConfig(sources=[str(tmp_path / "bad.jsonl")], format="jsonl", eval_fraction=0.0), 1))
    with pytest.raises(ValueError, match="data.format"):
        Pipeline(DataConfig(format="parquet"), 1)


def test_default_corpus_is_the_standard_library():
    files = stdlib_sources()
    assert len(files) > 500 and any(f.endswith("os.py") for f in files)


def test_model_ids_that_are_not_the_tokenizers_special_tokens_warn(tmp_path):
    """A tokenizer.json whose special tokens are 0/1, with a model config whose BOS/EOS are 256/257 (ordinary
    tokens there): documents would be marked with ordinary tokens, so loading it says so."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsv2_jax.tokenizer import load_tokenizer
    tok = Tokenizer(models.WordLevel({"<bos>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 300)}}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<bos>", "<eos>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    tiny = ModelConfig.from_preset("tiny")
    with pytest.warns(UserWarning, match=r"bos 256 \('w256'\) and eos 257 \('w257'\) are not special tokens"):
        load_tokenizer(str(tmp_path), tiny)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tokenizer(str(tmp_path), tiny.replace(bos_token_id=0, eos_token_id=1)).eos_id == 1
