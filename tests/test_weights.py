"""from_hf: file layouts, both config styles, and a clear error for every mismatch."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dsv2_jax
from dsv2_jax import ModelConfig
from hf_models import YARN, hf_logits, random_hf_model, save_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = random_hf_model(seed=3, rope_parameters=YARN, max_position_embeddings=128)
    path = save_hf_model(model, tmp_path_factory.mktemp("hf") / "sharded")
    return model, path


def single_file_copy(src, dst):
    """The same checkpoint as one model.safetensors, no index."""
    os.makedirs(dst)
    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, f)))
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), dst)
    return tensors


def test_single_file_and_legacy_config_give_the_same_logits(hf_dir, tmp_path):
    hf, path = hf_dir
    ids = np.random.default_rng(0).integers(0, 160, (2, 24))
    want = hf_logits(hf, ids)
    single = tmp_path / "single"
    single_file_copy(path, single)
    config = ModelConfig.from_hf(single)
    config.save(single / "config.json", rope_style="rope_scaling")  # released files' style
    assert "rope_scaling" in json.loads((single / "config.json").read_text())
    for folder in (path, single):
        got = np.asarray(dsv2_jax.from_hf(folder, dtype=jnp.float32)(jnp.asarray(ids)))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_bf16_load(hf_dir):
    hf, path = hf_dir
    model = dsv2_jax.from_hf(path)  # default: bfloat16
    assert model.moe_layers.mlp.gate_proj[...].dtype == jnp.bfloat16
    ids = np.random.default_rng(1).integers(0, 160, (1, 16))
    want = hf_logits(hf, ids)
    got = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


def broken_copy(path, dst, edit):
    tensors = single_file_copy(path, dst)
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"),
     r"missing tensor model.layers.2.mlp.experts.5.up_proj.weight \(expected shape \[32, 64\]\)"),
    (lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": np.zeros((32, 64), np.float32)}),
     "unexpected tensor model.layers.1.mlp.experts.8.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": np.zeros((4 * 32, 8), np.float32)}),
     r"tensor model.layers.0.self_attn.kv_b_proj.weight has shape \[128, 8\], expected \[128, 16\]"),
])
def test_mismatched_tensors_are_named(hf_dir, tmp_path, edit, message):
    _, path = hf_dir
    broken_copy(path, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        dsv2_jax.from_hf(tmp_path / "bad", dtype=jnp.float32)


def test_config_disagreeing_with_weights(hf_dir, tmp_path):
    _, path = hf_dir
    shutil.copytree(path, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected tensor model.layers.2"):
        dsv2_jax.from_hf(tmp_path / "c", dtype=jnp.float32)


def test_missing_shard_and_truncated_file(hf_dir, tmp_path):
    _, path = hf_dir
    shutil.copytree(path, tmp_path / "m")
    shards = sorted(f for f in os.listdir(tmp_path / "m") if f.endswith(".safetensors"))
    os.remove(tmp_path / "m" / shards[-1])
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        dsv2_jax.from_hf(tmp_path / "m", dtype=jnp.float32)
    shutil.copytree(path, tmp_path / "t")
    victim = tmp_path / "t" / shards[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ValueError, match=shards[0]):
        dsv2_jax.from_hf(tmp_path / "t", dtype=jnp.float32)
