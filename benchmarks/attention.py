"""Benchmark ``fastformer.attention`` against PyTorch's ``scaled_dot_product_attention``.

    python benchmarks/attention.py                       # fine-tuning shape on CUDA, small on CPU
    python benchmarks/attention.py --padding --causal --quick --json benchmarks/results/attn.json

Providers: every fastformer backend that can take the call on this machine (``fastformer-cuda``,
``fastformer-triton``, ``fastformer-torch``; the others are listed with the reasons they were
skipped) and the baseline ``torch-sdpa``: ``torch.nn.functional.scaled_dot_product_attention``
with PyTorch's default choice of kernel, which is what users would otherwise run.

What is measured, per provider and pass:
- inputs: q, k, v drawn with ``torch.randn`` as (B, L, H, D) projections and viewed as
  (B, H, L, D), as a model passes them; ``--padding`` draws each row's key length uniformly
  between 10% and 100% of L (right padding) and passes ``key_padding_mask`` (fastformer) or the
  equivalent boolean mask, True = attend, built once outside the timed call (SDPA);
- "fwd": the forward as in training (inputs require grad, so autograd records the graph);
  "bwd": the backward alone, through a graph kept from one forward (``retain_graph=True``);
  "fwd+bwd": both. Gradients come from ``torch.autograd.grad``, so none accumulate in ``.grad``;
- TFLOP/s in FlashAttention's convention: forward 4 * B * H * Lq * Lk * D, halved for causal;
  backward 2.5x and fwd+bwd 3.5x the forward. With padding, Lk is each row's useful key count
  (summed over the batch); padded query rows still count, as every kernel computes them;
- before timing, every provider's output (and, for backward passes, its gradients) is compared
  with SDPA's: ``rel err`` is ||x - x_sdpa|| / ||x_sdpa||, and a row above the tolerance is marked
  MISMATCH (not checked with dropout, whose random masks differ between providers).

Exit status: 0, or 1 when a provider that accepted the call failed while running.
"""

from __future__ import annotations

import argparse
import math
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

OP = "attention"
BASELINE = "torch-sdpa"
PASSES = ("fwd", "bwd", "fwd+bwd")
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
# Tolerated relative error against SDPA: twice the tolerances against float64 of DESIGN.md, as
# SDPA has its own rounding error. (forward, gradients)
TOLERANCES = {torch.float16: (5e-2, 1e-1), torch.bfloat16: (5e-2, 1e-1),
              torch.float32: (4e-3, 8e-3), torch.float64: (1e-6, 1e-6)}
CUDA_DEFAULTS = {"batch": 32, "heads": 8, "seq_len": 512, "head_dim": 64, "dtype": "bfloat16",
                 "warmup": 10, "repeats": 100, "quick_repeats": 20}
CPU_DEFAULTS = {"batch": 4, "heads": 8, "seq_len": 256, "head_dim": 64, "dtype": "float32",
                "warmup": 2, "repeats": 10, "quick_repeats": 3}


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------
def _passes(text: str) -> list[str]:
    passes = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in passes if p not in PASSES]
    if bad or not passes:
        raise argparse.ArgumentTypeError(f"passes must be a comma-separated list of {PASSES}, got {text!r}")
    return list(dict.fromkeys(passes))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        description="Benchmark fastformer.attention against torch.nn.functional.scaled_dot_product_attention.",
        epilog=f"Defaults on CUDA: B={CUDA_DEFAULTS['batch']} H={CUDA_DEFAULTS['heads']} "
               f"L={CUDA_DEFAULTS['seq_len']} D={CUDA_DEFAULTS['head_dim']} {CUDA_DEFAULTS['dtype']}, "
               f"{CUDA_DEFAULTS['repeats']} repeats; on CPU: B={CPU_DEFAULTS['batch']} "
               f"H={CPU_DEFAULTS['heads']} L={CPU_DEFAULTS['seq_len']} D={CPU_DEFAULTS['head_dim']} "
               f"{CPU_DEFAULTS['dtype']}, {CPU_DEFAULTS['repeats']} repeats.")
    parser.add_argument("--device", default=default_device,
                        help=f"device to benchmark on (default: {default_device})")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="input dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--batch", "-B", type=_positive, help="batch size B")
    parser.add_argument("--heads", "-H", type=_positive, help="number of heads H")
    parser.add_argument("--seq-len", "-L", type=_positive, help="sequence length L (queries and keys)")
    parser.add_argument("--head-dim", "-D", type=_positive, help="head dim D")
    parser.add_argument("--padding", action="store_true",
                        help="draw per-row key lengths between 10%% and 100%% of L and pass a key "
                             "padding mask (TFLOP/s then count only the useful keys)")
    parser.add_argument("--causal", action="store_true", help="is_causal=True (top-left aligned)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout_p on the attention weights (default 0)")
    parser.add_argument("--passes", type=_passes, default=["fwd", "fwd+bwd"],
                        help="comma-separated passes among fwd, bwd, fwd+bwd (default: fwd,fwd+bwd)")
    parser.add_argument("--repeats", type=_positive, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, help="untimed runs before the timed ones")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write the environment and rows as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    args = parser.parse_args(argv)

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = device
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for name in ("batch", "heads", "seq_len", "head_dim", "dtype", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.repeats is None:
        args.repeats = defaults["quick_repeats" if args.quick else "repeats"]
    if args.quick:
        args.warmup = min(args.warmup, 2)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    args.torch_dtype = DTYPES[args.dtype]
    return args


# --------------------------------------------------------------------------------------------
# inputs and work
# --------------------------------------------------------------------------------------------
def key_lengths(batch: int, seq_len: int, padding: bool, seed: int) -> list[int]:
    """Each row's number of real (non-padding) keys: all L, or uniform in [ceil(0.1 L), L]."""
    if not padding:
        return [seq_len] * batch
    generator = torch.Generator().manual_seed(seed + 1)
    low = max(1, math.ceil(0.1 * seq_len))
    return torch.randint(low, seq_len + 1, (batch,), generator=generator).tolist()


def make_inputs(args: argparse.Namespace) -> dict:
    """q, k, v (leaf views of (B, L, H, D) tensors), the output gradient and the masks."""
    batch, heads, seq_len, head_dim = args.batch, args.heads, args.seq_len, args.head_dim
    device, dtype = args.device, args.torch_dtype
    torch.manual_seed(args.seed)

    def projection() -> torch.Tensor:
        # What a model passes: a (B, L, H*D) projection viewed as (B, H, L, D); not contiguous.
        x = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=dtype)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = projection(), projection(), projection()
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    lengths = key_lengths(batch, seq_len, args.padding, args.seed)
    key_padding_mask = sdpa_mask = None
    if args.padding:
        positions = torch.arange(seq_len, device=device)
        key_padding_mask = positions[None, :] >= torch.tensor(lengths, device=device)[:, None]
        sdpa_mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk), True = attend
        if args.causal:  # SDPA refuses attn_mask together with is_causal: fold causality in
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
            sdpa_mask = sdpa_mask & causal
    return {"q": q, "k": k, "v": v, "grad_out": grad_out, "lengths": lengths,
            "key_padding_mask": key_padding_mask, "sdpa_mask": sdpa_mask}


def forward_flops(heads: int, seq_len: int, head_dim: int, lengths: list[int], causal: bool) -> float:
    """4 * H * D * (query, key) pairs, summed over the batch (FlashAttention's convention).

    A row with ``n`` real keys has L * n pairs, or L * n - n^2 / 2 when causal (L^2 / 2 with no
    padding: the halved count of FlashAttention, which ignores the diagonal).
    """
    pairs = sum(seq_len * n - (n * n / 2 if causal else 0) for n in lengths)
    return 4.0 * heads * head_dim * pairs


def shape_label(args: argparse.Namespace, lengths: list[int]) -> str:
    label = f"B={args.batch} H={args.heads} L={args.seq_len} D={args.head_dim}"
    if args.causal:
        label += " causal"
    if args.padding:
        label += f" pad(keys {100.0 * sum(lengths) / (len(lengths) * args.seq_len):.0f}%)"
    if args.dropout > 0:
        label += f" p={args.dropout:g}"
    return label


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------
def sdpa_provider(args, inputs) -> Callable:
    mask, dropout_p = inputs["sdpa_mask"], args.dropout
    is_causal = args.causal and mask is None

    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal)
    return run


def fastformer_provider(args, inputs, backend: str) -> Callable:
    padding, dropout_p, causal = inputs["key_padding_mask"], args.dropout, args.causal

    def run(q, k, v):
        return fastformer.attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                    key_padding_mask=padding, backend=backend)
    return run


def _reasons_from_error(message: str) -> list[str]:
    reasons = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    return reasons or [message]


def fastformer_providers(args, inputs) -> tuple[dict[str, Callable], dict[str, list[str]], str]:
    """(provider name -> function, skipped provider -> reasons, what backend=None would pick)."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    call = {"dropout_p": args.dropout, "is_causal": args.causal,
            "key_padding_mask": inputs["key_padding_mask"]}
    available, skipped = {}, {}
    for backend, reasons in fastformer.available_backends().items():
        name = f"fastformer-{backend}"
        if reasons:
            skipped[name] = list(reasons)
            continue
        try:
            fastformer.explain(fastformer.attention, q, k, v, backend=backend, **call)
        except fastformer.BackendUnavailableError as exc:
            skipped[name] = _reasons_from_error(str(exc))
            continue
        available[name] = fastformer_provider(args, inputs, backend)
    try:
        auto = str(fastformer.explain(fastformer.attention, q, k, v, **call)).splitlines()[0]
    except (fastformer.BackendUnavailableError, ValueError) as exc:  # e.g. FASTFORMER_BACKEND
        auto = f"error: {exc}"
    return available, skipped, auto


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    denominator = ref.norm().item()
    difference = (x - ref).norm().item()
    return difference / denominator if denominator > 0 else difference


def _outputs(fn, inputs, backward: bool):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), inputs["grad_out"]) if backward else None
    return out.detach(), grads


def check_against_baseline(fn, baseline_fn, inputs, passes) -> dict[str, float]:
    """pass -> relative error against SDPA (forward: output; backward passes: worst gradient)."""
    backward = any(p != "fwd" for p in passes)
    out, grads = _outputs(fn, inputs, backward)
    ref_out, ref_grads = _outputs(baseline_fn, inputs, backward)
    errors = {"fwd": _relative_error(out, ref_out)}
    if backward:
        grad_error = max(_relative_error(g, r) for g, r in zip(grads, ref_grads))
        errors["bwd"] = errors["fwd+bwd"] = grad_error
    return {p: errors[p] for p in passes}


def timed_call(fn, inputs, pass_: str):
    """The function to time for one pass (for "bwd", it holds the graph of one forward)."""
    q, k, v, grad_out = inputs["q"], inputs["k"], inputs["v"], inputs["grad_out"]
    if pass_ == "fwd":
        return lambda: fn(q, k, v)
    if pass_ == "bwd":
        out = fn(q, k, v)
        return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)


def measure(provider: str, fn, args, inputs, shape: str, flops: float,
            errors: dict[str, float] | None) -> list[common.Row]:
    rows = []
    for pass_ in args.passes:
        call = timed_call(fn, inputs, pass_)
        timing = common.time_ms(call, warmup=args.warmup, repeats=args.repeats, device=args.device)
        peak = common.peak_memory_mb(call, args.device)
        del call  # frees the graph kept for "bwd"
        ms = timing["median"]
        rel_err = None if errors is None else errors.get(pass_)
        note = ""
        if rel_err is not None:
            tolerance = TOLERANCES[args.torch_dtype][0 if pass_ == "fwd" else 1]
            if not rel_err <= tolerance:
                note = f"MISMATCH (tolerance {tolerance:g})"
        rows.append(common.Row(
            op=OP, provider=provider, shape=shape, dtype=args.dtype, pass_=pass_, ms=ms,
            spread=timing["p80"] - timing["p20"],
            tflops=flops * PASS_FLOP_FACTOR[pass_] / (ms * 1e-3) / 1e12 if ms > 0 else None,
            gbps=None,  # attention is compute-bound: no bandwidth figure
            peak_mem_mb=peak, n=timing["n"], rel_err=rel_err, note=note))
    return rows


def run(args: argparse.Namespace) -> int:
    env = common.environment(args.device)
    print(common.format_environment(env))
    print()

    inputs = make_inputs(args)
    lengths = inputs["lengths"]
    shape = shape_label(args, lengths)
    flops = forward_flops(args.heads, args.seq_len, args.head_dim, lengths, args.causal)
    if args.padding:
        print(f"padding: key lengths {min(lengths)}..{max(lengths)} of {args.seq_len}, "
              f"{100.0 * sum(lengths) / (len(lengths) * args.seq_len):.1f}% of keys are real")
    print(f"timing: {args.repeats} runs after {args.warmup} warm-up runs per measurement; "
          f"passes: {', '.join(args.passes)}")

    fast, skipped, auto = fastformer_providers(args, inputs)
    print("fastformer backend=None picks: " + auto)
    if skipped:
        print("skipped providers:")
        for name, reasons in skipped.items():
            print(f"  {name}:")
            for reason in reasons:
                print(f"    - {reason}")
    print()

    baseline_fn = sdpa_provider(args, inputs)
    providers = {BASELINE: baseline_fn, **fast}
    rows: list[common.Row] = []
    failures: dict[str, str] = {}
    for name, fn in providers.items():
        try:
            errors = None
            if name != BASELINE and args.dropout == 0.0:
                errors = check_against_baseline(fn, baseline_fn, inputs, args.passes)
            rows += measure(name, fn, args, inputs, shape, flops, errors)
        except Exception as exc:  # a backend that accepted the call failed: report, go on
            if name == BASELINE:
                raise
            failures[name] = f"{type(exc).__name__}: {exc}"
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    common.set_ratios(rows, BASELINE)
    rows.sort(key=lambda r: (args.passes.index(r.pass_), r.provider != BASELINE, r.provider))

    common.print_table(rows, title=f"{OP}: {shape}, {args.dtype}, {args.device.type}")
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    mismatches = [f"{r.provider} {r.pass_}" for r in rows if r.note.startswith("MISMATCH")]
    if mismatches:
        print("WARNING: results differ from SDPA beyond tolerance: " + ", ".join(mismatches))
    if args.json:
        common.write_json(args.json, rows, env)
        print(f"wrote {args.json}")
    if args.csv:
        common.write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
