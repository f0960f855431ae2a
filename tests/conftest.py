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
_CACHE_MADE_HERE = None
if "SEGFORMER_TEST_XLA_CACHE" not in os.environ:
    _CACHE_MADE_HERE = os.environ["SEGFORMER_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="segformer-jax-tests-xla-")
SHARED_COMPILATION_CACHE = os.path.abspath(os.path.expanduser(os.environ["SEGFORMER_TEST_XLA_CACHE"]))
os.environ["JAX_COMPILATION_CACHE_DIR"] = SHARED_COMPILATION_CACHE  # read by jax at import, and by the CLIs
MIN_COMPILE_SECONDS = 0.1  # below it, loading an entry saves about what it costs
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(MIN_COMPILE_SECONDS)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    if "jax" in sys.modules:  # imported before this file (a plugin): its config already read the environment
        from segformer_jax.xla_options import enable_compilation_cache

        enable_compilation_cache(SHARED_COMPILATION_CACHE, MIN_COMPILE_SECONDS)


# The longest modules first (summed test time of a 2-core run, 2026-12-02). With `--dist loadscope
# --no-loadscope-reorder` (the README's command) each module runs whole on one xdist worker, so its
# module fixtures (a training run, a compiled model) are built once, and the short modules fill in at
# the end. (`--dist loadgroup` would not do: pytest-xdist 3.8 tags the node ids the way pytest 9.2 no
# longer reads, so its groups are ignored.)
LONGEST_MODULES = (
    "test_preemption",
    "test_equivalence",
    "test_kernels",
    "test_training",
    "test_compile",
    "test_readme_claims",
    "test_onnx",
    "test_bf16",
    "test_pretrained",
    "test_inference",
    "test_binary",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    # Only the process that made the cache removes it (the xdist controller, or a plain run), after
    # every worker has ended.
    if _CACHE_MADE_HERE and not hasattr(config, "workerinput"):
        shutil.rmtree(_CACHE_MADE_HERE, ignore_errors=True)


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
