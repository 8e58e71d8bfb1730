"""Weight conversion both ways (dsv2_jax.convert, convert_weights.py) and dsv2_jax.load.

The references: the original HF folder byte for byte, and transformers' DeepseekV2ForCausalLM logits.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import convert_weights
import dsv2_jax
from dsv2_jax import checkpoint, convert
from dsv2_jax.sharding import MESH_AXES, param_sharding
from dsv2_jax.weights import iter_params
from hf_models import YARN, hf_logits, random_hf_model, save_hf_model

CONFIGS = {
    "q_lora-1dense-fp32": dict(),
    "plain_q-all_moe-yarn-bf16": dict(q_lora_rank=None, first_k_dense_replace=0, rope_parameters=YARN,
                                      max_position_embeddings=128, n_shared_experts=2, v_head_dim=12),
    "all_dense-tied-fp32": dict(first_k_dense_replace=3, tie_word_embeddings=True),
}


def tensors_of(folder):
    return dict(convert.iter_hf_tensors(folder))


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        g, w = got[name], want[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        assert g.tobytes() == w.tobytes(), f"{name} differs"


def assert_nothing_left(parent, keep):
    """Only the inputs remain: no output, no staging folder."""
    assert sorted(os.listdir(parent)) == sorted(keep)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_checkpoint_to_hf_is_bit_exact(tmp_path, monkeypatch, name):
    monkeypatch.setattr(convert, "ROW_BLOCK_BYTES", 3000)  # embedding / lm_head in many row blocks, one partial
    hf = random_hf_model(seed=len(name), **CONFIGS[name])
    if "bf16" in name:
        hf = hf.to(torch.bfloat16)
    save_hf_model(hf, tmp_path / "hf", max_shard_size="64KB")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 3  # really sharded
    convert.hf_to_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    convert.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_size="100KB")
    want = tensors_of(tmp_path / "hf")
    assert_same_tensors(tensors_of(tmp_path / "out"), want)

    files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files and len(files) > 1
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
    for f in files:  # each shard is a valid safetensors file under the limit (or one big tensor alone)
        with safe_open(str(tmp_path / "out" / f), "numpy") as h:
            sizes = [h.get_tensor(k).nbytes for k in h.keys()]
            assert all(index["weight_map"][k] == f for k in h.keys())
        assert sum(sizes) <= 100_000 or len(sizes) == 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_parameters" not in config and "rope_theta" in config
    assert config["torch_dtype"] == ("bfloat16" if "bf16" in name else "float32")
    if "yarn" in name:
        assert config["rope_scaling"]["type"] == "yarn" and config["rope_scaling"]["factor"] == 8.0
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in want) != ("all_dense" in name)


def test_transformers_reads_the_export_and_load_matches_transformers(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "ROW_BLOCK_BYTES", 3000)
    hf = random_hf_model(seed=7, rope_parameters=YARN, max_position_embeddings=128)
    save_hf_model(hf, tmp_path / "hf")
    convert_weights.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--no-progress"])
    convert_weights.main(["--ckpt", str(tmp_path / "ckpt"), "--out-hf", str(tmp_path / "out"),
                          "--max-shard-size", "200KB", "--no-progress"])
    ids = np.random.default_rng(0).integers(0, 160, (2, 24))
    want = hf_logits(hf, ids)

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.dtype == torch.float32
    np.testing.assert_array_equal(hf_logits(reloaded, ids), want)

    model = dsv2_jax.load(tmp_path / "ckpt", dtype=jnp.float32)
    assert isinstance(model, dsv2_jax.DeepseekV2)
    got = np.asarray(model(jnp.asarray(ids)))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, f"max |diff| / max |logit| = {err:.2e}"
    bf16 = dsv2_jax.load(tmp_path / "ckpt")  # default bf16, like from_hf
    assert bf16.moe_layers.mlp.gate_proj[...].dtype == jnp.bfloat16


def test_dtype_option_casts(tmp_path):
    hf = random_hf_model(seed=2)
    save_hf_model(hf, tmp_path / "hf")
    convert.hf_to_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    assert checkpoint.StoredParams(tmp_path / "ckpt").dtype(("moe_layers", "mlp", "up_proj")) == jnp.bfloat16
    convert.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out")  # default: the checkpoint's dtype
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors_of(tmp_path / "hf").items()}
    assert_same_tensors(tensors_of(tmp_path / "out"), want)
    convert.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out32", dtype="float32")
    assert_same_tensors(tensors_of(tmp_path / "out32"), {k: v.astype(np.float32) for k, v in want.items()})


def test_mixed_dtypes_keep_each_tensors_own(tmp_path):
    """transformers keeps the router (mlp.gate) in float32 beside bf16 weights when it loads and saves a model:
    each parameter keeps its source dtype both ways, so the round trip stays bit-exact."""
    hf = random_hf_model(seed=11).to(torch.bfloat16)
    for name, module in hf.named_modules():
        if name.endswith("mlp.gate"):
            module.float()
    save_hf_model(hf, tmp_path / "hf")
    want = tensors_of(tmp_path / "hf")
    assert {str(v.dtype) for k, v in want.items() if k.endswith("mlp.gate.weight")} == {"float32"}
    convert.hf_to_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    stored = checkpoint.StoredParams(tmp_path / "ckpt")
    assert stored.dtype(("moe_layers", "mlp", "router")) == np.float32
    assert stored.dtype(("moe_layers", "mlp", "up_proj")) == ml_dtypes.bfloat16
    convert.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out")
    assert_same_tensors(tensors_of(tmp_path / "out"), want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    router = dsv2_jax.load(tmp_path / "ckpt", dtype=jnp.float32).moe_layers.mlp.router[...]
    first_moe = next(k for k in sorted(want) if k.endswith("mlp.gate.weight") and ".layers.1." in k)
    np.testing.assert_array_equal(np.asarray(router[0]).T, want[first_moe])


def test_bin_input_equals_safetensors_input(tmp_path):
    hf = random_hf_model(seed=4)
    save_hf_model(hf, tmp_path / "hf")
    tensors = {k: torch.from_numpy(v) for k, v in tensors_of(tmp_path / "hf").items()}
    names = sorted(tensors)
    os.makedirs(tmp_path / "bin")
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "bin")
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in halves.items():
        torch.save({k: tensors[k] for k in part}, tmp_path / "bin" / file)
    index = {"weight_map": {k: f for f, part in halves.items() for k in part}}
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    convert.hf_to_checkpoint(tmp_path / "hf", tmp_path / "from_st")
    convert.hf_to_checkpoint(tmp_path / "bin", tmp_path / "from_bin")
    for source in ("from_st", "from_bin"):
        convert.checkpoint_to_hf(tmp_path / source, tmp_path / f"{source}_hf")
    assert_same_tensors(tensors_of(tmp_path / "from_bin_hf"), tensors_of(tmp_path / "from_st_hf"))
    assert_same_tensors(tensors_of(tmp_path / "from_bin_hf"), tensors_of(tmp_path / "hf"))


def train_style_workdir(path, config, models):
    """A train.py-like workdir: checkpoints/<step>/{params, model_config, train_state} via CheckpointManager."""
    with ocp.CheckpointManager(path / "checkpoints") as manager:
        for step, model in models.items():
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(nnx.state(model, nnx.Param).to_pure_dict()),
                model_config=ocp.args.JsonSave(config.to_hf_dict()),
                train_state=ocp.args.JsonSave({"step": step})))
        manager.wait_until_finished()
    os.makedirs(path / "checkpoints" / "30.orbax-checkpoint-tmp-1" / "params")  # an unfinished save


def test_train_checkpoints_export_and_load(tmp_path):
    config = dsv2_jax.ModelConfig.from_hf(random_hf_model(seed=5).config.to_dict())
    models = {step: dsv2_jax.DeepseekV2(config, rngs=nnx.Rngs(step)) for step in (10, 20)}  # float32 params
    train_style_workdir(tmp_path / "work", config, models)
    want_model = models[20]
    ids = np.random.default_rng(3).integers(0, 160, (2, 16))
    want = np.asarray(want_model(jnp.asarray(ids)))
    for path in (tmp_path / "work", tmp_path / "work" / "checkpoints", tmp_path / "work" / "checkpoints" / "20"):
        loaded = dsv2_jax.load(path, dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(ids))), want)

    convert.checkpoint_to_hf(tmp_path / "work", tmp_path / "out", max_shard_size="300KB")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.dtype == torch.float32  # the checkpoint's dtype
    got = hf_logits(hf, ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    convert.checkpoint_to_hf(tmp_path / "work", tmp_path / "out_bf16", dtype="bfloat16")
    back = tensors_of(tmp_path / "out_bf16")
    assert {v.dtype for v in back.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert_same_tensors(back, {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors_of(tmp_path / "out").items()})


def test_load_with_mesh_restores_into_the_param_shardings(tmp_path):
    model = dsv2_jax.DeepseekV2(dsv2_jax.ModelConfig.from_preset("tiny"), rngs=nnx.Rngs(1))
    dsv2_jax.save(model, tmp_path / "step")
    mesh = dsv2_jax.make_mesh(fsdp=2, expert=2, tensor=2)  # Auto axes: jax.make_mesh's Explicit ones are refused
    sharded = dsv2_jax.load(tmp_path / "step", dtype=jnp.float32, mesh=mesh)
    want = dict(iter_params(nnx.state(model, nnx.Param)))
    for path, var in iter_params(nnx.state(sharded, nnx.Param)):
        assert var[...].sharding == param_sharding(mesh, var), path
        assert var[...].dtype == jnp.float32
        for shard in var[...].addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want[path][...])[shard.index])
    assert any(len(v[...].sharding.device_set) == 8 and not v[...].sharding.is_fully_replicated
               for _, v in iter_params(nnx.state(sharded, nnx.Param)))


# ---------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return save_hf_model(random_hf_model(seed=9), root / "hf")


def single_file(src, dst, edit=None):
    tensors = tensors_of(src)
    if edit:
        edit(tensors)
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    names = list(tensors)
    convert.write_safetensors(os.path.join(dst, "model.safetensors"),
                              [(n, tensors[n].shape, tensors[n].dtype) for n in names], (tensors[n] for n in names))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"),
     r"missing tensor model.layers.2.mlp.experts.5.up_proj.weight \(expected shape \[32, 64\]\)"),
    (lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": np.zeros((32, 64), np.float32)}),
     "unexpected tensor model.layers.1.mlp.experts.8.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.kv_b_proj.weight": np.zeros((128, 8), np.float32)}),
     r"tensor model.layers.0.self_attn.kv_b_proj.weight has shape \[128, 8\], expected \[128, 16\]"),
])
def test_bad_tensors_fail_by_name_and_leave_nothing(hf_dir, tmp_path, edit, message):
    single_file(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        convert.hf_to_checkpoint(tmp_path / "bad", tmp_path / "ckpt")
    assert_nothing_left(tmp_path, ["bad"])


def test_config_weights_disagreement_and_truncated_file(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path / "cfg")
    cfg = json.loads((tmp_path / "cfg" / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected tensor model.layers.2"):
        convert.hf_to_checkpoint(tmp_path / "cfg", tmp_path / "ckpt")
    shutil.copytree(hf_dir, tmp_path / "trunc")
    shards = sorted(f for f in os.listdir(tmp_path / "trunc") if f.endswith(".safetensors"))
    victim = tmp_path / "trunc" / shards[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shards[-1]}: tensor .* ends at byte .* truncated"):
        convert.hf_to_checkpoint(tmp_path / "trunc", tmp_path / "ckpt")
    os.remove(tmp_path / "trunc" / shards[0])
    with pytest.raises(FileNotFoundError, match=shards[0]):
        convert.hf_to_checkpoint(tmp_path / "trunc", tmp_path / "ckpt")
    shutil.copytree(hf_dir, tmp_path / "header")  # an entry without data_offsets
    victim = tmp_path / "header" / shards[-1]
    data = victim.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    del header[name]["data_offsets"]
    raw = json.dumps(header).encode()
    victim.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ValueError, match=f"{shards[-1]}: tensor '{name}' has a malformed header entry"):
        convert.hf_to_checkpoint(tmp_path / "header", tmp_path / "ckpt")
    assert_nothing_left(tmp_path, ["cfg", "trunc", "header"])


def test_failure_midway_leaves_nothing_and_existing_output_needs_force(hf_dir, tmp_path, monkeypatch):
    calls = []
    real_read = convert.SafetensorsFolder.read

    def failing_read(self, name):
        calls.append(name)
        if len(calls) == 30:
            raise OSError("disk went away")
        return real_read(self, name)

    monkeypatch.setattr(convert.SafetensorsFolder, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        convert.hf_to_checkpoint(hf_dir, tmp_path / "ckpt")
    assert_nothing_left(tmp_path, [])
    monkeypatch.undo()

    convert.hf_to_checkpoint(hf_dir, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        convert.hf_to_checkpoint(hf_dir, tmp_path / "ckpt")
    assert convert_weights.main(["--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 1
    convert.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists"):
        convert.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out")
    convert.hf_to_checkpoint(hf_dir, tmp_path / "ckpt", dtype="bfloat16", force=True)
    convert.checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "out", force=True)
    assert {v.dtype for v in tensors_of(tmp_path / "out").values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert_nothing_left(tmp_path, ["ckpt", "out"])


def test_terminated_run_leaves_nothing_and_stale_staging_is_removed(hf_dir, tmp_path, monkeypatch):
    """SIGTERM midway (as a job scheduler stops a job) unwinds like Ctrl-C: exit 130, no output, no staging
    folder. A staging folder left by a run on this host whose process is gone (SIGKILL) goes with the next run's
    start; a running process's stays, and so does another host's."""
    import signal
    import socket
    import subprocess
    calls, real_read = [], convert.SafetensorsFolder.read

    def terminated_read(self, name):
        calls.append(name)
        if len(calls) == 30:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_read(self, name)

    monkeypatch.setattr(convert.SafetensorsFolder, "read", terminated_read)
    handler = signal.getsignal(signal.SIGTERM)
    assert convert_weights.main(["--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 130
    assert signal.getsignal(signal.SIGTERM) is handler and len(calls) >= 30
    assert_nothing_left(tmp_path, [])
    monkeypatch.undo()

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    (tmp_path / f".ckpt.partial-{host}-{gone.pid}" / "ckpt").mkdir(parents=True)
    live = [f".ckpt.partial-{host}-{os.getppid()}",  # a live process's (this test's parent)
            f".ckpt.partial-otherhost-{gone.pid}"]  # another host's: its process cannot be checked from here
    for name in live:
        (tmp_path / name).mkdir()
    convert.hf_to_checkpoint(hf_dir, tmp_path / "ckpt")
    assert_nothing_left(tmp_path, ["ckpt"] + live)


def test_saved_models_store_a_layer_and_an_expert_a_chunk(tmp_path):
    """dsv2_jax.save (and train.py) store each layer (and expert) of a stack in chunks of its own: an export
    reading one expert's tensor decodes ~its bytes, not a chunk spanning every layer and expert (orbax's default
    splits the widest axes: 86x slower to export at 64 experts, bench/RESULTS.md)."""
    config = dsv2_jax.ModelConfig.from_preset("tiny")
    dsv2_jax.save(dsv2_jax.DeepseekV2(config, rngs=nnx.Rngs(0)), tmp_path / "step")
    stored = checkpoint.StoredParams(tmp_path / "step")
    for path in stored.meta:
        experts = path in [("moe_layers", "mlp", w) for w in ("gate_proj", "up_proj", "down_proj")]
        lead = 2 if experts else 1 if path[0].endswith("_layers") else 0
        stored.read(path, (0,) * lead)
        chunk, shape = stored._open[path].chunk_layout.read_chunk.shape, stored.meta[path].shape
        assert chunk[:lead] == (1,) * lead and chunk[lead:] == tuple(shape[lead:]), (path, chunk)


def test_checkpoint_not_matching_its_config_and_no_checkpoint(tmp_path):
    model = dsv2_jax.DeepseekV2(dsv2_jax.ModelConfig.from_preset("tiny"), rngs=nnx.Rngs(0))
    dsv2_jax.save(model, tmp_path / "step")
    meta = tmp_path / "step" / "model_config" / "metadata"
    cfg = json.loads(meta.read_text())
    cfg["moe_intermediate_size"] += 1
    meta.write_text(json.dumps(cfg))
    i = cfg["moe_intermediate_size"]
    with pytest.raises(ValueError, match=rf"parameter moe_layers/mlp/gate_proj has shape \[.*\], expected \[.*, {i}\]"):
        convert.checkpoint_to_hf(tmp_path / "step", tmp_path / "out")
    with pytest.raises(ValueError, match="moe_layers/mlp/gate_proj has shape"):
        dsv2_jax.load(tmp_path / "step")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*empty.*expected a step directory"):
        dsv2_jax.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        convert.checkpoint_to_hf(tmp_path / "empty", tmp_path / "out")
    assert_nothing_left(tmp_path, ["step", "empty"])


def test_cli_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        convert_weights.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--hf", "--out", "--ckpt", "--out-hf", "--dtype", "--max-shard-size", "--force", "--no-progress"):
        assert option in text
    for bad in (["--hf", "x"], ["--ckpt", "x", "--out", "y"], ["--hf", "x", "--ckpt", "y", "--out", "z"],
                ["--hf", "x", "--out", "y", "--dtype", "int8"]):
        with pytest.raises(SystemExit) as e:
            convert_weights.parse_args(bad)
        assert e.value.code == 2
    assert convert.parse_size("5GB") == 5 * 10**9 and convert.parse_size("2GiB") == 2 << 30
    with pytest.raises(ValueError, match="max shard size"):
        convert.parse_size("five")
