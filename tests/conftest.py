import os
import sys

# Tests run on the CPU with float32 matmuls; keep XLA from grabbing more threads than CI has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_reference():
    """A small HF SegFormer (4 stages, sr 8/4/2/1, 7 labels) shared by the block-level tests."""
    import reference

    return reference.build_reference(**reference.TINY)


@pytest.fixture(scope="session")
def tiny_flax(tiny_reference):
    import reference

    return reference.to_flax(tiny_reference)
