"""Helpers shared by the per-op benchmark scripts (attention.py, layer_norm.py, gelu.py, ...).

- :func:`environment`: what a result was measured on (versions, device, git commit, command line),
  with no machine names in it, so that results can be published as they are.
- :func:`time_ms`: the timer. On CUDA, ``triton.testing.do_bench`` (L2 cache flushed before every
  run) when Triton is importable, otherwise CUDA events around each run with the same L2 flush; on
  the CPU, ``time.perf_counter`` around each call. Always median and 20th/80th percentiles of
  ``repeats`` runs after ``warmup`` runs.
- :func:`peak_memory_mb`: extra CUDA memory one call needs, above what was allocated before it.
- :class:`Row`: one result, with the columns every benchmark script writes.
- :func:`print_table`, :func:`write_json`, :func:`write_csv`: the outputs.

Conventions: one row per (op, provider, shape, dtype, pass); ``ratio_vs_baseline`` is baseline ms /
provider ms, so > 1 means faster than the baseline (what users would otherwise run).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
JSON_SCHEMA_VERSION = 1

# do_bench flushes L2 by zeroing a 256 MiB buffer before each run; the fallback timer does the same.
_L2_FLUSH_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return str(getattr(module, "__version__", "unknown"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit() -> str:
    """Short commit of the repository these scripts live in, '-dirty' if tracked files changed.

    'unknown' outside a git checkout or before the first commit. Untracked files (such as results
    written under benchmarks/results/) do not make a checkout dirty.
    """
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if changes else "")


def command_line() -> str:
    """The command as run, with the script path relative to the repository (no home directories)."""
    argv = list(sys.argv)
    if argv:
        script = Path(argv[0])
        try:
            argv[0] = str(script.resolve().relative_to(REPO_ROOT))
        except (ValueError, OSError):
            argv[0] = script.name
    return shlex.join(["python", *argv])


def fastformer_source() -> str:
    """Whether ``import fastformer`` gives this checkout or a copy installed elsewhere (no paths)."""
    try:
        import fastformer

        location = Path(fastformer.__file__).resolve()
    except Exception:
        return "not importable"
    try:
        location.relative_to(REPO_ROOT)
        return "this checkout"
    except ValueError:
        return "an installed copy outside this checkout"


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_model()
    return device.type


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """What the results were measured on. Holds no host name and no user path.

    ``device`` is the device benchmarked (default: cuda if available, else cpu).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        import fastformer

        fastformer_version = fastformer.__version__
        backends = {name: ("available" if not reasons else "; ".join(reasons))
                    for name, reasons in fastformer.available_backends().items()}
    except Exception as exc:  # the environment header must never stop a benchmark
        fastformer_version = f"not importable ({type(exc).__name__}: {exc})"
        backends = {}
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "cuda_runtime": torch.version.cuda,
        "fastformer": fastformer_version,
        "fastformer_source": fastformer_source(),
        "fastformer_backends": backends,
        "git_commit": git_commit(),
        "command": command_line(),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["compute_capability"] = f"{major}.{minor}"
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env["gpu_count"] = torch.cuda.device_count()
    else:
        env["cpu_threads"] = torch.get_num_threads()
    env["timer"] = timer_name(device)
    return env


def format_environment(env: dict[str, Any]) -> str:
    """The environment as aligned 'key: value' lines, for the header of a run."""
    width = max(len(key) for key in env)
    lines = []
    for key, value in env.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _triton_testing():
    try:
        import triton.testing

        return triton.testing
    except Exception:
        return None


def timer_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        if _triton_testing() is not None:
            return "triton.testing.do_bench (L2 flushed before each run)"
        return "CUDA events around each run (L2 flushed before each run)"
    return "time.perf_counter around each call"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values; q in [0, 1]."""
    if not sorted_values:
        return math.nan
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summary_ms(times_ms: Sequence[float]) -> dict[str, Any]:
    """dict(median, p20, p80, n) of per-call times in milliseconds."""
    values = sorted(float(t) for t in times_ms)
    return {"median": _percentile(values, 0.5), "p20": _percentile(values, 0.2),
            "p80": _percentile(values, 0.8), "n": len(values)}


def _time_cpu(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return summary_ms(times)


def _estimate_cuda_ms(fn: Callable[[], Any], flush: torch.Tensor, runs: int = 5) -> float:
    """Mean time of one run including the L2 flush, as do_bench estimates it."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    return max(start.elapsed_time(end) / runs, 1e-3)


def _time_cuda_events(fn: Callable[[], Any], warmup: int, repeats: int,
                      flush: torch.Tensor) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summary_ms([start.elapsed_time(end) for start, end in zip(starts, ends)])


_DO_BENCH_ALL_WORKS: bool | None = None  # whether do_bench(return_mode="all") is accepted


def _time_do_bench(testing, fn: Callable[[], Any], warmup: int, repeats: int,
                   estimate_ms: float) -> dict[str, Any]:
    """do_bench takes warmup and rep in milliseconds; convert our counts with the estimate.

    Triton 3.2 to 3.8 all accept ``quantiles``; ``return_mode="all"`` (every run's time, so the
    exact n) is used where accepted, checked once (do_bench asserts on it before running fn).
    """
    global _DO_BENCH_ALL_WORKS
    params = inspect.signature(testing.do_bench).parameters
    kwargs: dict[str, Any] = {"warmup": max(1.0, warmup * estimate_ms), "rep": repeats * estimate_ms}
    if "return_mode" in params and _DO_BENCH_ALL_WORKS is not False:
        try:
            times = testing.do_bench(fn, return_mode="all", **kwargs)
            if isinstance(times, (list, tuple)) and times:
                _DO_BENCH_ALL_WORKS = True
                return summary_ms(times)
        except (AssertionError, ValueError, TypeError, KeyError):
            if _DO_BENCH_ALL_WORKS:  # it worked before: the error came from fn, not the option
                raise
        _DO_BENCH_ALL_WORKS = False
    median, p20, p80 = testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], **kwargs)
    # Not returned by this version: the count do_bench derives from its own estimate.
    n = max(1, int(kwargs["rep"] / estimate_ms))
    return {"median": float(median), "p20": float(p20), "p80": float(p80), "n": n}


def time_ms(fn: Callable[[], Any], *, warmup: int, repeats: int,
            device: str | torch.device | None = None) -> dict[str, Any]:
    """Time ``fn()``: dict(median, p20, p80, n), in milliseconds per call.

    ``device`` says which clock to use (default: cuda if available, else cpu). On CUDA every run
    starts with a flushed L2 cache, as in ``triton.testing.do_bench``; CUDA time excludes the
    host-side launch overhead only when the GPU is busier than the host.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"time_ms: need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return _time_cpu(fn, warmup, repeats)
    with torch.cuda.device(device):
        flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        estimate_ms = _estimate_cuda_ms(fn, flush)
        testing = _triton_testing()
        if testing is not None:
            del flush
            return _time_do_bench(testing, fn, warmup, repeats, estimate_ms)
        return _time_cuda_events(fn, warmup, repeats, flush)


def peak_memory_mb(fn: Callable[[], Any], device: str | torch.device) -> float | None:
    """Peak CUDA memory one call of ``fn`` allocates above what was allocated before it, in MiB.

    Counts the outputs and workspaces the call creates (kept or freed); not its inputs. None on
    devices other than CUDA.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before) / 2**20


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One measurement. ``pass_`` is written as the column "pass" ("fwd", "bwd" or "fwd+bwd").

    ms: median time per call; spread: p80 - p20 of the timed runs, in ms; tflops / gbps: achieved
    rates (None where not meaningful for the op); peak_mem_mb: see :func:`peak_memory_mb` (CUDA
    only); ratio_vs_baseline: baseline ms / this ms (> 1 = faster than the baseline); n: timed runs;
    rel_err: ||out - baseline out|| / ||baseline out|| (None if not checked); note: free text.
    """

    op: str
    provider: str
    shape: str
    dtype: str
    pass_: str
    ms: float
    spread: float
    tflops: float | None = None
    gbps: float | None = None
    peak_mem_mb: float | None = None
    ratio_vs_baseline: float | None = None
    n: int | None = None
    rel_err: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {("pass" if key == "pass_" else key): value for key, value in out.items()}


COLUMNS = [("pass" if f.name == "pass_" else f.name) for f in dataclasses.fields(Row)]


def set_ratios(rows: Sequence[Row], baseline: str) -> None:
    """Fill ratio_vs_baseline: baseline ms / row ms among rows of the same op, shape, dtype, pass."""
    base = {(r.op, r.shape, r.dtype, r.pass_): r.ms for r in rows if r.provider == baseline}
    for row in rows:
        ms = base.get((row.op, row.shape, row.dtype, row.pass_))
        row.ratio_vs_baseline = ms / row.ms if ms is not None and row.ms > 0 else None


def _format_ms(value: float) -> str:
    if value >= 100:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def _format_rate(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cells(row: Row) -> list[str]:
    def opt(value, fmt):
        return "-" if value is None else fmt.format(value)

    def rate(value):
        return "-" if value is None else _format_rate(value)

    return [row.op, row.provider, row.shape, row.dtype, row.pass_, _format_ms(row.ms),
            _format_ms(row.spread), rate(row.tflops), rate(row.gbps),
            opt(row.peak_mem_mb, "{:.1f}"), opt(row.ratio_vs_baseline, "{:.2f}x"),
            opt(row.rel_err, "{:.1e}"), row.note]


_HEADERS = ["op", "provider", "shape", "dtype", "pass", "ms", "spread", "TFLOP/s", "GB/s",
            "peak MiB", "vs base", "rel err", "note"]
_RIGHT = {"ms", "spread", "TFLOP/s", "GB/s", "peak MiB", "vs base", "rel err"}


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table with aligned columns (numbers right-aligned)."""
    table = [_HEADERS] + [_cells(row) for row in rows]
    keep = [i for i, header in enumerate(_HEADERS) if header != "note" or any(r.note for r in rows)]
    widths = {i: max(len(line[i]) for line in table) for i in keep}
    lines = []
    for number, line in enumerate(table):
        cells = [line[i].rjust(widths[i]) if _HEADERS[i] in _RIGHT else line[i].ljust(widths[i])
                 for i in keep]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * widths[i] for i in keep))
    return "\n".join(lines)


def print_table(rows: Sequence[Row], title: str | None = None) -> None:
    """Print the rows: with ``rich`` when it is importable and stdout is a terminal, else plain."""
    rich_table = None
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table

            rich_table = Table(title=title)
            keep = [i for i, h in enumerate(_HEADERS) if h != "note" or any(r.note for r in rows)]
            for i in keep:
                rich_table.add_column(_HEADERS[i], justify="right" if _HEADERS[i] in _RIGHT else "left")
            for row in rows:
                cells = _cells(row)
                rich_table.add_row(*(cells[i] for i in keep))
        except Exception:
            rich_table = None
    if rich_table is not None:
        Console().print(rich_table)
        return
    if title:
        print(title)
    print(format_table(rows))


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    return value


def write_json(path: str | os.PathLike, rows: Sequence[Row], env: dict[str, Any]) -> None:
    """{"schema_version", "environment", "columns", "rows": [{column: value}]}; makes parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema_version": JSON_SCHEMA_VERSION,
        "environment": env,
        "columns": COLUMNS,
        "rows": [{k: _json_value(v) for k, v in row.as_dict().items()} for row in rows],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def write_csv(path: str | os.PathLike, rows: Sequence[Row]) -> None:
    """One line per row, the columns of :class:`Row` (empty cell for None); makes parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else _json_value(v)) for k, v in row.as_dict().items()})
