"""Python side of the compiled CUDA extension ``fastformer._C`` (the "cuda" backend).

The extension is optional: it is built by setup.py only where a CUDA toolkit and a CUDA build of
PyTorch are present. Importing this module is cheap and never fails; torch and the extension are
only imported when one of the functions below is first called.

- ``load_extension()``: the ``fastformer._C`` module, or None.
- ``extension_unavailable_reasons()``: why the extension cannot be used here ([] when it can).
- ``extension_build_info()``: how the extension was built, or None.
- ``extension_stale_reasons()``: a reason when the extension was built from other sources than
  this checkout's csrc/ (then it counts as unavailable), else [].
- ``op_table()``: op name -> (dispatch.Support, implementation module), for ``fastformer.dispatch``.
  Each implementation module (``layer_norm``, ``bias_gelu``, ``attention``) declares its
  ``support()``; a module that does not exist is left out.
- ``kernel_ops()``: ``torch.ops.fastformer`` (the kernels' ops, registered by the extension), for
  the launchers; with :data:`KERNEL_DEVICE`, the one place the launchers name the device.
- ``verified_record()``: the hardware runs that verified each op's kernels
  (``fastformer/cuda/verified.json``). Until an op has a record, the automatic choice
  (``backend=None``) passes over its CUDA kernel with a reason; forcing ``backend="cuda"`` runs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import threading
from pathlib import Path

__all__ = ["load_extension", "extension_unavailable_reasons", "extension_build_info", "extension_stale_reasons",
           "op_table", "require_extension", "kernel_ops", "verified_record", "VERIFIED_RECORD", "UNVERIFIED_REASON",
           "KERNEL_DEVICE", "OPS_NAMESPACE"]

EXTENSION_MODULE = "fastformer._C"
# From a source checkout (-e .) or an sdist (its file name in place of "-e .").
BUILD_COMMAND = "FASTFORMER_BUILD_CUDA=1 pip install --no-build-isolation -e . (in a source checkout, or the sdist)"

_lock = threading.Lock()
_loaded = False
_module = None  # fastformer._C once imported
_load_error: BaseException | None = None


def load_extension():
    """Import ``fastformer._C`` once and return it, or None if it cannot be imported.

    Never raises; ``extension_unavailable_reasons()`` says why it is None.
    """
    global _loaded, _module, _load_error
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            try:
                import torch  # noqa: F401  (loads libtorch, which the extension links against)

                _module = importlib.import_module(EXTENSION_MODULE)
            except Exception as exc:  # ImportError, OSError (undefined symbols, ...), anything
                _module = None
                _load_error = exc
            _loaded = True
    return _module


def extension_build_info() -> dict | None:
    """``fastformer._C.build_info()``: cuda_runtime_version, torch_version, compiled_archs,
    source_digest (extensions built before it was recorded lack it).

    None when the extension is not available.
    """
    module = load_extension()
    if module is None:
        return None
    try:
        return dict(module.build_info())
    except Exception:
        return None


def extension_unavailable_reasons() -> list[str]:
    """Reasons the CUDA extension cannot run on this machine; an empty list when it can."""
    try:
        import torch
    except Exception as exc:
        return [f"PyTorch is not importable ({type(exc).__name__}: {exc})"]

    reasons = []
    if load_extension() is None:
        reasons.append(_load_error_reason(_load_error))
    else:
        reasons += extension_stale_reasons()
    if torch.version.cuda is None:
        reasons.append(f"PyTorch {torch.__version__} is a CPU-only build")
    elif not _cuda_device_visible(torch):
        reasons.append("no CUDA device is visible")
    elif not reasons:
        reasons += _arch_reasons(torch)
    return reasons


def _load_error_reason(exc: BaseException | None) -> str:
    error = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError) and exc.name == EXTENSION_MODULE:
        return f"{EXTENSION_MODULE} is not built ({error}); build it with {BUILD_COMMAND}"
    # Built, but does not load: typically compiled against another torch or CUDA version.
    return f"{EXTENSION_MODULE} cannot be loaded ({error}); rebuild it with {BUILD_COMMAND}"


def _checkout_csrc() -> Path | None:
    """csrc/ of the source checkout (or unpacked sdist) this package was imported from; None for
    an installed copy, whose parent folder is not fastformer's project."""
    root = Path(__file__).resolve().parents[2]
    try:
        ours = 'name = "fastformer"' in (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return root / "csrc" if ours and (root / "csrc").is_dir() else None


CHECKOUT_CSRC = _checkout_csrc()
_stale: list[str] | None = None  # extension_stale_reasons(), once computed


def extension_stale_reasons() -> list[str]:
    """A reason when the loaded extension was built from other CUDA sources than this checkout's
    csrc/ (edited, or checked out at another commit, since the build): its kernels are not the
    ones the checkout describes, and tests or benchmarks of them would mislead."""
    global _stale
    if _stale is None:
        from fastformer.cuda.source_digest import source_digest

        built = (extension_build_info() or {}).get("source_digest")
        _stale = []
        if built and CHECKOUT_CSRC is not None and source_digest(CHECKOUT_CSRC) != built:
            _stale.append(f"{EXTENSION_MODULE} was built from other CUDA sources than this checkout's csrc/ "
                          f"(changed since the build); rebuild it with {BUILD_COMMAND}")
    return _stale


def _cuda_device_visible(torch) -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _arch_reasons(torch) -> list[str]:
    """A reason if the extension holds no code the current GPU can run."""
    info = extension_build_info() or {}
    targets = [t for t in str(info.get("compiled_archs", "")).split(",") if t]
    if not targets:
        return []  # unknown build: do not guess
    try:
        major, minor = torch.cuda.get_device_capability()
    except Exception as exc:
        return [f"cannot query the CUDA device ({type(exc).__name__}: {exc})"]
    if any(_target_runs_on(target, major, minor) for target in targets):
        return []
    return [
        f"{EXTENSION_MODULE} was compiled for {','.join(targets)}, which cannot run on this "
        f"GPU (compute capability {major}.{minor}); rebuild it with "
        f"FASTFORMER_CUDA_ARCHS={major}.{minor} {BUILD_COMMAND}"
    ]


def _target_runs_on(target: str, major: int, minor: int) -> bool:
    """Whether code built for ``target`` (sm_80, sm_90a, sm_100f, compute_90) runs on major.minor.

    Binary code (sm_XY) runs on the same major version with an equal or higher minor; the
    arch-specific ``a`` variant only on exactly that GPU; the family ``f`` variant like plain
    binary code. PTX (compute_XY) is JIT-compiled on any GPU of equal or higher capability.
    """
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target)
    if not match:
        return False
    kind, suffix = match.group(1), match.group(4)
    t_major, t_minor = int(match.group(2)), int(match.group(3))
    if kind == "compute":
        return (major, minor) >= (t_major, t_minor)
    if suffix == "a":
        return (major, minor) == (t_major, t_minor)
    return major == t_major and minor >= t_minor


def require_extension():
    """The extension module, or RuntimeError with the reasons it cannot be used (for launchers):
    not built, not loadable, or built from other sources than this checkout's csrc/."""
    module = load_extension()
    if module is None or extension_stale_reasons():
        raise RuntimeError("fastformer cuda backend: " + "; ".join(extension_unavailable_reasons()))
    return module


# The torch.library namespace of the kernels' ops and the device type of the tensors they take.
# The tests' CPU emulator of the kernels (tests/cuda_emulator) registers the same ops, compiled
# for the CPU, as torch.ops.fastformer_emulated and points these two names at them, so that the
# launchers below run unchanged on CPU tensors there.
OPS_NAMESPACE = "fastformer"
KERNEL_DEVICE = "cuda"


def kernel_ops():
    """``torch.ops.<OPS_NAMESPACE>``, once the extension that registers the ops is loaded.

    RuntimeError with the reasons when it cannot be.
    """
    import torch

    if OPS_NAMESPACE == "fastformer":
        require_extension()
    return getattr(torch.ops, OPS_NAMESPACE)


def seed_argument(op: str, seed, like):
    """A launcher's dropout seed as the kernels take it: None, or one int64 on ``like``'s device
    (the ops pass its pointer; the kernels load it)."""
    from fastformer.validation import check_seed

    if seed is not None:
        check_seed(op, seed, like.device)
    return seed


# --------------------------------------------------------------------------------------------
# What the backend implements, and which kernels have been verified on a GPU
# --------------------------------------------------------------------------------------------
# op -> implementation module. attention.py is written separately; op_table() skips it until it
# exists.
OP_MODULES = {
    "attention": "fastformer.cuda.attention",
    "residual_layer_norm": "fastformer.cuda.layer_norm",
    "residual_rms_norm": "fastformer.cuda.layer_norm",
    "bias_gelu": "fastformer.cuda.bias_gelu",
}

VERIFIED_RECORD = Path(__file__).with_name("verified.json")
RECORD_FIELDS = ("date", "gpu", "commit", "command")
UNVERIFIED_REASON = ("not yet verified on a GPU (fastformer/cuda/verified.json); "
                     "force backend='cuda' to use it")

# op -> why its module could not be imported (shown by python -m fastformer.info)
op_table_errors: dict[str, str] = {}


def verified_record(path: Path | None = None) -> dict[str, dict]:
    """op -> the record of the hardware run that verified its CUDA kernels.

    The file holds ``{"verified": {op: {"date", "gpu", "commit", "command"}, ...}}``; an op that
    is absent has not been verified on a GPU. A malformed file raises ValueError (a test checks
    the shipped one), never silently verifies anything.
    """
    path = VERIFIED_RECORD if path is None else Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    entries = data.get("verified") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f'{path}: expected {{"verified": {{op: record}}}}')
    from fastformer.dispatch import OPS

    for op, entry in entries.items():
        if op not in OPS:
            raise ValueError(f"{path}: unknown op {op!r} (ops: {', '.join(OPS)})")
        missing = [f for f in RECORD_FIELDS if not isinstance(entry, dict) or not entry.get(f)]
        if missing:
            raise ValueError(f"{path}: the record of {op!r} lacks {', '.join(missing)}")
    return dict(entries)


def op_table() -> dict:
    """op name -> (dispatch.Support, implementation module) for every CUDA kernel module present.

    Ops without a record in ``verified.json`` get the ``not_automatic`` reason
    :data:`UNVERIFIED_REASON`: ``backend=None`` passes over them, ``backend="cuda"`` runs them.
    """
    record = verified_record()
    table = {}
    op_table_errors.clear()
    for op, module_name in OP_MODULES.items():
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
            support = importlib.import_module(module_name).support()
        except Exception as exc:  # a broken module must not break `import fastformer`
            op_table_errors[op] = f"{module_name}: {type(exc).__name__}: {exc}"
            continue
        if op not in record:
            support = dataclasses.replace(support, not_automatic=(UNVERIFIED_REASON,))
        table[op] = (support, module_name)
    return table
