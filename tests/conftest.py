import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Eight fake CPU devices for the mesh tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One compilation cache for the run (and the subprocesses tests start), so that a program several tests compile,
# e.g. the training step of each train() call, is compiled once; removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsv2-jax-tests-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def decode_kernels(monkeypatch):
    """decode_kernels(experts, projections): sets DSV2_DECODE_EXPERTS and DSV2_DECODE_PROJECTIONS for one test
    (fresh choices and compilations), restoring both after."""
    from dsv2_jax.grouped_matmul import reread_decode_choices

    def choose(experts="auto", projections="auto"):
        monkeypatch.setenv("DSV2_DECODE_EXPERTS", experts)
        monkeypatch.setenv("DSV2_DECODE_PROJECTIONS", projections)
        reread_decode_choices()

    yield choose
    monkeypatch.delenv("DSV2_DECODE_EXPERTS", raising=False)
    monkeypatch.delenv("DSV2_DECODE_PROJECTIONS", raising=False)
    reread_decode_choices()
