"""Benchmark fastformer's drop-in modules against torch.nn's in a training step.

    python benchmarks/modules.py                      # cuda if available (bf16), else cpu (float32)
    python benchmarks/modules.py --json benchmarks/results/modules-cpu.json

Providers, per module: ``torch.nn`` (nn.MultiheadAttention / nn.TransformerEncoderLayer) and
``fastformer`` (FastMultiheadAttention / FastTransformerEncoderLayer with the same weights). A
training step is forward + backward of ``out.square().mean()`` on random (B, L, E) batch-first
inputs with IMDB-like key padding (per-row lengths between 10% and 100% of L), dropout 0.1 and
the layer in train mode; ``fwd`` is the forward alone (train mode, grads recorded). Every row is
the median of ``--repeats`` timed runs after ``--warmup`` runs (on the CPU the two providers
alternate call by call); ratio = torch.nn ms / fastformer ms.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

try:
    import fastformer
except ImportError:  # a checkout that is not installed and not on PYTHONPATH
    sys.path.insert(0, str(common.REPO_ROOT))
    import fastformer

BASELINE = "torch.nn"


def _modules(kind: str, d_model: int, heads: int, dtype, device):
    if kind == "MultiheadAttention":
        reference = nn.MultiheadAttention(d_model, heads, dropout=0.1, batch_first=True)
    else:
        reference = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1,
                                               activation="gelu", batch_first=True)
    reference = reference.to(device=device, dtype=dtype).train()
    fast = fastformer.optimize(nn.Sequential(copy.deepcopy(reference)))[0].train()
    return {BASELINE: reference, "fastformer": fast}


def _step(module, x, padding, backward: bool):
    def run():
        if isinstance(module, nn.MultiheadAttention):
            out, _ = module(x, x, x, key_padding_mask=padding, need_weights=False)
        else:
            out = module(x, src_key_padding_mask=padding)
        if backward:
            out.float().square().mean().backward()
        return out
    return run


def _time_providers(steps: dict, args) -> dict:
    """provider -> timing. On the CPU the providers alternate call by call, so that the load of a
    shared machine drifting during the run hits both alike; on CUDA each is timed on its own."""
    if torch.device(args.device).type == "cuda":
        return {provider: common.time_ms(step, warmup=args.warmup, repeats=args.repeats, device=args.device)
                for provider, step in steps.items()}
    times = {provider: [] for provider in steps}
    for i in range(args.warmup + args.repeats):
        for provider, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[provider].append((time.perf_counter() - start) * 1e3)
    return {provider: common.summary_ms(values) for provider, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=32 if cuda else 8)
    parser.add_argument("--seq-len", type=int, default=512 if cuda else 128)
    parser.add_argument("--d-model", type=int, default=768 if cuda else 256)
    parser.add_argument("--heads", type=int, default=12 if cuda else 4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30 if cuda else 15)
    parser.add_argument("--json")
    parser.add_argument("--csv")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=args.device, dtype=dtype)
    lengths = torch.randint(max(1, args.seq_len // 10), args.seq_len + 1, (args.batch,), device=args.device)
    padding = torch.arange(args.seq_len, device=args.device)[None, :] >= lengths[:, None]
    shape = f"B={args.batch} L={args.seq_len} E={args.d_model} H={args.heads} padded"
    rows = []
    for kind in ("MultiheadAttention", "TransformerEncoderLayer"):
        modules = _modules(kind, args.d_model, args.heads, dtype, args.device)
        for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
            steps = {provider: _step(module, x, padding, backward) for provider, module in modules.items()}
            for provider, timing in _time_providers(steps, args).items():
                rows.append(common.Row(op=kind, provider=provider, shape=shape, dtype=args.dtype,
                                       pass_=pass_name, ms=timing["median"],
                                       spread=timing["p80"] - timing["p20"], n=timing["n"]))
    common.set_ratios(rows, BASELINE)
    env = common.environment(args.device)
    print(common.format_environment(env))
    common.print_table(rows, title=f"modules, training step, {args.device}")
    if args.json:
        common.write_json(args.json, rows, env)
    if args.csv:
        common.write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
