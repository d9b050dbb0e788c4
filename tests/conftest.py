"""Test hooks: GPU tests are skipped without a GPU, and run first with one; each test gets its own
reproducible seed.

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


def _gpu_run_priority(item) -> int:
    """Where a test goes in a GPU run, which may be cut short (GPU time is rare; CI runs the rest on
    the CPU): 0, the CUDA extension's kernels, which run nowhere else; 1, the other tests on the
    GPU (marked, or of the Triton backend, which takes the GPU where there is one); 2, the rest."""
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    on_gpu = "gpu" in item.keywords
    if backend == "cuda" or (on_gpu and item.path.name.startswith("test_cuda_")):
        return 0
    return 1 if on_gpu or backend == "triton" else 2


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        items.sort(key=_gpu_run_priority)  # stable: file order within each group
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
