"""What the CUDA extension's kernels compiled to, read from the built extension without a GPU.

    python benchmarks/compile_cuda.py [--extension PATH] [-k SUBSTRING] [--json PATH]

The extension (``fastformer._C``) holds a cubin per source file and target (sm_80, sm_90a) wherever
it builds, GPU or not. For each kernel of each cubin this reports, from ``cuobjdump`` (the copy in
Triton's wheel, else the one on PATH): registers per thread, the stack frame per thread in bytes
(spilled registers and local arrays: local memory, which the hot kernels should not need), and
counts of its SASS instructions: LDSM (``ldmatrix``), HMMA (``mma.sync``), LDL/STL (local memory)
and IMAD.HI/IMAD.WIDE (high and wide multiplies: Philox rounds, 64-bit index arithmetic). The
counts are static, each unrolled copy once and a loop body once; within the attention kernels,
whose loads and products sit in their key or query loop, LDSM per HMMA is what each tensor-core
product costs in shared-memory reads.

``-k`` keeps the cubins whose name contains the text (e.g. ``fwd_hdim64``); without it every cubin
is read (under a minute on two cores). Exit status 1 when the extension or cuobjdump is missing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Opcode prefixes counted, by column name.
COUNTED = {"ldsm": ("LDSM",), "hmma": ("HMMA",), "local": ("LDL", "STL"), "imad_hi": ("IMAD.HI", "IMAD.WIDE")}
# A SASS line: /*address*/, an optional predicate (@P0, @!UP1, @PT), the opcode.
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)")


@dataclasses.dataclass
class Kernel:
    cubin: str          # e.g. fwd_hdim64_bf16.sm_90a (source file . target)
    arch: str
    name: str           # demangled and shortened when c++filt is there, else mangled
    registers: int
    stack_bytes: int
    instructions: int = 0
    ldsm: int = 0
    hmma: int = 0
    local: int = 0
    imad_hi: int = 0


def extension_path() -> Path | None:
    """The built ``fastformer._C`` shared object, found without importing it."""
    spec = importlib.util.find_spec("fastformer._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def _run(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _demangled(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    lines = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for mangled, full in zip(names, lines):
        full = re.sub(r"\b(fastformer|attention|residual_norm)::", "", full)
        short[mangled] = re.sub(r"^void ", "", full).rsplit("(", 1)[0]
    return short


def _usage(tool: str, cubin: Path) -> dict[str, tuple[int, int]]:
    """{mangled kernel: (registers, stack bytes)} of one cubin."""
    usage, name = {}, None
    for line in _run([tool, "--dump-resource-usage", str(cubin)]).splitlines():
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            name = match.group(1)
        elif name and "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            usage[name] = (int(fields["REG"]), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)))
            name = None
    return usage


def count_sass(sass: str) -> dict[str, dict[str, int]]:
    """{mangled kernel: {column: count}} of ``cuobjdump -sass`` output."""
    counts: dict[str, dict[str, int]] = {}
    current = None
    for line in sass.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = counts.setdefault(match.group(1), dict.fromkeys(("instructions", *COUNTED), 0))
            continue
        match = _INSTRUCTION.search(line) if current is not None else None
        if match:
            opcode = match.group(1)
            current["instructions"] += 1
            for column, prefixes in COUNTED.items():
                current[column] += opcode.startswith(prefixes)
    return counts


def read_kernels(extension: Path, select: str = "", *, sass: bool = True, tool: str | None = None) -> list[Kernel]:
    """Every kernel of the extension's cubins whose name contains ``select``; without ``sass``,
    registers and stack only (the instruction counts stay 0)."""
    tool = tool or common.cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (neither in Triton's wheel nor on PATH)")
    cubins = [line.split(":", 1)[1].strip() for line in _run([tool, "--list-elf", str(extension)]).splitlines()
              if ":" in line]
    cubins = [c for c in cubins if select in c]
    with tempfile.TemporaryDirectory() as folder:
        for name in cubins:  # extracted into the working directory, under their own names
            subprocess.run([tool, "--extract-elf", name, str(extension)], cwd=folder, capture_output=True, check=True)

        def read(name: str):
            path = Path(folder) / name
            return name, _usage(tool, path), count_sass(_run([tool, "-sass", str(path)])) if sass else {}

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            results = list(pool.map(read, cubins))
    names = _demangled(sorted({k for _, usage, _ in results for k in usage}))
    kernels = []
    for cubin, usage, counts in results:
        stem, arch = cubin.removesuffix(".cubin").rsplit(".", 1)
        for mangled, (registers, stack) in sorted(usage.items()):
            kernels.append(Kernel(f"{stem}.{arch}", arch, names[mangled], registers, stack,
                                  **counts.get(mangled, {})))
    return kernels


def format_kernels(kernels: list[Kernel]) -> str:
    header = ["cubin", "kernel", "regs", "stack B", "instr", "LDSM", "HMMA", "LDL/STL", "IMAD.HI/WIDE"]
    rows = [header] + [[k.cubin, k.name, str(k.registers), str(k.stack_bytes), str(k.instructions), str(k.ldsm),
                        str(k.hmma), str(k.local), str(k.imad_hi)] for k in kernels]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extension", type=Path, help="the built extension (default: fastformer._C's file)")
    parser.add_argument("-k", dest="select", default="", help="only the cubins whose name contains this")
    parser.add_argument("--json", help="write the kernels and the environment here")
    args = parser.parse_args(argv)
    extension = args.extension or extension_path()
    if extension is None or not extension.exists():
        print("The CUDA extension is not built (see the README, 'Building the CUDA extension').", file=sys.stderr)
        return 1
    try:
        kernels = read_kernels(extension, args.select)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(format_kernels(kernels))
    spilling = sorted({k.cubin for k in kernels if k.stack_bytes})
    print(f"\n{len(kernels)} kernels; cubins with local memory: {', '.join(spilling) or 'none'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": common.environment("cpu"), "kernels": [dataclasses.asdict(k) for k in kernels]},
                      f, indent=2, default=str)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
