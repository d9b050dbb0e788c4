"""Python side of the compiled CUDA extension ``fastformer._C`` (the "cuda" backend).

The extension is optional: it is built by setup.py only where a CUDA toolkit and a CUDA build of
PyTorch are present. Importing this module is cheap and never fails; torch and the extension are
only imported when one of the functions below is first called.

- ``load_extension()``: the ``fastformer._C`` module, or None.
- ``extension_unavailable_reasons()``: why the extension cannot be used here ([] when it can).
- ``extension_build_info()``: how the extension was built, or None.
"""

from __future__ import annotations

import importlib
import re
import threading

__all__ = ["load_extension", "extension_unavailable_reasons", "extension_build_info"]

EXTENSION_MODULE = "fastformer._C"
BUILD_COMMAND = "FASTFORMER_BUILD_CUDA=1 pip install --no-build-isolation -e ."

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
    """``fastformer._C.build_info()``: cuda_runtime_version, torch_version, compiled_archs.

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
