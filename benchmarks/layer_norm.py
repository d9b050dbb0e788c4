"""Benchmark ``fastformer.residual_layer_norm`` / ``residual_rms_norm`` against what users would
otherwise run.

    python benchmarks/layer_norm.py                    # LayerNorm and RMSNorm, every hidden size
    python benchmarks/layer_norm.py --quick --json r.json --csv r.csv --plot r.png
    python benchmarks/layer_norm.py --norms layer --hidden 768,4096 --rows 16384

The op (a Transformer block's "add & norm"): ``residual_out = x + residual``, ``out =
norm(residual_out) * weight (+ bias)``; both outputs are returned, as the next block needs the
residual stream. Inputs are random (``torch.randn``), shape (rows, hidden) with rows = B * L
tokens (default 32 * 512 = 16384 on CUDA), dropout 0 (``--dropout`` to change).

Providers: ``fastformer-<backend>`` for every fastformer backend that can take the call (the
others are listed with the reasons they were skipped); ``torch-eager``: ``x + residual`` then
``F.layer_norm`` / ``F.rms_norm`` (the baseline: what a model does); ``torch.compile``: the same
compiled; ``apex`` (``apex.normalization`` fused LayerNorm / RMSNorm) and ``liger`` (Liger-Kernel's
LayerNorm / RMSNorm) when installed, each after a PyTorch ``x + residual`` since they do not fuse
the residual add.

Passes: "fwd", "bwd" (gradients of both outputs, through a kept graph) and "fwd+bwd"; every
provider's outputs and gradients (x, residual, weight, bias) are checked against the baseline's.

Bytes (GB/s), each input read once and each output written once, s = element size:
- fwd: read x, residual; write out, residual_out: 4 * rows * hidden * s, plus weight and bias;
- bwd: read the two output gradients and the saved residual_out; write the gradients of x and
  residual: one tensor for both without dropout (they are equal; PyTorch's ``x + residual`` and
  fastformer in eager mode hand both the same tensor), two with dropout: 4 (5 with dropout) *
  rows * hidden * s, plus weight, bias and their gradients (per-row statistics not counted);
- fwd+bwd: the sum of both.
``pct_of_peak``: GB/s as a percentage of a large device-to-device copy measured in the same run.
``ratio_vs_baseline``: torch-eager ms / provider ms.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

try:
    import fastformer
except ImportError:  # run from a checkout that is not installed and not on PYTHONPATH
    sys.path.insert(0, str(common.REPO_ROOT))
    import fastformer

BASELINE = "torch-eager"
NORMS = {"layer": "residual_layer_norm", "rms": "residual_rms_norm"}
# Every provider name, for checking --providers (fastformer-<backend> whether or not it runs here).
PROVIDERS = (BASELINE, "torch.compile", "apex", "liger",
             *(f"fastformer-{b}" for b in fastformer.dispatch.BACKEND_NAMES))


def _eager(norm: str, eps: float, dropout_p: float) -> Callable:
    def run(x, residual, weight, bias):
        if dropout_p > 0:
            x = F.dropout(x, dropout_p)
        residual_out = x + residual
        if norm == "layer":
            out = F.layer_norm(residual_out, (x.shape[-1],), weight, bias, eps)
        else:
            out = F.rms_norm(residual_out, (x.shape[-1],), weight, eps)
        return out, residual_out
    return run


def _apex(module, norm: str, eps: float) -> Callable:
    if norm == "layer":
        fn = module.fused_layer_norm_affine
        return lambda r, weight, bias: fn(r, weight, bias, (r.shape[-1],), eps)
    fn = module.fused_rms_norm_affine
    return lambda r, weight, bias: fn(r, weight, (r.shape[-1],), eps)


def _liger(norm: str, eps: float):
    if norm == "layer":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda r, weight, bias: LigerLayerNormFunction.apply(r, weight, bias, eps)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # offset 0, casting mode "llama", in_place=False (in place, it overwrites the output gradient)
    return lambda r, weight, bias: LigerRMSNormFunction.apply(r, weight, eps, 0.0, "llama", False)


def _after_residual_add(norm_fn: Callable) -> Callable:
    """A norm that does not fuse the residual add, after PyTorch's ``x + residual``, returning
    (out, residual_out) as eager does: one add, as in a model."""
    def run(x, residual, weight, bias):
        residual_out = x + residual
        return norm_fn(residual_out, weight, bias), residual_out
    return run


def bench_shape(norm: str, rows_n: int, hidden: int, args, skips, failures) -> list[common.Row]:
    device, dtype = args.device, args.torch_dtype
    op = NORMS[norm]
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def rand(*shape, requires_grad=True, scale=1.0):
        t = torch.randn(*shape, device=device, dtype=dtype, generator=generator) * scale
        return t.requires_grad_(requires_grad)

    x, residual = rand(rows_n, hidden), rand(rows_n, hidden)
    weight = (1 + rand(hidden, requires_grad=False, scale=0.1)).requires_grad_()
    bias = rand(hidden, scale=0.1) if norm == "layer" else None
    grad_out, grad_residual = rand(rows_n, hidden, requires_grad=False), rand(rows_n, hidden, requires_grad=False)
    grad_inputs = [x, residual, weight] + ([bias] if bias is not None else [])
    label = f"rows={rows_n} hidden={hidden}"
    eps = 1e-5 if norm == "layer" else 1e-6
    p = args.dropout

    def bind(fn):
        return lambda: fn(x, residual, weight, bias)

    providers: dict[str, Callable] = {BASELINE: bind(_eager(norm, eps, p))}
    if common.wanted("torch.compile", args.providers, BASELINE):
        if args.no_compile:
            skips.add("torch.compile", label, "--no-compile")
        else:
            providers["torch.compile"] = bind(common.compile_fn(_eager(norm, eps, p), dynamic=False))
    for name in ("apex", "liger"):
        if not common.wanted(name, args.providers, BASELINE):
            continue
        if p > 0:
            skips.add(name, label, "no fused dropout (benchmarked without dropout only)")
            continue
        if args.device.type != "cuda":
            skips.add(name, label, "needs a CUDA device")
            continue
        try:
            if name == "apex":
                module = common.optional_import("apex.normalization.fused_layer_norm")
                if module is None:
                    skips.add(name, label, "apex (with its CUDA extensions) is not installed")
                    continue
                providers[name] = bind(_after_residual_add(_apex(module, norm, eps)))
            else:
                if common.optional_import("liger_kernel") is None:
                    skips.add(name, label, "liger_kernel is not installed")
                    continue
                providers[name] = bind(_after_residual_add(_liger(norm, eps)))
        except Exception as exc:
            skips.add(name, label, f"not usable: {common.first_line(exc)}")
    if norm == "layer":
        call = (fastformer.residual_layer_norm, (x, residual, weight, bias), {"eps": eps, "dropout_p": p})
    else:
        call = (fastformer.residual_rms_norm, (x, residual, weight), {"eps": eps, "dropout_p": p})
    usable, reasons = common.fastformer_backends_for(call[0], *call[1], **call[2])
    for backend in common.fastformer_backends():
        name = f"fastformer-{backend}"
        if not common.wanted(name, args.providers, BASELINE):
            continue
        if backend in usable:
            fn, positional, keywords = call
            providers[name] = (lambda fn=fn, positional=positional, keywords=keywords, backend=backend:
                               fn(*positional, backend=backend, **keywords))
        else:
            skips.add(name, label, "; ".join(reasons[backend]))

    size = torch.finfo(dtype).bits // 8
    params = hidden * size * (2 if bias is not None else 1)
    fwd = 4 * rows_n * hidden * size + params
    bwd = (5 if p > 0 else 4) * rows_n * hidden * size + 2 * params
    work = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
    return common.run_providers(op, providers, BASELINE, grad_inputs, (grad_out, grad_residual), args,
                                label=label, suite=op, group=f"{op} rows={rows_n}", size=hidden,
                                work=work, kind="bytes", tolerances=common.NORM_AND_GELU_TOLERANCES[dtype],
                                check=p == 0.0, skips=skips, failures=failures,
                                refusal=_refusal, param_grads_from=2)


def _refusal(name: str, exc: BaseException, caught) -> str | None:
    if name in ("apex", "liger"):
        return f"failed on these inputs: {common.first_line(exc)}"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for providers and byte counts.")
    common.add_common_arguments(parser)
    parser.add_argument("--norms", default="layer,rms", help="comma-separated among layer, rms")
    parser.add_argument("--rows", type=int, help="rows = B * L tokens (default 16384 on CUDA, 2048 on CPU)")
    parser.add_argument("--hidden", type=common.int_list, help="hidden sizes")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout_p on x (default 0)")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    args = parser.parse_args(argv)
    common.resolve_common_arguments(parser, args, cuda_repeats=(100, 30), cpu_repeats=(10, 3),
                                    providers=PROVIDERS)
    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    if not norms or any(n not in NORMS for n in norms):
        parser.error(f"--norms: expected a comma-separated list of {list(NORMS)}, got {args.norms!r}")
    args.norms = norms
    cuda = args.device.type == "cuda"
    if args.rows is None:
        args.rows = 16384 if cuda else 2048
    if args.hidden is None:
        if cuda:
            args.hidden = [768, 1024, 4096] if args.quick else [384, 768, 1024, 2048, 4096, 8192]
        else:
            args.hidden = [256] if args.quick else [256, 768]
    if args.rows < 1 or not 0.0 <= args.dropout < 1.0:
        parser.error("need --rows >= 1 and --dropout in [0, 1)")
    return args


def run(args) -> int:
    cases = [common.Case(f"{NORMS[norm]} rows={args.rows} hidden={hidden}",
                         functools.partial(bench_shape, norm, args.rows, hidden, args))
             for norm in args.norms for hidden in args.hidden]
    return common.run_cases(args, cases, baseline=BASELINE, plot_x_label="hidden size",
                            plot_title=f"residual + norm, {{device}}, {args.dtype}")


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
