"""fastformer.attention on every backend against a float64 reference."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastformer
import reference
from fastformer.functional import _draw_seed
from helpers import (ATTENTION_TOL, BACKENDS, DEVICES, HALF_DTYPES, assert_grads_close, assert_rel_close,
                     attention_dtype, deterministic_algorithms, in_memory_order, keep_mask_function, kernel_device,
                     require_backend)

# (B, Hq, Hk, Lq, Lk, D, Dv): odd sizes, GQA, MQA, a single key, Dv != D, Lq != Lk.
SHAPES = [
    (2, 4, 4, 97, 97, 50, 50),
    (1, 8, 2, 33, 65, 64, 64),
    (3, 2, 1, 17, 1, 16, 16),
    (2, 3, 3, 5, 40, 8, 24),
]
MASKS = ["none", "bool", "float", "padding", "bool+padding", "causal", "causal+padding", "causal+float"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_qkv(shape, dtype, device, requires_grad=True):
    """q, k, v as (B, H, L, D) views of (B, L, H, D) projections, as models pass them."""
    batch, heads_q, heads_k, len_q, len_k, dim, dim_v = shape

    def projection(length, heads, d):
        t = torch.randn(batch, length, heads, d, device=device, dtype=dtype).transpose(1, 2)
        return t.detach().requires_grad_(requires_grad)

    return projection(len_q, heads_q, dim), projection(len_k, heads_k, dim), projection(len_k, heads_k, dim_v)


def padding_mask(batch, len_k, device, min_keep=1):
    """Random key lengths (at least ``min_keep``), True = padding."""
    lengths = torch.randint(min_keep, len_k + 1, (batch,), device=device)
    return torch.arange(len_k, device=device)[None, :] >= lengths[:, None]


def make_masks(kind, shape, dtype, device):
    """(attn_mask, key_padding_mask, is_causal) for a mask kind; no query row is left without keys."""
    batch, heads_q, _, len_q, len_k, _, _ = shape
    attn_mask, key_padding_mask = None, None
    if "bool" in kind:
        attn_mask = torch.rand(batch, 1, len_q, len_k, device=device) > 0.3
        attn_mask[..., 0] = True  # keep key 0 so that every row has a key
    if "float" in kind:
        attn_mask = torch.randn(heads_q, len_q, len_k, device=device, dtype=dtype)
    if "padding" in kind:
        key_padding_mask = padding_mask(batch, len_k, device)
    return attn_mask, key_padding_mask, "causal" in kind


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def assert_close_to_reference(out, q, k, v, dtype, **kwargs):
    """An attention output (in ``dtype``) and its q/k/v gradients against the float64 reference
    (``reference.attention(q, k, v, **kwargs)``) within DESIGN.md's tolerances; in half precision
    also within BASELINE_MULTIPLE times the error of the same formula computed by PyTorch in
    ``dtype`` (DESIGN.md's second criterion)."""
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert out.dtype == dtype
    expected = reference.attention(q, k, v, **kwargs)
    plain = reference.attention(q, k, v, compute_dtype=dtype, **kwargs) if dtype in HALF_DTYPES else None
    assert_rel_close(out, expected, fwd_tol, "out", baseline=plain)
    grad_out = torch.randn_like(expected)
    grads = _grads(out, (q, k, v), grad_out.to(dtype))
    expected_grads = _grads(expected, (q, k, v), grad_out)
    plain_grads = _grads(plain, (q, k, v), grad_out.to(dtype)) if plain is not None else (None,) * 3
    for name, grad, want, baseline in zip("qkv", grads, expected_grads, plain_grads):
        assert grad.dtype == dtype
        assert_rel_close(grad, want, grad_tol, f"grad {name}", baseline=baseline)


def assert_matches_reference(q, k, v, dtype, backend, **kwargs):
    """fastformer.attention against the float64 reference (:func:`assert_close_to_reference`);
    returns the output."""
    out = fastformer.attention(q, k, v, backend=backend, **kwargs)
    assert_close_to_reference(out, q, k, v, dtype, **kwargs)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, mask_kind, dtype, backend, device):
    q, k, v = make_qkv(shape, dtype, device)
    attn_mask, key_padding_mask, is_causal = make_masks(mask_kind, shape, dtype, device)
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, key_padding_mask=key_padding_mask)
    require_backend(backend, "attention", q, k, v, **kwargs)
    assert_matches_reference(q, k, v, dtype, backend, **kwargs)


# On the GPU, in half precision: the head dims the CUDA kernels are compiled for (32, 96, 128; 50 and
# 64 are in SHAPES), lengths across several tiles, GQA, and key padding that is not a right padding.
GPU_SHAPES = [
    (2, 4, 2, 97, 130, 32, 32),
    (1, 4, 4, 97, 97, 96, 96),
    (2, 2, 1, 77, 200, 128, 128),
]
GPU_MASKS = MASKS + ["scattered", "causal+scattered"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_kind", GPU_MASKS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_half_precision_head_dims_on_gpu(shape, mask_kind, dtype, backend):
    device = "cuda"
    q, k, v = make_qkv(shape, dtype, device)
    attn_mask, key_padding_mask, is_causal = make_masks(mask_kind, shape, dtype, device)
    if "scattered" in mask_kind:  # padding anywhere (key 0 kept so that every row has a key)
        key_padding_mask = torch.rand(shape[0], shape[4], device=device) > 0.6
        key_padding_mask[:, 0] = False
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, key_padding_mask=key_padding_mask)
    require_backend(backend, "attention", q, k, v, **kwargs)
    assert_matches_reference(q, k, v, dtype, backend, **kwargs)


# The longest Triton attention config list (checked below): one test item per config index, so
# that a GPU run compiles them on several workers at once (float32 ones take up to 10 s each).
LONGEST_CONFIG_LIST = 8


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(LONGEST_CONFIG_LIST))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [50, 128, 200])  # the three config lists: head dims <= 64, 128, 256
def test_every_triton_launch_config_on_gpu(dim, dtype, index):
    """The tests run one fixed Triton config (FASTFORMER_TRITON_AUTOTUNE=0, conftest.py); here config
    ``index`` of the forward, dK/dV and dQ lists (modulo each list's length) runs, with causal
    masking, GQA and scattered key padding across several tiles, the backward both with atomic dQ
    and in deterministic mode (the dQ kernel). A config that needs more shared memory than the card
    has is skipped, as the autotuner skips it."""
    triton_attention = pytest.importorskip("fastformer.triton.attention")
    from triton.runtime.errors import OutOfResources

    block = triton_attention._head_block(dim)
    count = max(len(triton_attention._configs(kind, triton_attention._head_class(block, block)))
                for kind in ("fwd", "dkdv", "dq"))
    assert count <= LONGEST_CONFIG_LIST, "raise LONGEST_CONFIG_LIST"
    if index >= count:
        pytest.skip(f"the lists of head dim {dim} hold at most {count} configs")
    shape = (2, 4, 2, 150, 270, dim, dim)
    q, k, v = make_qkv(shape, dtype, "cuda")
    key_padding_mask = torch.rand(2, 270, device="cuda") > 0.7
    key_padding_mask[:, 0] = False
    kwargs = dict(is_causal=True, key_padding_mask=key_padding_mask)
    too_large = []
    for deterministic in (False, True):
        with triton_attention.use_config(index), deterministic_algorithms(deterministic):
            try:
                out = fastformer.attention(q, k, v, backend="triton", **kwargs)
                assert_close_to_reference(out, q, k, v, dtype, **kwargs)
            except OutOfResources as error:
                too_large.append(f"deterministic={deterministic}: {error}")
    if len(too_large) == 2:  # (one of the two is enough to run the config's kernels)
        pytest.skip("more shared memory than this GPU has: " + "; ".join(too_large))


@pytest.mark.gpu
def test_autotuned_triton_launches_on_gpu(monkeypatch):
    """With autotuning on (the tests otherwise run one fixed config): the first call tunes each
    kernel, later calls with the same launch key launch the chosen config directly; all match the
    float64 reference, forward and gradients, with atomic dQ and in deterministic mode."""
    triton_attention = pytest.importorskip("fastformer.triton.attention")
    monkeypatch.setenv("FASTFORMER_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_attention, "_chosen_configs", {})
    shape = (2, 4, 2, 150, 270, 64, 64)
    kwargs = dict(is_causal=True, key_padding_mask=padding_mask(2, 270, "cuda"))
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            for _ in range(2):  # tuned, then launched with the chosen configs
                q, k, v = make_qkv(shape, torch.bfloat16, "cuda")
                assert_matches_reference(q, k, v, torch.bfloat16, "triton", **kwargs)
    kinds = {key[0] for key in triton_attention._chosen_configs}
    assert kinds == {"fwd", "dkdv", "dq"}, kinds


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal+padding"])
def test_same_results_as_sdpa(mask_kind, backend):
    """Mask polarity, broadcasting and top-left causal alignment are SDPA's (Lq != Lk here)."""
    shape = (2, 4, 4, 13, 29, 32, 32)
    q, k, v = make_qkv(shape, torch.float64, "cpu", requires_grad=False)
    attn_mask, key_padding_mask, is_causal = make_masks(mask_kind, shape, torch.float64, "cpu")
    require_backend(backend, "attention", q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                    key_padding_mask=key_padding_mask)
    out = fastformer.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                               key_padding_mask=key_padding_mask, backend=backend)
    sdpa_mask = attn_mask
    if key_padding_mask is not None:  # SDPA has no key_padding_mask and no is_causal + mask
        sdpa_mask = ~key_padding_mask[:, None, None, :]
        sdpa_mask = sdpa_mask & torch.ones(13, 29, dtype=torch.bool).tril()
        is_causal = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=is_causal)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.6, 3.0])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_any_finite_scale(is_causal, scale, backend, device):
    """Zero and negative scales are legal (SDPA's own causal path on the CPU gives NaN for them)."""
    shape = (2, 4, 2, 13, 21, 16, 16)
    q, k, v = make_qkv(shape, torch.float32, device)
    require_backend(backend, "attention", q, k, v, is_causal=is_causal, scale=scale)
    assert_matches_reference(q, k, v, torch.float32, backend, is_causal=is_causal, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Packed QKV views, transposed layouts and non-contiguous heads give the contiguous result."""
    batch, length, heads, dim = 2, 19, 4, 24
    packed = torch.randn(batch, length, 3, heads, dim, dtype=torch.float64)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    require_backend(backend, "attention", q, k, v)
    out = fastformer.attention(q, k, v, backend=backend)
    contiguous = fastformer.attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend)
    torch.testing.assert_close(out, contiguous)
    torch.testing.assert_close(out, reference.attention(q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("how", ["padding", "bool", "float", "causal+padding"])
def test_fully_masked_rows_give_zero_not_nan(how, dtype, backend, device):
    batch, heads, len_q, len_k, dim = 3, 2, 11, 16, 32
    shape = (batch, heads, heads, len_q, len_k, dim, dim)
    q, k, v = make_qkv(shape, dtype, device)
    attn_mask, key_padding_mask, is_causal = None, padding_mask(batch, len_k, device), False
    dead = torch.zeros(batch, heads, len_q, dtype=torch.bool, device=device)
    if how == "padding":
        key_padding_mask[1] = True  # every key of batch row 1 is padding
        dead[1] = True
    elif how == "bool":
        attn_mask = torch.rand(batch, heads, len_q, len_k, device=device) > 0.5
        attn_mask[..., 0] = True
        attn_mask[0, 1, 3] = False
        attn_mask[2, :, 7] = False
        key_padding_mask = None
        dead[0, 1, 3] = dead[2, :, 7] = True
    elif how == "float":
        attn_mask = torch.randn(batch, heads, len_q, len_k, device=device, dtype=dtype)
        attn_mask[1, 0, 5] = float("-inf")
        key_padding_mask = None
        dead[1, 0, 5] = True
    else:  # causal with the first 4 keys of batch row 0 padded: its queries 0..3 see nothing
        is_causal = True
        key_padding_mask[0, :4] = True
        dead[0, :, :4] = True
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, key_padding_mask=key_padding_mask)
    require_backend(backend, "attention", q, k, v, **kwargs)

    out = fastformer.attention(q, k, v, backend=backend, **kwargs)
    assert torch.isfinite(out).all()
    assert (out[dead] == 0).all()
    grad_out = torch.randn_like(out)
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), grad_out)
    for grad in (grad_q, grad_k, grad_v):
        assert torch.isfinite(grad).all()
    assert (grad_q[dead] == 0).all()

    expected = reference.attention(q, k, v, **kwargs)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    for name, grad, want in zip("qkv", (grad_q, grad_k, grad_v), expected_grads):
        assert_rel_close(grad, want, grad_tol, f"grad {name}")


def finfo_min_mask(batch, length, left_padding, dtype, device):
    """Hugging Face's additive mask: causal and left padding, filled with finfo(dtype).min, (B, 1, L, L).
    The first left_padding[b] query rows of batch row b have every key masked that way."""
    keys = torch.arange(length)
    pad = torch.tensor(left_padding)
    allowed = (keys[None, :] <= keys[:, None])[None] & (keys[None, None, :] >= pad[:, None, None])
    mask = torch.zeros(batch, 1, length, length, dtype=dtype)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finfo_min_masks_keep_sdpa_semantics(dtype, backend, device):
    """finfo(dtype).min is finite: as in SDPA, such keys get weight 0 next to any unmasked key, and
    a row with every key masked that way still attends (uniformly: the scores vanish next to the
    mask). |finfo(bfloat16 or float32).min| * log2(e) overflows float32, which a kernel working in
    log2 units must not turn into -inf (the row would give 0). The gradients are checked where
    dO is 0 on those rows, as in a model (their outputs reach no loss): with scores of -3.4e38 the
    log-sum-exp the backward recomputes P from cannot hold log(L) (FlashAttention's limitation too)."""
    batch, heads, length, dim = 2, 2, 16, 32
    q, k, v = make_qkv((batch, heads, heads, length, length, dim, dim), dtype, device)
    mask = finfo_min_mask(batch, length, [0, 3], dtype, device)
    require_backend(backend, "attention", q, k, v, attn_mask=mask)
    out = fastformer.attention(q, k, v, attn_mask=mask, backend=backend)
    expected = reference.attention(q, k, v, attn_mask=mask)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    if torch.finfo(dtype).max > 1e30:  # bfloat16, float32: the scores vanish next to the mask (not float16's)
        mean_value = v[1].double().mean(dim=1, keepdim=True).expand(-1, 3, -1)
        torch.testing.assert_close(out[1, :, :3].double(), mean_value, atol=fwd_tol, rtol=fwd_tol)
    grad_out = torch.randn_like(expected)
    grad_out[1, :, :3] = 0
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    for name, grad, want in zip("qkv", grads, torch.autograd.grad(expected, (q, k, v), grad_out)):
        assert_rel_close(grad, want, grad_tol, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, mask_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.float32, torch.float64)], ids=str)
def test_wider_float_masks_stay_finite_in_the_query_dtype(dtype, mask_dtype, backend, device):
    """A float mask wider than the query (float32 under bfloat16 autocast, as Hugging Face fills
    them with finfo(float32).min) is read in the query dtype with its finite values saturated to
    that dtype's range: they stay finite, as in SDPA. A plain cast makes them infinite: a row of
    finfo(float32).min in bfloat16 would have no key left (0), +1e5 in float16 would give NaN."""
    batch, heads, len_q, len_k, dim = 2, 2, 6, 9, 16
    q, k, v = make_qkv((batch, heads, heads, len_q, len_k, dim, dim), dtype, device, requires_grad=False)
    wide = torch.finfo(mask_dtype)
    mask = torch.randn(batch, 1, len_q, len_k, dtype=mask_dtype, device=device)
    mask[:, :, 0] = wide.min  # every key of row 0 masked with a finite value
    mask[:, :, 1, 2] = wide.max / 2  # beyond float16's range (not bfloat16's): row 1 attends key 2 only
    mask[:, :, 2, ::2] = -1e5  # beyond float16's range: those keys get no weight
    mask[:, :, 3] = float("-inf")  # no key left: 0
    require_backend(backend, "attention", q, k, v, attn_mask=mask)
    out = fastformer.attention(q, k, v, attn_mask=mask, backend=backend)
    narrow = torch.finfo(dtype)
    saturated = torch.where(mask.isinf(), mask, mask.clamp(narrow.min, narrow.max))
    expected = reference.attention(q, k, v, attn_mask=saturated)
    assert out.dtype == dtype and not out.isnan().any()
    assert_rel_close(out, expected, ATTENTION_TOL[dtype][0], "out")
    assert (out[:, :, 3] == 0).all()
    torch.testing.assert_close(out[:, :, 1].double(), v[:, :, 2].double(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_torch_backend_saturates_masks_for_sdpas_cuda_kernels(dtype):
    """SDPA's memory-efficient CUDA kernel takes mask + scores to log2 units, where finfo.min
    overflows to -inf (NaN rows): finite values are clipped to where their product with log2(e)
    stays finite, infinities kept (they mean "no weight"). Checked end to end on a GPU by the two
    tests above."""
    from fastformer.torch_backend.attention import saturated_for_cuda_sdpa

    finfo = torch.finfo(dtype)
    mask = torch.tensor([finfo.min, float("-inf"), -1e30, 0.5, finfo.max, float("inf")], dtype=dtype)
    saturated = saturated_for_cuda_sdpa(mask)
    assert saturated.dtype == dtype
    assert torch.isfinite(saturated[[0, 2, 3, 4]].float() * math.log2(math.e)).all()
    assert saturated[0] < -2e38 and saturated[4] > 2e38
    assert torch.equal(saturated[1:4], mask[1:4]) and saturated[5] == float("inf")
    for other in (torch.float16, torch.float64):  # no value of theirs overflows there / SDPA's math
        assert torch.equal(saturated_for_cuda_sdpa(mask.to(other)), mask.to(other))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast_inputs_are_cast_as_sdpa_casts_them(backend, device):
    """Under autocast SDPA runs in autocast's dtype: so does fastformer.attention, on every
    backend (the output dtype must not depend on which backend dispatch picks), and the
    gradients come back to the float32 inputs through the casts."""
    shape = (2, 4, 2, 13, 21, 16, 16)
    q, k, v = make_qkv(shape, torch.float32, device)
    mask = torch.randn(shape[3], shape[4], device=device)  # float32, wider than the autocast dtype
    half = torch.bfloat16
    with torch.autocast(torch.device(device).type, dtype=half):
        want_dtype = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).dtype
        require_backend(backend, "attention", q, k, v, attn_mask=mask)
        assert fastformer.explain(fastformer.attention, q, k, v, attn_mask=mask, backend=backend).call.dtype == half
        out = fastformer.attention(q, k, v, attn_mask=mask, backend=backend)
    assert want_dtype == out.dtype == half
    cast = [t.detach().to(half).requires_grad_() for t in (q, k, v)]
    expected = reference.attention(*cast, attn_mask=mask)
    assert_rel_close(out, expected, ATTENTION_TOL[half][0], "out")
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(half))
    for name, grad, want in zip("qkv", grads, torch.autograd.grad(expected, cast, grad_out)):
        assert grad.dtype == torch.float32
        assert_rel_close(grad, want, ATTENTION_TOL[half][1], f"grad {name}")


def check_nan_and_inf_mask_values_give_nan_rows(attend, dtype, device):
    """NaN or +inf in a float mask makes its query row NaN, as in SDPA (softmax of inf - inf),
    never a silently masked key or a row attending to one key; the other rows are untouched.
    (The gradients then hold NaN too; the kernels' dV has NaN only in the rows of the poisoned
    key, where SDPA's is NaN everywhere.) ``attend(q, k, v, mask)``: the attention under test."""
    batch, heads, length, dim = 2, 2, 12, 16
    q, k, v = make_qkv((batch, heads, heads, length, length, dim, dim), dtype, device, requires_grad=False)
    mask = torch.randn(batch, 1, length, length, dtype=dtype, device=device)
    mask[0, 0, 3, 5] = float("nan")
    mask[1, 0, 7, 0] = float("inf")
    out = attend(q, k, v, mask)
    expected = reference.attention(q, k, v, attn_mask=mask)
    poisoned = torch.zeros(batch, heads, length, dtype=torch.bool, device=device)
    poisoned[0, :, 3] = poisoned[1, :, 7] = True
    assert expected[poisoned].isnan().all() and out[poisoned].isnan().all()
    assert_rel_close(out[~poisoned], expected[~poisoned], ATTENTION_TOL[dtype][0], "out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, in NumPy
def test_nan_and_inf_mask_values_give_nan_rows(dtype, backend, device):
    q = torch.randn(2, 2, 12, 16, dtype=dtype, device=device)
    require_backend(backend, "attention", q, q, q, attn_mask=torch.zeros(2, 1, 12, 12, dtype=dtype, device=device))
    if backend == "torch":  # which runs SDPA: held to what SDPA itself does on this machine
        try:
            check_nan_and_inf_mask_values_give_nan_rows(
                lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), dtype, device)
        except AssertionError:
            pytest.skip(f"PyTorch's SDPA itself ({device}, {dtype}) gives no NaN row for a NaN or +inf mask value "
                        "on this machine (seen: float16 on the CPU, a row of 12 keys with a +inf gives 0, on an "
                        "AMD EPYC without AVX-512, torch 2.14.1)")
    check_nan_and_inf_mask_values_give_nan_rows(
        lambda q, k, v, mask: fastformer.attention(q, k, v, attn_mask=mask, backend=backend), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_any_key_padding_pattern(is_causal, dtype, backend, device):
    """Padding anywhere (left, in the middle, whole rows), not only at the right end; key tiles
    of 32 and more are crossed (Lk = 70), and one batch row has its only key in the last tile."""
    batch, heads, len_q, len_k, dim = 4, 2, 13, 70, 16
    q, k, v = make_qkv((batch, heads, heads, len_q, len_k, dim, dim), dtype, device)
    pad = torch.rand(batch, len_k, device=device) < 0.4
    pad[0, :5] = True       # left padding
    pad[1] = True           # no key at all
    pad[2] = True
    pad[2, 66] = False      # a single key, in the last tile
    kwargs = dict(key_padding_mask=pad, is_causal=is_causal)
    require_backend(backend, "attention", q, k, v, **kwargs)
    out = assert_matches_reference(q, k, v, dtype, backend, **kwargs)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_key_padding_of_long_rows(dtype, backend, device):
    """Rows of more keys than the Triton kernels read at once (2048) to find each row's last
    unpadded key: that key in the second pass, past padding in the first; in the first pass,
    before a second pass of padding only; the very last key alone."""
    batch, heads, len_q, len_k, dim = 3, 1, 5, 2100, 16
    q, k, v = make_qkv((batch, heads, heads, len_q, len_k, dim, dim), dtype, device)
    pad = torch.zeros(batch, len_k, dtype=torch.bool, device=device)
    pad[0, 40:2060] = True
    pad[0, 2090:] = True
    pad[1, 101:] = True
    pad[2, :-1] = True
    kwargs = dict(key_padding_mask=pad)
    require_backend(backend, "attention", q, k, v, **kwargs)
    assert_matches_reference(q, k, v, dtype, backend, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-kernel"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_keys_after_the_last_unpadded_key_are_never_read(is_causal, deterministic, backend, device):
    """The fast kernels read no key or value after a batch row's last unpadded key (right
    padding, as tokenizers pad): NaN and inf there change no output and no gradient, and get 0
    gradients. The lengths end inside, at the edge of, and before the kernels' key tiles."""
    dtype, batch, heads, len_q, len_k, dim = torch.float16, 4, 2, 40, 75, 16
    q, k, v = make_qkv((batch, heads, heads, len_q, len_k, dim, dim), dtype, device)
    lengths = torch.tensor([75, 64, 33, 1], device=device)
    pad = torch.arange(len_k, device=device)[None, :] >= lengths[:, None]
    kwargs = dict(key_padding_mask=pad, is_causal=is_causal)
    require_backend(backend, "attention", q, k, v, **kwargs)
    poisoned_k = k.detach().masked_fill(pad[:, None, :, None], float("nan")).requires_grad_()
    poisoned_v = v.detach().masked_fill(pad[:, None, :, None], float("inf")).requires_grad_()
    with deterministic_algorithms(deterministic):
        out = fastformer.attention(q, poisoned_k, poisoned_v, backend=backend, **kwargs)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, poisoned_k, poisoned_v), grad_out)
    expected = reference.attention(q, k, v, **kwargs)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    for name, grad, want in zip("qkv", grads, expected_grads):
        assert_rel_close(grad, want, grad_tol, f"grad {name}")
    for grad in grads[1:]:
        assert (grad.transpose(1, 2)[pad] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["blhd", "lbhd", "bhld"])
def test_output_and_gradients_come_in_the_inputs_memory_order(layout, backend, device):
    """The kernel backends' output is laid out like the query and the gradients of q, k, v like
    their inputs: for views of (B, L, H, D) projections (or of sequence-first (L, B, H, D) ones, as
    nn.MultiheadAttention's default layout gives) merging the output's heads is a free view and
    the gradients flow back through the views into the projections without a copy; contiguous
    (B, H, L, D) inputs get a contiguous output and gradients, as SDPA gives. Under torch.compile
    the output keeps one layout, (B, L, H, D) memory. The values against float64."""
    shape = (2, 4, 2, 9, 12, 16, 8)
    q, k, v = make_qkv(shape, torch.float32, device)
    order = {"blhd": (0, 2, 1, 3), "lbhd": (2, 0, 1, 3), "bhld": (0, 1, 2, 3)}[layout]  # memory dims
    q, k, v = (in_memory_order(t.detach(), order).requires_grad_() for t in (q, k, v))
    require_backend(backend, "attention", q, k, v)
    out = fastformer.attention(q, k, v, backend=backend)
    expected = reference.attention(q, k, v)
    assert out.permute(order).is_contiguous(), f"out: strides {out.stride()}, query {q.stride()}"
    assert_rel_close(out, expected, ATTENTION_TOL[torch.float32][0], "out")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    for name, t, grad, expected_grad in zip("qkv", (q, k, v), grads, want):
        assert grad.permute(order).is_contiguous(), f"grad {name}: strides {grad.stride()}, input {t.stride()}"
        assert_rel_close(grad, expected_grad, ATTENTION_TOL[torch.float32][1], f"grad {name}")
    with torch.no_grad():
        op_out, _ = torch.ops.fastformer.attention_fwd(q, k, v, None, None, 0.0, False, 16 ** -0.5, None, backend)
    assert op_out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(op_out, out, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_shape", [(2, 4, 40, 70), (1, 1, 40, 70), (4, 40, 70), (2, 1, 1, 70), (70,)],
                         ids=str)
def test_float_mask_gradient(mask_shape, is_causal, deterministic, dtype, backend):
    """A learned additive bias (e.g. relative positions) gets its gradient, summed over
    broadcasts, in the mask's shape and dtype; zero where the kernels skip tiles (a query block
    before a causal key block, a key block of padding only)."""
    shape = (2, 4, 2, 40, 70, 16, 16)
    device = kernel_device(backend)
    q, k, v = make_qkv(shape, dtype, device)
    bias = torch.randn(mask_shape, dtype=dtype, device=device, requires_grad=True)
    pad = torch.zeros(2, 70, dtype=torch.bool, device=device)
    pad[1, 30:] = True  # batch row 1: keys 30.. padding, whole key blocks of it
    pad[0, 5] = True
    require_backend(backend, "attention", q, k, v, attn_mask=bias, key_padding_mask=pad, is_causal=is_causal)
    with deterministic_algorithms(deterministic):
        out = fastformer.attention(q, k, v, attn_mask=bias, key_padding_mask=pad, is_causal=is_causal,
                                   backend=backend)
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    expected = reference.attention(*inputs64[:3], attn_mask=inputs64[3], key_padding_mask=pad, is_causal=is_causal)
    want = torch.autograd.grad(expected, inputs64, grad_out.double())
    assert got[3].dtype == bias.dtype and got[3].shape == bias.shape
    if deterministic:  # the same bits again
        with deterministic_algorithms(True):
            again = fastformer.attention(q, k, v, attn_mask=bias, key_padding_mask=pad, is_causal=is_causal,
                                         backend=backend)
            assert torch.equal(torch.autograd.grad(again, bias, grad_out)[0], got[3])
    assert_grads_close(got, want, ATTENTION_TOL[dtype][1], f"mask {mask_shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_gradcheck_float64(is_causal, backend):
    q, k, v = make_qkv((2, 4, 2, 5, 7, 6, 3), torch.float64, "cpu")
    bias = torch.randn(4, 5, 7, dtype=torch.float64, requires_grad=True)
    pad = padding_mask(2, 7, "cpu", min_keep=2)
    require_backend(backend, "attention", q, k, v, attn_mask=bias, key_padding_mask=pad,
                    is_causal=is_causal)

    def run(q, k, v, bias):
        return fastformer.attention(q, k, v, attn_mask=bias, key_padding_mask=pad, is_causal=is_causal,
                                    backend=backend)

    assert torch.autograd.gradcheck(run, (q, k, v, bias))


def _same_seed_call(seed_value, fn, backend, device):
    """Run ``fn`` after seeding, and return (its result, the dropout seed the op drew)."""
    torch.manual_seed(seed_value)
    seed = _draw_seed(0.5, backend, device)
    torch.manual_seed(seed_value)
    return fn(), seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dropout_matches_reference_with_the_same_mask(dtype, backend, monkeypatch):
    """The keep-mask used by forward and backward is the one regenerated from the call's seed."""
    shape = (2, 4, 2, 13, 21, 16, 16)
    p = 0.3
    q, k, v = make_qkv(shape, dtype, "cpu")
    pad = padding_mask(2, 21, "cpu")
    require_backend(backend, "attention", q, k, v, dropout_p=p, is_causal=True, key_padding_mask=pad)
    keep_mask = keep_mask_function(backend, monkeypatch)
    out, seed = _same_seed_call(
        7, lambda: fastformer.attention(q, k, v, dropout_p=p, is_causal=True, key_padding_mask=pad,
                                        backend=backend), backend, "cpu")
    keep = keep_mask(seed, (2, 4, 13, 21), p, "cpu")
    assert 0.6 < keep.float().mean().item() < 0.8
    assert_close_to_reference(out, q, k, v, dtype, key_padding_mask=pad, is_causal=True, keep=keep, dropout_p=p)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dim", [32, 64, 96, 128])
def test_dropout_on_gpu_matches_reference_with_the_same_mask(dim, dtype, backend, monkeypatch):
    """As above, in half precision on the GPU, over several key/query tiles and the compiled head dims."""
    shape = (2, 4, 2, 77, 130, dim, dim)
    p = 0.3
    q, k, v = make_qkv(shape, dtype, "cuda")
    pad = padding_mask(2, 130, "cuda")
    require_backend(backend, "attention", q, k, v, dropout_p=p, is_causal=True, key_padding_mask=pad)
    keep_mask = keep_mask_function(backend, monkeypatch)
    out, seed = _same_seed_call(
        11, lambda: fastformer.attention(q, k, v, dropout_p=p, is_causal=True, key_padding_mask=pad,
                                         backend=backend), backend, "cuda")
    keep = keep_mask(seed, (2, 4, 77, 130), p, "cuda")
    assert 0.6 < keep.float().mean().item() < 0.8
    assert_close_to_reference(out, q, k, v, dtype, key_padding_mask=pad, is_causal=True, keep=keep, dropout_p=p)


# The fast kernels' backward adds each key block's share of dQ with float32 atomics (run-to-run
# order varies); under torch.use_deterministic_algorithms(True) a dQ kernel of its own recomputes
# the scores instead. Both paths, same inputs and dropout seed: each against the float64 reference
# (with the keep mask of that seed), against each other, and bitwise reproducible when deterministic.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["gqa+padding", "causal+dropout", "bool+dropout"])
def test_backward_with_and_without_atomic_dq(case, dtype, backend, device, monkeypatch):
    shape = (2, 4, 2, 70, 45, 50, 50) if case == "gqa+padding" else (2, 3, 3, 45, 70, 64, 32)
    q, k, v = make_qkv(shape, dtype, device)
    attn_mask, key_padding_mask, is_causal = make_masks(case, shape, dtype, device)
    p = 0.3 if "dropout" in case else 0.0
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, dropout_p=p)
    require_backend(backend, "attention", q, k, v, **kwargs)
    keep_mask = keep_mask_function(backend, monkeypatch)
    grad_out = torch.randn(*shape[:2], shape[3], shape[6], device=device, dtype=dtype)

    def gradients():
        out, seed = _same_seed_call(5, lambda: fastformer.attention(q, k, v, backend=backend, **kwargs), backend,
                                    device)
        return out, seed, _grads(out, (q, k, v), grad_out)

    with deterministic_algorithms(False):
        out, seed, atomic = gradients()
    with deterministic_algorithms(True):
        _, _, deterministic = gradients()
        _, _, again = gradients()
    keep = keep_mask(seed, (shape[0], shape[1], shape[3], shape[4]), p, device) if p else None
    expected = reference.attention(q, k, v, keep=keep, **kwargs)
    expected_grads = _grads(expected, (q, k, v), grad_out.double())
    grad_tol = ATTENTION_TOL[dtype][1]
    for name, a, d, r, want in zip("qkv", atomic, deterministic, again, expected_grads):
        assert_rel_close(a, want, grad_tol, f"grad {name}, atomic dQ")
        assert_rel_close(d, want, grad_tol, f"grad {name}, deterministic")
        assert torch.equal(d, r), f"grad {name}: two deterministic runs differ"
        # The two paths differ in the order of float32 sums and, in 16-bit dtypes, where dQ is rounded.
        assert_rel_close(a, d, 1e-5 if dtype == torch.float32 else 1e-2, f"grad {name}, atomic vs deterministic")


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_triton_backward_launches_the_dq_kernel_only_when_deterministic(deterministic, monkeypatch):
    from fastformer.triton import attention as triton_attention

    q, k, v = make_qkv((1, 2, 2, 20, 20, 16, 16), torch.float32, kernel_device("triton"))
    require_backend("triton", "attention", q, k, v)
    launched = []
    launch = triton_attention._launch
    monkeypatch.setattr(triton_attention, "_launch", lambda kind, *args: launched.append(kind) or launch(kind, *args))
    with deterministic_algorithms(deterministic):
        fastformer.attention(q, k, v, backend="triton").sum().backward()
    assert launched == (["fwd", "dkdv", "dq"] if deterministic else ["fwd", "dkdv"])


def test_triton_backward_takes_the_dq_kernel_where_atomic_dq_fits_no_config(monkeypatch):
    """On a GPU whose shared memory holds no config of the dK/dV kernel with atomic dQ (float32 at
    head dims over 128 on 99 KiB GPUs; tests/test_triton_compile.py), Triton raises OutOfResources
    at that launch before running anything: the backward then computes dQ with the dQ kernel, as in
    deterministic mode, right, and later calls of that (device, dtype, head dims) go there
    directly. Here the launch raises as Triton would."""
    from triton.runtime.errors import OutOfResources

    from fastformer.triton import attention as triton_attention

    shape = (2, 4, 2, 33, 40, 24, 20)
    device = kernel_device("triton")
    q, k, v = make_qkv(shape, torch.float32, device)
    attn_mask, key_padding_mask, is_causal = make_masks("gqa+padding", shape, torch.float32, device)
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal)
    require_backend("triton", "attention", q, k, v, **kwargs)
    monkeypatch.setattr(triton_attention, "_atomic_dq_unfit", set())
    launched = []
    launch = triton_attention._launch

    def launch_on_a_small_gpu(kind, rows, heads, batch, args, meta, interpret):
        launched.append((kind, meta.get("ATOMIC_DQ")))
        if kind == "dkdv" and meta["ATOMIC_DQ"]:
            raise OutOfResources(118784, 101376, "shared memory")
        return launch(kind, rows, heads, batch, args, meta, interpret)

    monkeypatch.setattr(triton_attention, "_launch", launch_on_a_small_gpu)
    grad_out = torch.randn(*shape[:2], shape[3], shape[6], dtype=torch.float64, device=device)
    expected = _grads(reference.attention(q, k, v, **kwargs), (q, k, v), grad_out)
    for call in range(2):
        launched.clear()
        grads = _grads(fastformer.attention(q, k, v, backend="triton", **kwargs), (q, k, v), grad_out.float())
        for name, got, want in zip("qkv", grads, expected):
            assert_rel_close(got, want, ATTENTION_TOL[torch.float32][1], f"grad {name}, call {call}")
        tried = [("dkdv", True)] if call == 0 else []
        assert launched == [("fwd", None), *tried, ("dkdv", False), ("dq", None)], call
    # A config forced by use_config(i) that does not fit is the caller's error, not the device's.
    monkeypatch.setattr(triton_attention, "_atomic_dq_unfit", set())
    with triton_attention.use_config(0), pytest.raises(OutOfResources):
        fastformer.attention(q, k, v, backend="triton", **kwargs).sum().backward()
    assert triton_attention._atomic_dq_unfit == set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_reproducible_and_fresh_per_call(backend):
    q, k, v = make_qkv((2, 2, 2, 16, 16, 8, 8), attention_dtype(backend), kernel_device(backend), requires_grad=False)
    require_backend(backend, "attention", q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    first = fastformer.attention(q, k, v, dropout_p=0.5, backend=backend)
    second = fastformer.attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(3)
    again = fastformer.attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, second)
    # Dropout keeps the expectation: the mean over many calls approaches the dropout-free output
    # (relative error about 1/sqrt(calls); a missing 1/(1-p) rescale would be off by 50%).
    mean = torch.stack([fastformer.attention(q, k, v, dropout_p=0.5, backend=backend)
                        for _ in range(100)]).mean(0)
    assert_rel_close(mean, fastformer.attention(q, k, v, backend=backend), 0.25, "mean over calls")


# (B, H, Lq, Lk), one of them 0
EMPTY_SIZES = [(0, 2, 5, 7), (2, 0, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", EMPTY_SIZES, ids=str)
def test_empty_sizes(sizes, backend):
    check_empty_sizes(sizes, backend, kernel_device(backend))


def check_empty_sizes(sizes, backend, device):
    """Empty outputs, and zero gradients of the right shapes (as autograd hands the backward an
    empty gradient, with whatever strides)."""
    batch, heads, len_q, len_k = sizes
    like = dict(device=device, dtype=attention_dtype(backend), requires_grad=True)
    q = torch.randn(batch, heads, len_q, 8, **like)
    k = torch.randn(batch, heads, len_k, 8, **like)
    v = torch.randn(batch, heads, len_k, 4, **like)
    require_backend(backend, "attention", q, k, v)
    out = fastformer.attention(q, k, v, backend=backend)
    assert out.shape == (batch, heads, len_q, 4)
    assert (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_default_backend_on_cpu_is_torch_and_agrees_with_forced():
    q, k, v = make_qkv((2, 2, 2, 9, 9, 8, 8), torch.float32, "cpu", requires_grad=False)
    if not torch.cuda.is_available():
        assert fastformer.explain(fastformer.attention, q, k, v).backend == "torch"
    torch.testing.assert_close(fastformer.attention(q, k, v), fastformer.attention(q, k, v, backend="torch"))


# --------------------------------------------------------------------------------------------
# Random sweeps: every feature of the op drawn at random, against the float64 reference
# --------------------------------------------------------------------------------------------
SWEEP_DIMS = [16, 32, 50, 64, 80, 96, 128, 256]


def draw_attention_case(rng, lengths, dims, dtypes):
    """One random call: sizes (GQA, Dv != D), dtype, causal, attn_mask kind (bool or float, full or
    broadcast, float with -inf, a float bias per key), key padding (right, scattered, a fully padded
    batch row), dropout, scale, layout and whether the backward runs under deterministic algorithms."""
    heads_k = int(rng.choice([1, 2, 3]))
    dim = int(rng.choice(dims))
    return dict(batch=int(rng.integers(1, 4)), heads_k=heads_k, heads_q=heads_k * int(rng.choice([1, 2, 4])),
                len_q=int(rng.choice(lengths)), len_k=int(rng.choice(lengths)), dim=dim,
                dim_v=dim if rng.random() < 0.7 else int(rng.choice(dims)),
                dtype=dtypes[int(rng.integers(len(dtypes)))], causal=bool(rng.integers(2)),
                mask=str(rng.choice(["none", "bool", "bool-broadcast", "float", "float-inf", "float-keys"])),
                padding=str(rng.choice(["none", "right", "scattered", "right+padded-row"])),
                dropout_p=float(rng.choice([0.0, 0.3])),
                scale=None if rng.random() < 0.7 else float(rng.uniform(0.05, 0.5)),
                layout=str(rng.choice(["bhld", "blhd"])), deterministic=bool(rng.integers(2)))


def _case_inputs(c, device):
    """(q, k, v, attn_mask, key_padding_mask) of a drawn case; rows may be left with no key."""
    shape = (c["batch"], c["heads_q"], c["heads_k"], c["len_q"], c["len_k"], c["dim"], c["dim_v"])
    q, k, v = make_qkv(shape, c["dtype"], device)
    if c["layout"] == "bhld":
        q, k, v = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    batch, heads_q, len_q, len_k = c["batch"], c["heads_q"], c["len_q"], c["len_k"]
    attn_mask = padding = None
    if c["mask"] == "bool":
        attn_mask = torch.rand(batch, 1, len_q, len_k, device=device) > 0.3
    elif c["mask"] == "bool-broadcast":
        attn_mask = torch.rand(len_q, len_k, device=device) > 0.3
    elif c["mask"] == "float":
        attn_mask = torch.randn(heads_q, len_q, len_k, device=device, dtype=c["dtype"])
    elif c["mask"] == "float-inf":
        attn_mask = torch.randn(batch, heads_q, len_q, len_k, device=device, dtype=c["dtype"])
        attn_mask = attn_mask.masked_fill(torch.rand(attn_mask.shape, device=device) < 0.4, float("-inf"))
    elif c["mask"] == "float-keys":
        attn_mask = torch.randn(batch, 1, 1, len_k, device=device, dtype=c["dtype"])
    if c["padding"].startswith("right"):
        padding = padding_mask(batch, len_k, device)
        if c["padding"] == "right+padded-row":
            padding[0] = True
    elif c["padding"] == "scattered":
        padding = torch.rand(batch, len_k, device=device) > 0.6
    return q, k, v, attn_mask, padding


def documented_keep_mask(seed, shape, dropout_p, device):
    """The documented dropout keep-mask (``reference.philox_keep_mask``, NumPy on the CPU: for
    small shapes) on ``device``."""
    return reference.philox_keep_mask(int(seed), shape, dropout_p).to(device)


def check_random_sweep(run, draws, seed, device, lengths, dims=SWEEP_DIMS, dtypes=DTYPES,
                       keep_mask=documented_keep_mask, mask_grad=False):
    """``draws`` random calls (:func:`draw_attention_case`) against the float64 reference, dropout
    with the keep-mask regenerated from the call's seed by ``keep_mask(seed, shape, dropout_p,
    device)``. (At real sizes on a GPU, pass the backend's own keep-mask kernel: the documented
    mask's NumPy Philox would take minutes a draw; the dropout tests check that kernel against it.)
    With ``mask_grad``, three in four float masks require grad.

    ``run(q, k, v, grad_out, kwargs) -> (out, grads, seed)``: the call under test with ``kwargs``
    (attn_mask, key_padding_mask, is_causal, dropout_p, scale), its gradients for ``grad_out``
    (of q, k, v, and of attn_mask where it requires grad), and the dropout seed it used (None
    without dropout)."""
    import numpy

    rng = numpy.random.default_rng(seed)
    for _ in range(draws):
        c = draw_attention_case(rng, lengths, dims, dtypes)
        q, k, v, attn_mask, padding = _case_inputs(c, device)
        if mask_grad and c["mask"].startswith("float") and rng.random() < 0.75:
            attn_mask.requires_grad_()
        kwargs = dict(attn_mask=attn_mask, key_padding_mask=padding, is_causal=c["causal"], scale=c["scale"])
        grad_out = torch.randn(c["batch"], c["heads_q"], c["len_q"], c["dim_v"], device=device, dtype=c["dtype"])
        with deterministic_algorithms(c["deterministic"]):
            out, grads, dropout_seed = run(q, k, v, grad_out, dict(kwargs, dropout_p=c["dropout_p"]))
        keep = None
        if c["dropout_p"] > 0.0:
            keep = keep_mask(dropout_seed, out.shape[:3] + (c["len_k"],), c["dropout_p"], device)
        inputs64 = [t.detach().double().requires_grad_() for t in _differentiable(q, k, v, attn_mask)]
        expected = reference.attention(*inputs64[:3], keep=keep, dropout_p=c["dropout_p"],
                                       **dict(kwargs, attn_mask=inputs64[3] if len(inputs64) > 3 else attn_mask))
        want = torch.autograd.grad(expected, inputs64, grad_out.double())
        fwd_tol, grad_tol = ATTENTION_TOL[c["dtype"]]
        if expected.norm() > 0:
            assert_rel_close(out, expected, fwd_tol, f"out {c}")
        else:  # every row without a key (or every weight dropped)
            assert (out == 0).all(), f"out {c}"
        assert_grads_close(grads, want, grad_tol, str(c))


def _differentiable(q, k, v, attn_mask):
    """The inputs a sweep differentiates: q, k, v, and attn_mask where it requires grad."""
    return (q, k, v) if attn_mask is None or not attn_mask.requires_grad else (q, k, v, attn_mask)


def public_api_run(backend):
    """A ``run`` for :func:`check_random_sweep`: ``fastformer.attention`` on ``backend``, its
    dropout seed drawn again from the same generator state."""
    def run(q, k, v, grad_out, kwargs):
        require_backend(backend, "attention", q, k, v, **kwargs)
        generator_seed = int(torch.randint(0, 2**31, ()))  # each draw its own
        out, seed = _same_seed_call(generator_seed, lambda: fastformer.attention(q, k, v, backend=backend, **kwargs),
                                    backend, q.device)
        grads = torch.autograd.grad(out, _differentiable(q, k, v, kwargs["attn_mask"]), grad_out)
        return out, grads, seed if kwargs["dropout_p"] else None
    return run


@pytest.mark.parametrize("device, lengths, draws, seed", [
    pytest.param("cpu", [1, 2, 17, 33, 47, 64], 24, 20261128, id="cpu"),
    # On a GPU most draws compile new kernels (about three, a second or more each): 40 draws in
    # four items, which a GPU run's workers take side by side.
    *(pytest.param("cuda", [1, 128, 257, 512, 1000, 2048], 10, 20261128 + part, marks=pytest.mark.gpu,
                   id=f"cuda-{part}") for part in range(4))])
def test_triton_random_sweep(device, lengths, draws, seed):
    from fastformer.triton.dropout import dropout_keep_mask

    keep_mask = dropout_keep_mask if device == "cuda" else documented_keep_mask
    check_random_sweep(public_api_run("triton"), draws, seed, device, lengths, keep_mask=keep_mask,
                       mask_grad=True)


# CUDA's grid axes y and z stop at 65535 blocks, x at 2^31 - 1. A batch of 65536 short sequences
# (axial or per-patch attention folds positions into the batch) fails on kernels that put the
# batch on y or z ("invalid configuration argument": SDPA's pytorch/pytorch#142228, xformers#845).
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def record_triton_launches(monkeypatch):
    """Triton launches (``kernel[grid](*args, **kwargs)``) recorded as (grid, kwargs) instead of
    run; a grid that is a function of the config gets 16 x 16 blocks."""
    from triton.runtime import interpreter, jit

    launches = []

    def record(kernel, grid):
        grid = grid({"BLOCK_M": 16, "BLOCK_N": 16}) if callable(grid) else grid
        return lambda *args, **kwargs: launches.append((grid, kwargs))

    # JIT functions and autotuners are KernelInterfaces; Triton < 3.3's interpreter has its own.
    for cls in (jit.KernelInterface, interpreter.InterpretedFunction):
        if "__getitem__" in vars(cls):
            monkeypatch.setattr(cls, "__getitem__", record)
    return launches


def test_triton_grids_stay_within_cuda_limits_for_any_batch(monkeypatch):
    """Every Triton attention launch, forward and backward, for a batch of 70000: the launches
    are recorded instead of run (the interpreter has no grid limits to trip over)."""
    triton_attention = pytest.importorskip("fastformer.triton.attention")
    launches = record_triton_launches(monkeypatch)
    batch, heads, length, dim = 70000, 2, 3, 16
    q, k, v = (torch.randn(batch, heads, length, dim) for _ in range(3))
    out, lse = triton_attention.attention_fwd(q, k, v, None, None, 0.0, False, 0.25, None)
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            triton_attention.attention_bwd(torch.randn_like(out), q, k, v, out, lse, None, None, 0.0, False, 0.25,
                                           None, False)
    grids = [grid for grid, _ in launches]
    assert len(grids) == 1 + 2 + 3  # forward; delta and dK/dV; delta, dK/dV and dQ
    for grid in grids:
        assert all(size <= limit for size, limit in zip(grid, GRID_LIMITS)), f"grid {grid}"
        assert math.prod(grid) >= batch * heads, f"grid {grid} leaves out programs"


def test_triton_compile_workers_come_from_the_environment(monkeypatch):
    triton_attention = pytest.importorskip("fastformer.triton.attention")
    monkeypatch.setenv("FASTFORMER_TRITON_COMPILE_WORKERS", "3")
    assert triton_attention._compile_workers() == 3
    monkeypatch.setenv("FASTFORMER_TRITON_COMPILE_WORKERS", "0")
    assert triton_attention._compile_workers() == 1
    monkeypatch.setenv("FASTFORMER_TRITON_COMPILE_WORKERS", "auto")
    with pytest.raises(ValueError, match="COMPILE_WORKERS must be a whole number of threads, got 'auto'"):
        triton_attention._compile_workers()
    monkeypatch.delenv("FASTFORMER_TRITON_COMPILE_WORKERS")
    assert 0 <= triton_attention._compile_workers() <= 8


def test_triton_autotune_keys_name_only_the_kernels_own_parameters(monkeypatch):
    """Triton 3.9 refuses an autotune key naming anything else (older versions skip such names),
    so a key shared by the three kernels broke every autotuned launch there. The keys are taken
    from what the launcher hands ``triton.autotune`` (no autotuner is built: Triton 3.2 would want
    a GPU driver for one)."""
    triton_attention = pytest.importorskip("fastformer.triton.attention")
    keys = {}

    def autotune(configs, key, **kwargs):
        return lambda kernel: keys.setdefault(kernel, []).append(list(key))

    monkeypatch.setattr(triton_attention.triton, "autotune", autotune)
    for kind, kernel in triton_attention._KERNELS.items():
        for head_class in (64, 128, 256):
            triton_attention._autotuned.__wrapped__(kind, head_class)  # not the launcher's cache
        assert len(keys[kernel]) == 3, kind
        for key in keys[kernel]:
            assert set(key) <= set(kernel.arg_names), (kind, sorted(set(key) - set(kernel.arg_names)))
            assert "bucket_q" in key and "HAS_DROPOUT" in key, (kind, key)
    assert "ATOMIC_DQ" in keys[triton_attention._KERNELS["dkdv"]][0]


def test_triton_autotuned_launches_reuse_the_chosen_config(monkeypatch):
    """After the autotuner has chosen a config for a launch key, launches with that key go to the
    kernel directly with the chosen config (the GPU path, with the launches recorded instead of
    run); a new length bucket, switch or tensor dtype goes through the autotuner again. The key
    reads the dtypes of the launch's leading tensor arguments: every launch must put all its
    tensors first."""
    triton_attention = pytest.importorskip("fastformer.triton.attention")
    from triton.runtime import interpreter, jit

    monkeypatch.setenv("FASTFORMER_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_attention, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(triton_attention, "_chosen_configs", {})
    monkeypatch.setattr(triton_attention, "_precompiled", set())
    chosen = triton_attention.triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    launches = []

    class RecordingTuner:
        configs = [chosen]  # one config: nothing to precompile

        def __init__(self, kind):
            self.kind = kind
            self.best_config = None

        def __getitem__(self, grid):
            def run(*args, **meta):
                self.best_config = chosen
                launches.append(("tuner", self.kind, None, args, meta))
            return run

    monkeypatch.setattr(triton_attention, "_autotuned", lambda kind, head_class: RecordingTuner(kind))
    kinds = {kernel: kind for kind, kernel in triton_attention._KERNELS.items()}

    def record(kernel, grid):
        return lambda *args, **kwargs: launches.append(("direct", kinds.get(kernel), grid, args, kwargs))

    for cls in (jit.KernelInterface, interpreter.InterpretedFunction):
        if "__getitem__" in vars(cls):
            monkeypatch.setattr(cls, "__getitem__", record)

    def forward_and_backward(length, dtype, deterministic=False):
        launches.clear()
        q, k, v = (torch.randn(2, 3, length, 16, dtype=dtype) for _ in range(3))
        out, lse = triton_attention.attention_fwd(q, k, v, None, None, 0.0, False, 0.25, None)
        with deterministic_algorithms(deterministic):
            triton_attention.attention_bwd(out, q, k, v, out, lse, None, None, 0.0, False, 0.25, None, False)
        return [(how, kind) for how, kind, *_ in launches if kind is not None]

    tuned = [("tuner", "fwd"), ("tuner", "dkdv")]
    direct = [("direct", "fwd"), ("direct", "dkdv")]
    assert forward_and_backward(70, torch.float32) == tuned
    assert forward_and_backward(70, torch.float32) == direct
    assert forward_and_backward(100, torch.float32) == direct  # the same length bucket (128)
    assert forward_and_backward(130, torch.float32) == tuned  # a new bucket
    assert forward_and_backward(70, torch.float16) == tuned  # new dtypes (and so DOT_PRECISION)
    assert forward_and_backward(70, torch.bfloat16) == tuned  # new dtypes only
    # deterministic: the forward as before, dK/dV without atomic dQ, and a dQ kernel
    assert forward_and_backward(70, torch.float32, True) == [("direct", "fwd"), ("tuner", "dkdv"), ("tuner", "dq")]
    assert forward_and_backward(70, torch.float32, True) == [*direct, ("direct", "dq")]

    forward_and_backward(70, torch.float32)
    for how, kind, grid, args, kwargs in launches:
        if how == "direct" and kind is not None:
            assert {key: kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")} == \
                {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
            assert grid == (2 if kind == "fwd" else 3, 3, 2)  # 70 rows of BLOCK_M = 64 or keys of BLOCK_N = 32
        tensors = [isinstance(arg, torch.Tensor) for arg in args]
        assert tensors == sorted(tensors, reverse=True), f"{kind}: a tensor argument after a non-tensor"


@pytest.mark.parametrize("mask_kind", ["none", "causal+padding", "bool"])
def test_triton_flat_grid_computes_what_the_3d_grid_does(mask_kind, monkeypatch):
    """Launches past the grid's y/z limit decode (row block, head, batch) from one axis: with the
    limit lowered to 1, every launch takes that path, and gives the same bits, with GQA, several
    row blocks, dropout and masks."""
    triton_attention = pytest.importorskip("fastformer.triton.attention")
    shape = (3, 4, 2, 70, 45, 16, 16)
    device = kernel_device("triton")
    q, k, v = make_qkv(shape, torch.float32, device)
    attn_mask, key_padding_mask, is_causal = make_masks(mask_kind, shape, torch.float32, device)
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, dropout_p=0.3)
    require_backend("triton", "attention", q, k, v, **kwargs)
    results = []
    for limit in (triton_attention.GRID_YZ_LIMIT, 1):
        monkeypatch.setattr(triton_attention, "GRID_YZ_LIMIT", limit)
        torch.manual_seed(5)
        # (on a GPU, atomic dQ adds in a different order from run to run)
        with deterministic_algorithms(device != "cpu"):
            out = fastformer.attention(q, k, v, backend="triton", **kwargs)
            results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for flat, grid_3d in zip(*results):
        torch.testing.assert_close(flat, grid_3d, rtol=0, atol=0)


def test_torch_backend_gives_sdpa_at_most_its_batch_limit(monkeypatch):
    """Batches over SDPA's limit go through it in slices: same outputs and gradients, every mask
    kind sliced (or broadcast) along with them. The limit is lowered to 3 for a batch of 8."""
    from fastformer.torch_backend import attention as torch_attention

    shape = (8, 4, 2, 6, 11, 16, 16)
    cases = [dict(), dict(is_causal=True), dict(is_causal=True, scale=-0.5),
             dict(attn_mask=torch.rand(8, 1, 6, 11) > 0.3), dict(attn_mask=torch.randn(1, 4, 6, 11)),
             dict(key_padding_mask=padding_mask(8, 11, "cpu"), is_causal=True)]
    sdpa, batches = F.scaled_dot_product_attention, []

    def recording_sdpa(query, *args, **kwargs):
        batches.append(query.shape[0])
        return sdpa(query, *args, **kwargs)

    for kwargs in cases:
        q, k, v = make_qkv(shape, torch.float64, "cpu")
        expected = fastformer.attention(q, k, v, backend="torch", **kwargs)
        grad_out = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
        with monkeypatch.context() as patch:
            patch.setattr(torch_attention, "SDPA_MAX_BATCH", 3)
            patch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
            out = fastformer.attention(q, k, v, backend="torch", **kwargs)
        torch.testing.assert_close(out, expected)
        for grad, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
            torch.testing.assert_close(grad, want)
        assert batches == [3, 3, 2], f"{kwargs}: SDPA saw batches {batches}"
        batches.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_beyond_the_grid_limits_on_gpu(backend):
    """A batch of 70000 on the GPU, forward and backward, against the same call in two halves."""
    shape = (70000, 2, 1, 5, 7, 32, 32)
    q, k, v = make_qkv(shape, torch.bfloat16, "cuda")
    key_padding_mask = padding_mask(shape[0], shape[4], "cuda")
    kwargs = dict(key_padding_mask=key_padding_mask, is_causal=True)
    require_backend(backend, "attention", q, k, v, **kwargs)
    out = fastformer.attention(q, k, v, backend=backend, **kwargs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    half = shape[0] // 2
    for rows in (slice(0, half), slice(half, None)):
        part = fastformer.attention(q[rows], k[rows], v[rows], backend=backend,
                                    key_padding_mask=key_padding_mask[rows], is_causal=True)
        part_grads = torch.autograd.grad(part, (q, k, v), grad_out[rows])
        torch.testing.assert_close(out[rows], part)
        for grad, want in zip(grads, part_grads):
            torch.testing.assert_close(grad[rows], want[rows])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_rows_more_than_2_pow_31_elements_apart(backend, device):
    """A mask whose rows lie 2^30 elements apart (as a 46341 x 46341 mask's would, past 2^31 by
    the third row): the kernels' row index times row stride needs int64. The view's storage is
    allocated, not written, beyond the elements the mask holds."""
    storage = torch.empty(2**31 + 64, dtype=torch.bool, device=device)
    attn_mask = storage.as_strided((1, 1, 3, 40), (0, 0, 2**30, 1))
    attn_mask.copy_(torch.rand(1, 1, 3, 40, device=device) > 0.3)
    attn_mask[..., 0] = True
    q, k, v = make_qkv((2, 2, 2, 3, 40, 16, 16), torch.float32, device)
    require_backend(backend, "attention", q, k, v, attn_mask=attn_mask)
    assert_matches_reference(q, k, v, torch.float32, backend, attn_mask=attn_mask)


@contextlib.contextmanager
def tf32_allowed(allowed: bool):
    """torch.backends.cuda.matmul.allow_tf32 set inside the block (monkeypatch cannot: it is a
    property of a module-like object)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_triton_float32_products_follow_pytorch_float32_matmul_precision(monkeypatch):
    """Float32 attention keeps float32 accuracy (three TF32 products a dot) unless PyTorch's switch
    allows plain TF32, as its own matmuls do; 16-bit inputs are unaffected. Read from the launches
    (recorded, not run)."""
    triton_attention = pytest.importorskip("fastformer.triton.attention")
    launches = record_triton_launches(monkeypatch)
    expected = {(torch.float32, False): "tf32x3", (torch.float32, True): "tf32",
                (torch.bfloat16, False): "tf32", (torch.bfloat16, True): "tf32"}
    for (dtype, allow_tf32), precision in expected.items():
        q = torch.randn(1, 2, 5, 16, dtype=dtype)
        for deterministic in (False, True):  # the dQ kernel runs only in deterministic mode
            with tf32_allowed(allow_tf32), deterministic_algorithms(deterministic):
                out, lse = triton_attention.attention_fwd(q, q, q, None, None, 0.0, False, 0.25, None)
                triton_attention.attention_bwd(out, q, q, q, out, lse, None, None, 0.0, False, 0.25, None, False)
            precisions = [kwargs.get("DOT_PRECISION") for _, kwargs in launches]
            # fwd, delta (None), dK/dV [, dQ]
            assert precisions == [precision, None, precision] + [precision] * deterministic, (dtype, allow_tf32)
            launches.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["highest", "tf32"])
def test_triton_float32_on_gpu_is_exact_unless_tf32_is_allowed(allow_tf32):
    """Float32 accuracy by default (three TF32 products a dot): close to float64, far below
    DESIGN.md's float32 tolerance, which plain TF32, allowed by the switch, needs (about 1.5e-3
    forward at unit-variance inputs)."""
    shape = (2, 4, 2, 150, 270, 64, 64)
    q, k, v = make_qkv(shape, torch.float32, "cuda")
    kwargs = dict(is_causal=True, key_padding_mask=padding_mask(2, 270, "cuda", min_keep=100))
    with tf32_allowed(allow_tf32):
        out = fastformer.attention(q, k, v, backend="triton", **kwargs)
        grad_out = torch.randn_like(out)
        grads = _grads(out, (q, k, v), grad_out)
    expected = reference.attention(q, k, v, **kwargs)
    fwd_tol, grad_tol = (2e-5, 1e-4) if not allow_tf32 else ATTENTION_TOL[torch.float32]
    assert_rel_close(out, expected, fwd_tol, "out")
    for name, grad, want in zip("qkv", grads, _grads(expected, (q, k, v), grad_out.double())):
        assert_rel_close(grad, want, grad_tol, f"grad {name}")
