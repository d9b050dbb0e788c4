"""The CUDA kernels of csrc/, run on the CPU by the tests' emulator of the CUDA execution model.

``tests/cuda_emulator`` compiles csrc/'s kernels and ops for the CPU (fibers for the threads of a
block, warp-wide operations and the PTX of the attention kernels emulated from the PTX ISA's
definitions, shared-memory race checks; see cuda_emulator.h) and registers them as
``torch.ops.fastformer_emulated.cuda_*``. The fixture below points ``fastformer.cuda`` at them,
so these tests go through the real launchers (``fastformer/cuda/*.py``), the real op code
(``csrc/*/*_ops.cpp``: checks, params, launch shapes) and the real kernels, against float64
references. They check the kernels' logic (indexing, fragment layouts, masking, pipelines,
dropout bits, reductions) on machines without a GPU; they do not replace the GPU tests (the real
compiler, tensor-core rounding, timing, memory errors), which stay the record in
fastformer/cuda/verified.json.

Sizes are small: an emulated attention call takes 0.1-1 s here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastformer.cuda
import reference
import test_attention as attention_tests
import test_bias_gelu as bias_gelu_tests
import test_cuda_attention as cuda_tests
import test_custom_ops as custom_ops_tests
import test_nn_encoder as encoder_tests
import test_nn_multihead_attention as multihead_attention_tests
import test_residual_norm as residual_norm_tests
from cuda_emulator import build
from fastformer import dispatch
from fastformer.cuda import attention as cuda_attention
from fastformer.cuda import bias_gelu as cuda_bias_gelu
from fastformer.cuda import layer_norm as cuda_layer_norm
from helpers import (ELEMENTWISE_TOL, PARAM_GRAD_TOL_HALF, Copies, HostReads, ZeroFills, assert_rel_close,
                     check_p_rounded_to_a_multiple_of_2_to_the_minus_16, deterministic_algorithms, in_memory_order,
                     misaligned, offset_by)

@pytest.fixture(scope="module", autouse=True)
def emulated():
    """fastformer.cuda's launchers on the emulated ops, for CPU tensors."""
    reason = build.unavailable_reason()
    if reason:
        pytest.skip(f"the CUDA emulator cannot be built here: {reason}")
    ops = build.load()  # a compilation error fails the tests, never skips them
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastformer.cuda, "OPS_NAMESPACE", build.NAMESPACE)
        patch.setattr(fastformer.cuda, "KERNEL_DEVICE", "cpu")
        yield ops


def test_every_op_of_the_extension_is_emulated_with_its_schema(emulated):
    for name in ("cuda_attention_fwd", "cuda_attention_bwd", "cuda_residual_norm_fwd", "cuda_residual_norm_bwd",
                 "cuda_bias_gelu_fwd", "cuda_bias_gelu_bwd", "cuda_dropout_keep_mask"):
        schema = str(getattr(emulated, name).default._schema)
        assert schema.startswith(f"{build.NAMESPACE}::{name}(")
        if fastformer.cuda.load_extension() is not None:
            real = str(getattr(torch.ops.fastformer, name).default._schema)
            assert schema == real.replace("fastformer::", f"{build.NAMESPACE}::", 1)


def _opcheck_cases():
    """(op name, arguments): small calls of every op, with each optional input present somewhere."""
    half = torch.float16
    q = torch.randn(2, 9, 3, 50, dtype=half).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    k, v = torch.randn(2, 1, 11, 50, dtype=half), torch.randn(2, 1, 11, 40, dtype=half)
    padding = torch.arange(11)[None, :] >= torch.tensor([11, 6])[:, None]
    mask = torch.randn(9, 11)
    seed = torch.tensor(5)
    out, lse = torch.ops.fastformer_emulated.cuda_attention_fwd(q, k, v, mask, padding, 0.2, True, 0.1, seed)
    x, residual = torch.randn(5, 24, dtype=half), torch.randn(5, 24, dtype=half)
    weight, bias = torch.randn(24), torch.randn(24, dtype=half)
    normed, residual_out, _, rstd = torch.ops.fastformer_emulated.cuda_residual_norm_fwd(
        x, residual, weight, bias, 1e-5, 0.1, False, seed, True)
    return [
        ("cuda_attention_fwd", (q, k, v, mask, padding, 0.2, True, 0.1, seed)),
        ("cuda_attention_fwd", (q, k, v, None, None, 0.2, False, 0.0, None)),
        ("cuda_attention_bwd", (torch.randn_like(out), q, k, v, out, lse, mask, padding, 0.2, True, 0.1, seed)),
        # the gradient of a float mask broadcast over batch and heads, written into the last argument
        ("cuda_attention_bwd", (torch.randn_like(out), q, k, v, out, lse, mask, padding, 0.2, True, 0.1, seed,
                                torch.zeros(1, 1, 9, 11))),
        ("cuda_residual_norm_fwd", (x, residual, weight, bias, 1e-5, 0.1, False, seed, True)),
        ("cuda_residual_norm_fwd", (x, None, None, None, 1e-6, 0.0, True, None, False)),
        ("cuda_residual_norm_bwd", (torch.randn_like(x), torch.randn_like(x), residual_out, weight, bias, rstd,
                                    0.1, False, seed, True)),
        # a 16-bit x next to a float32 residual stream (autocast): float32 outputs, grad_x in x's dtype
        ("cuda_residual_norm_fwd", (x, residual.float(), weight, None, 1e-5, 0.1, False, seed, True)),
        ("cuda_residual_norm_bwd", (torch.randn_like(residual_out, dtype=torch.float32), None,
                                    residual_out.float(), weight, None, rstd, 0.1, False, seed, True, half)),
        ("cuda_bias_gelu_fwd", (x, bias, "tanh", 0.0, None)),
        ("cuda_bias_gelu_fwd", (x, None, "none", 0.3, seed)),
        ("cuda_bias_gelu_bwd", (torch.randn_like(x), x, weight, "none", 0.0, None)),
        ("cuda_bias_gelu_bwd", (torch.randn_like(x), x, bias, "tanh", 0.3, seed)),
        ("cuda_dropout_keep_mask", (seed, [3, 70], 0.3)),
    ]


def test_opcheck_of_every_op(emulated):
    """torch.library.opcheck on the real kernels: the schemas, and the Meta implementations against
    what the kernels return (shapes, strides, dtypes), with fake tensors and under AOT autograd."""
    for name, args in _opcheck_cases():
        torch.library.opcheck(getattr(emulated, name).default, args)


@pytest.mark.parametrize("case, message", [
    ("missing_wait", "reads shared memory .* with a cp.async to it still in flight"),
    ("missing_barrier", "written by cp.async since the last __syncthreads"),
    ("divergent_warp", "the lanes of warp 1 reached different warp-wide operations"),
    ("misaligned", "misaligned address: a 16-byte access"),
    ("shared_without_opt_in", "61440 bytes of dynamic shared memory; this kernel is allowed 49152"),
    ("deadlock", "deadlock: 63 threads wait at __syncthreads and 1 at a warp-wide operation"),
])
def test_the_emulator_reports_what_would_go_wrong_on_a_gpu(emulated, case, message):
    """tests/cuda_emulator/selftest.cpp: one kernel, run clean, then with one step left out."""
    emulated.emulator_selftest("clean")
    with pytest.raises(RuntimeError, match=message):
        emulated.emulator_selftest(case)


@pytest.mark.parametrize("shape, p", [((3, 5, 70), 0.3), ((1000,), 0.5), ((2, 7), 0.0), ((4, 9), 1.0)], ids=str)
def test_keep_mask_kernel_gives_the_documented_mask(emulated, shape, p):
    seed = torch.tensor(2**40 + 12345, dtype=torch.int64)
    keep = emulated.cuda_dropout_keep_mask(seed, list(shape), p)
    assert torch.equal(keep, reference.philox_keep_mask(int(seed), shape, p))


def test_keep_mask_kernel_rounds_p_to_the_nearest_multiple_of_2_to_the_minus_16(emulated):
    check_p_rounded_to_a_multiple_of_2_to_the_minus_16(
        lambda seed, shape, p: emulated.cuda_dropout_keep_mask(torch.tensor(seed), list(shape), p))


# ----------------------------------------------------------------------------------------------
# attention: the GPU tests' checks (test_cuda_attention.py), on the CPU, at smaller sizes
# ----------------------------------------------------------------------------------------------
# (B, Hq, Hk, Lq, Lk), mask kind, head dim, dtype: every mask kind, every compiled head dim (33 and 50
# padded to 64, 100 to 128, 8 to 32), GQA / MQA, Lq != Lk, lengths that are not multiples of the tiles.
CASES = [
    ((2, 2, 2, 97, 97), "none", 64, torch.float16),
    ((1, 4, 2, 33, 140), "causal", 32, torch.bfloat16),
    ((2, 2, 1, 130, 70), "padding", 50, torch.float16),
    ((2, 2, 2, 70, 75), "causal+padding", 96, torch.bfloat16),
    ((2, 2, 2, 65, 80), "scattered", 128, torch.float16),
    ((2, 2, 1, 80, 70), "causal+scattered", 64, torch.bfloat16),
    ((2, 2, 2, 40, 77), "bool", 100, torch.bfloat16),
    ((1, 3, 3, 50, 66), "float", 32, torch.float16),
    ((2, 2, 2, 71, 71), "causal+float", 64, torch.bfloat16),
    ((3, 2, 2, 1, 1), "none", 8, torch.float16),
    # two 128-row blocks of the forward (head dims <= 64), the diagonal crossing both m16 tiles of a warp
    ((1, 2, 1, 200, 150), "causal+padding", 64, torch.float16),
    # an odd head dim: element-wise loads and stores, dQ's atomic adds one by one
    ((2, 3, 1, 45, 70), "causal+padding", 33, torch.float16),
]


# dQ: summed with atomics by the dK/dV kernel (the default), or by the dQ kernel (deterministic).
DQ_PATHS = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])


@DQ_PATHS
@pytest.mark.parametrize("shape, mask_kind, dim, dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_attention_matches_float64_reference(shape, mask_kind, dim, dtype, deterministic):
    with deterministic_algorithms(deterministic):
        cuda_tests.check_matches_float64_reference(shape, mask_kind, dim, dtype, device="cpu")


@DQ_PATHS
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_shape", cuda_tests.MASK_GRAD_SHAPES, ids=str)
def test_attention_float_mask_gradient(mask_shape, is_causal, deterministic):
    dtype, mask_dtype = (torch.bfloat16, torch.float32) if is_causal else (torch.float16, torch.float16)
    cuda_tests.check_float_mask_gradient(mask_shape, is_causal, deterministic, dtype, mask_dtype, device="cpu")


@pytest.mark.parametrize("dims", [(32, 64), (100, 24)], ids=str)
def test_attention_value_head_dim_may_differ(dims):
    cuda_tests.check_value_head_dim_may_differ(dims, torch.float16, shape=(1, 2, 1, 70, 90), device="cpu")


def test_attention_float32_mask_is_read_in_the_query_dtype():
    cuda_tests.check_a_float32_mask_is_read_in_the_query_dtype(device="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_finfo_min_masks_keep_sdpa_semantics(dtype):
    cuda_tests.check_finfo_min_masks_keep_sdpa_semantics(dtype, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_nan_and_inf_mask_values_give_nan_rows(dtype):
    def attend(q, k, v, mask):
        return cuda_attention.attention_fwd(q, k, v, mask, None, 0.0, False, q.shape[-1] ** -0.5, None)[0]
    attention_tests.check_nan_and_inf_mask_values_give_nan_rows(attend, dtype, device="cpu")


@pytest.mark.parametrize("mask_dtype", cuda_tests.MASK_DTYPES, ids=str)
def test_attention_expanded_mask_views_give_the_materialised_masks_results(mask_dtype):
    cuda_tests.check_expanded_mask_views_give_the_materialised_masks_results(mask_dtype, device="cpu")


@pytest.mark.parametrize("how", cuda_tests.NO_KEY_CASES)
def test_attention_rows_with_no_key_give_zero_and_zero_gradients(how):
    cuda_tests.check_rows_with_no_key_give_zero_and_zero_gradients(how, heads=1, dim=32, device="cpu")


@pytest.mark.parametrize("layout", cuda_tests.KEY_PADDING_LAYOUTS)
def test_attention_key_padding_of_long_rows(layout):
    cuda_tests.check_key_padding_of_long_rows(layout, device="cpu")


@pytest.mark.parametrize("order", [(0, 2, 1, 3), (2, 0, 1, 3), (0, 1, 2, 3)], ids=["blhd", "lbhd", "bhld"])
def test_attention_output_and_gradients_come_in_the_inputs_memory_order(order):
    """The op allocates its output like q and dQ, dK, dV like their inputs, dense in the inputs'
    memory order (layout_like in attention_ops.cpp, the rule of
    fastformer.library.attention_layout_like), and the kernels write them through their strides;
    out_like_query=False stores the output as (B, Lq, Hq, Dv), the custom op's layout. Values
    against float64 (value head dim 16, query/key 32), layouts as the rule says."""
    from fastformer.library import attention_layout_like

    q, k = (in_memory_order(torch.randn(2, 3, 37, 32, dtype=torch.float16), order) for _ in range(2))
    v = in_memory_order(torch.randn(2, 3, 37, 16, dtype=torch.float16), order)
    grad_out = torch.randn(2, 3, 37, 16, dtype=torch.float16)
    out, lse, grads = cuda_tests._run(q, k, v, is_causal=True, grad_out=grad_out)
    expected_out, want = cuda_tests._reference(q, k, v, grad_out, is_causal=True)
    assert out.permute(order).is_contiguous() and out.stride() == attention_layout_like(q, 16).stride()
    assert_rel_close(out, expected_out, cuda_tests.ATTENTION_TOL[torch.float16][0], "out")
    for name, t, grad, expected in zip("qkv", (q, k, v), grads, want):
        assert grad.permute(order).is_contiguous() and grad.stride() == attention_layout_like(t).stride(), name
        assert_rel_close(grad, expected, cuda_tests.ATTENTION_TOL[torch.float16][1], f"grad {name}")
    blhd, _ = cuda_attention.attention_fwd(q, k, v, None, None, 0.0, True, 32 ** -0.5, None, out_like_query=False)
    assert blhd.transpose(1, 2).is_contiguous() and torch.equal(blhd, out)


DROPOUT_CASES = [
    ("none", 64, torch.float16, (2, 2, 1, 45, 70)),
    ("causal+padding", 32, torch.bfloat16, (2, 2, 1, 45, 70)),
    ("float", 128, torch.float16, (2, 2, 1, 45, 70)),
    ("causal", 64, torch.bfloat16, (1, 2, 2, 160, 90)),  # every m16 tile of a 128-row forward block
    # the fine-tuning case: right padding, whole key blocks unmasked, the last one masked by its key end
    ("padding", 64, torch.bfloat16, (2, 2, 2, 100, 300)),
]


@DQ_PATHS
@pytest.mark.parametrize("mask_kind, dim, dtype, shape", DROPOUT_CASES, ids=str)
def test_attention_dropout_matches_reference_with_the_same_mask(mask_kind, dim, dtype, shape, deterministic):
    with deterministic_algorithms(deterministic):
        cuda_tests.check_dropout_matches_reference_with_the_same_mask(mask_kind, dim, dtype, shape=shape,
                                                                      device="cpu")


@pytest.mark.parametrize("dim", [50, 64])
def test_attention_odd_strides_and_unaligned_rows(dim):
    cuda_tests.check_odd_strides_and_unaligned_rows(dim, batch=1, heads=2, device="cpu")


def test_attention_random_sweep():
    cuda_tests.check_random_sweep(12, [1, 17, 63, 64, 65, 130], seed=20261129, device="cpu")


# ----------------------------------------------------------------------------------------------
# residual + dropout + LayerNorm / RMSNorm
# ----------------------------------------------------------------------------------------------
# (rows, N, dtype, aligned): warp per row vectorised (N a multiple of 16 bytes) and element-wise,
# block per row (N above what a warp holds; above 8192, the instantiations bounded at 1024 threads),
# float32 parameters next to half activations.
NORM_CASES = [
    (37, 200, torch.float16, True),
    (9, 97, torch.bfloat16, True),
    (5, 2000, torch.float32, True),
    (3, 1030, torch.bfloat16, False),
    (4, 512, torch.float16, False),  # a whole number of vectors, but the rows are not aligned to them
    (70, 64, torch.float32, True),
    (2, 12000, torch.bfloat16, True),
    (2, 9001, torch.float16, False),
]


@pytest.mark.parametrize("rows, n, dtype, aligned", NORM_CASES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_residual_norm_matches_float64_reference(rows, n, dtype, aligned, rms, dropout_p):
    def make(*shape, dtype=dtype):
        t = torch.randn(*shape, dtype=dtype)
        return t if aligned else misaligned(t)  # misaligned: the element-wise path

    x, residual = make(rows, n), make(rows, n)
    weight = 1 + 0.1 * torch.randn(n, dtype=torch.float32 if dtype != torch.float32 else dtype)
    bias = None if rms else 0.1 * torch.randn(n, dtype=dtype)
    seed = torch.tensor(987654321, dtype=torch.int64)
    out, residual_out, mean, rstd = cuda_layer_norm.residual_norm_fwd(x, residual, weight, bias, 1e-5, dropout_p,
                                                                      rms, seed, True)
    keep = reference.philox_keep_mask(int(seed), (rows, n), dropout_p) if dropout_p else None
    x64, res64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    want, want_residual = reference.residual_norm(x64, res64, w64, b64, 1e-5, rms=rms, keep=keep, dropout_p=dropout_p)
    plain_inputs = [t.detach().requires_grad_() for t in (x, residual, weight, bias) if t is not None]
    plain, plain_residual = residual_norm_tests.plain_pytorch(  # the baseline of half-precision error
        "rms" if rms else "layer", *plain_inputs[:3], None if bias is None else plain_inputs[3], 1e-5, keep, dropout_p)
    fwd_tol, grad_tol = ELEMENTWISE_TOL[dtype]
    assert_rel_close(out, want, fwd_tol, "out", plain)
    assert_rel_close(residual_out, want_residual, fwd_tol, "residual_out", plain_residual)

    grad_out, grad_residual_out = torch.randn(rows, n, dtype=dtype), torch.randn(rows, n, dtype=dtype)
    # the autograd layer passes residual_out as `normed` when it was stored (fastformer/library.py)
    grads = cuda_layer_norm.residual_norm_bwd(grad_out, grad_residual_out, residual_out, weight, bias, mean, rstd,
                                              dropout_p, rms, seed, True)
    inputs = [x64, res64, w64] + ([b64] if b64 is not None else [])
    want_grads = torch.autograd.grad((want, want_residual), inputs, (grad_out.double(), grad_residual_out.double()))
    plain_grads = torch.autograd.grad((plain, plain_residual), plain_inputs, (grad_out, grad_residual_out))
    param_tol = grad_tol if dtype == torch.float32 else PARAM_GRAD_TOL_HALF
    for name, got, expected, tol, baseline in zip(("x", "residual", "weight", "bias"), grads, want_grads,
                                                  (grad_tol, grad_tol, param_tol, param_tol), plain_grads):
        assert got is not None, name
        assert_rel_close(got, expected, tol, f"grad {name}", baseline if baseline.dtype == got.dtype else None)


# (rows, N, x's offset in elements from a 16-byte boundary): a warp per row and a block per row
# with vectors (a 16-bit x read 4 values = 8 bytes at a time: an 8-byte offset keeps it on the
# vector path), N not a multiple of the vector (element-wise), and x off its 8-byte vectors.
MIXED_NORM_CASES = [(37, 200, 0), (5, 2000, 4), (3, 1030, 0), (4, 512, 2)]


@pytest.mark.parametrize("rows, n, offset", MIXED_NORM_CASES, ids=str)
@pytest.mark.parametrize("x_dtype, residual_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),  # autocast: read as they are
    (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16),  # the residual cast up first
], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_residual_norm_of_mixed_dtypes(rows, n, offset, x_dtype, residual_dtype, rms, dropout_p):
    """x and residual of different dtypes: outputs in the dtype of x + residual, grad_x in x's.
    Bit for bit what the kernels give x cast to that dtype first (the values each thread reads
    are the same, so are the sums), against float64 too, and with no cast of a 16-bit x or of
    its gradient next to a float32 residual."""
    stream = torch.promote_types(x_dtype, residual_dtype)
    x = offset_by(torch.randn(rows, n, dtype=x_dtype), offset)
    residual = torch.randn(rows, n, dtype=residual_dtype)
    weight = 1 + 0.1 * torch.randn(n)
    bias = None if rms else 0.1 * torch.randn(n)
    seed = torch.tensor(123456789, dtype=torch.int64)
    grad_out, grad_residual_out = torch.randn(rows, n, dtype=stream), torch.randn(rows, n, dtype=stream)

    def run(x, residual, x_dtype=None):
        out, residual_out, mean, rstd = cuda_layer_norm.residual_norm_fwd(x, residual, weight, bias, 1e-5, dropout_p,
                                                                          rms, seed, True)
        grads = cuda_layer_norm.residual_norm_bwd(grad_out, grad_residual_out, residual_out, weight, bias, mean,
                                                  rstd, dropout_p, rms, seed, True, x_dtype=x_dtype)
        return (out, residual_out, mean, rstd) + tuple(grads)

    with Copies() as copies:
        got = run(x, residual, x_dtype)
    if residual_dtype == torch.float32:
        assert copies.copies == []
    same_dtype = run(offset_by(x.to(stream), offset), residual.to(stream))  # the same vector path
    assert [t.dtype for t in got[:2]] == [stream, stream]
    assert got[4].dtype == x_dtype and got[5].dtype == stream
    for name, mixed, cast_first in zip(("out", "residual_out", "mean", "rstd", "grad x", "grad residual",
                                        "grad weight", "grad bias"), got, same_dtype):
        if cast_first is None:
            assert mixed is None, name
            continue
        assert torch.equal(mixed, cast_first.to(mixed.dtype)), name

    keep = reference.philox_keep_mask(int(seed), (rows, n), dropout_p) if dropout_p else None
    x64, res64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    want, want_residual = reference.residual_norm(x64, res64, w64, b64, 1e-5, rms=rms, keep=keep, dropout_p=dropout_p)
    fwd_tol, grad_tol = ELEMENTWISE_TOL[stream]
    assert_rel_close(got[0], want, fwd_tol, "out")
    assert_rel_close(got[1], want_residual, fwd_tol, "residual_out")
    want_grads = torch.autograd.grad((want, want_residual), (x64, res64),
                                     (grad_out.double(), grad_residual_out.double()))
    assert_rel_close(got[4], want_grads[0], ELEMENTWISE_TOL[x_dtype][1], "grad x")
    assert_rel_close(got[5], want_grads[1], grad_tol, "grad residual")


def test_residual_norm_ops_name_the_dtypes_they_cannot_pair(emulated):
    x, residual = torch.randn(3, 8), torch.randn(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"x \(Float\) must have the dtype of residual \(BFloat16\), or be "
                                           r"float16 / bfloat16 with a float32 residual"):
        emulated.cuda_residual_norm_fwd(x, residual, None, None, 1e-5, 0.0, False, None, True)
    normed, grad = torch.randn(3, 8, dtype=torch.float16), torch.randn(3, 8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"x_dtype \(Float\) must have the dtype of normed \(Half\)"):
        emulated.cuda_residual_norm_bwd(grad, None, normed, None, None, torch.ones(3), 0.0, False, None, False,
                                        torch.float32)


def test_dropout_seed_is_passed_to_the_kernels_not_read_on_the_host():
    """The launchers hand the seed tensor to the ops, whose kernels load it (a host read would
    wait for the GPU, and CUDA graph capture would keep its value for every replay)."""
    q, k, v = (torch.randn(1, 2, 19, 32, dtype=torch.float16) for _ in range(3))
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    seed = torch.tensor(2**40 + 3)
    with HostReads() as reads:
        out, lse = cuda_attention.attention_fwd(q, k, v, None, None, 0.2, False, 0.125, seed)
        cuda_attention.attention_bwd(torch.randn_like(out), q, k, v, out, lse, None, None, 0.2, False, 0.125,
                                     seed, False)
        normed, residual_out, mean, rstd = cuda_layer_norm.residual_norm_fwd(x, x, None, None, 1e-5, 0.2, False,
                                                                             seed, True)
        cuda_layer_norm.residual_norm_bwd(torch.randn_like(x), None, residual_out, None, None, mean, rstd, 0.2,
                                          False, seed, True)
        cuda_bias_gelu.bias_gelu_fwd(x, None, "tanh", 0.2, seed)
        cuda_bias_gelu.bias_gelu_bwd(torch.randn_like(x), x, x[0], "none", 0.2, seed)
    assert reads.count == 0


# What an op may ask of ATen besides its kernels: outputs and views, no work on the device.
ALLOCATIONS_AND_VIEWS = {"aten::empty", "aten::empty_strided", "aten::view", "aten::transpose", "aten::as_strided",
                         "aten::expand"}


@DQ_PATHS
@pytest.mark.parametrize("attn_mask", [None, "bool"])
def test_attention_ops_run_only_their_kernels(emulated, attn_mask, deterministic, monkeypatch):
    """With key padding (each batch row's key end and holes: one kernel of the op's own, where the
    launcher once ran about 8 ATen ops a call), dropout, causal and a bool mask, the forward and
    backward ops ask ATen for nothing but outputs and views: each op is a few kernel launches. With
    atomic dQ, also one copy (the float32 sums cast into dQ; the preprocess kernel zeroes them)."""
    q, k, v = (torch.randn(2, 3, 30, 32, dtype=torch.float16) for _ in range(3))
    padding = torch.arange(30)[None, :] >= torch.tensor([30, 17])[:, None]
    mask = torch.rand(2, 1, 30, 30) > 0.2 if attn_mask else None
    seed, grad_out = torch.tensor(7), torch.randn(2, 3, 30, 32, dtype=torch.float16)
    # Deterministic mode also has ATen fill what torch.empty returns; not the op's doing.
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    with deterministic_algorithms(deterministic), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out, lse = emulated.cuda_attention_fwd(q, k, v, mask, padding, 0.2, True, 0.1, seed)
        emulated.cuda_attention_bwd(grad_out, q, k, v, out, lse, mask, padding, 0.2, True, 0.1, seed)
    asked = [event.name for event in profile.events() if event.name.startswith("aten::")]
    allowed = ALLOCATIONS_AND_VIEWS if deterministic else ALLOCATIONS_AND_VIEWS | {"aten::copy_"}
    assert set(asked) <= allowed, sorted(set(asked) - allowed)
    assert asked.count("aten::copy_") == (0 if deterministic else 1)


# ----------------------------------------------------------------------------------------------
# bias + GELU
# ----------------------------------------------------------------------------------------------
# (shape, dtype, bias dtype or None): vectorised rows and element-wise ones (N not a multiple of a
# 16-byte vector), a float32 bias next to half activations, enough rows for several row groups;
# each with and without dropout.
GELU_CASES = [
    ((4, 33, 256), torch.float16, torch.float16, True),
    ((130, 97), torch.bfloat16, torch.float32, True),
    ((7, 1030), torch.float32, torch.float32, True),
    ((50, 64), torch.float16, None, True),
    ((6, 256), torch.bfloat16, torch.bfloat16, False),  # rows not aligned to the vectors
]


@pytest.mark.parametrize("shape, dtype, bias_dtype, aligned", GELU_CASES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_bias_gelu_matches_float64_reference(shape, dtype, bias_dtype, aligned, approximate, dropout_p):
    n = shape[-1]
    x = torch.randn(*shape, dtype=dtype)
    if not aligned:
        x = misaligned(x)  # the element-wise path
    bias = None if bias_dtype is None else torch.randn(n, dtype=bias_dtype)
    seed = torch.tensor(2**40 + 7) if dropout_p else None
    out = cuda_bias_gelu.bias_gelu_fwd(x, bias, approximate, dropout_p, seed)
    x64 = x.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    want = reference.gelu(x64, b64, approximate)
    if dropout_p:  # the mask of the (rows, N) view, as documented
        keep = reference.philox_keep_mask(int(seed), (x.numel() // n, n), dropout_p).view(shape)
        want = want * keep / (1.0 - dropout_p)
    plain_x = x.detach().requires_grad_()
    plain = bias_gelu_tests.plain_pytorch(plain_x, bias, approximate)
    if dropout_p:
        plain = plain * (keep / (1.0 - dropout_p)).to(dtype)
    fwd_tol, grad_tol = ELEMENTWISE_TOL[dtype]
    assert out.shape == x.shape and out.dtype == dtype
    assert_rel_close(out, want, fwd_tol, "out", plain)

    grad_out = torch.randn(*shape, dtype=dtype)
    grad_x, grad_bias = cuda_bias_gelu.bias_gelu_bwd(grad_out, x, bias, approximate, dropout_p, seed)
    want_grads = torch.autograd.grad(want, [x64] + ([b64] if b64 is not None else []), grad_out.double())
    assert_rel_close(grad_x, want_grads[0], grad_tol, "grad x", torch.autograd.grad(plain, plain_x, grad_out)[0])
    if dropout_p:  # a few wrong mask bits would hide in a relative error: the dropped ones, exactly
        assert not out[~keep].any() and not grad_x[~keep].any()
    if bias is None:
        assert grad_bias is None
    else:
        assert grad_bias.dtype == bias.dtype
        tol = grad_tol if dtype == torch.float32 else PARAM_GRAD_TOL_HALF
        assert_rel_close(grad_bias, want_grads[1], tol, "grad bias")


def test_bias_gelu_dropout_arguments_are_checked_by_the_ops():
    x, seed = torch.randn(4, 64), torch.tensor(3)
    for p in (1.0, -0.1):
        with pytest.raises(RuntimeError, match=r"cuda_bias_gelu_fwd: dropout_p must be in \[0, 1\), got"):
            cuda_bias_gelu.bias_gelu_fwd(x, None, "none", p, seed)
        with pytest.raises(RuntimeError, match=r"cuda_bias_gelu_bwd: dropout_p must be in \[0, 1\), got"):
            cuda_bias_gelu.bias_gelu_bwd(x, x, None, "none", p, seed)
    with pytest.raises(RuntimeError, match="cuda_bias_gelu_fwd: dropout_p > 0 needs a seed"):
        cuda_bias_gelu.bias_gelu_fwd(x, None, "none", 0.1, None)
    with pytest.raises(RuntimeError, match="cuda_bias_gelu_bwd: dropout_p > 0 needs a seed"):
        cuda_bias_gelu.bias_gelu_bwd(x, x, None, "none", 0.1, None)
    with pytest.raises(TypeError, match=r"bias_gelu \(cuda\): seed must be a one-element int64 tensor"):
        cuda_bias_gelu.bias_gelu_fwd(x, None, "none", 0.1, torch.tensor(3.0))


# ----------------------------------------------------------------------------------------------
# bad inputs: clear errors from the launchers and the ops, never a wrong result
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_rejected_clearly():
    q = torch.randn(1, 2, 9, 32, dtype=torch.float16)
    k = torch.randn(1, 2, 12, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"query must be 4-D .* got shape \(2, 9, 32\)"):
        cuda_attention.attention_fwd(q[0], k, k, None, None, 0.0, False, 1.0, None)
    with pytest.raises(RuntimeError, match=r"attn_mask of shape \[5, 12\] does not broadcast to "
                                           r"\(B, Hq, Lq, Lk\) = \(1, 2, 9, 12\)"):
        cuda_attention.attention_fwd(q, k, k, torch.zeros(5, 12), None, 0.0, False, 1.0, None)
    with pytest.raises(TypeError, match=r"attention \(cuda\): seed must be a one-element int64 tensor, got int"):
        cuda_attention.attention_fwd(q, k, k, None, None, 0.1, False, 1.0, 7)
    with pytest.raises(ValueError, match=r"seed must be on the data's device \(cpu\), got meta"):
        cuda_layer_norm.residual_norm_fwd(torch.randn(3, 8), None, None, None, 1e-5, 0.1, False,
                                          torch.empty((), dtype=torch.int64, device="meta"), True)
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"grad_out must have x's shape \(4, 64\), got \(8, 32\)"):
        cuda_bias_gelu.bias_gelu_bwd(torch.randn(8, 32), x, None, "none", 0.0, None)
    for bad in (torch.tensor(1.0), torch.randn(3, 0)):
        with pytest.raises(ValueError, match="x must have a last dim of at least 1"):
            cuda_bias_gelu.bias_gelu_fwd(bad, None, "none", 0.0, None)


def test_attention_batch_beyond_the_grid_axes_y_and_z(monkeypatch):
    """A batch of 65536 + 5: past the 65535 blocks of CUDA's grid axes y and z (the emulator refuses
    such launches), so every CTA goes on gridDim.x, forward and backward. The emulator runs the
    first and the last 2 blocks of each grid (FASTFORMER_EMULATOR_BLOCK_SAMPLE): batch rows 0, 1
    and the last two, checked against the same call on those 4 rows alone."""
    batch, heads, length, dim = 65541, 1, 1, 32
    q, k, v, grad_out = (torch.randn(batch, heads, length, dim, dtype=torch.float16) for _ in range(4))

    def run(q, k, v, grad_out):
        out, lse = cuda_attention.attention_fwd(q, k, v, None, None, 0.0, False, 0.2, None)
        grads = cuda_attention.attention_bwd(grad_out, q, k, v, out, lse, None, None, 0.0, False, 0.2, None, False)
        return (out, *grads[:3])

    with monkeypatch.context() as patch:
        patch.setenv("FASTFORMER_EMULATOR_BLOCK_SAMPLE", "2")
        whole = run(q, k, v, grad_out)
    rows = torch.tensor([0, 1, batch - 2, batch - 1])
    for got, want in zip(whole, run(q[rows], k[rows], v[rows], grad_out[rows])):
        torch.testing.assert_close(got[rows], want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# the drop-in modules on the CUDA kernels, through dispatch
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_backend_takes_cpu_tensors(monkeypatch):
    """dispatch lets the cuda backend, when forced, take the CPU tensors of the emulated ops."""
    table = {op: (dataclasses.replace(support, devices=frozenset({"cpu"}), forced_only_devices=frozenset({"cpu"})),
                  module) for op, (support, module) in dispatch._OP_TABLES["cuda"].items()}
    monkeypatch.setitem(dispatch._OP_TABLES, "cuda", table)
    monkeypatch.setitem(dispatch._UNAVAILABLE, "cuda", ())


@pytest.mark.parametrize("cname, mode, mask", multihead_attention_tests.HALF_CASES,
                         ids=["-".join(case) for case in multihead_attention_tests.HALF_CASES])
def test_multihead_attention_parity_in_bfloat16(cname, mode, mask, cuda_backend_takes_cpu_tensors):
    multihead_attention_tests.check_parity_in_bfloat16(cname, mode, mask, "cuda", "cpu")


@pytest.mark.parametrize("norm_first, activation, mask_kind", [(False, "gelu", "padding"), (True, "relu", "causal")],
                         ids=str)
def test_encoder_layer_parity_in_bfloat16(norm_first, activation, mask_kind, cuda_backend_takes_cpu_tensors):
    encoder_tests.check_parity_in_bfloat16(norm_first, activation, mask_kind, "cuda", "cpu")


def test_compile_fullgraph_runs_the_cuda_kernels(cuda_backend_takes_cpu_tensors, monkeypatch):
    custom_ops_tests.check_compile_fullgraph_runs_the_forced_backends_kernels("cuda", "cpu", monkeypatch)


@pytest.mark.parametrize("mode", ["fills no zeros", "copies no tensor"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_an_encoder_layer_training_step(mode, batch_first, norm_first, cuda_backend_takes_cpu_tensors):
    """tests/test_nn_encoder.py's checks of a training step on the cuda backend (dropout, padding,
    GELU): no zero-filled tensor, no copy, a finite gradient for every parameter."""
    watch = ZeroFills() if mode == "fills no zeros" else Copies()
    encoder_tests._training_step(watch, "cuda", "cpu", norm_first=norm_first, batch_first=batch_first)
    assert (watch.fills if mode == "fills no zeros" else watch.copies) == []


@pytest.mark.parametrize("sizes", attention_tests.EMPTY_SIZES, ids=str)
def test_attention_of_empty_sizes(sizes, cuda_backend_takes_cpu_tensors):
    attention_tests.check_empty_sizes(sizes, "cuda", "cpu")
