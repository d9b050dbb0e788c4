"""Build and load the CPU emulator of fastformer's CUDA kernels (tests only).

``load()`` compiles csrc/'s kernels and ops with the host C++ compiler and FASTFORMER_CPU_EMULATION
(see cuda_emulator.h) into a torch extension and loads it: the ops then exist as
``torch.ops.fastformer_emulated.cuda_*``, with the schemas of ``torch.ops.fastformer.cuda_*``, and
take CPU tensors. The build is kept under a hash of everything that goes into it (every file
under csrc/ and here, torch, Python and compiler versions), in ``FASTFORMER_EMULATOR_CACHE`` or
``~/.cache/fastformer/cuda-emulator``: a second run, or CI on a commit that leaves them alone,
loads it without compiling (about two minutes on 2 cores otherwise).

What it needs: a C++20 compiler, ninja, and the CUDA headers for the half-precision types
(cuda_fp16.h, cuda_bf16.h, cuda_runtime_api.h), from a CUDA toolkit or from the nvidia-* wheels
a CUDA build of PyTorch installs. ``unavailable_reason()`` says what is missing.

``FASTFORMER_EMULATOR_SANITIZE=address`` builds it with AddressSanitizer, which then reports the
kernels' out-of-bounds reads and writes of CPU tensors (what the emulator itself does not check);
run Python with the runtime preloaded::

    FASTFORMER_EMULATOR_SANITIZE=address ASAN_OPTIONS=detect_leaks=0 \
        LD_PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)" \
        python -m pytest -s tests/test_cuda_emulated.py

(libstdc++ is preloaded too: Triton's extension throws C++ exceptions, which ASan can intercept
only if libstdc++ was loaded before it started. -s: ASan ends the process at the first error,
and pytest's output capture would swallow its report; the exit status is 1 either way.)
``FASTFORMER_EMULATOR_SANITIZE=undefined`` builds it with UndefinedBehaviorSanitizer (signed
integer overflow in the kernels' index arithmetic, shifts, misaligned accesses, float-to-int
casts out of range), which needs nothing preloaded: ``FASTFORMER_EMULATOR_SANITIZE=undefined
python -m pytest -s tests/test_cuda_emulated.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
NAMESPACE = "fastformer_emulated"
LIBRARY = "fastformer_cuda_emulator"
# Not emulated: the extension's Python module and its build info (no kernels).
EXCLUDED = {"extension.cpp", "build_info.cu"}
FLAGS = ["-O2", "-DFASTFORMER_CPU_EMULATION", "-Wno-unknown-pragmas"]
SANITIZERS = {
    "address": ["-fsanitize=address", "-fno-omit-frame-pointer"],
    # signed overflow of int index arithmetic, out-of-range shifts, misaligned or null accesses,
    # float-to-int casts out of range: what a GPU computes silently wrong. The first report aborts.
    "undefined": ["-fsanitize=undefined,float-cast-overflow", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer"],
}

_lock = threading.Lock()
_loaded = False


def sources() -> list[Path]:
    """The csrc/ files the emulator compiles."""
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))
    return [p for p in files if p.relative_to(CSRC).as_posix() not in EXCLUDED]


def sanitizer_flags() -> list[str]:
    """Compile and link flags of FASTFORMER_EMULATOR_SANITIZE (empty when unset)."""
    name = os.environ.get("FASTFORMER_EMULATOR_SANITIZE", "")
    if name and name not in SANITIZERS:
        raise RuntimeError(f"CUDA emulator: FASTFORMER_EMULATOR_SANITIZE={name!r}; known: {', '.join(SANITIZERS)}")
    return SANITIZERS.get(name, [])


def cuda_include_dirs() -> list[str]:
    """Folders holding cuda_fp16.h: the CUDA toolkit's, or the nvidia-* wheels'."""
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            candidates += sorted(nvidia.glob("*/include"))
    dirs = []
    for d in candidates:
        if (d / "cuda_fp16.h").is_file() and str(d) not in dirs:
            dirs.append(str(d))
    # the toolkit's headers and the wheels' can differ in version: use one folder, the first found
    return dirs[:1]


def unavailable_reason() -> str | None:
    """Why the emulator cannot be built here, or None."""
    if not cuda_include_dirs():
        return ("no CUDA headers (cuda_fp16.h) found: install a CUDA toolkit or a CUDA build of PyTorch "
                "(its nvidia-* wheels ship them)")
    if _ninja_dir() is None:
        return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    return None


def _ninja_dir() -> str | None:
    """The folder of a ninja executable: on PATH, or next to this Python (a virtual environment's
    bin, where `pip install ninja` puts it, which need not be on PATH)."""
    found = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    return None if found is None else str(Path(found).parent)


def _compiler_version() -> str:
    try:
        return subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True,
                              check=False).stdout
    except OSError:
        return ""


def build_key() -> str:
    import torch

    digest = hashlib.sha256()
    for path in sources() + sorted(CSRC.rglob("*.h")) + sorted(CSRC.rglob("*.cuh")) + sorted(HERE.glob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    flags = " ".join(FLAGS + sanitizer_flags())
    for part in (torch.__version__, sys.version, _compiler_version(), flags, *cuda_include_dirs()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("FASTFORMER_EMULATOR_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastformer" / "cuda-emulator"


def load():
    """Build (once per content) and load the emulator; returns ``torch.ops.fastformer_emulated``.

    Raises RuntimeError with the reason when it cannot be built here.
    """
    global _loaded
    import torch

    with _lock:
        if not _loaded:
            reason = unavailable_reason()
            if reason:
                raise RuntimeError(f"CUDA emulator: {reason}")
            build_dir = cache_dir() / build_key()
            library = build_dir / f"{LIBRARY}.so"
            if not library.is_file():
                _compile(build_dir)
            torch.ops.load_library(str(library))
            _prune(cache_dir(), keep=build_dir)
            _loaded = True
    return getattr(torch.ops, NAMESPACE)


def _compile(build_dir: Path) -> None:
    from torch.utils import cpp_extension

    # One small translation unit per csrc file, so that ninja compiles them in parallel; they
    # include the csrc files by path, so the csrc tree is compiled as it is.
    units = build_dir / "units"
    units.mkdir(parents=True, exist_ok=True)
    unit_paths = []
    for src in sources():
        relative = src.relative_to(CSRC).as_posix()
        unit = units / (relative.replace("/", "__").replace(".", "_") + ".cpp")
        unit.write_text(f'// CPU emulator build of csrc/{relative}\n#include "{relative}"\n')
        unit_paths.append(str(unit))
    unit_paths.append(str(HERE / "selftest.cpp"))  # kernels with deliberate bugs, for the emulator's own tests
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([_ninja_dir(), path])  # torch runs `ninja` from PATH
    try:
        cpp_extension.load(name=LIBRARY, sources=unit_paths, extra_cflags=FLAGS + sanitizer_flags(),
                           extra_ldflags=sanitizer_flags(),
                           extra_include_paths=[str(CSRC), str(HERE), *cuda_include_dirs()],
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
    finally:
        os.environ["PATH"] = path


def _prune(base: Path, keep: Path, kept: int = 3) -> None:
    """Remove all but the `kept` most recently used builds."""
    try:
        builds = sorted((d for d in base.iterdir() if d.is_dir() and d != keep), key=lambda d: d.stat().st_mtime,
                        reverse=True)
        os.utime(keep)
        for old in builds[kept - 1:]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass


if __name__ == "__main__":  # python tests/cuda_emulator/build.py: build it, print where
    load()
    print(cache_dir() / build_key())
