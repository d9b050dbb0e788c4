"""Test hooks: GPU tests are skipped without a GPU; each test gets its own reproducible seed.

Without a GPU, Triton kernels run on the CPU in Triton's interpreter: TRITON_INTERPRET=1 is set
here, before anything imports triton, unless the caller chose a value. FASTFORMER_TRITON_AUTOTUNE=0
likewise, unless chosen: no autotuning of the Triton attention kernels in tests.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one fixed launch config per Triton attention kernel instead of compiling and timing
# every config for each new shape; test_attention.py runs every config explicitly.
os.environ.setdefault("FASTFORMER_TRITON_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test (fresh random inputs, replayable failures)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
