"""The CUDA attention kernels (csrc/attention/, fastformer/cuda/attention.py).

Without a GPU: what support() declares, the Python-side argument handling, and (once the
extension is built) the registered ops' schemas and meta shapes. On a GPU (marked ``gpu``): the
kernels through the backend contract (attention_fwd / attention_bwd) against the float64
reference, over head dims 8..128 (compiled 32/64/96/128, others padded), odd lengths, causal,
GQA/MQA, every mask kind, a float mask's gradient, rows with no key, dropout against the regenerated
keep-mask, odd strides and unaligned rows, and a random sweep at real sizes.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import fastformer
import reference
from fastformer.cuda import attention as cuda_attention
from fastformer.cuda import dropout as cuda_dropout
from fastformer.cuda import load_extension
from fastformer.functional import _prepare_attention
from fastformer.library import attention_layout_like
from fastformer.masks import float_mask_in
from helpers import (ATTENTION_TOL, assert_grads_close, assert_rel_close, deterministic_algorithms, misaligned,
                     require_backend)
from test_attention import check_random_sweep as sweep
from test_attention import finfo_min_mask

HALF = [torch.float16, torch.bfloat16]

FWD_SCHEMA = ("fastformer::cuda_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
              "Tensor? key_padding_mask, float scale, bool is_causal, float dropout_p, Tensor? seed, "
              "bool out_like_query=True) -> (Tensor out, Tensor lse)")
BWD_SCHEMA = ("fastformer::cuda_attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
              "Tensor out, Tensor lse, Tensor? attn_mask, Tensor? key_padding_mask, float scale, bool is_causal, "
              "float dropout_p, Tensor? seed, Tensor(a!)? grad_attn_mask=None) -> (Tensor grad_query, "
              "Tensor grad_key, Tensor grad_value)")

needs_extension = pytest.mark.skipif(load_extension() is None, reason="fastformer._C is not built")


# --------------------------------------------------------------------------------------------
# no GPU needed
# --------------------------------------------------------------------------------------------
def test_support_declares_what_the_kernels_do():
    support = cuda_attention.support()
    assert support.devices == frozenset({"cuda"})
    assert support.dtypes == frozenset({torch.float16, torch.bfloat16})
    assert support.features == frozenset({"dropout", "causal", "bool_mask", "float_mask", "mask_grad",
                                          "key_padding_mask", "gqa", "value_dim"})
    assert support.head_dims == (1, 128)
    assert support.min_compute_capability == (8, 0)


def test_arguments_the_kernels_cannot_take_are_rejected_clearly():
    q = torch.zeros(1, 2, 4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_attention.attention_fwd(q, q, q, None, None, 0.0, False, 1.0, None)
    half = torch.zeros(1, 2, 4, 8, dtype=torch.float16, device="meta")
    wide = torch.zeros(1, 2, 4, 130, dtype=torch.float16, device="meta")
    for args, match in [((half.float(),) * 3, "float16 or bfloat16"),
                        ((wide,) * 3, "head dims up to 128"),
                        ((half, half, wide), "head dims up to 128"),
                        ((torch.zeros(1, 3, 4, 8, dtype=torch.float16, device="meta"), half, half),
                         "multiple of key/value heads"),
                        ((half, half[:, :0], half[:, :0]), r"query heads \(2\) must be a multiple of key/value "
                                                           r"heads \(0\)"),
                        ((half[:, :0],) * 3, "CUDA tensor")]:  # no heads at all: empty, but on the meta device
        with pytest.raises(ValueError, match=match):
            cuda_attention._check(*args)


@needs_extension
def test_ops_are_registered_with_their_schemas():
    assert str(torch.ops.fastformer.cuda_attention_fwd.default._schema) == FWD_SCHEMA
    assert str(torch.ops.fastformer.cuda_attention_bwd.default._schema) == BWD_SCHEMA


@needs_extension
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_meta_shapes(dtype):
    """The Meta kernels give the CUDA kernels' shapes and layouts (out stored as (B, Lq, Hq, Dv))."""
    batch, heads_q, heads_k, len_q, len_k, dim = 2, 8, 2, 97, 65, 50
    q = torch.empty(batch, len_q, heads_q, dim, device="meta", dtype=dtype).transpose(1, 2)
    k = torch.empty(batch, heads_k, len_k, dim, device="meta", dtype=dtype)
    v = torch.empty(batch, heads_k, len_k, dim, device="meta", dtype=dtype)
    mask = torch.empty(len_q, len_k, device="meta", dtype=torch.bool)
    seed = torch.empty((), device="meta", dtype=torch.int64)
    out, lse = torch.ops.fastformer.cuda_attention_fwd(q, k, v, mask, None, 0.125, True, 0.1, seed)
    assert out.shape == (batch, heads_q, len_q, dim) and out.dtype == dtype
    assert out.stride() == (len_q * heads_q * dim, dim, heads_q * dim, 1)
    assert lse.shape == (batch, heads_q, len_q) and lse.dtype == torch.float32
    padding = torch.empty(batch, len_k, device="meta", dtype=torch.bool)
    grads = torch.ops.fastformer.cuda_attention_bwd(out, q, k, v, out, lse, None, padding, 0.125, False, 0.0, None)
    for grad, like in zip(grads, (q, k, v)):  # dense, in the input's memory order
        assert grad.shape == like.shape and grad.dtype == dtype
        assert grad.stride() == attention_layout_like(like).stride()
    assert grads[0].transpose(1, 2).is_contiguous() and grads[1].is_contiguous()


@needs_extension
@pytest.mark.parametrize("shape, dtype", [((2, 64), torch.bool), ((2, 65, 1), torch.bool), ((1, 65), torch.bool),
                                          ((2, 65), torch.uint8)], ids=str)
def test_a_bad_key_padding_mask_is_rejected_by_the_op(shape, dtype):
    """The op itself (its Meta kernel, which runs here) checks key_padding_mask: bool (B, Lk)."""
    q = torch.empty(2, 4, 97, 64, device="meta", dtype=torch.float16)
    k = torch.empty(2, 4, 65, 64, device="meta", dtype=torch.float16)
    padding = torch.empty(shape, device="meta", dtype=dtype)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be a bool tensor of shape \(B, Lk\) = \(2, 65\)"):
        torch.ops.fastformer.cuda_attention_fwd(q, k, k, None, padding, 0.125, False, 0.0, None)


@needs_extension
@pytest.mark.parametrize("grad_shape, grad_dtype, mask_dtype, message", [
    ((1, 4, 1, 65), torch.float32, torch.float16, None),  # a per-key bias per head: accepted
    ((2, 4, 97, 65), torch.float16, torch.float16, "must be a float32 tensor of 4 dims"),
    ((4, 97, 65), torch.float32, torch.float16, "must be a float32 tensor of 4 dims"),
    ((2, 3, 97, 65), torch.float32, torch.float16, "must be a float32 tensor of 4 dims"),
    ((2, 4, 97, 65), torch.float32, torch.bool, "gradient of a float attn_mask, and attn_mask is Bool"),
    ((2, 4, 97, 65), torch.float32, None, "gradient of a float attn_mask, and attn_mask is None"),
], ids=str)
def test_a_bad_grad_attn_mask_is_rejected_by_the_op(grad_shape, grad_dtype, mask_dtype, message):
    """The backward op checks the tensor it writes the mask's gradient into (its Meta kernel here)."""
    q = torch.empty(2, 4, 97, 64, device="meta", dtype=torch.float16)
    k = torch.empty(2, 2, 65, 64, device="meta", dtype=torch.float16)
    out, lse = torch.empty_like(q), torch.empty(2, 4, 97, device="meta")
    mask = None if mask_dtype is None else torch.empty(1, 4, 1, 65, device="meta", dtype=mask_dtype)
    grad = torch.empty(grad_shape, device="meta", dtype=grad_dtype)
    call = functools.partial(torch.ops.fastformer.cuda_attention_bwd, out, q, k, k, out, lse, mask, None, 0.125,
                             False, 0.0, None, grad)
    if message is None:
        assert [g.shape for g in call()] == [q.shape, k.shape, k.shape]
    else:
        with pytest.raises(RuntimeError, match=message):
            call()


# --------------------------------------------------------------------------------------------
# on a GPU, through the backend contract (attention_fwd / attention_bwd)
# --------------------------------------------------------------------------------------------
def _cuda_ready():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if load_extension() is None:
        pytest.skip("fastformer._C is not built")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the CUDA attention kernels need compute capability >= 8.0")


def _qkv(batch, heads_q, heads_k, len_q, len_k, dim, dim_v, dtype, layout="blhd", device="cuda"):
    def make(length, heads, d):
        if layout == "blhd":  # views of (B, L, H, D) projections, as models pass them
            return torch.randn(batch, length, heads, d, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, length, d, device=device, dtype=dtype)

    return make(len_q, heads_q, dim), make(len_k, heads_k, dim), make(len_k, heads_k, dim_v)


def _run(q, k, v, attn_mask=None, key_padding_mask=None, is_causal=False, dropout_p=0.0, seed=None,
         grad_out=None, scale=None, mask_needs_grad=False):
    """(out, lse, (dq, dk, dv)) from the backend functions, as the autograd layer calls them; with
    ``mask_needs_grad``, (dq, dk, dv, d attn_mask)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = cuda_attention.attention_fwd(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed)
    grads = None
    if grad_out is not None:
        grads = cuda_attention.attention_bwd(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p,
                                             is_causal, scale, seed, mask_needs_grad)
        grads = grads if mask_needs_grad else grads[:3]
    return out, lse, grads


def _reference(q, k, v, grad_out, compute_dtype=torch.float64, **kwargs):
    """The reference's output and q/k/v gradients: float64, or the same formula computed by plain
    PyTorch in ``compute_dtype`` (the baseline of DESIGN.md's half-precision criterion)."""
    inputs = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out = reference.attention(*inputs, compute_dtype=compute_dtype, **kwargs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(compute_dtype))
    return out.detach(), grads


def _reference_lse(q, k, attn_mask=None, key_padding_mask=None, is_causal=False):
    q, k = q.double(), k.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    allowed = torch.ones_like(s, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.double()
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    return torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1)


def _masks_of(kind, batch, heads_q, len_q, len_k, dtype, device="cuda"):
    """(attn_mask, key_padding_mask, is_causal); every query row keeps at least one key."""
    attn_mask, padding = None, None
    if "bool" in kind:
        attn_mask = torch.rand(batch, 1, len_q, len_k, device=device) > 0.3
        attn_mask[..., 0] = True
    if "float" in kind:
        attn_mask = torch.randn(heads_q, len_q, len_k, device=device, dtype=dtype)
    if "padding" in kind:
        lengths = torch.randint(1, len_k + 1, (batch,), device=device)
        padding = torch.arange(len_k, device=device)[None, :] >= lengths[:, None]
    if "scattered" in kind:  # not a right padding: padding bytes tested inside the key end
        padding = torch.rand(batch, len_k, device=device) > 0.6
        padding[:, 0] = False
    return attn_mask, padding, "causal" in kind


SHAPES = [  # (B, Hq, Hk, Lq, Lk)
    (2, 4, 4, 97, 97),
    (1, 8, 2, 33, 200),   # GQA, Lq < Lk
    (2, 2, 1, 130, 70),   # MQA, Lq > Lk
    (3, 2, 2, 1, 1),
]
MASK_KINDS = ["none", "causal", "padding", "causal+padding", "scattered", "causal+scattered", "bool", "float",
              "causal+float"]
MASK_DTYPES = [torch.bool, torch.float32, torch.float16]
NO_KEY_CASES = ["padding", "scattered", "bool", "float", "causal+padding"]


# Each check below runs on `device`: "cuda" in the GPU tests here, "cpu" where tests/
# test_cuda_emulated.py runs the same checks on the CPU emulator of the kernels (smaller sizes).
def check_matches_float64_reference(shape, mask_kind, dim, dtype, device="cuda"):
    batch, heads_q, heads_k, len_q, len_k = shape
    q, k, v = _qkv(batch, heads_q, heads_k, len_q, len_k, dim, dim, dtype, device=device)
    attn_mask, padding, is_causal = _masks_of(mask_kind, batch, heads_q, len_q, len_k, dtype, device=device)
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=padding, is_causal=is_causal)
    grad_out = torch.randn(batch, heads_q, len_q, dim, device=device, dtype=dtype)
    out, lse, grads = _run(q, k, v, grad_out=grad_out, **kwargs)
    expected, expected_grads = _reference(q, k, v, grad_out, **kwargs)
    plain, plain_grads = _reference(q, k, v, grad_out, compute_dtype=dtype, **kwargs)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert out.shape == expected.shape and out.dtype == dtype
    assert_rel_close(out, expected, fwd_tol, "out", baseline=plain)
    want_lse = _reference_lse(q, k, **kwargs)
    alive = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[alive].double(), want_lse[alive], atol=2e-2, rtol=2e-3)
    assert (lse[~alive] == float("-inf")).all()
    assert_grads_close(grads, expected_grads, grad_tol, f"{shape} {mask_kind} {dim} {dtype}", baselines=plain_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("dim", [8, 32, 33, 50, 64, 96, 100, 128])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, mask_kind, dim, dtype):
    _cuda_ready()
    check_matches_float64_reference(shape, mask_kind, dim, dtype)


def check_value_head_dim_may_differ(dims, dtype, shape=(2, 4, 2, 70, 90), device="cuda"):
    """The kernels take Dv != D (padded to the larger one)."""
    dim, dim_v = dims
    batch, heads_q, heads_k, len_q, len_k = shape
    q, k, v = _qkv(batch, heads_q, heads_k, len_q, len_k, dim, dim_v, dtype, device=device)
    grad_out = torch.randn(batch, heads_q, len_q, dim_v, device=device, dtype=dtype)
    out, _, grads = _run(q, k, v, is_causal=True, grad_out=grad_out)
    expected, expected_grads = _reference(q, k, v, grad_out, is_causal=True)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    assert_grads_close(grads, expected_grads, grad_tol, str(dims))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("dims", [(32, 64), (64, 24), (50, 128), (128, 8)], ids=str)
def test_value_head_dim_may_differ(dims, dtype):
    _cuda_ready()
    check_value_head_dim_may_differ(dims, dtype)


def check_a_float32_mask_is_read_in_the_query_dtype(device="cuda"):
    """The op reads a float32 mask rounded to the query dtype: -1e9 is -inf in float16, so that
    row has no key (output 0, lse -inf). fastformer.attention hands such a mask over saturated to
    the query dtype's range (-1e9 -> -65504: finite, as SDPA keeps it), for every backend."""
    q, k, v = _qkv(2, 2, 2, 9, 11, 64, 64, torch.float16, device=device)
    mask = torch.randn(2, 1, 9, 11, device=device)
    mask[0, 0, 3] = -1e9
    out, lse = cuda_attention.attention_fwd(q, k, v, mask, None, 0.0, False, 0.125, None)
    assert (out[0, :, 3] == 0).all() and (lse[0, :, 3] == float("-inf")).all()
    saturated = float_mask_in(mask, torch.float16)
    out, lse = cuda_attention.attention_fwd(q, k, v, saturated, None, 0.0, False, 0.125, None)
    assert torch.isfinite(lse).all() and (out[0, :, 3] != 0).any()
    expected = fastformer.attention(q, k, v, attn_mask=mask, scale=0.125, backend="torch")
    assert_rel_close(out, expected, ATTENTION_TOL[torch.float16][0], "out")


@pytest.mark.gpu
def test_a_float32_mask_is_read_in_the_query_dtype():
    _cuda_ready()
    check_a_float32_mask_is_read_in_the_query_dtype()


def check_finfo_min_masks_keep_sdpa_semantics(dtype, device="cuda"):
    """Hugging Face's finfo(dtype).min masks (causal + left padding; test_attention.py says why):
    the rows with every key masked that way attend as in SDPA, not as rows with no key."""
    q, k, v = _qkv(2, 2, 2, 16, 16, 32, 32, dtype, device=device)
    mask = finfo_min_mask(2, 16, [0, 3], dtype, device)
    grad_out = torch.randn(2, 2, 16, 32, device=device, dtype=dtype)
    grad_out[1, :, :3] = 0  # those rows reach no loss in a model (test_attention.py)
    out, lse, grads = _run(q, k, v, attn_mask=mask, grad_out=grad_out)
    expected, expected_grads = _reference(q, k, v, grad_out, attn_mask=mask)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    assert torch.isfinite(lse).all()
    assert_grads_close(grads, expected_grads, grad_tol, f"finfo.min mask {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_finfo_min_masks_keep_sdpa_semantics(dtype):
    _cuda_ready()
    check_finfo_min_masks_keep_sdpa_semantics(dtype)


def check_expanded_mask_views_give_the_materialised_masks_results(mask_dtype, device="cuda"):
    """A mask passed as an expanded view (stride 0, as Hugging Face builds its 4-d masks) gives
    exactly the result of the same mask materialised."""
    q, k, v = _qkv(3, 4, 2, 37, 45, 64, 64, torch.float16, device=device)
    per_key = torch.rand(3, 1, 1, 45, device=device) > 0.3
    per_key[..., 0] = True
    if mask_dtype != torch.bool:
        per_key = torch.randn(3, 1, 1, 45, device=device, dtype=mask_dtype)
    expanded = per_key.expand(3, 4, 37, 45)
    grad_out = torch.randn(3, 4, 37, 64, device=device, dtype=torch.float16)
    with deterministic_algorithms():  # no atomic dQ: bitwise comparable gradients
        out, lse, grads = _run(q, k, v, attn_mask=expanded, grad_out=grad_out)
        want_out, want_lse, want_grads = _run(q, k, v, attn_mask=expanded.contiguous(), grad_out=grad_out)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    for grad, want in zip(grads, want_grads):
        assert torch.equal(grad, want)


@pytest.mark.gpu
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_expanded_mask_views_give_the_materialised_masks_results(mask_dtype):
    _cuda_ready()
    check_expanded_mask_views_give_the_materialised_masks_results(mask_dtype)


def check_rows_with_no_key_give_zero_and_zero_gradients(how, heads=2, dim=64, device="cuda"):
    dtype = torch.bfloat16
    batch, len_q, len_k = 3, 75, 80
    q, k, v = _qkv(batch, heads, heads, len_q, len_k, dim, dim, dtype, device=device)
    lengths = torch.tensor([80, 37, 5], device=device)
    padding = torch.arange(len_k, device=device)[None, :] >= lengths[:, None]
    attn_mask, is_causal = None, False
    dead = torch.zeros(batch, heads, len_q, dtype=torch.bool, device=device)
    if how == "padding":
        padding[1] = True  # every key of batch row 1
        dead[1] = True
    elif how == "scattered":
        padding[2] = True
        padding[0, 3] = True
        padding[0, 40:] = False
        dead[2] = True
    elif how == "bool":
        attn_mask = torch.rand(batch, heads, len_q, len_k, device=device) > 0.5
        attn_mask[..., 0] = True
        attn_mask[0, heads - 1, 3] = False
        attn_mask[2, :, 70] = False
        padding = None
        dead[0, heads - 1, 3] = dead[2, :, 70] = True
    elif how == "float":
        attn_mask = torch.randn(batch, heads, len_q, len_k, device=device, dtype=dtype)
        attn_mask[1, 0, 5] = float("-inf")
        padding = None
        dead[1, 0, 5] = True
    else:  # causal, the first 4 keys of batch row 0 padded: its queries 0..3 see nothing
        is_causal = True
        padding = torch.zeros(batch, len_k, dtype=torch.bool, device=device)
        padding[0, :4] = True
        dead[0, :, :4] = True
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=padding, is_causal=is_causal)
    grad_out = torch.randn(batch, heads, len_q, dim, device=device, dtype=dtype)
    out, lse, (grad_q, grad_k, grad_v) = _run(q, k, v, grad_out=grad_out, **kwargs)
    assert torch.isfinite(out).all() and (out[dead] == 0).all()
    assert (lse[dead] == float("-inf")).all() and torch.isfinite(lse[~dead]).all()
    for grad in (grad_q, grad_k, grad_v):
        assert torch.isfinite(grad).all()
    assert (grad_q[dead] == 0).all()
    expected, expected_grads = _reference(q, k, v, grad_out, **kwargs)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    assert_grads_close((grad_q, grad_k, grad_v), expected_grads, grad_tol, how)


@pytest.mark.gpu
@pytest.mark.parametrize("how", NO_KEY_CASES)
def test_rows_with_no_key_give_zero_and_zero_gradients(how):
    _cuda_ready()
    check_rows_with_no_key_give_zero_and_zero_gradients(how)


KEY_PADDING_LAYOUTS = ["contiguous", "offset", "transposed"]


def key_padding_of_long_rows(layout, device):
    """A (5, 1030) key_padding_mask whose rows take several passes of the key-range kernel's scan
    (128 threads x 4 bytes; 1030 = 257 words and 2 bytes) and end in each place a key end can be
    found, stored as `layout`: "contiguous" (rows 0, 2, 4 are 4-byte aligned, so read a word at a
    time, rows 1, 3 byte by byte), "offset" (every row unaligned), "transposed" (a key stride of
    5: made contiguous by the op)."""
    batch, len_k = 5, 1030
    pad = torch.zeros(batch, len_k, dtype=torch.bool, device=device)
    pad[0, 40:1028] = True  # holes, then the last unpadded key among the tail bytes
    pad[0, 1029] = True
    pad[1, 41:] = True  # right padding, the key end in the first pass and in the first key tile
    pad[2, :-1] = True  # the last key alone
    pad[3, 7] = True  # holes in the first pass, the key end in the third
    pad[3, 900:] = True
    if layout == "offset":
        return torch.zeros(batch, len_k + 2, dtype=torch.bool, device=device)[:, 2:].copy_(pad)
    if layout == "transposed":
        return pad.t().contiguous().t()
    return pad


def check_key_padding_of_long_rows(layout, device="cuda"):
    """Each batch row's key end and holes, as the key-range kernel finds them. Keys past a key
    end are never used, whatever they hold: NaN there (batch row 1, whose end is in the first
    key tile) changes nothing."""
    dtype, dim = torch.float16, 32
    padding = key_padding_of_long_rows(layout, device)
    batch, len_k = padding.shape
    q, k, v = _qkv(batch, 1, 1, 5, len_k, dim, dim, dtype, device=device)
    grad_out = torch.randn(batch, 1, 5, dim, device=device, dtype=dtype)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[1, :, 41:] = poisoned_v[1, :, 41:] = float("nan")
    out, lse, grads = _run(q, poisoned_k, poisoned_v, key_padding_mask=padding, grad_out=grad_out)
    expected, expected_grads = _reference(q, k, v, grad_out, key_padding_mask=padding)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    torch.testing.assert_close(lse.double(), _reference_lse(q, k, key_padding_mask=padding), atol=2e-2, rtol=2e-3)
    assert_grads_close(grads, expected_grads, grad_tol, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", KEY_PADDING_LAYOUTS)
def test_key_padding_of_long_rows(layout):
    _cuda_ready()
    check_key_padding_of_long_rows(layout)


def check_dropout_matches_reference_with_the_same_mask(mask_kind, dim, dtype, shape=(2, 4, 2, 77, 130),
                                                       device="cuda"):
    """The kernels' keep bits (shared between lanes, transposed in the dK/dV kernel) are the
    documented Philox mask of ((b Hq + h) Lq + i, j), computed independently (reference.py)."""
    batch, heads_q, heads_k, len_q, len_k = shape
    p = 0.3
    q, k, v = _qkv(batch, heads_q, heads_k, len_q, len_k, dim, dim, dtype, device=device)
    attn_mask, padding, is_causal = _masks_of(mask_kind, batch, heads_q, len_q, len_k, dtype, device=device)
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=padding, is_causal=is_causal)
    seed = torch.tensor(123456789012345, dtype=torch.int64, device=device)
    grad_out = torch.randn(batch, heads_q, len_q, dim, device=device, dtype=dtype)
    out, _, grads = _run(q, k, v, dropout_p=p, seed=seed, grad_out=grad_out, **kwargs)
    keep = reference.philox_keep_mask(int(seed), (batch, heads_q, len_q, len_k), p).to(device)
    assert 0.6 < keep.float().mean().item() < 0.8
    expected, expected_grads = _reference(q, k, v, grad_out, keep=keep, dropout_p=p, **kwargs)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    assert_grads_close(grads, expected_grads, grad_tol, f"{mask_kind} {dim} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("dim", [32, 64, 96, 128])
@pytest.mark.parametrize("mask_kind", ["none", "causal+padding", "float"])
def test_dropout_matches_reference_with_the_same_mask(mask_kind, dim, dtype):
    _cuda_ready()
    check_dropout_matches_reference_with_the_same_mask(mask_kind, dim, dtype)


def check_odd_strides_and_unaligned_rows(dim, batch=2, heads=3, device="cuda"):
    """Packed QKV views (rows 16-byte aligned for dim 64: 16-byte cp.async; 4-byte aligned for 50:
    4-byte cp.async), a non-contiguous last dim (made contiguous), contiguous inputs and inputs
    starting 2 bytes off (element-wise loads) all give bit-identical results (without atomic dQ,
    whose order of adds varies on a GPU), and, with atomic dQ, the reference's."""
    dtype = torch.float16
    length = 67
    packed = torch.randn(batch, length, 3, heads, dim, device=device, dtype=dtype)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))  # row stride 9 * dim: unaligned for 50
    grad_out = torch.randn(batch, heads, length, dim, device=device, dtype=dtype)
    transposed_last = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    assert transposed_last[0].stride(-1) != 1
    layouts = [(q, k, v), tuple(t.contiguous() for t in (q, k, v)), transposed_last,
               tuple(misaligned(t) for t in (q, k, v))]
    expected, expected_grads = _reference(q, k, v, grad_out, is_causal=True)
    for atomic_dq in (False, True):
        with deterministic_algorithms(not atomic_dq):
            runs = [_run(*inputs, is_causal=True, grad_out=grad_out if i < 3 else misaligned(grad_out))
                    for i, inputs in enumerate(layouts)]
        out, lse, grads = runs[0]
        for other in runs[1:]:
            torch.testing.assert_close(out, other[0], atol=0, rtol=0)
            torch.testing.assert_close(lse, other[1], atol=0, rtol=0)
            for grad, grad_other in zip(grads, other[2]):
                if atomic_dq:
                    assert_rel_close(grad_other, grad, 1e-3, "strided, atomic dQ")
                else:
                    torch.testing.assert_close(grad, grad_other, atol=0, rtol=0)
            assert_grads_close(other[2], expected_grads, ATTENTION_TOL[dtype][1], f"strided, atomic dQ: {atomic_dq}")
        assert_rel_close(out, expected, ATTENTION_TOL[dtype][0], "out")
        assert_grads_close(grads, expected_grads, ATTENTION_TOL[dtype][1], f"strided, atomic dQ: {atomic_dq}")


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [50, 64])
def test_odd_strides_and_unaligned_rows(dim):
    _cuda_ready()
    check_odd_strides_and_unaligned_rows(dim)


# Float masks whose gradient the kernels write: full shape (stored), broadcast over the batch, the
# heads, both (a learned position bias: atomic adds), and per key (summed over the queries first).
MASK_GRAD_SHAPES = [(2, 4, 70, 150), (1, 4, 70, 150), (1, 1, 70, 150), (2, 1, 1, 150), (1, 1, 1, 150)]
# d attn_mask against the kernels' algorithm computed exactly (check_float_mask_gradient): float32
# arithmetic (2e-7..4e-7 relative on the emulator; room left for the GPU's approximate exp2 and
# accumulation order), then the result rounded to the mask's dtype (an ulp where the two straddle).
MASK_GRAD_ALGORITHM_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def check_float_mask_gradient(mask_shape, is_causal, deterministic, dtype, mask_dtype, dim=32, device="cuda"):
    """d attn_mask = dS against float64, in the mask's shape and dtype; zero where the kernels skip
    tiles (the causal key blocks after every query, batch row 1's key blocks of padding only: 128
    keys a block up to head dim 64, 64 above); bitwise repeatable under deterministic algorithms."""
    q, k, v = _qkv(2, 4, 2, 70, 150, dim, dim, dtype, device=device)
    bias = torch.randn(mask_shape, device=device, dtype=mask_dtype)
    padding = torch.zeros(2, 150, dtype=torch.bool, device=device)
    padding[1, 60:] = True
    padding[0, 5] = True  # a hole: the padding bytes are read
    grad_out = torch.randn(2, 4, 70, dim, device=device, dtype=dtype)
    kwargs = dict(attn_mask=bias, key_padding_mask=padding, is_causal=is_causal)
    with deterministic_algorithms(deterministic):
        out, _, grads = _run(q, k, v, grad_out=grad_out, mask_needs_grad=True, **kwargs)
        if deterministic:
            again = _run(q, k, v, grad_out=grad_out, mask_needs_grad=True, **kwargs)[2]
            assert torch.equal(again[3], grads[3])
    assert grads[3].dtype == mask_dtype and grads[3].shape == bias.shape
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    expected = reference.attention(*inputs64[:3], **dict(kwargs, attn_mask=inputs64[3]))
    want = torch.autograd.grad(expected, inputs64, grad_out.double())
    assert_grads_close(grads, want, ATTENTION_TOL[dtype][1], f"mask {mask_shape} {mask_dtype}")
    # Against the kernels' own algorithm (dS from the O they stored, the mask rounded to the query
    # dtype as every backend reads it): only their float32 arithmetic and the rounding of the
    # result to the mask's dtype differ, so this sees errors far below the tolerance above.
    algorithm = reference.attention_scores_grad(q, k, v, out, grad_out, **dict(kwargs, attn_mask=bias.to(dtype)))
    assert_rel_close(grads[3], algorithm.sum_to_size(bias.shape).to(mask_dtype), MASK_GRAD_ALGORITHM_TOL[mask_dtype],
                     f"mask {mask_shape} {mask_dtype}, against dS from the kernels' O")


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_shape", MASK_GRAD_SHAPES, ids=str)
def test_float_mask_gradient(mask_shape, is_causal, deterministic, dim):
    _cuda_ready()
    check_float_mask_gradient(mask_shape, is_causal, deterministic, torch.bfloat16, torch.float32, dim)
    check_float_mask_gradient(mask_shape, is_causal, deterministic, torch.float16, torch.float16, dim)


@pytest.mark.gpu
def test_backward_is_deterministic_when_asked():
    """Under torch.use_deterministic_algorithms(True): no atomic dQ, bit-identical gradients; by
    default (atomic dQ) dK and dV still are (they never use atomics)."""
    _cuda_ready()
    q, k, v = _qkv(2, 8, 2, 300, 300, 64, 64, torch.bfloat16)
    grad_out = torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16)
    with deterministic_algorithms():
        first = _run(q, k, v, is_causal=True, grad_out=grad_out)[2]
        second = _run(q, k, v, is_causal=True, grad_out=grad_out)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = _run(q, k, v, is_causal=True, grad_out=grad_out)[2]
    assert torch.equal(atomic[1], first[1]) and torch.equal(atomic[2], first[2])
    assert_rel_close(atomic[0], first[0], 1e-2, "dQ, atomic vs deterministic")


def backend_functions_run(q, k, v, grad_out, kwargs):
    """A ``run`` for ``test_attention.check_random_sweep``: the arguments checked and normalised as
    ``fastformer.attention`` does, then the backend functions as the autograd layer calls them."""
    dropout_p = kwargs["dropout_p"]
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=q.device) if dropout_p else None
    given_mask = kwargs["attn_mask"]
    mask_needs_grad = given_mask is not None and given_mask.requires_grad
    _, args = _prepare_attention(q, k, v, given_mask, dropout_p, kwargs["is_causal"], kwargs["scale"],
                                 key_padding_mask=kwargs["key_padding_mask"])
    q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale = args
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = float_mask_in(attn_mask, q.dtype)
    out, _, grads = _run(q, k, v, attn_mask.detach() if mask_needs_grad else attn_mask, key_padding_mask, is_causal,
                         dropout_p, seed, grad_out, scale, mask_needs_grad)
    if mask_needs_grad:  # back through the broadcast to 4-D and the cast, to the mask as given
        grads = (*grads[:3], torch.autograd.grad(attn_mask, given_mask, grads[3])[0])
    return out, grads, seed


def check_random_sweep(draws, lengths, seed, device="cuda"):
    """Random draws over every feature (test_attention.draw_attention_case) at the head dims and
    dtypes the kernels take; on the GPU, dropout against the extension's keep-mask kernel."""
    keep_mask = {"keep_mask": cuda_dropout.dropout_keep_mask} if device == "cuda" else {}
    sweep(backend_functions_run, draws, seed, device, lengths, dims=[16, 32, 40, 64, 80, 96, 128], dtypes=HALF,
          mask_grad=True, **keep_mask)


@pytest.mark.gpu
def test_random_sweep_at_real_sizes():
    _cuda_ready()
    check_random_sweep(40, [1, 63, 128, 257, 512, 1000, 2048], seed=20261128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_public_api_with_the_cuda_backend(dtype):
    """fastformer.attention(backend="cuda") once the op table lists the kernels (autograd path)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v = _qkv(2, 4, 2, 97, 97, 50, 50, dtype)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    padding = torch.arange(97, device="cuda")[None, :] >= torch.tensor([97, 40], device="cuda")[:, None]
    require_backend("cuda", "attention", q, k, v, is_causal=True, key_padding_mask=padding)
    out = fastformer.attention(q, k, v, is_causal=True, key_padding_mask=padding, backend="cuda")
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected, want = _reference(q, k, v, grad_out, is_causal=True, key_padding_mask=padding)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    assert_grads_close(got, want, grad_tol, "public api")
