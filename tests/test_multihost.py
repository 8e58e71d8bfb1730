"""Two processes x 4 CPU devices (gloo collectives): a sharded forward and a train-style gradient step over a mesh
that spans both processes equal the single-process, single-device result.

The expert axis crosses the process boundary (mesh expert=4, tensor=2: process 0 holds experts 0-3, process 1
experts 4-7), so the MoE all_to_all runs between processes. Each process feeds only its own rows of the batch.
This file is also the worker: `python tests/test_multihost.py PROCESS_ID PORT OUT_DIR`. And train.py itself as two
processes: stopped and resumed, it logs what an unbroken two-process run logs.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
BATCH, SEQ, LR = 8, 8, 0.5


def config():
    from dsv2_jax import ModelConfig

    return ModelConfig.from_preset("tiny").replace(num_hidden_layers=2, initializer_range=0.1)


def batch():
    ids = np.random.default_rng(7).integers(0, config().vocab_size, (BATCH, SEQ + 1))
    return ids[:, :-1], ids[:, 1:]


def train_step(graphdef, state, ids, targets):
    """Next-token cross-entropy, its gradient, and one SGD step."""
    import jax
    import optax
    from flax import nnx

    def loss_fn(state):
        logits = nnx.merge(graphdef, state).forward(ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    new_state = jax.tree.map(lambda w, g: w - LR * g, state, grads)
    return loss, logits, grads, new_state


def flat(tree):
    import jax

    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def worker(process_id: int, port: int, out_dir: str):
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    import dsv2_jax
    from dsv2_jax import distributed, sharding

    distributed.initialize(f"localhost:{port}", NUM_PROCESSES, process_id)
    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == LOCAL_DEVICES
    mesh = dsv2_jax.make_mesh(expert=4, tensor=2)
    model = dsv2_jax.init_model(config(), mesh, seed=0)
    graphdef, state = nnx.split(model)
    ids, targets = batch()
    start, stop = distributed.host_rows(BATCH, mesh)
    ids, targets = (distributed.global_array(a[start:stop], mesh) for a in (ids, targets))

    @jax.jit
    def step(state, ids, targets):
        with sharding.activation_mesh(mesh):
            return train_step(graphdef, state, ids, targets)

    loss, logits, grads, new_state = step(state, ids, targets)
    experts = state["moe_layers"]["mlp"]["gate_proj"][...]
    local_experts = sorted({idx[1].start for idx in experts.sharding.addressable_devices_indices_map(
        experts.shape).values()})
    result = multihost_utils.process_allgather(
        dict(loss=loss, logits=logits, grads=grads, new_state=nnx.to_pure_dict(new_state)), tiled=True)
    if process_id == 0:
        np.savez(os.path.join(out_dir, "result.npz"), rows=np.array([start, stop]),
                 **{k: v for k, v in flat(result).items()})
    np.save(os.path.join(out_dir, f"layout{process_id}.npy"), np.array([start, stop] + local_experts))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def finish(procs, timeout: float) -> None:
    """Waits for the processes (killing any still running if the wait fails) and asserts each exited with 0,
    showing the end of a failed one's output."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"


def test_two_processes_match_single_device(tmp_path):
    import jax
    from flax import nnx

    from dsv2_jax.model import DeepseekV2

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(NUM_PROCESSES)]
    try:
        # the single-device reference, computed while the workers start
        graphdef, state = nnx.split(DeepseekV2(config(), rngs=nnx.Rngs(0)))
        ids, targets = batch()
        loss, logits, grads, new_state = jax.jit(lambda s, i, t: train_step(graphdef, s, i, t))(state, ids, targets)
        want = flat(dict(loss=loss, logits=logits, grads=grads, new_state=nnx.to_pure_dict(new_state)))
    except BaseException:
        for p in procs:
            p.kill()
        raise
    finish(procs, timeout=240)

    # each process fed its own half of the batch and holds its own half of the experts
    layouts = [np.load(tmp_path / f"layout{i}.npy") for i in range(NUM_PROCESSES)]
    assert [list(a[:2]) for a in layouts] == [[0, 4], [4, 8]]
    assert [list(a[2:]) for a in layouts] == [[0, 2], [4, 6]]

    got = dict(np.load(tmp_path / "result.npz"))
    assert set(want) == set(got) - {"rows"}
    for key, w in want.items():
        scale = max(np.abs(w).max(), 1e-30)
        err = np.abs(got[key] - w).max() / scale
        assert err <= 1e-5, f"{key}: max error {err:.2e} of max |value|"


def run_train_py(workdir, *args) -> list[dict]:
    """train.py on the tiny recipe in NUM_PROCESSES processes of LOCAL_DEVICES CPU devices each (mesh data=8);
    returns the logged records."""
    import json
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
               JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}",
               JAX_NUM_PROCESSES=str(NUM_PROCESSES))
    command = [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs", "tiny.yaml"),
               "--workdir", str(workdir), "--no-progress", "--set", "steps=6", "--set", "log_every=3",
               "--set", "eval_every=3", "--set", "checkpoint_every=3", "--set", "eval_batches=2",
               "--set", "mesh={data: 8}", "--set", "data.seq_len=64", "--set", "model_overrides={num_hidden_layers: 2}",
               *args]
    procs = [subprocess.Popen(command, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(NUM_PROCESSES)]
    finish(procs, timeout=300)
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_train_py_on_two_processes_resumes_as_an_unbroken_run(tmp_path):
    """The training loop across two processes (each reading its own documents, checkpoints written together, the
    held-out loss over both): stopped after 3 steps and started again, its logged figures at step 6 equal an
    unbroken run's."""
    unbroken = run_train_py(tmp_path / "unbroken")
    run_train_py(tmp_path / "resumed", "--stop-after", "3")
    resumed = run_train_py(tmp_path / "resumed")
    assert [r["step"] for r in unbroken] == [3, 6] and [r["step"] for r in resumed] == [3, 6]
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3", "6"]
    for key in ("loss", "grad_norm", "eval_loss"):
        assert np.isfinite(unbroken[1][key]) and resumed[1][key] == unbroken[1][key], key
    assert unbroken[1]["loss"] < unbroken[0]["loss"]


def test_initialize_reports_incomplete_settings(monkeypatch):
    from dsv2_jax import distributed

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="needs the coordinator address.*got None, 2, 0"):
        distributed.initialize()
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"process_id \(JAX_PROCESS_ID\) must lie in \[0, 2\), got 2"):
        distributed.initialize("localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()


def test_host_rows_on_one_process():
    import dsv2_jax
    from dsv2_jax import distributed

    mesh = dsv2_jax.make_mesh(data=2, expert=2, tensor=2)
    assert distributed.host_rows(8, mesh) == (0, 8)
    rows = np.arange(16).reshape(8, 2)
    batch = distributed.global_array(rows, mesh)
    assert batch.shape == (8, 2) and {s.data.shape for s in batch.addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(np.asarray(batch), rows)
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by the 4 batch shards"):
        distributed.host_rows(6, mesh)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
