"""The Triton launchers' host-side helpers: above all ``vector_alignment``, the vector width the
launchers promise the compiler; also their grid arithmetic and device switch.

A wrong promise gives misaligned vector accesses on the GPU (a crash or wrong values) that the
interpreter never shows, so the promise is checked here against every row's actual address: for
views like the ones the modules pass (packed projections, slices, transposes), every row start
must be ALIGN elements aligned and every extent a multiple of ALIGN, and ALIGN must be the widest
such power of two (up to 16 bytes).
"""

import itertools

import pytest
import torch

from fastformer.triton.alignment import VECTOR_BYTES, vector_alignment


def _row_start_bytes(t: torch.Tensor) -> torch.Tensor:
    """The byte address of element [..., 0] of every row of t."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        offsets = offsets[..., None] + torch.arange(size, dtype=torch.int64) * stride
    return t.data_ptr() + offsets.flatten() * t.element_size()


def _holds(align: int, extents, tensors) -> bool:
    return all(e % align == 0 for e in extents) and all(
        bool((_row_start_bytes(t) % (align * t.element_size()) == 0).all()) for t in tensors)


def _views():
    """(name, extents, tensors) like the launchers see: q, k, v views of projections."""
    for dtype, heads, dim in itertools.product((torch.float16, torch.float32), (1, 3, 4), (8, 24, 50, 56, 64)):
        packed = torch.empty(2, 7, 3, heads, dim, dtype=dtype)  # (B, L, 3, H, D): a packed QKV projection
        q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
        yield f"packed {dtype} h{heads} d{dim}", (dim, dim), (q, k, v)
        flat = torch.empty(2, 7, 3 * heads * dim, dtype=dtype)  # q, k, v split along the last dim
        q, k, v = (x.view(2, 7, heads, dim).transpose(1, 2) for x in flat.split(heads * dim, dim=-1))
        yield f"split {dtype} h{heads} d{dim}", (dim, dim), (q, k, v)
    base = torch.empty(4 * 97 + 3, dtype=torch.float16)
    yield "odd offset", (96,), (base[3:3 + 4 * 96].view(4, 96),)
    yield "offset by 4", (96,), (base[4:4 + 4 * 96].view(4, 96),)
    yield "row stride 97", (96,), (base[:4 * 97].view(4, 97)[:, :96],)
    weight = torch.empty(200, dtype=torch.float32)
    yield "rows and a float32 weight", (200,), (torch.empty(5, 200, dtype=torch.bfloat16), weight)
    yield "broadcast rows", (64,), (torch.empty(64, dtype=torch.float16).expand(9, 64),)


@pytest.mark.parametrize("name, extents, tensors", [pytest.param(*view, id=view[0]) for view in _views()])
def test_promise_holds_for_every_row_and_is_the_widest(name, extents, tensors):
    align = vector_alignment(extents, tensors)
    assert align >= 1 and align & (align - 1) == 0, align
    assert _holds(align, extents, tensors), f"{name}: ALIGN {align} is not true of every row"
    widest = VECTOR_BYTES // min(t.element_size() for t in tensors)
    assert align == widest or not _holds(2 * align, extents, tensors), f"{name}: ALIGN {align} is not the widest"


def test_known_values():
    """The shapes the fine-tuning benchmark runs: head dim 50 (d_model 200, 4 heads) and 64."""
    for dim, expected in [(50, 2), (56, 8), (64, 8), (48, 8)]:
        packed = torch.empty(2, 7, 3, 4, dim, dtype=torch.bfloat16)
        q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
        assert vector_alignment((dim, dim), (q, k, v)) == expected, dim
    rows = torch.empty(3, 200, dtype=torch.float32)
    assert vector_alignment((200,), (rows,)) == 4  # 16 bytes of float32
    assert vector_alignment((200,), (rows[:, 1:101],)) == 1  # starts one element in
    strided = torch.empty(3, 64, 2, dtype=torch.float16)[..., 0]
    assert vector_alignment((64,), (strided,)) == 1  # a strided last dim: no vectors at all


def test_host_grid_arithmetic_matches_triton():
    """The launchers' plain-Python cdiv and next_power_of_2 give what triton's do (whose host calls
    are slow since Triton 3.5), 0 included."""
    triton = pytest.importorskip("triton")
    from fastformer.triton import cdiv, next_power_of_2

    for n in [*range(0, 300), 2**31 - 1, 2**31, 2**31 + 1, 10**12]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for divisor in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(n, divisor) == triton.cdiv(n, divisor), (n, divisor)


def test_launches_switch_device_only_for_a_tensor_on_another_gpu(monkeypatch):
    """``on_device``: Triton launches on the current device, so a tensor on another GPU gets a
    switch to its device; one on the current GPU or on the CPU none (a switch costs host time at
    every launch). Faked devices: this runs without a GPU."""
    import contextlib
    import types

    import fastformer.triton as triton_backend

    switches = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda device: switches.append(device) or contextlib.nullcontext())
    for device in (torch.device("cuda", 1), torch.device("cpu"), torch.device("cuda", 0)):
        with triton_backend.on_device(types.SimpleNamespace(device=device)):
            pass
    assert switches == [torch.device("cuda", 0)]
