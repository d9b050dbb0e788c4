"""Dropout keep-masks of the CUDA kernels: ``torch.ops.fastformer.cuda_dropout_keep_mask``.

The CUDA kernels keep element (row, column) of a (rows, N) tensor when
``Philox::keep(seed, row, column, N, drop_threshold(p))`` (``csrc/common/philox.cuh``): the
Triton kernels' function (``fastformer.triton.dropout``: one Philox call per 8 columns,
``tl.randint4x``, a 16-bit uniform each) bit for bit, so the mask equals the Triton backend's.
The op also runs on the CPU (the same function on the host), which is how that equality is
tested without a GPU.
"""

from __future__ import annotations

import torch

from fastformer.cuda import require_extension


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep-mask the kernels use for a tensor of ``shape`` (viewed as rows of its last dim)."""
    require_extension()
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(()).to(device)
    return torch.ops.fastformer.cuda_dropout_keep_mask(seed, [int(s) for s in shape], float(dropout_p))
