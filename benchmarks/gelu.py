"""Benchmark ``fastformer.bias_gelu`` against what users would otherwise run.

    python benchmarks/gelu.py                       # erf and tanh GELU, every width
    python benchmarks/gelu.py --quick --json r.json --csv r.csv --plot r.png
    python benchmarks/gelu.py --approximate tanh --width 3072 --rows 16384
    python benchmarks/gelu.py --dropout 0.1         # with the activation dropout fused

The op (a Transformer feed-forward's first activation): ``gelu(x + bias)``, x of shape (rows,
width) with rows = B * L tokens (default 32 * 512 = 16384 on CUDA) and width the feed-forward
size (4 x hidden: 1536 for MiniLM, 3072 for BERT-base, ...). Inputs are random (``torch.randn``).
``--dropout P``: ``dropout(gelu(x + bias), P)``, as ``nn.TransformerEncoderLayer`` applies it
(the baseline runs ``F.dropout`` after the GELU; outputs are then not compared: each provider
draws its own mask).

Providers: ``fastformer-<backend>`` for every fastformer backend that can take the call (the
others are listed with the reasons they were skipped); ``torch-eager``: ``F.gelu(x + bias,
approximate=...)`` (the baseline: what a model does); ``torch.compile``: the same compiled.
apex and Liger-Kernel have no bias + GELU op (Liger's GEGLU is a different op; apex's fused
dense GELU includes the matmul), so they are not compared here.

Passes: "fwd", "bwd" (through a kept graph) and "fwd+bwd"; every provider's output and gradients
(x and bias) are checked against the baseline's.

Bytes (GB/s), each input read once and each output written once, s = element size:
- fwd: read x, write out: 2 * rows * width * s, plus the bias;
- bwd: read the output gradient and x (the backward recomputes x + bias, and the dropout mask
  from its seed), write the x gradient: 3 * rows * width * s, plus the bias and its gradient;
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

OP = "bias_gelu"
BASELINE = "torch-eager"
APPROXIMATE = ("none", "tanh")
# Every provider name, for checking --providers (fastformer-<backend> whether or not it runs here).
PROVIDERS = (BASELINE, "torch.compile", "apex", "liger",
             *(f"fastformer-{b}" for b in fastformer.dispatch.BACKEND_NAMES))


def _eager(approximate: str, dropout_p: float) -> Callable:
    def run(x, bias):
        y = F.gelu(x + bias, approximate=approximate)
        return F.dropout(y, dropout_p) if dropout_p > 0 else y
    return run


def bench_shape(approximate: str, rows_n: int, width: int, args, skips, failures) -> list[common.Row]:
    device, dtype, p = args.device, args.torch_dtype, args.dropout
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(rows_n, width, device=device, dtype=dtype, generator=generator).requires_grad_()
    bias = (0.1 * torch.randn(width, device=device, dtype=dtype, generator=generator)).requires_grad_()
    grad_out = torch.randn(rows_n, width, device=device, dtype=dtype, generator=generator)
    label = f"rows={rows_n} width={width} approximate={approximate}" + (f" dropout={p}" if p > 0 else "")

    providers: dict[str, Callable] = {BASELINE: lambda: _eager(approximate, p)(x, bias)}
    if common.wanted("torch.compile", args.providers, BASELINE):
        if args.no_compile:
            skips.add("torch.compile", label, "--no-compile")
        else:
            compiled = common.compile_fn(_eager(approximate, p), dynamic=False)
            providers["torch.compile"] = lambda: compiled(x, bias)
    for name, module, what in (("apex", "apex", "its fused dense GELU includes the matmul"),
                               ("liger", "liger_kernel", "its GEGLU is another op")):
        if common.wanted(name, args.providers, BASELINE):
            installed = common.optional_import(module) is not None
            skips.add(name, label, f"no bias + GELU op ({what})" if installed else f"{module} is not installed")
    usable, reasons = common.fastformer_backends_for(fastformer.bias_gelu, x, bias, approximate, dropout_p=p)
    for backend in common.fastformer_backends():
        name = f"fastformer-{backend}"
        if not common.wanted(name, args.providers, BASELINE):
            continue
        if backend in usable:
            providers[name] = lambda backend=backend: fastformer.bias_gelu(x, bias, approximate, dropout_p=p,
                                                                           backend=backend)
        else:
            skips.add(name, label, "; ".join(reasons[backend]))

    size = torch.finfo(dtype).bits // 8
    fwd = 2 * rows_n * width * size + width * size
    bwd = 3 * rows_n * width * size + 2 * width * size
    work = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
    return common.run_providers(OP, providers, BASELINE, (x, bias), (grad_out,), args, label=label,
                                suite=OP, group=f"rows={rows_n} approximate={approximate}",
                                size=width, work=work, kind="bytes",
                                tolerances=common.NORM_AND_GELU_TOLERANCES[dtype],
                                check=p == 0.0, skips=skips, failures=failures, param_grads_from=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for providers and byte counts.")
    common.add_common_arguments(parser)
    parser.add_argument("--approximate", default="none,tanh",
                        help="comma-separated among none (erf), tanh (default: both)")
    parser.add_argument("--rows", type=int, help="rows = B * L tokens (default 16384 on CUDA, 2048 on CPU)")
    parser.add_argument("--width", type=common.int_list, help="feed-forward widths")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout_p after the GELU (default 0)")
    args = parser.parse_args(argv)
    common.resolve_common_arguments(parser, args, cuda_repeats=(100, 30), cpu_repeats=(10, 3),
                                    providers=PROVIDERS)
    modes = [m.strip() for m in args.approximate.split(",") if m.strip()]
    if not modes or any(m not in APPROXIMATE for m in modes):
        parser.error(f"--approximate: expected a comma-separated list of {APPROXIMATE}, got {args.approximate!r}")
    args.approximate = modes
    cuda = args.device.type == "cuda"
    if args.rows is None:
        args.rows = 16384 if cuda else 2048
    if args.width is None:
        if cuda:
            args.width = [3072, 4096] if args.quick else [1536, 3072, 4096, 8192, 16384]
        else:
            args.width = [1024] if args.quick else [1024, 3072]
    if args.rows < 1 or not 0.0 <= args.dropout < 1.0:
        parser.error("need --rows >= 1 and --dropout in [0, 1)")
    return args


def run(args) -> int:
    cases = [common.Case(f"{OP} rows={args.rows} width={width} approximate={approximate}",
                         functools.partial(bench_shape, approximate, args.rows, width, args))
             for approximate in args.approximate for width in args.width]
    return common.run_cases(args, cases, baseline=BASELINE, plot_x_label="feed-forward width",
                            plot_title=f"bias + GELU, {{device}}, {args.dtype}")


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
