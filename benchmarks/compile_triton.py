"""Compile every Triton kernel of fastformer for real GPU targets, on a machine without a GPU.

    python benchmarks/compile_triton.py [--arch 90 --arch 80] [--full] [--json PATH]

Targets: sm_80 (A100), sm_86 / sm_89 / sm_120 (99 KiB of shared memory a block: RTX 30xx-50xx,
A10, L4, L40S), sm_90 (H100, H200), sm_100 (B200).

CI runs the Triton kernels in Triton's interpreter, which never lowers a kernel to a GPU: a kernel
that passes there can still fail to compile for sm_80 or sm_90, or ask for more shared memory than
the card has. This script calls the real launchers (``fastformer.triton.*``) on CPU tensors with
Triton's driver replaced by one that compiles for the chosen target and launches nothing, so each
kernel is compiled exactly as its launcher specialises it: the same compile-time switches, every
autotune configuration, the same argument divisibility. Nothing is computed; tensors are
allocated and never touched (the 2**31-element cases of the int64-offset paths cost no memory).

Per compiled kernel it reports the shared memory it needs, registers per thread, bytes spilled to
local memory (``cuobjdump --dump-resource-usage`` on the cubin), the MMA instruction used, the
widest global load and cp.async copy in bytes (1- or 2-byte accesses to 16-bit data mean that
Triton could not prove the rows aligned; no cp.async in a multi-stage loop means no pipelining),
and the 32-bit high multiplies of its PTX (``mul.hi``: two per Philox round, 20 per call of the
dropout masks' Philox-4x32-10, which the kernels' other arithmetic hardly uses: a count of the
random-number work a thread does).

Exit status 1 when a kernel fails to compile, when a launch has no configuration that fits the
target's shared memory (an autotuned launch may keep configurations that do not fit: the autotuner
skips those; a launch that fits none raises OutOfResources here as on a GPU, which is a problem
unless the launcher catches it and falls back to other kernels), or when a Triton kernel of the
package was not compiled by any case; 0 otherwise.
Spills are reported, not failed. Cases: the default set covers every kernel, dtype, head-dim class
and compile-time switch at least once; ``--full`` takes their product (slow: about half an hour
per target on two cores the first time; Triton caches what it compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted ones
os.environ["FASTFORMER_TRITON_AUTOTUNE"] = "1"  # every autotune config, even under the test suite
os.environ["FASTFORMER_TRITON_COMPILE_WORKERS"] = "1"  # compiled here one by one, each recorded once

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
except ImportError:  # triton < 3.0
    from triton.compiler.compiler import GPUTarget

# The most shared memory one block may use, in bytes (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability" and the sections on each capability's shared memory:
# 163 KB on 8.0, 99 KB on 8.6, 8.9 and 12.0, 227 KB on 9.0 and 10.0).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


# --------------------------------------------------------------------------------------------
# compiling without launching
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Compiled:
    """One kernel compiled for one target with one configuration."""
    case: str
    launch: int            # compilations of one launch share it: the configs an autotuner tries
    kernel: str
    arch: int
    constants: dict[str, Any]
    num_warps: int
    num_stages: int
    shared_bytes: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    mma: str = ""
    load_bytes: int = 0         # the widest ld.global
    async_copy_bytes: int = 0   # the widest cp.async (global to shared) copy; 0: none
    mul_hi: int = 0             # mul.hi.u32 in the PTX: 20 per Philox call
    seconds: float = 0.0
    error: str | None = None
    # No configuration of its launch fits, so the launch raised OutOfResources as on a GPU (see
    # compile_only), and the launcher caught it and went on with other kernels (compile_cases).
    fell_back: bool = False

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared_bytes <= SHARED_MEMORY_LIMIT[self.arch]


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target, owns no device, launches nothing.
    The "device" is the arch, so each target keeps its own kernel cache in a JIT function."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):  # asked for when an autotuner is built (Triton 3.2); never called
        return lambda *args, **kwargs: float("inf")


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, bytes of stack frame + local memory per thread: where ptxas puts
    spilled registers) of the cubin's only kernel."""
    tool = common.cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    fields = dict(item.split(":", 1) for line in text.splitlines() if "REG:" in line
                  for item in line.split() if ":" in item)
    if "REG" not in fields:
        return None, None
    return int(fields["REG"]), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))


def _mma(ptx: str) -> str:
    """The tensor-core instruction of a kernel's matmuls: tcgen05 (sm_100), wgmma (sm_90),
    mma.sync (sm_80 and up); empty: none (FMA)."""
    for instruction, name in (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma.sync")):
        if instruction in ptx:
            return name
    return ""


_PTX_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "b32": 32,
             "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64, "b128": 128}


def _widest_accesses(ptx: str) -> tuple[int, int]:
    """(bytes of the widest ld.global, bytes of the widest cp.async copy) in a kernel's PTX."""
    loads = [0]
    for match in re.finditer(r"\bld\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.([bsuf]\d+)\b", ptx):
        lanes, kind = match.groups()
        loads.append(int(lanes or 1) * _PTX_BITS.get(kind, 0) // 8)
    copy = r"\bcp\.async\.c[ag]\.shared\.global[^;]*?\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
    copies = [0] + [int(size, 0) for size in re.findall(copy, ptx)]
    return max(loads), max(copies)


class _Recorder:
    def __init__(self, arch: int):
        self.arch = arch
        self.results: list[Compiled] = []
        self.case = ""
        self.launches = 0
        self.autotuned_launch: int | None = None

    def compile(self, fn: JITFunction, original_run, args, kwargs) -> Any:
        launch = self.autotuned_launch
        single = launch is None
        if single:
            self.launches += 1
            launch = self.launches
        record = Compiled(self.case, launch, fn.__name__, self.arch,
                          {k: v for k, v in kwargs.items() if k.isupper()},
                          kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
        start = time.perf_counter()
        try:
            kernel = original_run(fn, *args, grid=None, warmup=True, **kwargs)
        except Exception as exc:  # reported, and the launcher goes on to its next kernel
            kernel = None
            message = str(exc)
            if exc.__cause__ is not None:  # older Tritons keep the reason there
                message += f"\n{type(exc.__cause__).__name__}: {exc.__cause__}"
            lines = (line.strip() for line in message.splitlines())
            record.error = f"{type(exc).__name__}: {' | '.join(line for line in lines if line)}"[:400]
        record.seconds = time.perf_counter() - start
        if kernel is not None:
            record.num_warps, record.num_stages = kernel.metadata.num_warps, kernel.metadata.num_stages
            record.shared_bytes = kernel.metadata.shared
            record.registers, record.spill_bytes = _resources(kernel.asm["cubin"])
            record.mma = _mma(kernel.asm["ptx"])
            record.load_bytes, record.async_copy_bytes = _widest_accesses(kernel.asm["ptx"])
            record.mul_hi = len(re.findall(r"\bmul\.hi\.u32\b", kernel.asm["ptx"]))
        self.results.append(record)
        if single:
            self.launched(launch)
        return kernel

    def launched(self, launch: int) -> None:
        """What a GPU does at a launch whose configurations all compiled but none fits in shared
        memory: Triton raises OutOfResources before running anything."""
        group = [r for r in self.results if r.launch == launch]
        if group and not any(r.error for r in group) and not any(r.fits for r in group):
            raise OutOfResources(min(r.shared_bytes for r in group), SHARED_MEMORY_LIMIT[self.arch],
                                 "shared memory")


@contextlib.contextmanager
def compile_only(arch: int):
    """Within the block, launching a Triton kernel compiles it for sm_<arch> and runs nothing; an
    autotuned kernel compiles every configuration. A launch none of whose configurations fits in
    the target's shared memory raises OutOfResources, as on a GPU. Yields the recorder of what was
    compiled."""
    from fastformer.triton import attention as triton_attention

    recorder = _Recorder(arch)
    jit_run, autotuner_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        return recorder.compile(self, jit_run, args, kwargs)

    def autotuned_run(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        recorder.launches += 1
        recorder.autotuned_launch = recorder.launches
        try:
            for config in self.prune_configs(kwargs):
                self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
        finally:
            recorder.autotuned_launch = None
            self.nargs = None
        recorder.launched(recorder.launches)

    # The attention launches that fell back on a GPU are remembered per device: here, per target.
    unfit, triton_attention._atomic_dq_unfit = triton_attention._atomic_dq_unfit, set()
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run, Autotuner.run = run, autotuned_run
    try:
        yield recorder
    finally:
        triton_attention._atomic_dq_unfit = unfit
        JITFunction.run, Autotuner.run = jit_run, autotuner_run
        try:
            driver.reset_active()
        except RuntimeError:  # no GPU: leave the driver to be created lazily, as it was
            driver.set_active(None)


# --------------------------------------------------------------------------------------------
# cases: the launchers called as fastformer calls them
# --------------------------------------------------------------------------------------------
WIDE = 2**31  # elements from which the kernels switch to int64 offsets


def _projection(batch, length, heads, dim, dtype):
    """(B, H, L, D) view of a (B, L, H, D) projection, as the modules pass them."""
    return torch.empty(batch, length, heads, dim, dtype=dtype).transpose(1, 2)


def attention_case(dtype, dim, *, dim_v=None, batch=2, heads=4, heads_k=None, len_q=128, len_k=None,
                   causal=False, mask=None, padding=False, dropout=0.0, tf32=False,
                   deterministic=False, mask_grad=False) -> Callable[[], None]:
    """mask: "bool" (Lq, Lk), "float" (B, 1, Lq, Lk), "float-full" (B, H, Lq, Lk), "float-keys"
    (B, 1, 1, Lk).
    tf32: float32 products on the tensor cores (torch.backends.cuda.matmul.allow_tf32 set during
    the launches); without it float32 attention multiplies in full float32, without them.
    deterministic: the backward under torch.use_deterministic_algorithms(True), which takes the dQ
    kernel (and the dK/dV kernel without atomic dQ). mask_grad: the backward also computes the
    float mask's gradient (stored for a full mask or under deterministic, else added up; for
    "float-keys" summed over each block's queries first)."""
    from fastformer.triton import attention as triton_attention

    def run():
        allowed = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            with common.deterministic_algorithms(deterministic):
                launch()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allowed

    def launch():
        h_k, l_k, d_v = heads_k or heads, len_k or len_q, dim_v or dim
        q = _projection(batch, len_q, heads, dim, dtype)
        k, v = _projection(batch, l_k, h_k, dim, dtype), _projection(batch, l_k, h_k, d_v, dtype)
        attn_mask = None
        if mask == "bool":
            attn_mask = torch.empty(len_q, l_k, dtype=torch.bool)
        elif mask == "float":
            attn_mask = torch.empty(batch, 1, len_q, l_k, dtype=dtype)
        elif mask == "float-full":
            attn_mask = torch.empty(batch, heads, len_q, l_k, dtype=dtype)
        elif mask == "float-keys":
            attn_mask = torch.empty(batch, 1, 1, l_k, dtype=dtype)
        key_padding_mask = torch.zeros(batch, l_k, dtype=torch.bool) if padding else None
        seed = torch.tensor(7) if dropout else None
        out, lse = triton_attention.attention_fwd(q, k, v, attn_mask, key_padding_mask, dropout,
                                                  causal, dim ** -0.5, seed)
        grad_out = torch.empty(out.shape, dtype=dtype)
        triton_attention.attention_bwd(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask,
                                       dropout, causal, dim ** -0.5, seed, mask_grad)
    return run


def norm_case(dtype, hidden, *, rows=64, residual=True, weight=True, bias=True, dropout=0.0,
              rms=False) -> Callable[[], None]:
    from fastformer.triton import layer_norm as triton_norm

    def run():
        x = torch.empty(rows, hidden, dtype=dtype)
        res = torch.empty(rows, hidden, dtype=dtype) if residual else None
        w = torch.empty(hidden, dtype=dtype) if weight else None
        b = torch.empty(hidden, dtype=dtype) if bias and not rms else None
        seed = torch.tensor(7) if dropout else None
        out, residual_out, mean, rstd = triton_norm.residual_norm_fwd(
            x, res, w, b, 1e-5, dropout, rms, seed, residual)
        grad = torch.empty(rows, hidden, dtype=dtype)
        triton_norm.residual_norm_bwd(grad, grad if residual else None, out, w, b, mean, rstd, dropout,
                                      rms, seed, residual)
    return run


def gelu_case(dtype, hidden, *, rows=4096, bias=True, approximate="none", dropout=0.0) -> Callable[[], None]:
    from fastformer.triton import bias_gelu as triton_gelu

    def run():
        x = torch.empty(rows, hidden, dtype=dtype)
        b = torch.empty(hidden, dtype=dtype) if bias else None
        seed = torch.tensor(7) if dropout else None
        triton_gelu.bias_gelu_fwd(x, b, approximate, dropout, seed)
        triton_gelu.bias_gelu_bwd(torch.empty(rows, hidden, dtype=dtype), x, b, approximate, dropout, seed)
    return run


def dropout_case(numel) -> Callable[[], None]:
    from fastformer.triton import dropout as triton_dropout
    return lambda: triton_dropout.dropout_keep_mask(torch.tensor(7), (numel,), 0.1, "cpu")


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_DTYPE_NAMES = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}


def default_cases() -> dict[str, Callable[[], None]]:
    """Every kernel, dtype, head-dim class (<=64, 128, 256) and compile-time switch at least once;
    lengths both multiples of 16 and odd (the launchers' integer arguments are specialised on it)."""
    return {
        "attention bf16 d64 L512 padding dropout": attention_case(BF16, 64, len_q=512, heads=12,
                                                                  padding=True, dropout=0.1),
        "attention bf16 d64 L512 padding dropout deterministic": attention_case(
            BF16, 64, len_q=512, heads=12, padding=True, dropout=0.1, deterministic=True),
        "attention fp16 d50 L97 causal bool-mask": attention_case(FP16, 50, len_q=97, causal=True,
                                                                  mask="bool"),
        "attention fp16 d50 L97 causal bool-mask deterministic": attention_case(
            FP16, 50, len_q=97, causal=True, mask="bool", deterministic=True),
        "attention fp32 d128 gqa float-mask": attention_case(FP32, 128, heads=8, heads_k=2,
                                                             mask="float"),
        "attention fp32 d128 gqa float-mask mask-grad": attention_case(FP32, 128, heads=8, heads_k=2,
                                                                       mask="float", mask_grad=True),
        "attention bf16 d64 L512 float-mask-full mask-grad deterministic": attention_case(
            BF16, 64, len_q=512, heads=12, mask="float-full", mask_grad=True, deterministic=True),
        "attention bf16 d64 L512 padding float-key-bias mask-grad": attention_case(
            BF16, 64, len_q=512, heads=12, padding=True, mask="float-keys", mask_grad=True),
        "attention fp32 d64 tf32 causal padding": attention_case(FP32, 64, causal=True, padding=True,
                                                                 tf32=True),
        "attention bf16 d200/dv256 Lq100 Lk300 causal": attention_case(BF16, 200, dim_v=256, len_q=100,
                                                                      len_k=300, causal=True),
        "attention fp16 d32 dropout int64-offsets": attention_case(FP16, 32, batch=1, heads=1,
                                                                   len_q=46341, dropout=0.1),
        "layer_norm fp32 N200 residual dropout": norm_case(FP32, 200, dropout=0.1),
        "layer_norm bf16 N768 no-residual": norm_case(BF16, 768, residual=False, bias=False),
        "rms_norm fp16 N4096 dropout": norm_case(FP16, 4096, rms=True, dropout=0.1),
        "layer_norm bf16 N16384": norm_case(BF16, 16384),
        "layer_norm bf16 N1024 dropout int64-offsets": norm_case(BF16, 1024, rows=WIDE // 1024,
                                                                 dropout=0.1),
        "bias_gelu fp32 N2048 erf": gelu_case(FP32, 2048),
        "bias_gelu bf16 N1536 tanh": gelu_case(BF16, 1536, approximate="tanh"),
        "bias_gelu fp16 N50 no-bias": gelu_case(FP16, 50, rows=97, bias=False),
        "bias_gelu fp32 N2048 erf dropout": gelu_case(FP32, 2048, dropout=0.1),
        "bias_gelu bf16 N1024 tanh dropout int64-offsets": gelu_case(BF16, 1024, rows=WIDE // 1024,
                                                                     approximate="tanh", dropout=0.1),
        "dropout_keep_mask": dropout_case(1000),
        "dropout_keep_mask int64-offsets": dropout_case(WIDE),
    }


def full_cases() -> dict[str, Callable[[], None]]:
    """The defaults plus the product of dtypes, head dims / hidden sizes and feature sets."""
    cases = default_cases()
    attention_features = {"plain": {}, "causal padding dropout bool-mask":
                          dict(causal=True, padding=True, dropout=0.1, mask="bool"),
                          "gqa float-mask": dict(heads=8, heads_k=2, mask="float"),
                          "causal padding dropout deterministic":
                          dict(causal=True, padding=True, dropout=0.1, deterministic=True)}
    for dtype, dim, (features, kwargs) in itertools.product(
            (BF16, FP16, FP32), (32, 50, 64, 96, 128, 200, 256), attention_features.items()):
        cases[f"attention {_DTYPE_NAMES[dtype]} d{dim} {features}"] = attention_case(dtype, dim, **kwargs)
    norm_features = {"layer_norm": dict(dropout=0.1), "rms_norm": dict(rms=True, dropout=0.1),
                     "layer_norm plain": dict(residual=False, weight=False, bias=False)}
    for dtype, hidden, (features, kwargs) in itertools.product(
            (BF16, FP16, FP32), (64, 200, 384, 768, 1024, 2048, 4096, 8192, 16384), norm_features.items()):
        cases[f"{features} {_DTYPE_NAMES[dtype]} N{hidden}"] = norm_case(dtype, hidden, **kwargs)
    for dtype, hidden, approximate, dropout in itertools.product((BF16, FP16, FP32), (50, 768, 1536, 3072, 8192),
                                                                 ("none", "tanh"), (0.0, 0.1)):
        cases[f"bias_gelu {_DTYPE_NAMES[dtype]} N{hidden} {approximate}" + (" dropout" if dropout else "")] = \
            gelu_case(dtype, hidden, approximate=approximate, dropout=dropout)
    return cases


def package_kernels() -> set[str]:
    """Names of the Triton kernels (JIT functions named ``*_kernel``) in fastformer.triton."""
    import importlib
    import pkgutil

    import fastformer.triton as package

    names = set()
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        names.update(name for name, value in vars(module).items()
                     if isinstance(value, JITFunction) and name.endswith("_kernel"))
    return names


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def problems(results: list[Compiled], expected_kernels: set[str]) -> list[str]:
    """One line per compile error, per launch of which no configuration fits the target's shared
    memory (unless its launcher fell back to other kernels; if it did not, compile_cases reports
    the case as stopped), and per target for the expected kernels that no case compiled."""
    found = []
    for r in results:
        if r.error:
            found.append(f"sm_{r.arch} {r.kernel} {r.constants}: {r.error}")
    launches: dict[tuple, list[Compiled]] = {}
    for r in results:
        launches.setdefault((r.arch, r.case, r.launch), []).append(r)
    for (arch, case, _), group in launches.items():
        if not any(r.fits or r.fell_back for r in group) and not any(r.error for r in group):
            smallest = min(r.shared_bytes for r in group)
            found.append(f"sm_{arch} {group[0].kernel} in '{case}': no configuration fits in "
                         f"{SHARED_MEMORY_LIMIT[arch]} bytes of shared memory (smallest needs {smallest})")
    for arch in sorted({r.arch for r in results}):
        missing = expected_kernels - {r.kernel for r in results if r.arch == arch}
        if missing:
            found.append(f"sm_{arch}: no case compiled {', '.join(sorted(missing))}")
    return found


_SWITCHES = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "BLOCK")


def format_results(results: list[Compiled]) -> str:
    header = ["arch", "kernel", "blocks", "warps", "stages", "shared KiB", "regs", "spill B", "mma",
              "load B", "cp.async B", "mul.hi", "s", "note"]
    rows = [header]
    for r in results:
        blocks = "x".join(str(r.constants[k]) for k in _SWITCHES if k in r.constants)
        note = r.error or ("" if r.fits else f"over the {SHARED_MEMORY_LIMIT[r.arch] // 1024} KiB limit")
        if r.fell_back:
            note += "; no config fits: the launcher fell back"
        rows.append([f"sm_{r.arch}", r.kernel.strip("_"), blocks, str(r.num_warps), str(r.num_stages),
                     "" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.0f}",
                     "" if r.registers is None else str(r.registers),
                     "" if r.spill_bytes is None else str(r.spill_bytes), r.mma, str(r.load_bytes),
                     str(r.async_copy_bytes), str(r.mul_hi), f"{r.seconds:.1f}", note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def compile_cases(arch: int, cases: dict[str, Callable[[], None]]) -> tuple[list[Compiled], list[str]]:
    """Runs each case compiling for sm_<arch>; returns what was compiled and a line per case that
    a launch stopped (OutOfResources that no launcher caught: a crash on a GPU). Launches that
    raised and were caught are marked ``fell_back``."""
    stopped_cases = []
    with compile_only(arch) as recorder:
        for name, case in cases.items():
            recorder.case = name
            start = time.perf_counter()
            try:
                case()
                stopped = None
            except OutOfResources as exc:
                stopped = exc
                stopped_cases.append(f"sm_{arch} '{name}' stopped: {exc}")
            compiled = [r for r in recorder.results if r.case == name]
            if stopped is None:  # the launches that raised were caught by their launchers
                for r in compiled:
                    r.fell_back = not r.error and not any(
                        other.fits or other.error for other in compiled if other.launch == r.launch)
            print(f"sm_{arch}  {name}: {len(compiled)} compiled, {time.perf_counter() - start:.1f} s", flush=True)
    return recorder.results, stopped_cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capability as an integer, repeatable (default: 90 and 80)")
    parser.add_argument("--full", action="store_true", help="the product of dtypes, sizes and features")
    parser.add_argument("-k", dest="select", default="", help="only the cases whose name contains this")
    parser.add_argument("--json", help="write the results and the environment here")
    args = parser.parse_args(argv)
    archs = args.arch or [90, 80]
    cases = {name: case for name, case in (full_cases() if args.full else default_cases()).items()
             if args.select in name}
    expected = package_kernels() if not args.select else set()

    results: list[Compiled] = []
    unhandled: list[str] = []
    for arch in archs:
        compiled, stopped = compile_cases(arch, cases)
        results += compiled
        unhandled += stopped
    print()
    print(format_results(results))
    found = unhandled + problems(results, expected)
    spilled = sorted({(r.arch, r.kernel) for r in results if r.spill_bytes})
    print(f"\n{len(results)} kernels compiled for {', '.join(f'sm_{a}' for a in archs)} with triton "
          f"{triton.__version__}; {len(spilled)} (arch, kernel) pairs spill registers in some config")
    for line in found:
        print(f"PROBLEM: {line}")
    if args.json:
        env = common.environment("cpu")
        env["targets"] = [f"sm_{a}" for a in archs]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "problems": found,
                       "kernels": [dataclasses.asdict(r) for r in results]}, f, indent=2, default=str)
            f.write("\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
