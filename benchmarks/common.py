"""Helpers shared by the per-op benchmark scripts (attention.py, layer_norm.py, gelu.py, ...).

- :func:`environment`: what a result was measured on (versions, device, git commit, command line),
  with no machine names in it, so that results can be published as they are.
- :func:`time_ms`: the timer. On CUDA, ``triton.testing.do_bench`` (L2 cache flushed before every
  run) when Triton is importable, otherwise CUDA events around each run with the same L2 flush; on
  the CPU, ``time.perf_counter`` around each call (:func:`time_interleaved_cpu`: several calls in
  rounds). Always median and 20th/80th percentiles of ``repeats`` runs after ``warmup`` runs.
- :func:`peak_memory_mb`: extra CUDA memory one call needs, above what was allocated before it.
- :func:`measure_ceilings`: this device's copy bandwidth and matmul rate, measured in the same
  run, so that percentages of peak are against this card rather than a datasheet.
- :func:`measure_passes`, :func:`compare`: time fwd / bwd / fwd+bwd of one provider, and check its
  outputs and gradients against the baseline's.
- :class:`Row`: one result, with the columns every benchmark script writes.
- :func:`print_grouped`, :func:`write_json`, :func:`write_csv`, :func:`plot_rows`,
  :func:`markdown_pivot`: the outputs (rich table when rich is installed and stdout is a terminal,
  plain text otherwise; PNG only with matplotlib); :func:`check_plot_path`: --plot checked
  before a run (finetune.py's too).

Conventions: one row per (op, provider, shape, dtype, pass); ``ratio_vs_baseline`` is baseline ms /
provider ms, so > 1 means faster than the baseline (what users would otherwise run).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
JSON_SCHEMA_VERSION = 2

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


# Names the commit where the scripts run from a copy of a checkout without its .git (as copied
# to a rented GPU machine; perhaps into another repository's folder): whoever copies it knows it.
COMMIT_ENV_VAR = "FASTFORMER_GIT_COMMIT"


def git_commit() -> str:
    """$FASTFORMER_GIT_COMMIT when set; else the short commit of the repository these scripts live
    in, '-dirty' if tracked files changed ('unknown' outside a git checkout or before the first
    commit). Untracked files and anything under benchmarks/results/ (results being written) do not
    make a checkout dirty.
    """
    named = os.environ.get(COMMIT_ENV_VAR, "").strip()
    if named:
        return named
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                   ":(exclude)benchmarks/results")
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
    command = shlex.join(["python", *argv])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun: say so, with its process layout
        world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        command = f"torchrun --nnodes {max(1, world // local)} --nproc_per_node {local} " + command[len("python "):]
    return command


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """torch.use_deterministic_algorithms(enabled, warn_only=True) inside the block, the previous
    setting after. The fastformer attention backward sums dQ with atomics unless it is on (then it
    runs its dQ kernel); warn_only, because other ops timed or run beside it (a float64
    reference in the tests) may have no deterministic kernel."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def cuobjdump() -> str | None:
    """cuobjdump: the copy in Triton's wheel (CUDA toolkits reduced to nvcc lack it), else PATH's."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    return shutil.which("cuobjdump")


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


def _nvidia_driver() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_model()
    return device.type


def without_paths(text: str) -> str:
    """``text`` with the folders of its absolute paths dropped (an import error names the file it
    could not load by its full path): results record no user path."""
    return re.sub(r"(?<![\w.:/])/(?:[^\s/:()'\"]+/)+", "", text)


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
        backends = {name: ("available" if not reasons else without_paths("; ".join(reasons)))
                    for name, reasons in fastformer.available_backends().items()}
    except Exception as exc:  # the environment header must never stop a benchmark
        fastformer_version = without_paths(f"not importable ({type(exc).__name__}: {exc})")
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
        # the fast attention backward sums dQ with atomics unless this is set
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["compute_capability"] = f"{major}.{minor}"
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env["gpu_count"] = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        env["driver"] = _nvidia_driver()
        # float32 matmuls, and fastformer's float32 attention, in TF32 or exact
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        try:  # which CUDA sources the measured kernels were built from (source_digest)
            from fastformer import cuda as cuda_backend

            env["cuda_extension"] = cuda_backend.extension_build_info()
        except Exception:
            env["cuda_extension"] = None
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


def time_interleaved_cpu(fns: Sequence[Callable[[], Any]], *, warmup: int,
                         repeats: int) -> list[dict[str, Any]]:
    """CPU timing of several calls in rounds: each round times every call once, starting one
    further along each time, so that the machine's drift (other processes, frequency changes)
    falls on all of them alike. Returns time_ms's dict for each call, in order."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        for offset in range(len(fns)):
            index = (round_ + offset) % len(fns)
            start = time.perf_counter()
            fns[index]()
            times[index].append((time.perf_counter() - start) * 1e3)
    return [summary_ms(values) for values in times]


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
    only); pct_of_peak: tflops (or gbps) as a percentage of the ceiling measured in the same run
    (:func:`measure_ceilings`); ratio_vs_baseline: baseline ms / this ms (> 1 = faster than the
    baseline); n: timed runs; rel_err: ||out - baseline out|| / ||baseline out|| (None if not
    checked); suite: the shape set ("finetune", "long", ...); group: rows of one group and pass
    form one line per provider in the plot, against ``size`` (sequence length, hidden size);
    note: free text.
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
    pct_of_peak: float | None = None
    peak_mem_mb: float | None = None
    ratio_vs_baseline: float | None = None
    n: int | None = None
    rel_err: float | None = None
    suite: str = ""
    group: str = ""
    size: int | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {("pass" if key == "pass_" else key): value for key, value in out.items()}


COLUMNS = [("pass" if f.name == "pass_" else f.name) for f in dataclasses.fields(Row)]


def set_ratios(rows: Sequence[Row], baseline: str | dict[str, str]) -> None:
    """Fill ratio_vs_baseline: baseline ms / row ms among rows of the same op, shape, dtype, pass.

    ``baseline`` is a provider name, or op -> provider name where each op has its own baseline.
    """
    def base_of(op: str) -> str | None:
        return baseline.get(op) if isinstance(baseline, dict) else baseline

    base = {(r.op, r.shape, r.dtype, r.pass_): r.ms for r in rows if r.provider == base_of(r.op)}
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


def _cells(row: Row) -> dict[str, str]:
    def opt(value, fmt):
        return "-" if value is None else fmt.format(value)

    def rate(value):
        return "-" if value is None else _format_rate(value)

    return {"op": row.op, "provider": row.provider, "shape": row.shape, "dtype": row.dtype,
            "pass": row.pass_, "ms": _format_ms(row.ms), "spread": _format_ms(row.spread),
            "TFLOP/s": rate(row.tflops), "GB/s": rate(row.gbps),
            "% peak": opt(row.pct_of_peak, "{:.1f}"), "peak MiB": opt(row.peak_mem_mb, "{:.1f}"),
            "vs base": opt(row.ratio_vs_baseline, "{:.2f}x"), "rel err": opt(row.rel_err, "{:.1e}"),
            "note": row.note}


_HEADERS = ["op", "provider", "shape", "dtype", "pass", "ms", "spread", "TFLOP/s", "GB/s", "% peak",
            "peak MiB", "vs base", "rel err", "note"]
_RIGHT = {"ms", "spread", "TFLOP/s", "GB/s", "% peak", "peak MiB", "vs base", "rel err"}


def _columns(rows: Sequence[Row], omit: Sequence[str] = ()) -> list[str]:
    """The headers worth showing: no all-empty rate/memory/note column, none in ``omit``."""
    cells = [_cells(r) for r in rows]
    keep = []
    for header in _HEADERS:
        if header in omit:
            continue
        if header in ("TFLOP/s", "GB/s", "% peak", "peak MiB", "rel err", "vs base", "note") and \
                all(c[header] in ("-", "") for c in cells):
            continue
        keep.append(header)
    return keep


def format_table(rows: Sequence[Row], omit: Sequence[str] = ()) -> str:
    """Plain-text table with aligned columns (numbers right-aligned)."""
    headers = _columns(rows, omit)
    table = [headers] + [[_cells(row)[h] for h in headers] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = []
    for number, line in enumerate(table):
        cells = [cell.rjust(w) if h in _RIGHT else cell.ljust(w)
                 for cell, w, h in zip(line, widths, headers)]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _rich_console():
    """A rich Console when rich is importable and stdout is a terminal, else None (plain text)."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console
    except Exception:
        return None
    return Console()


def print_table(rows: Sequence[Row], title: str | None = None, omit: Sequence[str] = ()) -> None:
    """Print the rows: with ``rich`` when it is importable and stdout is a terminal, else plain."""
    if not rows:
        return
    console = _rich_console()
    if console is not None:
        try:
            from rich.table import Table

            headers = _columns(rows, omit)
            table = Table(title=title, title_justify="left")
            for header in headers:
                table.add_column(header, justify="right" if header in _RIGHT else "left")
            for row in rows:
                cells = _cells(row)
                table.add_row(*(cells[h] for h in headers))
            console.print(table)
            return
        except Exception:
            pass
    if title:
        print(title)
    print(format_table(rows, omit))
    print()


def print_grouped(rows: Sequence[Row]) -> None:
    """One table per (op, shape, dtype): providers x passes, shape in the title."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.op, row.shape, row.dtype), []).append(row)
    for (op, shape, dtype), members in groups.items():
        print_table(members, title=f"{op}  {shape}  {dtype}", omit=("op", "shape", "dtype"))


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    return value


def write_json(path: str | os.PathLike, rows: Sequence[Row], env: dict[str, Any],
               **extra: Any) -> None:
    """{"schema_version", "environment", "columns", "rows": [{column: value}], **extra}.

    ``extra`` holds e.g. "ceilings" and "skipped"; parent folders are created.
    """
    payload = {
        "schema_version": JSON_SCHEMA_VERSION,
        "environment": env,
        "columns": COLUMNS,
        "rows": [{k: _json_value(v) for k, v in row.as_dict().items()} for row in rows],
        **extra,
    }
    with _replaced_whole(path) as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


@contextlib.contextmanager
def _replaced_whole(path: str | os.PathLike):
    """A text file written beside ``path`` and moved onto it when complete (parent folders made):
    a run killed while writing leaves the previous version, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", encoding="utf-8", newline="") as f:
        yield f
    os.replace(partial, path)


# What the CSV repeats on every row from the environment (the JSON's "environment"), so that a
# CSV copied on its own still says when, on what and from which commit it was measured.
CSV_ENVIRONMENT_COLUMNS = ["date", "device", "device_type", "driver", "torch", "triton", "cuda_runtime",
                           "fastformer", "git_commit", "command"]


def write_csv(path: str | os.PathLike, rows: Sequence[Row], env: dict[str, Any] | None = None) -> None:
    """One line per row, the columns of :class:`Row` then :data:`CSV_ENVIRONMENT_COLUMNS` (the same
    values on every row, from ``env``); empty cell for None; makes parent dirs."""
    run = {key: ("" if (env or {}).get(key) is None else env[key]) for key in CSV_ENVIRONMENT_COLUMNS}
    with _replaced_whole(path) as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + CSV_ENVIRONMENT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: ("" if v is None else _json_value(v)) for k, v in row.as_dict().items()}, **run})


def markdown_pivot(rows: Sequence[Row], pass_: str, value: str = "ms") -> str:
    """A Markdown table: one line per shape, one column per provider, for one pass.

    ``value``: "ms" (median ms, with the ratio to the baseline) or "rate" (TFLOP/s or GB/s).
    """
    selected = [r for r in rows if r.pass_ == pass_]
    if not selected:
        return ""
    providers = list(dict.fromkeys(r.provider for r in selected))
    suites = {}
    for r in selected:
        suites.setdefault((r.op, r.shape, r.dtype), set()).add(r.suite)

    def shape_of(r):  # the suite too where two suites measured the same shape (else one hides the other)
        return f"{r.shape} ({r.suite})" if len(suites[r.op, r.shape, r.dtype]) > 1 else r.shape

    shapes = list(dict.fromkeys((r.op, shape_of(r), r.dtype) for r in selected))
    cell = {(r.op, shape_of(r), r.dtype, r.provider): r for r in selected}
    lines = ["| op | shape | dtype | " + " | ".join(providers) + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in providers) + " |"]
    for op, shape, dtype in shapes:
        cells = []
        for provider in providers:
            row = cell.get((op, shape, dtype, provider))
            if row is None:
                cells.append("")
                continue
            if value == "rate":
                rate = row.tflops if row.tflops is not None else row.gbps
                text = "-" if rate is None else _format_rate(rate)
            else:
                text = _format_ms(row.ms)
                if row.ratio_vs_baseline is not None:
                    text += f" ({row.ratio_vs_baseline:.2f}x)"
            # A result that differs from the baseline's beyond tolerance is no speed-up.
            cells.append(f"{text} MISMATCH" if row.note.startswith("MISMATCH") else text)
        lines.append(f"| {op} | {shape} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# ceilings: what this device can do, measured in the same run
# --------------------------------------------------------------------------------------------
def measure_ceilings(device: str | torch.device, quick: bool = False) -> dict[str, Any]:
    """The copy bandwidth and the matmul rate of this device, measured now with :func:`time_ms`.

    copy_gbps: bytes read + bytes written per second by ``dst.copy_(src)`` of a large buffer
    (1 GiB on CUDA, 64 MiB on the CPU). matmul_tflops: 2 n^3 / time of an n x n x n product of
    random matrices (bfloat16, n = 8192 on CUDA; float32, n = 1024 on the CPU, where it is the
    reference for the CPU's own rates, not a tensor-core rate).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    generator = torch.Generator(device=device).manual_seed(1234)
    copy_bytes = (2**30 if not quick else 2**29) if cuda else 64 * 2**20
    repeats = 10 if quick else 30
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32

    def time_copy():
        src = torch.rand(copy_bytes // 4, device=device, generator=generator)
        dst = torch.empty_like(src)
        return time_ms(lambda: dst.copy_(src), warmup=3, repeats=repeats, device=device)

    def time_matmul():
        a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        return time_ms(lambda: a @ b, warmup=3, repeats=repeats, device=device)

    copy = time_copy()  # each buffer is freed when its function returns
    matmul = time_matmul()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "copy_gbps": 2 * copy_bytes / (copy["median"] * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_tflops": 2 * n**3 / (matmul["median"] * 1e-3) / 1e12,
        "matmul_shape": f"{n}x{n}x{n}",
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "method": "median of timed runs of dst.copy_(src) and a @ b on random data",
    }


def format_ceilings(ceilings: dict[str, Any]) -> str:
    return (f"ceilings measured now: copy {ceilings['copy_gbps']:.0f} GB/s "
            f"({ceilings['copy_bytes'] / 2**20:.0f} MiB buffer), matmul "
            f"{ceilings['matmul_tflops']:.3g} TFLOP/s ({ceilings['matmul_dtype']} "
            f"{ceilings['matmul_shape']})")


# --------------------------------------------------------------------------------------------
# running providers: time budget, SIGTERM, skipped providers, one measurement per pass
# --------------------------------------------------------------------------------------------
class Stop(BaseException):
    """Raised by the SIGTERM handler, so that a script killed by `timeout` still writes results.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way (an
    autotuner's, a provider's) swallows it.
    """


def install_sigterm_handler() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise Stop(f"signal {signum}")
    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread
        pass


# How errors that leave the CUDA context unusable read: torch's "CUDA error: ...", Triton's launcher's
# "Triton Error [CUDA]: ...", and cuBLAS failing after an earlier kernel's fault.
_LOST_CONTEXT_ERRORS = ("CUDA error", "Triton Error [CUDA]", "device-side assert", "illegal memory access",
                        "CUBLAS_STATUS_EXECUTION_FAILED", "CUBLAS_STATUS_INTERNAL_ERROR")


def fatal_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the CUDA context unusable: every later call would fail too. Running
    out of memory does not (the provider is skipped, the next one runs)."""
    text = str(exc)
    if "out of memory" in text.lower():
        return False
    return type(exc).__name__ == "AcceleratorError" or any(error in text for error in _LOST_CONTEXT_ERRORS)


def guarded(what: str, failures: dict[str, str], bench: Callable[..., list], *args) -> tuple[list, bool]:
    """Run one shape's benchmark, ``bench(*args)``; an exception that escapes it (the baseline failing, a CUDA
    error) becomes a failure entry instead of ending the script. Returns (rows, keep_going):
    after a CUDA error the device is unusable, so the script should stop and write what it has
    (with the rows the shape measured before the error, which run_providers attaches)."""
    try:
        return bench(*args), True
    except Exception as exc:
        message = first_line(exc)
        failures[what] = message
        print(f"FAILED {what}: {message}")
        fatal = fatal_device_error(exc)
        if fatal:
            print("stopping: the CUDA context cannot be trusted after this error")
        return getattr(exc, "partial_rows", []), not fatal


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): imports and CUDA's start-up count
    against a run's budget too."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


class Budget:
    """Wall-clock budget of a run (``--max-seconds``, counted from the process's start): scripts
    stop starting new shapes once the next one, assumed to take as long as the longest so far,
    would end past it."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic() - _process_age()
        self.longest_case = 0.0
        self.stopped_early = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def case_took(self, seconds: float) -> None:
        self.longest_case = max(self.longest_case, seconds)

    def exhausted(self) -> bool:
        if self.seconds is not None and self.elapsed() + self.longest_case > self.seconds:
            self.stopped_early = True
        return self.stopped_early


class Skips:
    """Providers that could not run, with reasons; printed once per (provider, reason)."""

    def __init__(self):
        self.entries: list[dict[str, str]] = []

    def add(self, provider: str, shape: str, reason: str) -> None:
        self.entries.append({"provider": provider, "shape": shape, "reason": reason})

    def summary(self) -> list[str]:
        counts: dict[tuple[str, str], int] = {}
        for entry in self.entries:
            key = (entry["provider"], entry["reason"])
            counts[key] = counts.get(key, 0) + 1
        return [f"{provider}: {reason}" + (f" ({count} shapes)" if count > 1 else "")
                for (provider, reason), count in counts.items()]

    def print(self) -> None:
        lines = self.summary()
        if lines:
            print("skipped:")
            for line in lines:
                print("  - " + line)


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return f"{type(exc).__name__}: {message}"[:limit]


# Tolerated relative error of residual_layer_norm and bias_gelu against the eager baseline: twice
# DESIGN.md's against float64 (one row there for both ops): (forward, input gradients, weight and
# bias gradients: reductions over all rows).
NORM_AND_GELU_TOLERANCES = {torch.float16: (4e-2, 8e-2, 4e-1), torch.bfloat16: (4e-2, 8e-2, 4e-1),
                            torch.float32: (2e-4, 2e-3, 2e-3), torch.float64: (1e-8, 1e-8, 1e-8)}


def relative_error(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||x - ref|| / max(||ref||, floor) (the plain difference when that is 0)."""
    x, ref = x.detach().double(), ref.detach().double()
    denominator = max(ref.norm().item(), floor)
    difference = (x - ref).norm().item()
    return difference / denominator if denominator > 0 else difference


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def outputs_and_grads(fn: Callable[[], Any], grad_inputs: Sequence[torch.Tensor],
                      grad_outputs: Sequence[torch.Tensor], backward: bool):
    outs = _as_tuple(fn())
    grads = None
    if backward:
        grads = torch.autograd.grad(outs, list(grad_inputs), list(grad_outputs), allow_unused=True)
    return [o.detach() for o in outs], grads


def compare(fn, baseline_fn, grad_inputs, grad_outputs, passes: Sequence[str],
            baseline_grad_inputs=None, param_grads_from: int | None = None) -> dict[str, float]:
    """pass -> relative error against the baseline (forward: worst output; backward: worst grad).

    ``baseline_grad_inputs``: what the baseline's gradients are taken w.r.t., when not the same
    tensors (e.g. each module's own parameters, in the same order); default ``grad_inputs``.
    ``param_grads_from``: the gradients from this index on are of weights and biases (sums over
    every row, with a looser tolerance): their worst error goes under "params", not the passes.
    """
    backward = any(p != "fwd" for p in passes)
    if baseline_grad_inputs is None:
        baseline_grad_inputs = grad_inputs
    outs, grads = outputs_and_grads(fn, grad_inputs, grad_outputs, backward)
    ref_outs, ref_grads = outputs_and_grads(baseline_fn, baseline_grad_inputs, grad_outputs, backward)
    errors = {p: max(relative_error(o, r) for o, r in zip(outs, ref_outs)) for p in passes}
    if backward:
        split = len(grads) if param_grads_from is None else param_grads_from
        pairs = [(i, g, r) for i, (g, r) in enumerate(zip(grads, ref_grads)) if g is not None and r is not None]
        inputs_error = max((relative_error(g, r) for i, g, r in pairs if i < split), default=0.0)
        errors.update({pass_: inputs_error for pass_ in passes if pass_ != "fwd"})
        if param_grads_from is not None:
            errors["params"] = max((relative_error(g, r) for i, g, r in pairs if i >= split), default=0.0)
    return errors


def pass_call(fn: Callable[[], Any], grad_inputs, grad_outputs, pass_: str) -> Callable[[], Any]:
    """The function to time for one pass: "fwd" (graph recorded, as in training), "bwd" (through
    a graph kept from one forward, retain_graph=True) or "fwd+bwd". Gradients come from
    torch.autograd.grad, so nothing accumulates in .grad between runs."""
    grad_inputs, grad_outputs = list(grad_inputs), list(grad_outputs)
    if pass_ == "fwd":
        return fn
    if pass_ == "bwd":
        outs = _as_tuple(fn())
        return lambda: torch.autograd.grad(outs, grad_inputs, grad_outputs, retain_graph=True,
                                           allow_unused=True)
    return lambda: torch.autograd.grad(_as_tuple(fn()), grad_inputs, grad_outputs, allow_unused=True)


def measure_passes(fn, grad_inputs, grad_outputs, passes, *, device, warmup, repeats,
                   make_row: Callable[[str, dict, float | None], Row]) -> list[Row]:
    """Time each pass; ``make_row(pass_, timing, peak_mb)`` turns the numbers into a Row."""
    rows = []
    for pass_ in passes:
        call = pass_call(fn, grad_inputs, grad_outputs, pass_)
        timing = time_ms(call, warmup=warmup, repeats=repeats, device=device)
        peak = peak_memory_mb(call, device)
        del call  # frees the graph kept for "bwd"
        rows.append(make_row(pass_, timing, peak))
    return rows


def rate_fields(work: float, kind: str, ms: float, ceilings: dict[str, Any] | None) -> dict[str, Any]:
    """tflops (kind "flops") or gbps (kind "bytes") of ``work`` done in ``ms``, and pct_of_peak."""
    if not ms > 0 or work <= 0:
        return {}
    if kind == "flops":
        tflops = work / (ms * 1e-3) / 1e12
        peak = ceilings.get("matmul_tflops") if ceilings else None
        return {"tflops": tflops, "pct_of_peak": 100.0 * tflops / peak if peak else None}
    gbps = work / (ms * 1e-3) / 1e9
    peak = ceilings.get("copy_gbps") if ceilings else None
    return {"gbps": gbps, "pct_of_peak": 100.0 * gbps / peak if peak else None}


def run_providers(op: str, providers: dict[str, Callable], baseline: str, grad_inputs, grad_outputs,
                  args, *, label: str, suite: str, group: str, size: int | None,
                  work: dict[str, float] | None, kind: str, tolerances: tuple[float, ...],
                  check: bool, skips: Skips, failures: dict[str, str],
                  refusal: Callable[[str, BaseException, list], str | None] | None = None,
                  param_grads_from: int | None = None) -> list[Row]:
    """Check and time every provider of one shape, the baseline first (it must run).

    ``tolerances``: (forward, gradients) or, with ``param_grads_from`` (see :func:`compare`),
    (forward, input gradients, weight and bias gradients); the rows' ``rel_err`` of a backward
    pass is that of the input gradients, and a note says when a weight or bias gradient is off.
    ``grad_inputs``: the tensors gradients are taken w.r.t., or provider -> such a list.
    ``work``: pass -> FLOPs (``kind="flops"``) or bytes (``kind="bytes"``), None for no rate.
    ``refusal(name, exc, caught_warnings)``: the reason when a provider merely does not support
    the inputs (listed as skipped); other exceptions are failures (listed, exit status 1).
    Rows get ratio_vs_baseline against the baseline of the same pass. On the CPU all providers'
    passes are timed together, interleaved (:func:`time_interleaved_cpu`), after every check.
    """
    import warnings

    rows: list[Row] = []
    baseline_fn = providers[baseline]
    args_ceilings = getattr(args, "ceilings", None)
    interleave = torch.device(args.device).type == "cpu"
    deferred = []  # CPU: (pass call, make_row, pass) of each checked provider, timed together

    def inputs_of(name):
        return grad_inputs[name] if isinstance(grad_inputs, dict) else grad_inputs

    for name, fn in providers.items():
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                errors = None
                if check and name != baseline:
                    errors = compare(fn, baseline_fn, inputs_of(name), grad_outputs, args.passes,
                                     baseline_grad_inputs=inputs_of(baseline),
                                     param_grads_from=param_grads_from)
                else:  # run once anyway: compiles, autotunes, and shows a refusal before timing
                    outputs_and_grads(fn, inputs_of(name), grad_outputs, False)
                first_s = time.perf_counter() - start
                # What a provider warns is seen by now: recording it again at every timed call
                # would cost inside the measurement.
                warnings.simplefilter("ignore")

                def make_row(pass_, timing, peak, name=name, errors=errors, first_s=first_s):
                    ms = timing["median"]
                    rel_err = None if errors is None else errors.get(pass_)
                    notes = []
                    if rel_err is not None:
                        tolerance = tolerances[0 if pass_ == "fwd" else 1]
                        if not rel_err <= tolerance:
                            notes.append(f"MISMATCH (tolerance {tolerance:g})")
                        params_err = errors.get("params")
                        if pass_ != "fwd" and params_err is not None and not params_err <= tolerances[2]:
                            notes.append(f"MISMATCH of a weight/bias gradient ({params_err:.2g}, "
                                         f"tolerance {tolerances[2]:g})")
                    if "compile" in name and pass_ == args.passes[0]:
                        notes.append(f"first call {first_s:.1f} s")
                    rates = rate_fields(work[pass_], kind, ms, args_ceilings) if work else {}
                    return Row(op=op, provider=name, shape=label, dtype=args.dtype, pass_=pass_,
                               ms=ms, spread=timing["p80"] - timing["p20"], peak_mem_mb=peak,
                               n=timing["n"], rel_err=rel_err, suite=suite, group=group, size=size,
                               note="; ".join(notes), **rates)

                if interleave:
                    deferred += [(pass_call(fn, inputs_of(name), grad_outputs, pass_), make_row, pass_)
                                 for pass_ in args.passes]
                else:
                    rows += measure_passes(fn, inputs_of(name), grad_outputs, args.passes,
                                           device=args.device, warmup=args.warmup,
                                           repeats=args.repeats, make_row=make_row)
            except Stop as stop:  # keep what this shape measured so far
                set_ratios(rows, baseline)
                stop.partial_rows = rows
                raise
            except torch.cuda.OutOfMemoryError as exc:
                if name == baseline:  # every other provider is compared with it: a failed shape
                    raise
                skips.add(name, label, f"out of memory ({first_line(exc, 120)})")
            except Exception as exc:
                if name == baseline:
                    raise
                if fatal_device_error(exc):  # the providers after it would fail for its fault
                    failures[f"{name} {label}"] = first_line(exc)
                    print(f"FAILED {name} on {label}: {first_line(exc)}")
                    set_ratios(rows, baseline)
                    exc.partial_rows = rows
                    raise
                reason = refusal(name, exc, caught) if refusal is not None else None
                if reason is not None:
                    skips.add(name, label, reason)
                else:
                    failures[f"{name} {label}"] = first_line(exc)
                    print(f"FAILED {name} on {label}: {first_line(exc)}")
            finally:
                if torch.device(args.device).type == "cuda":
                    try:  # after a CUDA error this fails too, and must not hide that error
                        torch.cuda.empty_cache()
                    except Exception:  # noqa: BLE001
                        pass
    if deferred:
        timings = time_interleaved_cpu([call for call, _, _ in deferred], warmup=args.warmup,
                                       repeats=args.repeats)
        rows += [make_row(pass_, timing, None) for (_, make_row, pass_), timing in zip(deferred, timings)]
    set_ratios(rows, baseline)
    return rows


def compile_fn(fn: Callable, **kwargs) -> Callable:
    """torch.compile(fn) with a larger recompile cache (one graph per benchmarked shape).

    Donated buffers are turned off: the "bwd" pass runs the backward of one graph repeatedly
    (retain_graph=True), which a backward with donated buffers refuses.
    """
    try:
        import torch._functorch.config

        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
    except Exception:
        pass
    try:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 1024)
    except Exception:
        pass
    return torch.compile(fn, **kwargs)


def optional_import(name: str):
    """The module, or None when it is not installed or fails to import (optional providers)."""
    try:
        return __import__(name, fromlist=["_"])
    except Exception:
        return None


# What "% of peak" is against on the CPU, by the kind of rate (rate_fields's ``kind``).
_CPU_PEAKS = {
    "bytes": "a large (DRAM) copy, which inputs that stay in the CPU's caches can exceed.",
    "flops": "a float32 matmul measured in the same run (a reference for this CPU, not a peak: rows "
             "can exceed it).",
}


def cpu_notice(device: torch.device, rate_kind: str = "bytes") -> str | None:
    """The warning of a CPU run; ``rate_kind`` ("bytes" or "flops") says what % of peak is against."""
    if torch.device(device).type == "cuda":
        return None
    return ("NOTE: no GPU used: these are CPU timings of the CPU code paths (PyTorch's CPU kernels, "
            "the fastformer torch backend). The GPU kernels (fastformer's Triton and CUDA backends, "
            "SDPA's flash / efficient / cuDNN kernels) were NOT measured. % of peak is against "
            + _CPU_PEAKS[rate_kind])


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
# What matplotlib writes without extras, for checking --plot where it is not importable (the plot is
# then skipped with a message, but a run on a machine without it must not fail on the name).
_PLOT_FORMATS = ("eps", "jpeg", "jpg", "pdf", "png", "ps", "raw", "rgba", "svg", "svgz", "tif", "tiff", "webp")


def plot_formats() -> list[str]:
    """The file extensions (formats) matplotlib can write, without the dot."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase

        return sorted(FigureCanvasBase.get_supported_filetypes())
    except Exception:
        return list(_PLOT_FORMATS)


def check_plot_path(parser, path: str | os.PathLike | None) -> Path | None:
    """``--plot PATH`` checked when the arguments are parsed, so that a name matplotlib cannot write
    stops the script before the run rather than after it: ``parser.error`` for a folder or an
    extension that names no format matplotlib writes. A name without an extension gets ".png"
    (matplotlib's default format, which it would append itself), so that the name reported is
    the file written. None stays None. Usage, after ``args = parser.parse_args()``:
    ``args.plot = common.check_plot_path(parser, args.plot)``.
    """
    if path is None:
        return None
    plot = Path(path)
    if str(path).strip() in ("", ".") or plot.is_dir():
        parser.error(f"--plot {str(path)!r}: expected a file name (e.g. results.png), not a folder")
    suffix = plot.suffix[1:].lower()
    if not suffix:
        return plot.with_name(plot.name + ".png")
    formats = plot_formats()
    if suffix not in formats:
        parser.error(f"--plot {str(path)!r}: matplotlib cannot write .{suffix} files "
                     f"(extensions it writes: {', '.join(formats)})")
    return plot


def plot_rows(rows: Sequence[Row], path: str | os.PathLike, *, x_label: str, title: str,
              passes: Sequence[str] = ("fwd", "fwd+bwd")) -> bool:
    """A chart (PNG, or the format of ``path``'s extension): one panel per (group, pass), rate
    (TFLOP/s, else GB/s) against ``size``, one line per provider. Rows with no group or no size,
    or of another pass, are left out. False (and a message) without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"no plot: matplotlib is not importable ({first_line(exc)})")
        return False
    plotted = [r for r in rows if r.group and r.size is not None and (r.tflops or r.gbps)]
    if any(r.pass_ in passes for r in plotted):
        plotted = [r for r in plotted if r.pass_ in passes]  # else the passes measured (e.g. --passes bwd)
    if not plotted:
        print("no plot: no rows with a group, a size and a rate")
        return False
    panels = list(dict.fromkeys((r.group, r.pass_) for r in plotted))
    providers = list(dict.fromkeys(r.provider for r in plotted))
    colours = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (group, pass_) in zip(axes.flat, panels):
        members = [r for r in plotted if r.group == group and r.pass_ == pass_]
        unit = "TFLOP/s" if any(r.tflops for r in members) else "GB/s"
        for provider in providers:
            points = sorted((r.size, r.tflops if unit == "TFLOP/s" else r.gbps)
                            for r in members if r.provider == provider)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        label=provider, color=colours[provider])
        ax.set_xscale("log", base=2)
        ax.set_title(f"{group} ({pass_})", fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 5), 1, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# command line shared by the scripts
# --------------------------------------------------------------------------------------------
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


def parse_passes(text: str) -> list[str]:
    import argparse

    passes = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in passes if p not in PASSES]
    if bad or not passes:
        raise argparse.ArgumentTypeError(f"passes must be a comma-separated list of {PASSES}, got {text!r}")
    return list(dict.fromkeys(passes))


def int_list(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def add_common_arguments(parser) -> None:
    """--device --dtype --passes --providers --repeats --warmup --quick --max-seconds --seed
    --json --csv --plot --no-ceilings --threads."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device,
                        help=f"device to benchmark on (default: {default_device})")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="input dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--passes", type=parse_passes, default=list(PASSES),
                        help="comma-separated passes among fwd, bwd, fwd+bwd (default: all three)")
    parser.add_argument("--providers", help="comma-separated substrings: run only providers whose "
                                            "name contains one of them (the baseline always runs)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, help="untimed runs before the timed ones")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (smoke run)")
    parser.add_argument("--max-seconds", type=float,
                        help="stop starting new shapes when the next one, taken to last as long as the "
                             "longest so far, would end past this many seconds from the start of the "
                             "process (results so far are still printed and written)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write environment, ceilings and rows as JSON")
    parser.add_argument("--csv", metavar="PATH",
                        help="write the rows as CSV, each with the run's date, device, versions, commit and command")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a chart (needs matplotlib) in the format its extension names (.png, "
                             ".svg, .pdf, ...); a PATH without one is written as PATH.png")
    parser.add_argument("--no-ceilings", action="store_true",
                        help="skip measuring the copy bandwidth and matmul rate (no %% of peak)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of PyTorch (torch.set_num_threads; default: PyTorch's "
                             "choice). 1 gives steadier CPU timings on a machine shared with other "
                             "work, where spinning OpenMP threads can slow small ops many times over")


def resolve_common_arguments(parser, args, *, cuda_repeats=(100, 20), cpu_repeats=(10, 3),
                             providers: Sequence[str] = ()) -> None:
    """Validate --device, --providers (against ``providers``, every name the script knows) and
    --plot (:func:`check_plot_path`), apply --threads, fill --dtype / --repeats / --warmup
    defaults, set args.torch_dtype."""
    if args.providers is not None and not _selection_parts(args.providers):
        # An empty list would select nothing but the baseline: a run that compares nothing.
        parser.error(f"--providers {args.providers!r} names no provider (omit it to run them all)")
    unknown = unmatched_selection(args.providers, providers) if providers else []
    if unknown:
        parser.error(f"--providers: {', '.join(map(repr, unknown))} names no provider of this script "
                     f"(known: {', '.join(providers)})")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = device
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    full, quick = cuda_repeats if cuda else cpu_repeats
    if args.repeats is None:
        args.repeats = quick if args.quick else full
    if args.warmup is None:
        args.warmup = (5 if cuda else 1) if args.quick else (10 if cuda else 2)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("need --repeats >= 1 and --warmup >= 0")
    args.torch_dtype = DTYPES[args.dtype]
    args.plot = check_plot_path(parser, args.plot)


def _selection_parts(selection: str) -> list[str]:
    """--providers "a, b": each part selects the providers whose names contain it."""
    return [part.strip() for part in selection.split(",") if part.strip()]


def wanted(provider: str, selection: str | None, baseline: str | Sequence[str]) -> bool:
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    if selection is None or provider in baselines:
        return True
    return any(part in provider for part in _selection_parts(selection))


def unmatched_selection(selection: str | None, providers: Sequence[str]) -> list[str]:
    """The parts of ``--providers`` that name none of ``providers`` (every provider the script
    knows, runnable here or not): a typo would otherwise leave a run that compares nothing."""
    if selection is None:
        return []
    return [part for part in _selection_parts(selection) if not any(part in name for name in providers)]


def fastformer_backends() -> list[str]:
    """fastformer's backends in the order the scripts run them: the hand-written CUDA kernels last,
    so that a memory fault in one (it ends the run: the CUDA context is lost) costs no other
    provider's rows of that shape."""
    import fastformer

    return sorted(fastformer.available_backends(), key=lambda backend: backend == "cuda")


def fastformer_backends_for(op, *args, **kwargs) -> tuple[list[str], dict[str, list[str]]]:
    """(backends that can take this call, backend -> reasons for those that cannot)."""
    import fastformer

    usable, reasons = [], {}
    for backend, unavailable in fastformer.available_backends().items():
        if unavailable:
            reasons[backend] = list(unavailable)
            continue
        try:
            fastformer.explain(op, *args, backend=backend, **kwargs)
        except fastformer.BackendUnavailableError as exc:
            lines = [line.strip()[2:] for line in str(exc).splitlines() if line.strip().startswith("- ")]
            reasons[backend] = lines or [str(exc)]
            continue
        usable.append(backend)
    return usable, reasons


def finish(rows: Sequence[Row], env: dict[str, Any], args, *, ceilings, skips: Skips,
           budget: Budget, plot_x_label: str, plot_title: str, failures: dict[str, str],
           rate_kind: str = "bytes") -> None:
    """Print the skipped providers and write --json / --csv / --plot."""
    skips.print()
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    mismatches = sorted({f"{r.provider} {r.pass_}" for r in rows if r.note.startswith("MISMATCH")})
    if mismatches:
        print("WARNING: results differ from the baseline beyond tolerance: " + ", ".join(mismatches))
    if budget.stopped_early:
        print(f"stopped early after {budget.elapsed():.0f} s (--max-seconds, a signal or a CUDA error): "
              "the shapes not reached were not measured")
    notice = cpu_notice(args.device, rate_kind)
    if notice:
        print(notice)
    save_rows(rows, env, args, ceilings=ceilings, skips=skips, budget=budget, failures=failures)
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {path}")
    if args.plot and plot_rows(rows, args.plot, x_label=plot_x_label, title=plot_title):
        print(f"wrote {args.plot}")


def save_rows(rows: Sequence[Row], env: dict[str, Any], args, *, ceilings, skips: Skips, budget: Budget,
              failures: dict[str, str], final: bool = True) -> None:
    """--json and --csv of the rows so far: after each shape (``final`` False), so that a run
    killed in a hung kernel keeps what it measured, and at the end."""
    extra = {"ceilings": ceilings, "skipped": skips.entries, "failures": failures,
             "stopped_early": budget.stopped_early, "elapsed_s": round(budget.elapsed(), 1),
             "gpu_kernels_measured": torch.device(args.device).type == "cuda", "final": final}
    if args.json:
        write_json(args.json, rows, env, **extra)
    if args.csv:
        write_csv(args.csv, rows, env)


# --------------------------------------------------------------------------------------------
# the main loop every benchmark script shares
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One shape of a script: ``bench(skips, failures)`` measures every provider, returns rows."""

    label: str  # names the shape in failure entries
    bench: Callable[["Skips", dict], list]


def run_cases(args, cases: Sequence[Case], *, baseline: str, plot_x_label: str, plot_title: str,
              summary_ops: set[str] | None = None, timing_note: str = "",
              rate_kind: str = "bytes") -> int:
    """Environment and ceilings, then each case under the time budget (a failing case is recorded
    and the run goes on; SIGTERM or Ctrl-C still writes what was measured), a table per op of each
    case, the summary pivots (of ``summary_ops``, or every op), and --json / --csv / --plot.

    ``plot_title`` may name ``{device}``; ``rate_kind``: the cases' rates, "bytes" (GB/s, % of the
    copy) or "flops" (TFLOP/s, % of the matmul), for the CPU notice. Returns the exit status: 1 if
    a case failed, 143 / 130 after SIGTERM / Ctrl-C (the files are still written).
    """
    install_sigterm_handler()
    budget = Budget(args.max_seconds)
    env = environment(args.device)
    print(format_environment(env))
    notice = cpu_notice(args.device, rate_kind)
    if notice:
        print(notice)
    args.ceilings = None if args.no_ceilings else measure_ceilings(args.device, args.quick)
    if args.ceilings:
        print(format_ceilings(args.ceilings))
    print(f"timing: {args.repeats} runs after {args.warmup} warm-up runs per measurement; "
          f"passes: {', '.join(args.passes)}{timing_note}\n")
    rows: list[Row] = []
    skips, failures = Skips(), {}
    interrupted = 0  # the exit status of a run cut short by a signal: 128 + its number, as a shell's
    try:
        for number, case in enumerate(cases, 1):
            if budget.exhausted():
                break
            started = time.monotonic()
            new, keep_going = guarded(case.label, failures, case.bench, skips, failures)
            budget.case_took(time.monotonic() - started)
            rows += new  # after an error that ends the run too: what the case measured before it
            save_rows(rows, env, args, ceilings=args.ceilings, skips=skips, budget=budget, failures=failures,
                      final=False)
            if not keep_going:
                budget.stopped_early = True
                break
            for op in dict.fromkeys(r.op for r in new):
                members = [r for r in new if r.op == op]
                print_table(members, title=f"[{number}/{len(cases)}, {budget.elapsed():.0f} s] {op}  "
                                           f"{members[0].shape}  {args.dtype}", omit=("op", "shape", "dtype"))
    except (Stop, KeyboardInterrupt) as exc:
        rows += getattr(exc, "partial_rows", [])
        budget.stopped_early = True
        interrupted = 128 + (signal.SIGTERM if isinstance(exc, Stop) else signal.SIGINT)
        print(f"interrupted ({exc or type(exc).__name__}): writing the results so far")
    for pass_ in args.passes:
        table = markdown_pivot([r for r in rows if summary_ops is None or r.op in summary_ops], pass_)
        if table:
            print(f"\nsummary, {pass_}: ms (speed-up vs {baseline})")
            print(table)
    print()
    finish(rows, env, args, ceilings=args.ceilings, skips=skips, budget=budget, plot_x_label=plot_x_label,
           failures=failures, plot_title=plot_title.format(device=env["device"]), rate_kind=rate_kind)
    return interrupted or (1 if failures else 0)
