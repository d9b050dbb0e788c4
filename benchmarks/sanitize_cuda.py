"""Run every CUDA kernel of fastformer once on a small, odd-shaped case, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py

Each case runs forward and backward with backend="cuda" (attention's backward twice: with atomic dQ
and with the dQ kernel of deterministic mode; some cases with a learned float bias, whose gradient
takes the dK/dV kernel's mask-gradient variant), synchronises, and prints one line; the
script exits non-zero if a case raises. Shapes are small so the sanitizers finish quickly, odd so
that the masked tails and the scalar (unaligned) paths run, and cover both the warp-per-row and
the block-per-row norm kernels. Attention is included when fastformer.cuda.attention exists and
its ops are registered.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path

import torch

import fastformer
from fastformer import cuda as cuda_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)


def _t(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_(grad)


def _backward(outputs, inputs):
    outputs = [o for o in outputs if o is not None and o.requires_grad]
    loss = sum(o.float().square().mean() for o in outputs)
    torch.autograd.grad(loss, [i for i in inputs if i is not None and i.requires_grad])


def norm_cases():
    # (rows, hidden, dtype, residual, weight, bias, dropout_p, rms, misaligned[, residual dtype])
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for hidden in (13, 200, 1000, 3000):  # 13: scalar path; 3000 (bf16/fp16): block per row
            cases.append((7, hidden, dtype, True, True, True, 0.1, False, False))
        cases.append((5, 768, dtype, False, False, False, 0.0, False, False))
        cases.append((5, 768, dtype, True, True, False, 0.2, True, False))
        cases.append((3, 4096, dtype, False, True, False, 0.0, True, False))
        cases.append((4, 256, dtype, True, True, True, 0.0, False, True))  # unaligned views
    cases.append((2, 16384, torch.float32, True, True, True, 0.1, False, False))  # widest row
    # autocast: a 16-bit x next to a float32 residual stream (x read in 8-byte vectors)
    for dtype in (torch.bfloat16, torch.float16):
        for hidden in (13, 200, 3000):
            cases.append((7, hidden, dtype, True, True, True, 0.1, False, False, torch.float32))
        cases.append((4, 256, dtype, True, True, False, 0.0, True, True, torch.float32))
    return cases


def run_norm(rows, hidden, dtype, residual, weight, bias, dropout_p, rms, misaligned, residual_dtype=None):
    if misaligned:
        x = _t(rows, hidden + 1, dtype=dtype, grad=False)[:, 1:].requires_grad_()
    else:
        x = _t(rows, hidden, dtype=dtype)
    res = _t(rows, hidden, dtype=residual_dtype or dtype) if residual else None
    w = _t(hidden) if weight else None
    b = _t(hidden, dtype=dtype) if bias and not rms else None
    if rms:
        out, res_out = fastformer.residual_rms_norm(x, res, w, 1e-6, dropout_p, backend="cuda")
    else:
        out, res_out = fastformer.residual_layer_norm(x, res, w, b, 1e-5, dropout_p, backend="cuda")
    _backward([out, res_out if res_out is not x else None], [x, res, w, b])


def gelu_cases():
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for approximate in ("none", "tanh"):
            cases.append(((37,), dtype, True, approximate, "contiguous"))
            cases.append(((5, 7, 200), dtype, True, approximate, "contiguous"))
            cases.append(((67, 72), dtype, False, approximate, "contiguous"))
        cases.append(((48, 64), dtype, True, "none", "row_strided"))
        cases.append(((48, 64), dtype, True, "tanh", "expanded"))
    return cases


def run_gelu(shape, dtype, with_bias, approximate, layout):
    if layout == "row_strided":
        x = _t(shape[0], shape[1] + 36, dtype=dtype, grad=False)[:, 10:10 + shape[1]].requires_grad_()
    elif layout == "expanded":
        x = _t(1, shape[1], dtype=dtype, grad=False).expand(*shape).requires_grad_()
    else:
        x = _t(*shape, dtype=dtype)
    bias = _t(shape[-1], dtype=dtype) if with_bias else None
    out = fastformer.bias_gelu(x, bias, approximate, backend="cuda")
    _backward([out], [x, bias])


def attention_available() -> bool:
    if importlib.util.find_spec("fastformer.cuda.attention") is None:
        return False
    cuda_backend.load_extension()  # registers the extension's ops
    return any(str(schema.name).startswith("fastformer::cuda_attention")
               for schema in torch._C._jit_get_all_schemas())


# The shape of a learned float bias (requiring grad) by name: the dK/dV kernel's mask-gradient
# variant stores its gradient ("full"), adds it with atomics ("heads"), or sums it over the queries
# first ("keys").
BIAS_SHAPES = {"full": lambda b, h, lq, lk: (b, h, lq, lk), "heads": lambda b, h, lq, lk: (1, h, lq, lk),
               "keys": lambda b, h, lq, lk: (b, 1, 1, lk)}


def attention_cases():
    # (batch, heads_q, heads_k, len_q, len_k, head_dim, dtype, causal, padding, dropout_p, bias)
    return [
        (2, 4, 2, 37, 45, 64, torch.bfloat16, True, True, 0.0, None),
        (2, 2, 2, 33, 33, 64, torch.float16, False, True, 0.1, None),
        (1, 2, 1, 17, 29, 128, torch.bfloat16, True, False, 0.0, None),
        (2, 2, 2, 33, 40, 50, torch.float16, False, True, 0.0, None),  # rows 4-byte aligned: 4-byte cp.async
        (2, 4, 2, 37, 45, 32, torch.bfloat16, True, True, 0.0, "heads"),
        (2, 2, 2, 33, 140, 96, torch.float16, False, True, 0.1, "keys"),
        (1, 2, 1, 17, 29, 128, torch.bfloat16, False, False, 0.0, "full"),
    ]


def run_attention(batch, heads_q, heads_k, len_q, len_k, head_dim, dtype, causal, padding, dropout_p, bias):
    q = _t(batch, heads_q, len_q, head_dim, dtype=dtype)
    k = _t(batch, heads_k, len_k, head_dim, dtype=dtype)
    v = _t(batch, heads_k, len_k, head_dim, dtype=dtype)
    if bias is not None:
        bias = _t(*BIAS_SHAPES[bias](batch, heads_q, len_q, len_k), dtype=dtype)
    pad = None
    if padding:
        pad = torch.zeros(batch, len_k, dtype=torch.bool, device="cuda")
        pad[0, len_k - 5:] = True  # right padding: tiles skipped
        pad[-1, 1:len_k - 1:3] = True  # holes before the key end: padding bytes tested
    # dQ both ways: float32 atomics in the dK/dV kernel (the default), and the dQ kernel
    # (deterministic algorithms).
    for deterministic in (False, True):
        with common.deterministic_algorithms(deterministic):
            out = fastformer.attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=causal,
                                       key_padding_mask=pad, backend="cuda")
            _backward([out], [q, k, v, bias])


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cuda: no CUDA device", file=sys.stderr)
        return 2
    reasons = cuda_backend.extension_unavailable_reasons()
    if reasons:
        print("sanitize_cuda: the cuda backend cannot run: " + "; ".join(reasons), file=sys.stderr)
        return 2
    torch.manual_seed(0)
    jobs = [("residual_norm", run_norm, case) for case in norm_cases()]
    jobs += [("bias_gelu", run_gelu, case) for case in gelu_cases()]
    if attention_available():
        jobs += [("attention", run_attention, case) for case in attention_cases()]
    else:
        print("attention: skipped (fastformer.cuda.attention or its ops are not there)")
    failures = 0
    for name, run, case in jobs:
        text = ", ".join(str(c).replace("torch.", "") for c in case)
        try:
            run(*case)
            torch.cuda.synchronize()
            print(f"ok   {name}({text})", flush=True)
        except Exception:  # report every case, then fail
            failures += 1
            print(f"FAIL {name}({text})", flush=True)
            traceback.print_exc()
    print(f"{len(jobs) - failures}/{len(jobs)} cases ran")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
