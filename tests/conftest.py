import os
import shutil
import sys
import tempfile

# Tests run on the CPU with float32 matmuls; keep XLA from grabbing more threads than CI has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

# One persistent XLA compilation cache for the whole run: this process, the xdist workers (started
# after this file is read, so they inherit the variable) and every train.py / CLI subprocess. A tiny
# train.py run on a 2-core VM is ~38 s with its programs cached and ~74 s without; a test that builds
# its own training setup in-process compiles what a fixture's run already compiled. Set
# SEGFORMER_TEST_XLA_CACHE to a directory to keep the cache between runs (it is then never deleted).
_OWN_CACHE = "SEGFORMER_TEST_XLA_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["SEGFORMER_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="segformer-jax-tests-xla-")
    _OWN_CACHE = os.environ["SEGFORMER_TEST_XLA_CACHE"]
SHARED_COMPILATION_CACHE = os.path.abspath(os.path.expanduser(os.environ["SEGFORMER_TEST_XLA_CACHE"]))
os.environ["JAX_COMPILATION_CACHE_DIR"] = SHARED_COMPILATION_CACHE  # read by jax at import, and by the CLIs
# (below ~0.1 s, loading an entry saves about what it costs)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    if "jax" in sys.modules:  # imported before this file (a plugin): its config already read the environment
        import jax

        jax.config.update("jax_compilation_cache_dir", SHARED_COMPILATION_CACHE)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def pytest_unconfigure(config):
    # Only the process that made the cache removes it (the xdist controller, or a plain run), after
    # every worker has ended.
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def compile_cache():
    """The run's shared persistent XLA cache directory, for subprocesses that are given it explicitly."""
    return SHARED_COMPILATION_CACHE


@pytest.fixture(scope="session")
def tiny_reference():
    """A small HF SegFormer (4 stages, sr 8/4/2/1, 7 labels) shared by the block-level tests."""
    import reference

    return reference.build_reference(**reference.TINY)


@pytest.fixture(scope="session")
def tiny_flax(tiny_reference):
    import reference

    return reference.to_flax(tiny_reference)
