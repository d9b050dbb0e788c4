"""Outputs of the fine-tuning benchmark: progress bars, environment, table, JSON, plots.

tqdm, rich and matplotlib are optional: without them progress is a line every 10%, the table is
plain text and ``--plot`` is skipped with a warning.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable

import torch

import common  # benchmarks/common.py: finetune.py and the tests put benchmarks/ on sys.path

REPO_ROOT = common.REPO_ROOT


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------
class _PlainProgress:
    """A minimal stand-in for tqdm: one line to stderr every 10% (only when stderr is a terminal
    is a live bar worth it, and then tqdm is what we use)."""

    def __init__(self, iterable: Iterable, total: int | None, desc: str, enabled: bool):
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def __iter__(self):
        start, next_report = time.perf_counter(), 0.1
        for done, item in enumerate(self.iterable, start=1):
            yield item
            if self.enabled and self.total and done / self.total >= next_report - 1e-9:
                next_report += 0.1
                print(f"  {self.desc}: {done}/{self.total} ({time.perf_counter() - start:.0f} s) {self.postfix}",
                      file=sys.stderr, flush=True)

    def set_postfix(self, refresh: bool = False, **values):
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self):
        pass


def progress(iterable: Iterable, desc: str, enabled: bool = True, leave: bool = True, total: int | None = None):
    """tqdm when installed, else :class:`_PlainProgress`; nothing shown when not ``enabled``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(iterable, total, desc, enabled)
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=leave, dynamic_ncols=True,
                mininterval=1.0)


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def environment(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """What a run was measured on: the benchmarks' common record (versions, device, commit,
    command; no host names, no paths) plus what training adds."""
    env = common.environment(device)
    env["world_size"] = world_size
    env["tokenizers"] = common._version("tokenizers")
    env["transformers"] = common._version("transformers")
    if device.type == "cuda":
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        env["cpu_count"] = os.cpu_count()
    if hasattr(os, "getloadavg"):  # other work on the machine slows a run down: say how much there was
        env["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    return env


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------
def _finite(value) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


# What the time-share columns hold: ops are attributed by name, and a fused op does more than its
# name says; the step time is the comparable total.
SHARES_NOTE = ("Time shares by op name: fastformer's LayerNorm column holds the dropout and residual add it "
               "fuses, its GELU column the activation dropout it fuses and the bias add where bias_gelu "
               "takes it (kernel backends); the torch variant counts its dropout and add in 'rest', its "
               "bias in the GEMM. A backward op with a generic name (BmmBackward0) counts where its forward op "
               "did. Compare totals by step time.")
COMPILED_SHARES_NOTE = ("Time shares by kernel name, under torch.compile: a generated kernel fusing several ops "
                        "counts as attention if its name mentions it, else LayerNorm, else GELU, so the torch "
                        "variant's dropout and residual adds can count as LayerNorm, as fastformer's do. Compare "
                        "totals by step time.")


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["variant", "tokens/s", "padding", "speedup", "step ms (p20-p80)", "peak MiB", "attention", "LayerNorm",
               "GELU", "rest", "GPU busy", "test acc", "backends"]
    rows = []
    base = _finite(results.get("variants", {}).get("torch", {}).get("tokens_per_s"))
    for name, run in results.get("variants", {}).items():
        shares = (run.get("time_shares") or {}).get("shares", {})
        busy = _finite((run.get("time_shares") or {}).get("gpu_busy"))  # GPU runs only
        step = run.get("step_ms", {})
        rate = _finite(run.get("tokens_per_s"))  # NaN when no step was timed
        speedup = rate / base if base and rate is not None else None
        used = ", ".join(f"{op}: {'/'.join(entry['calls'])}" for op, entry in run.get("backends", {}).items())
        padding = _finite(run.get("padding_fraction"))
        rows.append([
            name, _fmt(rate, ",.0f"),
            "-" if padding is None else _fmt(100 * padding, ".0f") + "%",
            "-" if speedup is None else _fmt(speedup, ".2f") + "x",
            f"{_fmt(step.get('median'), '.1f')} ({_fmt(step.get('p20'), '.1f')}-{_fmt(step.get('p80'), '.1f')})",
            _fmt(run.get("peak_memory_mib"), ",.0f"),
            *(_fmt(100 * shares[k], ".1f") + "%" if k in shares and math.isfinite(shares[k]) else "-"
              for k in ("attention", "layer_norm", "gelu", "rest")),
            "-" if busy is None else _fmt(100 * busy, ".0f") + "%",
            _fmt(100 * run["test_accuracy"], ".2f") + "%" if run.get("test_accuracy") is not None else "-",
            used or "-"])
    return headers, rows


# The README's table of fine-tuning results: one row per results file, every cell read from it.
README_HEADERS = ["run", "device", "date, commit", "tokens/s torch", "tokens/s fastformer", "speedup",
                  "test accuracy torch / fastformer", "equivalence"]


def readme_row(results: dict, file_name: str) -> list[str]:
    """The README's row for one results JSON (``README_HEADERS``)."""
    env, config, data = results["environment"], results["config"], results.get("data", {})
    variants, equivalence = results["variants"], results.get("equivalence") or {}
    run = " ".join([config["model"]] + [f"--{flag}" for flag in ("quick", "compile") if config.get(flag)])
    reviews = f"{data['train']['reviews']:,} / {data['test']['reviews']:,} reviews" if "train" in data else "-"
    accuracies = [variants[name].get("test_accuracy") for name in ("torch", "fastformer")]
    verdict = ("passed" if equivalence.get("passed") else "failed") if equivalence else "not run"
    if equivalence.get("max_relative_difference") is not None:
        verdict += f" ({equivalence['max_relative_difference']:.1e})"
    return [f"`{file_name}`: {run} ({reviews})",
            f"{env['device']} ({env['device_type']}, {env.get('cpu_threads', '-')} threads)"
            if env["device_type"] == "cpu" else env["device"],
            f"{env['date'][:10]}, {env['git_commit']}",
            *(_fmt(_finite(variants[name].get("tokens_per_s")), ",.0f") for name in ("torch", "fastformer")),
            _fmt(_finite(results["comparison"].get("speedup_tokens_per_s")), ".2f") + "x",
            " / ".join("-" if a is None else f"{100 * a:.2f}%" for a in accuracies),
            verdict]


def heading(results: dict) -> str:
    """The run's title, marked when the run was stopped before its end."""
    title = results.get("title", "IMDB fine-tuning")
    return f"{title} (INTERRUPTED)" if results.get("interrupted") else title


def provenance(results: dict) -> str:
    """One line of where the numbers come from: date, device, versions, commit, command."""
    env = results.get("environment", {})
    return (f"{env.get('date', '?')}, {env.get('device', '?')}, torch {env.get('torch', '?')}, "
            f"triton {env.get('triton') or '-'}, fastformer {env.get('git_commit', '?')}: "
            f"`{env.get('command', '?')}`")


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(results: dict, title: str) -> None:
    headers, rows = table_rows(results)
    note = shares_note(results)
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title)
            for header in headers:
                table.add_column(header)
            for row in rows:
                table.add_row(*row)
            Console().print(table)
            if note:
                print(note)
            return
        except ImportError:
            pass
    print(title)
    print(format_table(headers, rows))
    if note:
        print(note)


def shares_note(results: dict) -> str:
    """What the time-share columns hold (:data:`SHARES_NOTE`, or :data:`COMPILED_SHARES_NOTE` for
    variants trained under torch.compile) when a variant has time shares, else why none has ("" if
    none was asked for)."""
    variants = results.get("variants", {}).values()
    if not any((run.get("time_shares") or {}).get("shares") for run in variants):
        reasons = [(run.get("time_shares") or {}).get("note") for run in variants]
        return next((f"Time shares {reason}." for reason in reasons if reason), "")
    return COMPILED_SHARES_NOTE if any(run.get("compile") for run in variants) else SHARES_NOTE


# --------------------------------------------------------------------------------------------
# JSON and plots
# --------------------------------------------------------------------------------------------
def _clean(value):
    """JSON-safe: NaN/inf -> None, tuples -> lists, dict keys -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | os.PathLike, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(results), f, indent=1)
        f.write("\n")


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_plot(path: str | os.PathLike, results: dict) -> bool:
    """Loss curves of the variants on one chart; tokens/s and time shares as bars. False (with a
    warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: --plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr)
        return False
    variants = results.get("variants", {})
    colours = {"torch": "tab:blue", "fastformer": "tab:orange"}
    figure, (curves, speed, shares) = plt.subplots(1, 3, figsize=(16, 4.5),
                                                    gridspec_kw={"width_ratios": [2.2, 1, 1.2]})
    for name, run in variants.items():
        losses = run.get("losses") or []
        window = max(1, len(losses) // 50)
        curves.plot(range(1, len(losses) + 1), losses, color=colours.get(name), alpha=0.25, linewidth=0.8)
        accuracy = run.get("test_accuracy")
        label = name + (f" (test acc {100 * accuracy:.1f}%)" if accuracy is not None else "")
        curves.plot(range(1, len(losses) + 1), _smooth(losses, window), color=colours.get(name), label=label)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss")
    curves.set_title("training loss (faint: per step; solid: moving average)")
    curves.legend()
    names = list(variants)
    rates = [variants[n].get("tokens_per_s") or 0.0 for n in names]
    bars = speed.bar(names, rates, color=[colours.get(n, "grey") for n in names])
    for bar, rate in zip(bars, rates):
        speed.annotate(f"{rate:,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                       va="bottom")
    speed.set_ylabel("useful tokens/s (padding excluded)")
    speed.set_title("training throughput")
    bottoms = [0.0] * len(names)
    share_colours = {"attention": "tab:red", "layer_norm": "tab:green", "gelu": "tab:purple", "rest": "tab:grey"}
    for key, colour in share_colours.items():
        values = [100 * (((variants[n].get("time_shares") or {}).get("shares") or {}).get(key) or 0.0) for n in names]
        shares.bar(names, values, bottom=bottoms, color=colour, label=key)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    shares.set_ylabel("% of profiled step time")
    shares.set_title("time shares")
    shares.set_ylim(0, 100)
    for index, name in enumerate(names):  # say why a variant has no bar
        record = variants[name].get("time_shares") or {}
        if not record.get("shares"):
            why = record.get("note") or record.get("error") or "not measured"
            shares.text(index, 50, textwrap.fill(why, 24), ha="center", va="center", fontsize="small")
    shares.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    env = results.get("environment", {})
    figure.suptitle(f"{heading(results)} - {env.get('device', '')}, torch {env.get('torch', '')}")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
