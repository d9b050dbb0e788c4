"""``python -m fastformer.info``: versions, devices, backends and the CUDA extension on this machine.

``--json`` prints the same facts as JSON (for bug reports and benchmark records).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

import torch

import fastformer
from fastformer import cuda as cuda_backend
from fastformer import dispatch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict]:
    devices = [{"type": "cpu", "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"type": "cuda", "index": index, "name": props.name,
                            "compute_capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1)})
    return devices


def _support_text(support: dispatch.Support) -> str:
    dtypes = ",".join(sorted(str(d).replace("torch.", "") for d in support.dtypes))
    text = f"devices={','.join(sorted(support.devices))} dtypes={dtypes}"
    if support.head_dims is not None:
        text += f" head_dims={support.head_dims[0]}..{support.head_dims[1]}"
    if support.max_hidden is not None:
        text += f" max_hidden={support.max_hidden}"
    if support.min_compute_capability is not None:
        text += " sm>=%d.%d" % support.min_compute_capability
    if support.not_automatic:
        text += " (backend=None passes over it: " + "; ".join(support.not_automatic) + ")"
    return text


def _verified() -> dict:
    """op -> record of the GPU run that verified its CUDA kernels, or None (not verified)."""
    try:
        record = cuda_backend.verified_record()
    except ValueError as exc:
        return {"error": str(exc)}
    return {op: record.get(op) for op in dispatch.OPS}


def _environment_problems() -> list[str]:
    """What in the environment the ops would refuse at their first call (a FASTFORMER_BACKEND
    naming no backend), said here first."""
    try:
        dispatch._env_backend(os.environ.get("FASTFORMER_BACKEND"))
    except ValueError as error:
        return [str(error)]
    return []


def collect() -> dict:
    """All facts as a JSON-serialisable dict."""
    backends = {}
    for name in dispatch.BACKEND_NAMES:
        reasons = dispatch.backend_unavailable_reasons(name)
        table = dispatch._OP_TABLES[name]
        backends[name] = {
            "description": dispatch.get_backend(name).description,
            "available": not reasons,
            "unavailable_reasons": list(reasons),
            "ops": {op: _support_text(table[op][0]) if op in table else None for op in dispatch.OPS},
        }
    return {
        "fastformer": fastformer.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "environment": {key: os.environ.get(key) for key in ("FASTFORMER_BACKEND", "TRITON_INTERPRET")},
        "environment_problems": _environment_problems(),
        "devices": _devices(),
        "cuda_extension": {
            "built": cuda_backend.load_extension() is not None,
            "build_info": cuda_backend.extension_build_info(),
            "stale": cuda_backend.extension_stale_reasons(),
        },
        "cuda_verified": _verified(),
        "backends": backends,
    }


def _print_report(facts: dict) -> None:
    print(f"fastformer {facts['fastformer']}")
    print(f"  python {facts['python']} on {facts['platform']}")
    print(f"  torch {facts['torch']} (CUDA {facts['torch_cuda'] or 'none: CPU-only build'}), "
          f"triton {facts['triton'] or 'not installed'}, numpy {facts['numpy']}")
    print("  environment: " + ", ".join(f"{k}={v if v is not None else '(unset)'}"
                                        for k, v in facts["environment"].items()))
    for problem in facts["environment_problems"]:
        print(f"  problem: {problem}")
    print("devices:")
    for device in facts["devices"]:
        details = ", ".join(f"{k}={v}" for k, v in device.items() if k != "type")
        print(f"  {device['type']}: {details}")
    if not torch.cuda.is_available():
        print("  cuda: no CUDA device is visible")
    extension = facts["cuda_extension"]
    print(f"CUDA extension fastformer._C: {'built' if extension['built'] else 'not built'}"
          + (f" {extension['build_info']}" if extension["build_info"] else ""))
    for reason in extension.get("stale", []):
        print(f"  not used: {reason}")
    print("CUDA kernels verified on a GPU (fastformer/cuda/verified.json; backend=None uses only "
          "these, backend='cuda' runs any):")
    verified = facts["cuda_verified"]
    if "error" in verified:
        print(f"  error: {verified['error']}")
    for op, record in verified.items():
        if op == "error":
            continue
        if record is None:
            print(f"  {op}: not verified")
        else:
            print(f"  {op}: verified {record['date']} on {record['gpu']} at {record['commit']} "
                  f"({record['command']})")
    for op, error in cuda_backend.op_table_errors.items():
        print(f"  {op}: cuda module failed to import ({error})")
    print("backends (preferred first):")
    for name, backend in facts["backends"].items():
        status = "available" if backend["available"] else "unavailable"
        print(f"  {name}: {status} - {backend['description']}")
        for reason in backend["unavailable_reasons"]:
            print(f"      - {reason}")
        for op, support in backend["ops"].items():
            print(f"      {op}: {support or 'not implemented'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastformer.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
    else:
        _print_report(facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
