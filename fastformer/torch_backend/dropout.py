"""Dropout keep-masks regenerated from a seed, so the backward needs no stored mask."""

from __future__ import annotations

import torch


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """Bool tensor of ``shape``: True where an element is kept (probability 1 - dropout_p).

    The same (seed, shape, dropout_p, device) always gives the same mask. ``seed`` is the
    one-element int64 CPU tensor that fastformer draws from PyTorch's default generator per call,
    so ``torch.manual_seed`` makes dropout reproducible.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=generator, device=device) >= dropout_p
