"""Write ``summary.md`` for a folder written by ``benchmarks/gpu_check.sh`` (or by the benchmark scripts
run by hand: without steps.tsv there are no step results, only the results found).

    python benchmarks/summarize.py DIR [--cpu-run 0|1]
    python benchmarks/summarize.py DIR --readme     # the README's headline block, from DIR's files

Reads DIR/steps.tsv (one line per step: step, status, seconds, note), DIR/info.json, the
benchmark JSONs (attention.json, layer_norm.json, gelu.json, finetune.json) and DIR/logs/tests.log,
and writes DIR/summary.md: the pass/fail table of the steps, the environment, the measured
ceilings and the headline tables (fwd+bwd, else fwd, else bwd: median ms and speed-up over the baseline;
throughput; the other passes measured are named).
Whether the folder is a CPU-only run is read from its JSON files (``--cpu-run`` overrides that);
``--readme`` refuses a folder whose headline results did not measure the GPU kernels.
Uses only the standard library and benchmarks/common.py; the numbers are copied from the JSON
files as measured, never edited.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCHMARKS = ("attention", "layer_norm", "gelu")


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _measured_on_gpu(payload) -> bool | None:
    """Whether a results JSON measured the GPU kernels; None when it does not say."""
    if not isinstance(payload, dict):
        return None
    if "gpu_kernels_measured" in payload:  # the benchmark scripts' own verdict
        return bool(payload["gpu_kernels_measured"])
    device_type = (payload.get("environment") or {}).get("device_type")  # finetune.json has only this
    return None if device_type is None else device_type == "cuda"


def cpu_only_run(out: Path) -> bool | None:
    """Whether the folder's results were measured without a GPU, from its JSON files: True when
    none of them measured on a GPU, False when one did, None when none of them says."""
    verdicts = [_measured_on_gpu(_load(out / f"{name}.json")) for name in (*BENCHMARKS, "finetune")]
    verdicts = [v for v in verdicts if v is not None]
    if not verdicts:  # no benchmark results: info.json still lists the CUDA devices it saw
        devices = (_load(out / "info.json") or {}).get("devices")
        if isinstance(devices, list):
            verdicts = [any(isinstance(d, dict) and d.get("type") == "cuda" for d in devices)]
    return not any(verdicts) if verdicts else None


def _rows(payload) -> list[common.Row]:
    rows = []
    fields = {f.name for f in common.dataclasses.fields(common.Row)}
    for raw in payload.get("rows", []):
        values = {("pass_" if k == "pass" else k): v for k, v in raw.items()}
        values = {k: v for k, v in values.items() if k in fields}
        try:
            rows.append(common.Row(**values))
        except TypeError:
            continue
    return rows


def _steps(out: Path) -> list[dict] | None:
    """steps.tsv's lines; None without the file: not a gpu_check.sh folder, so no step results."""
    try:
        with open(out / "steps.tsv", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except OSError:
        return None


def _pytest_line(out: Path) -> str | None:
    try:
        text = (out / "logs" / "tests.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip("= ") for line in text.splitlines()
             if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if lines:
        return lines[-1]
    # No final tally (the run was cut short): count the per-test lines of pytest -v.
    outcomes = re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(?= |$)",
                          "\n".join(line for line in text.splitlines() if "::" in line))
    if not outcomes:
        return None
    counts = {kind: outcomes.count(kind) for kind in dict.fromkeys(outcomes)}
    return "cut short, per-test lines so far: " + ", ".join(f"{n} {kind.lower()}" for kind, n in counts.items())


def _environment_lines(info, payloads) -> list[str]:
    env = next((p["environment"] for p in payloads.values()
                if isinstance(p, dict) and isinstance(p.get("environment"), dict)), {})
    lines = []
    for key in ("date", "device", "driver", "compute_capability", "gpu_memory_gib", "torch", "triton",
                "cuda_runtime", "cudnn", "python", "git_commit"):
        if env.get(key) is not None:
            lines.append(f"- {key}: {env[key]}")
    if info:
        built = (info.get("cuda_extension") or {}).get("built")
        lines.append(f"- fastformer CUDA extension built: {built}")
        for name, backend in (info.get("backends") or {}).items():
            state = "available" if backend.get("available") else \
                "unavailable (" + "; ".join(backend.get("unavailable_reasons", []))[:200] + ")"
            lines.append(f"- backend {name}: {state}")
    return lines


def _run_line(payload) -> str:
    """Each run's own command, device, date and commit: the runs of one folder may differ."""
    env = payload.get("environment") or {}
    return (f"Command: `{env.get('command', '?')}` on {env.get('device', '?')}, "
            f"{env.get('date', '?')}, commit {env.get('git_commit', '?')}.")


def _partial_note(payload, rows) -> str | None:
    """The scripts rewrite their JSON after each shape with "final": false, and once more at the end with
    true: a JSON left at false is from a run killed before it finished (older JSONs lack the key)."""
    if payload.get("final", True) is not False:
        return None
    shapes = len({(r.suite, r.shape) for r in rows})
    return f"Partial: the run ended before finishing ({shapes} shape(s) measured, the rest not)"


def _benchmark_section(name: str, payload) -> list[str]:
    lines = [f"## {name}", ""]
    if payload is None:
        return lines + ["No results (see the step table and the log).", ""]
    lines.append(_run_line(payload))
    ceilings = payload.get("ceilings")
    if ceilings:
        lines.append(f"Ceilings measured in the same run: copy {ceilings['copy_gbps']:.0f} GB/s, "
                     f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.3g} TFLOP/s.")
    if not payload.get("gpu_kernels_measured", True):
        lines.append("**CPU run: the GPU kernels were not measured.**")
    rows = _rows(payload)
    partial = _partial_note(payload, rows)
    if partial:
        lines.append(f"**{partial}.**")
    elif payload.get("stopped_early"):
        # The JSON does not record why: --max-seconds, SIGTERM / Ctrl-C and a CUDA error all set it.
        lines.append("**Stopped early: some shapes were not measured** (the time budget, a signal or a "
                     "device error; see the failures and the log).")
    lines.append("")
    for op in dict.fromkeys(r.op for r in rows):
        members = [r for r in rows if r.op == op]
        shown = None
        for pass_ in ("fwd+bwd", "fwd", "bwd"):  # a --passes bwd run has only the last
            table = common.markdown_pivot(members, pass_, "ms")
            if not table:
                continue
            lines += [f"{op}, {pass_}: median ms (speed-up over the baseline)", "", table, ""]
            if any(r.tflops or r.gbps for r in members if r.pass_ == pass_):
                unit = "TFLOP/s" if any(r.tflops for r in members) else "GB/s"
                lines += [f"{op}, {pass_}: {unit}", "",
                          common.markdown_pivot(members, pass_, "rate"), ""]
            shown = pass_
            break  # one pass per op keeps the summary short; the JSON/CSV have all of them
        others = [p for p in dict.fromkeys(r.pass_ for r in members) if p != shown]
        if others:  # said, so that a pass left out of the tables does not read as not measured
            lines += [f"{op}: also measured {', '.join(others)} (not tabulated here: see the JSON/CSV).", ""]
    mismatches = sorted({f"{r.provider} ({r.pass_}, {r.shape})" for r in rows if r.note.startswith("MISMATCH")})
    if mismatches:
        lines += ["**Mismatches against the baseline:** " + "; ".join(mismatches), ""]
    failures = payload.get("failures") or {}
    if failures:
        lines += ["**Failures:**", ""] + [f"- {k}: {v}" for k, v in failures.items()] + [""]
    skipped = payload.get("skipped") or []
    if skipped:
        seen = {}
        for entry in skipped:
            seen.setdefault((entry["provider"], entry["reason"]), 0)
            seen[(entry["provider"], entry["reason"])] += 1
        lines += ["<details><summary>skipped providers</summary>", ""]
        lines += [f"- {provider}: {reason}" + (f" ({count}x)" if count > 1 else "")
                  for (provider, reason), count in seen.items()]
        lines += ["", "</details>", ""]
    return lines


def summarize(out: Path, cpu_run: bool) -> str:
    steps = _steps(out)
    info = _load(out / "info.json")
    payloads = {name: _load(out / f"{name}.json") for name in BENCHMARKS}
    gpu_check = steps is not None
    title = "# fastformer GPU check" if gpu_check else "# fastformer benchmark results"
    lines = [title + (" (CPU-only run)" if cpu_run else ""), ""]
    if not gpu_check:  # the benchmark scripts run by hand: nothing says which steps ran or passed
        lines += ["This folder holds the results of separate runs, not of gpu_check.sh (no steps.tsv): "
                  "no step results.", ""]
    if cpu_run:
        lines += [("**No GPU: the GPU steps were skipped and the benchmarks ran on the CPU " if gpu_check
                   else "**No GPU: measured on the CPU ") + "(GPU kernels not measured).**", ""]
    if gpu_check and not steps:  # gpu_check.sh stopped before its first step ended
        lines += ["Result: **no step recorded** (steps.tsv lists none).", ""]
    elif gpu_check:
        failed = [s for s in steps if s.get("status") not in ("pass", "skipped")]
        lines += [f"Result: **{'all steps passed' if not failed else f'{len(failed)} step(s) not passed'}**"
                  f" ({sum(float(s.get('seconds') or 0) for s in steps):.0f} s).", ""]
        lines += ["| step | status | seconds | note |", "| --- | --- | ---: | --- |"]
        for s in steps:
            status = s.get("status", "?")
            shown = status if status in ("pass", "skipped") else f"**{status}**"
            lines.append(f"| {s.get('step')} | {shown} | {s.get('seconds')} | {s.get('note', '')} |")
        lines.append("")
    pytest_line = _pytest_line(out)
    if pytest_line:
        lines += [f"pytest: {pytest_line}", ""]
    finetune = _load(out / "finetune.json")
    # finetune.json records the same environment keys: a fine-tuning-only folder has its environment too.
    lines += ["## Environment", ""] + _environment_lines(info, {**payloads, "finetune": finetune}) + [""]
    for name in BENCHMARKS:
        if gpu_check or payloads[name] is not None:  # outside gpu_check.sh a missing file is no failure
            lines += _benchmark_section(name, payloads[name])
    if not gpu_check and not any(payloads.values()) and not (out / "finetune.json").is_file():
        lines += ["No benchmark results in this folder.", ""]
    finetune_table = out / "finetune.md"
    run_line = [_run_line(finetune), ""] if isinstance(finetune, dict) else []
    if finetune_table.is_file():
        lines += ["## finetune", "", *run_line,
                  finetune_table.read_text(encoding="utf-8", errors="replace").strip(), ""]
    elif (out / "finetune.json").is_file():
        lines += ["## finetune", "", *run_line, "See finetune.json and logs/finetune.log.", ""]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    lines += ["## Files", ""] + [f"- {f}" for f in files if f != "summary.md"] + [""]
    return "\n".join(lines)


def readme_block(out: Path) -> str:
    """The README's headline: attention fwd+bwd on the fine-tuning shapes (ms, speed-up, TFLOP/s),
    the norms' and GELU's GB/s, the plot, with the date, the card and the command (as measured)."""
    payload = _load(out / "attention.json")
    if payload is None:
        raise SystemExit(f"no {out / 'attention.json'}")
    # The block is the README's GPU headline: CPU numbers must not end up there by mistake.
    others = {name: _load(out / f"{name}.json") for name in ("layer_norm", "gelu")}
    not_gpu = [f"{name}.json" for name, p in {"attention": payload, **others}.items()
               if p is not None and _measured_on_gpu(p) is not True]
    if not_gpu:
        raise SystemExit(f"{out}: {', '.join(not_gpu)} did not measure the GPU kernels (CPU run, or no "
                         "record of the device): not a headline for the README")
    env = payload.get("environment", {})
    rows = [r for r in _rows(payload) if r.op == "attention" and r.suite == "finetune"]
    partial = _partial_note(payload, rows)
    lines = [f"**{partial}.**", ""] if partial else []
    lines += [f"Measured {env.get('date', '?')[:10]} on {env.get('device', '?')} (driver "
             f"{env.get('driver', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
             f"CUDA {env.get('cuda_runtime', '?')}, commit {env.get('git_commit', '?')}) by "
             f"`{env.get('command', '?')}`; folder `{out.as_posix()}`.", ""]
    ceilings = payload.get("ceilings")
    if ceilings:
        lines += [f"Ceilings measured in the same run: {ceilings['matmul_dtype']} matmul "
                  f"{ceilings['matmul_tflops']:.3g} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s.", ""]
    lines += ["Attention, forward + backward, fine-tuning shapes: median ms (speed-up over SDPA's "
              "default)", "", common.markdown_pivot(rows, "fwd+bwd", "ms"), "",
              "The same in TFLOP/s (useful work only)", "", common.markdown_pivot(rows, "fwd+bwd", "rate"), ""]
    for name, other in others.items():
        if other is not None:
            lines += [f"{name}, forward + backward: GB/s", "",
                      common.markdown_pivot(_rows(other), "fwd+bwd", "rate"), ""]
    if (out / "attention.png").is_file():
        lines += [f"![attention throughput]({(out / 'attention.png').as_posix()})", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder gpu_check.sh wrote")
    parser.add_argument("--cpu-run", type=int, choices=(0, 1), default=None,
                        help="1 if no GPU was used, 0 if one was (default: read from DIR's JSON files)")
    parser.add_argument("--readme", action="store_true",
                        help="print the README's headline block (Markdown) instead of writing summary.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():  # a mistyped folder: say so, not a traceback from the first file read
        parser.error(f"no folder {out}")
    if args.readme:
        print(readme_block(out))
        return 0
    cpu_run = cpu_only_run(out) if args.cpu_run is None else bool(args.cpu_run)
    text = summarize(out, bool(cpu_run))
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
