"""Benchmark ``fastformer.attention`` and the drop-in modules against what users would otherwise run.

    python benchmarks/attention.py                  # every suite (a few minutes on a GPU)
    python benchmarks/attention.py --quick --json r.json --csv r.csv --plot r.png
    python benchmarks/attention.py --suites finetune --seq-lens 512 --heads 12 --head-dims 64 --padding yes

Suites (``--suites``, default all three):
- ``finetune``: the fine-tuning shapes, B=32, L=128/256/512, H=4/8/12, D=50/64, without and with
  IMDB-like key padding (each row's key length drawn uniformly between 10% and 100% of L, right
  padding). ``--batch``, ``--seq-lens``, ``--heads``, ``--head-dims``, ``--padding`` override it.
  ``--position-bias``: every call also adds a learned relative-position bias (1, H, L, L) to the
  scores (T5's, MPNet's), which requires grad: fastformer takes it as its float attn_mask and
  returns its gradient; SDPA (and the compiled reference) get it with padding and causality
  folded in as -inf, as a model passes it. flash-attn and xformers are skipped there.
- ``long``: a long-sequence sweep, L=1k..16k with B*L = 16k tokens, D=64/128 with H*D = 2048
  (FlashAttention's benchmark set-up), causal and not.
- ``modules``: ``nn.MultiheadAttention`` vs ``FastMultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` vs ``FastTransformerEncoderLayer`` (same weights; batch-first
  (B, L, E) inputs with IMDB-like key padding, dropout 0.1, train mode), eager and under
  ``torch.compile``. Baseline: the torch.nn module in eager mode. No TFLOP/s for modules.

Attention providers: ``fastformer-<backend>`` for every fastformer backend that can take the call
on this machine (the others are listed with the reasons they were skipped); ``torch-sdpa``,
``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's own choice of kernel, the
baseline; ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``: SDPA with one
backend forced (``torch.nn.attention.sdpa_kernel``); ``torch.compile(reference)``: the textbook
softmax(QK^T * scale + mask) V compiled by ``torch.compile``; ``flash-attn`` and ``xformers``
when installed (without key padding only: with padding they need their variable-length APIs on
unpadded tokens, not benchmarked here). Inputs: q, k, v drawn with ``torch.randn`` as (B, L, H, D)
projections viewed as (B, H, L, D), as a model passes them; masks are built once, outside the
timed call (fastformer gets ``key_padding_mask``, SDPA the equivalent boolean mask).

Passes: "fwd" (the forward as in training: inputs require grad), "bwd" (the backward alone,
through a graph kept from one forward) and "fwd+bwd". Before timing, every provider's output and
gradients are compared with the baseline's: ``rel_err`` = ||x - x_sdpa|| / ||x_sdpa||, marked
MISMATCH above the tolerance (not checked with dropout).

FLOP convention (FlashAttention's): forward 4 * B * H * Lq * Lk * D, halved for causal; backward
2.5x and fwd+bwd 3.5x the forward. With key padding only the useful work counts: batch row b with
n_b real tokens contributes 4 * H * n_b * n_b * D (its padded query rows and padded keys are
padding too), halved for causal. ``pct_of_peak``: TFLOP/s as a percentage of a bf16 8192^3 matmul
measured in the same run (on the CPU: a float32 1024^3 matmul). ``ratio_vs_baseline``: SDPA
default ms / provider ms (> 1 = faster than SDPA's own choice).

Timing: ``triton.testing.do_bench`` (or CUDA events) with the L2 flushed before each run, median
and p20-p80 spread; on the CPU ``time.perf_counter`` medians. With no GPU the script runs small
shapes on the CPU and says that the GPU kernels were not measured; there the torch.compile
providers run only with ``--compile``, and then on the first shape of each suite (their compile
time would dominate the run).

Exit status: 0, or 1 when a provider that accepted a call failed while running.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)

try:
    import fastformer
except ImportError:  # run from a checkout that is not installed and not on PYTHONPATH
    sys.path.insert(0, str(common.REPO_ROOT))
    import fastformer

OP = "attention"
BASELINE = "torch-sdpa"
MODULE_BASELINE = "torch.nn"
BASELINES = {OP: BASELINE, "MultiheadAttention": MODULE_BASELINE,
             "TransformerEncoderLayer": MODULE_BASELINE}
SUITES = ("finetune", "long", "modules")
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# Tolerated relative error against SDPA: twice the tolerances against float64 of DESIGN.md, as
# SDPA has its own rounding error. (forward, gradients)
TOLERANCES = {torch.float16: (5e-2, 1e-1), torch.bfloat16: (5e-2, 1e-1),
              torch.float32: (4e-3, 8e-3), torch.float64: (1e-6, 1e-6)}
# Providers that materialise the B x H x L x L scores are skipped above this many bytes of them.
MAX_SCORE_BYTES = 8 * 2**30
COMPILED = "torch.compile(reference)"
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
# Every provider name, for checking --providers (fastformer-<backend> whether or not it runs here).
PROVIDERS = (BASELINE, *SDPA_BACKENDS, COMPILED, "flash-attn", "xformers",
             *(f"fastformer-{b}" for b in fastformer.dispatch.BACKEND_NAMES),
             MODULE_BASELINE, "fastformer", f"{MODULE_BASELINE}+compile", "fastformer+compile")


def _not_compiled_here(args) -> str:
    """Why a torch.compile provider is left out of a shape (see run(): its compile policy)."""
    if args.device.type != "cuda" and args.compile is None:
        return "on the CPU torch.compile providers run only with --compile (compile time)"
    where = "--quick" if args.device.type == "cuda" else "on the CPU"
    return f"{where}: torch.compile providers run on the first shape of each suite only (compile time)"


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    suite: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool = False
    padding: bool = False
    plot: bool = True  # a line point of the PNG chart (the chart shows the largest H, D=64)
    bias: bool = False  # a learned (1, H, L, L) position bias that requires grad

    def label(self, lengths: list[int]) -> str:
        text = f"B={self.batch} H={self.heads} L={self.seq_len} D={self.head_dim}"
        if self.causal:
            text += " causal"
        if self.padding:
            text += f" pad({100.0 * sum(lengths) / (len(lengths) * self.seq_len):.0f}% real)"
        if self.bias:
            text += " +bias"
        return text

    def name(self) -> str:
        return f"B={self.batch} H={self.heads} L={self.seq_len} D={self.head_dim}" + self._variant()

    def _variant(self) -> str:
        """" causal", " padded", " +bias" as they apply (name and plot panel)."""
        return ((" causal" if self.causal else "") + (" padded" if self.padding else "")
                + (" +bias" if self.bias else ""))

    def group(self) -> str:
        """Plot panel: rows differing only in L share a panel; "" = not plotted."""
        if not self.plot:
            return ""
        if self.suite == "long":
            return f"long D={self.head_dim}" + (" causal" if self.causal else "")
        return f"B={self.batch} H={self.heads} D={self.head_dim}" + self._variant()


def _flags(choice: str) -> list[bool]:
    return {"no": [False], "yes": [True], "both": [False, True]}[choice]


def attention_shapes(args) -> list[Shape]:
    cuda = args.device.type == "cuda"
    shapes: list[Shape] = []
    if "finetune" in args.suites:
        if cuda:
            batch, seq_lens, heads, dims = 32, [128, 256, 512], [4, 8, 12], [50, 64]
            if args.quick:
                seq_lens, heads, dims = [128, 512], [12], [64, 50]
        else:
            batch, seq_lens, heads, dims = 4, [64, 128], [4], [64]
            if args.quick:
                seq_lens, dims = [128], [64]
        batch = args.batch or batch
        seq_lens, heads, dims = args.seq_lens or seq_lens, args.heads or heads, args.head_dims or dims
        paddings = _flags(args.padding) if args.padding else [True, False]
        # The headline shape first (largest L, D=64, most heads, padded): a run cut short has it.
        plot_dim = 64 if 64 in dims else dims[0]
        for L, D, H, pad in itertools.product(sorted(seq_lens, reverse=True), sorted(dims, key=lambda d: d != 64),
                                              sorted(heads, reverse=True), paddings):
            if args.quick and cuda and not (args.head_dims or D == 64 or (L == 512 and pad)):
                continue  # --quick keeps D=50 only for the padded L=512 shape
            shapes.append(Shape("finetune", batch, H, L, D, args.causal, pad,
                                plot=H == max(heads) and D == plot_dim, bias=args.position_bias))
    if "long" in args.suites:
        if cuda:
            tokens, seq_lens, dims = 16384, [1024, 2048, 4096, 8192, 16384], [64, 128]
            width = 2048
            if args.quick:
                seq_lens, dims = [1024, 4096, 16384], [64]
        else:
            tokens, seq_lens, dims, width = 1024, [256, 1024], [64], 256
            if args.quick:
                seq_lens = [1024]
        seq_lens = args.long_seq_lens or seq_lens
        tokens = args.long_tokens or tokens
        for D, causal, L in itertools.product(dims, [False, True], seq_lens):
            shapes.append(Shape("long", max(1, tokens // L), max(1, width // D), L, D, causal, False))
    return shapes


@dataclasses.dataclass(frozen=True)
class ModuleShape:
    batch: int
    seq_len: int
    heads: int
    head_dim: int

    @property
    def embed(self) -> int:
        return self.heads * self.head_dim

    def label(self) -> str:
        return f"B={self.batch} L={self.seq_len} E={self.embed} H={self.heads} padded"


def module_shapes(args) -> list[ModuleShape]:
    if "modules" not in args.suites:
        return []
    cuda = args.device.type == "cuda"
    batch, seq_lens, heads, dim = (32, [512, 128], 12, 64) if cuda else (4, [64], 4, 32)
    if args.quick:
        seq_lens = seq_lens[:1]
    batch = args.batch or batch
    seq_lens = args.seq_lens or seq_lens
    return [ModuleShape(batch, L, h, d) for h in args.heads or [heads] for d in args.head_dims or [dim]
            for L in seq_lens]


# --------------------------------------------------------------------------------------------
# inputs and work
# --------------------------------------------------------------------------------------------
def key_lengths(batch: int, seq_len: int, padding: bool, seed: int) -> list[int]:
    """Each row's number of real tokens: all L, or uniform in [ceil(0.1 L), L]."""
    if not padding:
        return [seq_len] * batch
    generator = torch.Generator().manual_seed(seed + 1)
    low = max(1, math.ceil(0.1 * seq_len))
    return torch.randint(low, seq_len + 1, (batch,), generator=generator).tolist()


def make_inputs(shape: Shape, args) -> dict:
    """q, k, v (leaf views of (B, L, H, D) tensors), the output gradient and the masks."""
    B, H, L, D = shape.batch, shape.heads, shape.seq_len, shape.head_dim
    device, dtype = args.device, args.torch_dtype
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def projection(requires_grad=True) -> torch.Tensor:
        # What a model passes: a (B, L, H*D) projection viewed as (B, H, L, D); not contiguous.
        x = torch.randn(B, L, H, D, device=device, dtype=dtype, generator=generator)
        return x.transpose(1, 2).requires_grad_(requires_grad)

    q, k, v = projection(), projection(), projection()
    grad_out = projection(False)
    lengths = key_lengths(B, L, shape.padding, args.seed)
    key_padding_mask = sdpa_mask = position_bias = None
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    if shape.padding:
        positions = torch.arange(L, device=device)
        key_padding_mask = positions[None, :] >= torch.tensor(lengths, device=device)[:, None]
        sdpa_mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk), True = attend
        if shape.causal:  # SDPA refuses attn_mask together with is_causal: fold causality in
            sdpa_mask = sdpa_mask & causal
    if shape.bias:
        position_bias = torch.randn(1, H, L, L, device=device, dtype=dtype, generator=generator).requires_grad_()
        if shape.causal and sdpa_mask is None:  # folded into the bias with -inf, as padding
            sdpa_mask = causal
    return {"q": q, "k": k, "v": v, "grad_out": grad_out, "lengths": lengths,
            "key_padding_mask": key_padding_mask, "sdpa_mask": sdpa_mask, "position_bias": position_bias}


def sdpa_attn_mask(inputs):
    """SDPA's attn_mask: the boolean mask, or the position bias with it folded in as -inf
    (computed inside the timed call, so that the bias gets its gradient through it)."""
    mask, bias = inputs["sdpa_mask"], inputs["position_bias"]
    if bias is None:
        return mask
    return bias if mask is None else bias.masked_fill(~mask, float("-inf"))


def grad_inputs(inputs) -> tuple:
    """What the gradients are taken w.r.t.: q, k, v, and the position bias."""
    bias = inputs["position_bias"]
    return (inputs["q"], inputs["k"], inputs["v"]) + (() if bias is None else (bias,))


def forward_flops(heads: int, head_dim: int, lengths: list[int], causal: bool) -> float:
    """Useful forward FLOPs: sum over rows of 4 * H * n_b * n_b * D, halved when causal."""
    pairs = sum(n * n for n in lengths) * (0.5 if causal else 1.0)
    return 4.0 * heads * head_dim * pairs


# --------------------------------------------------------------------------------------------
# attention providers: name -> (function of no arguments returning the output, or skip reason)
# --------------------------------------------------------------------------------------------
def _sdpa(inputs, shape: Shape, dropout_p: float, backend=None) -> Callable:
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    is_causal = shape.causal and inputs["sdpa_mask"] is None
    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_attn_mask(inputs),
                                                      dropout_p=dropout_p, is_causal=is_causal)
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_attn_mask(inputs), dropout_p=dropout_p,
                                                  is_causal=is_causal)
    return run


def reference_attention(q, k, v, mask, is_causal: bool, dropout_p: float):
    """softmax(q k^T / sqrt(D) + mask) v, scores in float32: what a model written by hand does."""
    scores = (q @ k.transpose(-2, -1)).float() * (q.shape[-1] ** -0.5)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif is_causal:
        L = q.shape[-2]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


_COMPILED_REFERENCE = None


def _compiled(inputs, shape: Shape, dropout_p: float) -> Callable:
    global _COMPILED_REFERENCE
    if _COMPILED_REFERENCE is None:
        _COMPILED_REFERENCE = common.compile_fn(reference_attention, dynamic=False)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    compiled, causal = _COMPILED_REFERENCE, shape.causal and inputs["sdpa_mask"] is None
    return lambda: compiled(q, k, v, sdpa_attn_mask(inputs), causal, dropout_p)


def _flash_attn(module, inputs, shape: Shape, dropout_p: float) -> Callable:
    q, k, v = (inputs[name].transpose(1, 2) for name in "qkv")  # (B, L, H, D), contiguous
    return lambda: module.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=shape.causal).transpose(1, 2)


def _xformers(ops, inputs, shape: Shape, dropout_p: float) -> Callable:
    q, k, v = (inputs[name].transpose(1, 2) for name in "qkv")
    bias = ops.LowerTriangularMask() if shape.causal else None
    return lambda: ops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p).transpose(1, 2)


def attention_providers(shape: Shape, inputs, args, compile_here: bool, skips: common.Skips,
                        label: str) -> dict[str, Callable]:
    """Every provider that may take this shape (in table order); the others go to ``skips``."""
    p = args.dropout
    providers: dict[str, Callable] = {BASELINE: _sdpa(inputs, shape, p)}
    score_bytes = shape.batch * shape.heads * shape.seq_len**2 * 4
    too_big = (f"would materialise {score_bytes / 2**30:.0f} GiB of scores (limit "
               f"{MAX_SCORE_BYTES / 2**30:.0f} GiB)") if score_bytes > MAX_SCORE_BYTES else None
    try:
        from torch.nn.attention import SDPBackend
        for name, member in SDPA_BACKENDS.items():
            if not common.wanted(name, args.providers, BASELINE):
                continue
            if name == "sdpa-math" and too_big:
                skips.add(name, label, too_big)
            elif name in ("sdpa-efficient", "sdpa-cudnn") and args.device.type != "cuda":
                skips.add(name, label, "needs a CUDA device (PyTorch's CPU SDPA has flash and math only)")
            elif not hasattr(SDPBackend, member):
                skips.add(name, label, f"this PyTorch has no SDPBackend.{member}")
            else:
                providers[name] = _sdpa(inputs, shape, p, getattr(SDPBackend, member))
    except ImportError as exc:
        skips.add("sdpa-<backend>", label, f"torch.nn.attention.sdpa_kernel missing ({exc})")
    if common.wanted(COMPILED, args.providers, BASELINE):
        if args.compile is False:
            skips.add(COMPILED, label, "--no-compile")
        elif not compile_here:
            skips.add(COMPILED, label, _not_compiled_here(args))
        elif too_big:
            skips.add(COMPILED, label, too_big)
        else:
            providers[COMPILED] = _compiled(inputs, shape, p)
    for name, module_name, factory in (("flash-attn", "flash_attn", _flash_attn),
                                       ("xformers", "xformers.ops", _xformers)):
        if not common.wanted(name, args.providers, BASELINE):
            continue
        module = common.optional_import(module_name)
        if module is None:
            skips.add(name, label, f"{module_name} is not installed")
        elif shape.bias:
            skips.add(name, label, "a position bias that requires grad (not benchmarked)")
        elif shape.padding:
            skips.add(name, label, "key padding needs its variable-length API on unpadded tokens "
                                   "(not benchmarked)")
        elif args.device.type != "cuda":
            skips.add(name, label, "needs a CUDA device")
        else:
            providers[name] = factory(module, inputs, shape, p)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    usable, reasons = common.fastformer_backends_for(
        fastformer.attention, q, k, v, attn_mask=inputs["position_bias"], dropout_p=p, is_causal=shape.causal,
        key_padding_mask=inputs["key_padding_mask"])
    for backend in common.fastformer_backends():
        name = f"fastformer-{backend}"
        if not common.wanted(name, args.providers, BASELINE):
            continue
        if backend in usable:
            providers[name] = _fastformer(inputs, shape, p, backend)
        else:
            skips.add(name, label, "; ".join(reasons[backend]))
    return providers


def _fastformer(inputs, shape: Shape, dropout_p: float, backend: str) -> Callable:
    q, k, v, padding, bias = (inputs[name] for name in ("q", "k", "v", "key_padding_mask", "position_bias"))
    return lambda: fastformer.attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=shape.causal,
                                        key_padding_mask=padding, backend=backend)


def _unsupported(name: str, exc: BaseException, caught: list) -> str | None:
    """The reason a forced SDPA backend (or an optional library) refused the inputs, else None."""
    if not (name.startswith("sdpa-") or name in ("flash-attn", "xformers")):
        return None
    if not isinstance(exc, (RuntimeError, NotImplementedError, ValueError, TypeError)):
        return None
    details = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    details = [d for d in details if "not used because" not in d][:4]
    reason = common.first_line(exc)
    if details:
        reason += " [" + "; ".join(dict.fromkeys(details)) + "]"
    return reason[:400]


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def bench_attention(shape: Shape, args, compile_here: bool, skips, failures) -> list[common.Row]:
    inputs = make_inputs(shape, args)
    label = shape.label(inputs["lengths"])
    providers = attention_providers(shape, inputs, args, compile_here, skips, label)
    flops = forward_flops(shape.heads, shape.head_dim, inputs["lengths"], shape.causal)
    work = {pass_: flops * PASS_FLOP_FACTOR[pass_] for pass_ in args.passes}
    rows = common.run_providers(OP, providers, BASELINE, grad_inputs(inputs), (inputs["grad_out"],), args,
                                label=label, suite=shape.suite, group=shape.group(), size=shape.seq_len,
                                work=work, kind="flops",
                                tolerances=TOLERANCES[args.torch_dtype], check=args.dropout == 0.0,
                                skips=skips, failures=failures, refusal=_unsupported)
    del inputs, providers
    return rows


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
def _module_pair(kind: str, shape: ModuleShape, args) -> dict[str, nn.Module]:
    E, H, p = shape.embed, shape.heads, args.module_dropout
    torch.manual_seed(args.seed)
    batch_first = not args.seq_first
    if kind == "MultiheadAttention":
        reference = nn.MultiheadAttention(E, H, dropout=p, batch_first=batch_first)
    else:
        reference = nn.TransformerEncoderLayer(E, H, 4 * E, dropout=p, activation="gelu",
                                               batch_first=batch_first)
    reference = reference.to(device=args.device, dtype=args.torch_dtype).train()
    fast = fastformer.optimize(nn.Sequential(copy.deepcopy(reference)))[0].train()
    return {MODULE_BASELINE: reference, "fastformer": fast}


def _module_call(module: nn.Module, kind: str, x, padding) -> Callable:
    if kind == "MultiheadAttention":
        return lambda: module(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    return lambda: module(x, src_key_padding_mask=padding)


def bench_modules(shape: ModuleShape, args, compile_here: bool, skips, failures) -> list[common.Row]:
    device, dtype = args.device, args.torch_dtype
    generator = torch.Generator(device=device).manual_seed(args.seed)
    layout = (shape.seq_len, shape.batch) if args.seq_first else (shape.batch, shape.seq_len)
    x = torch.randn(*layout, shape.embed, device=device, dtype=dtype, generator=generator).requires_grad_()
    grad_out = torch.randn(*layout, shape.embed, device=device, dtype=dtype, generator=generator)
    lengths = key_lengths(shape.batch, shape.seq_len, True, args.seed)
    padding = torch.arange(shape.seq_len, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    label = shape.label() + (" seq-first" if args.seq_first else "")
    rows = []
    for kind in ("MultiheadAttention", "TransformerEncoderLayer"):
        modules = _module_pair(kind, shape, args)
        providers: dict[str, Callable] = {}
        for name, module in modules.items():
            if common.wanted(name, args.providers, MODULE_BASELINE):
                providers[name] = _module_call(module, kind, x, padding)
        for name, module in modules.items():
            compiled_name = f"{name}+compile"
            if not common.wanted(compiled_name, args.providers, MODULE_BASELINE):
                continue
            if args.compile is False:
                skips.add(compiled_name, label, "--no-compile")
            elif not compile_here:
                skips.add(compiled_name, label, _not_compiled_here(args))
            else:
                providers[compiled_name] = _module_call(common.compile_fn(module), kind, x, padding)
        # Each provider differentiates w.r.t. x and its own module's parameters (same order).
        grad_inputs = {name: [x] + list(modules[name.split("+")[0]].parameters()) for name in providers}
        try:
            new = common.run_providers(kind, providers, MODULE_BASELINE, grad_inputs, (grad_out,), args,
                                       label=label, suite="modules", group=f"{kind} E={shape.embed}",
                                       size=shape.seq_len, work=None, kind="flops",
                                       tolerances=TOLERANCES[args.torch_dtype],
                                       check=args.module_dropout == 0.0, skips=skips,
                                       failures=failures, refusal=_unsupported)
        except (common.Stop, Exception) as stop:  # a CUDA error too: keep what was measured
            stop.partial_rows = rows + getattr(stop, "partial_rows", [])
            raise
        rows += new
        del modules, providers
    return rows


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring (top of this file) for the "
                                            "shapes, providers and conventions.")
    common.add_common_arguments(parser)
    parser.add_argument("--suites", default=",".join(SUITES),
                        help=f"comma-separated among {', '.join(SUITES)} (default: all)")
    parser.add_argument("--batch", "-B", type=int, help="finetune and modules suites: batch size")
    parser.add_argument("--seq-lens", "-L", type=common.int_list, help="finetune/modules: sequence lengths")
    parser.add_argument("--heads", "-H", type=common.int_list, help="finetune/modules: head counts")
    parser.add_argument("--head-dims", "-D", type=common.int_list, help="finetune/modules: head dims")
    parser.add_argument("--padding", choices=["no", "yes", "both"],
                        help="finetune: IMDB-like key padding (default: both)")
    parser.add_argument("--causal", action="store_true", help="finetune: is_causal=True (top-left)")
    parser.add_argument("--position-bias", action="store_true",
                        help="finetune: add a learned (1, H, L, L) position bias that requires grad")
    parser.add_argument("--long-seq-lens", type=common.int_list, help="long suite: sequence lengths")
    parser.add_argument("--long-tokens", type=int, help="long suite: B * L (default 16384 on CUDA)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="attention suites: dropout_p (default 0; > 0 disables the checks)")
    parser.add_argument("--module-dropout", type=float, default=0.1,
                        help="modules suite: dropout of the layers (default 0.1, as in fine-tuning)")
    parser.add_argument("--seq-first", action="store_true",
                        help="modules suite: sequence-first modules and inputs (batch_first=False, "
                             "PyTorch's default) instead of batch-first")
    parser.add_argument("--deterministic", action="store_true",
                        help="run under torch.use_deterministic_algorithms(True, warn_only=True): the "
                             "fastformer backward then takes its dQ kernel instead of atomic dQ sums")
    compiled = parser.add_mutually_exclusive_group()
    compiled.add_argument("--compile", dest="compile", action="store_true", default=None,
                          help="torch.compile providers also on the CPU (first shape of each suite)")
    compiled.add_argument("--no-compile", dest="compile", action="store_false",
                          help="leave out torch.compile providers")
    args = parser.parse_args(argv)
    common.resolve_common_arguments(parser, args, cuda_repeats=(100, 20), cpu_repeats=(10, 3),
                                    providers=PROVIDERS)
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        parser.error(f"--suites: expected a comma-separated list of {SUITES}, got {args.suites!r}")
    args.suites = suites
    if not 0.0 <= args.dropout < 1.0 or not 0.0 <= args.module_dropout < 1.0:
        parser.error("dropout must be in [0, 1)")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.long_tokens is not None and args.long_tokens < 1:
        parser.error(f"--long-tokens must be >= 1, got {args.long_tokens}")
    return args


def run(args: argparse.Namespace) -> int:
    # torch.compile providers: every shape on CUDA (--quick: the first shape of each suite); on the
    # CPU only with --compile, on the first shape of each suite (compile time dominates there).
    cuda = args.device.type == "cuda"
    if args.compile is False or (not cuda and args.compile is None):
        policy = "none"
    else:
        policy = "all" if cuda and not args.quick else "first"
    cases, seen_suites = [], set()
    for shape in attention_shapes(args):
        compile_here = policy == "all" or (policy == "first" and shape.suite not in seen_suites)
        seen_suites.add(shape.suite)
        cases.append(common.Case(f"{OP} {shape.name()}",
                                 functools.partial(bench_attention, shape, args, compile_here)))
    for number, mshape in enumerate(module_shapes(args)):
        compile_here = policy == "all" or (policy == "first" and number == 0)
        cases.append(common.Case(f"modules {mshape.label()}",
                                 functools.partial(bench_modules, mshape, args, compile_here)))
    modes = common.deterministic_algorithms() if args.deterministic else contextlib.nullcontext()
    with modes:
        return common.run_cases(args, cases, baseline=BASELINE, plot_x_label="sequence length L",
                                plot_title=f"attention, {{device}}, {args.dtype}", summary_ops={OP},
                                rate_kind="flops",
                                timing_note=f"; suites: {', '.join(args.suites)}"
                                            + ("; deterministic algorithms" if args.deterministic else ""))


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
