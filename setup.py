"""Build script for fastformer.

Everything about the package lives in pyproject.toml; this file only decides whether to build
the optional CUDA extension ``fastformer._C`` from ``csrc/`` and how. The Triton and PyTorch
backends need nothing compiled, so the package installs and works without the extension.

Environment variables:

  FASTFORMER_BUILD_CUDA  ``auto`` (default): build the extension when torch is importable, is a
                         CUDA build, and a CUDA toolkit (nvcc) is found; otherwise skip it with a
                         one-line reason (shown by ``pip install -v``). A failed compilation is
                         reported and skipped too.
                         ``1``: the extension must build; anything missing is an error.
                         ``0``: never build it.
  FASTFORMER_CUDA_ARCHS  GPU targets, separated by ``;``, ``,`` or spaces (default ``8.0;9.0a``).
                         Each becomes ``-gencode=arch=compute_XY,code=sm_XY`` (suffixes ``a`` and
                         ``f`` kept), plus PTX of the highest one so that newer GPUs can JIT it.
                         ``TORCH_CUDA_ARCH_LIST`` is ignored.
  CUDA_HOME              The CUDA toolkit root (found from ``nvcc`` on PATH when unset).
  MAX_JOBS               Parallel compile jobs (honoured by torch's BuildExtension).
  NVCC_THREADS           Passed to ``nvcc --threads`` (parallel compilation of the targets).
  FASTFORMER_BUILD_CACHE A folder (unset: no cache). The built extension is kept there under a
                         hash of everything that goes into it (the source files under csrc/,
                         this file, the compile flags, the torch, nvcc and host compiler
                         versions); a later build with the same hash copies it instead of
                         compiling, and a build of a new hash compiles every object afresh
                         (never reusing objects of older sources). CI sets it, so that commits
                         that leave csrc/'s sources alone skip the CUDA build.

torch is not a build requirement (see pyproject.toml): install with
``pip install --no-build-isolation -e .`` so that the build sees the installed torch.
"""

import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
EXTENSION_NAME = "fastformer._C"
DEFAULT_ARCHS = "8.0;9.0a"
BUILD_HINT = "FASTFORMER_BUILD_CUDA=1 pip install --no-build-isolation -e ."


def log(message):
    print(f"fastformer setup: {message}", flush=True)


def fail(message):
    """Stop the build with a readable message instead of a traceback."""
    sys.exit(f"fastformer setup: error: {message}")


def build_mode():
    mode = os.environ.get("FASTFORMER_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        fail(f"FASTFORMER_BUILD_CUDA={mode!r} is not one of 0, 1, auto")
    return mode


# --- Finding torch and the CUDA toolkit ------------------------------------------------------


def toolkit_root_from_nvcc(nvcc):
    """The toolkit root as nvcc itself reports it (its ``TOP``), or None.

    torch guesses CUDA_HOME as the parent of the folder holding the first ``nvcc`` on PATH; when
    that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc calling the real toolkit) the guess
    has no headers. ``nvcc -dryrun`` prints where the toolkit really is.
    """
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def has_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and (
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
    )


def find_cuda_home(cpp_extension):
    """Return (toolkit root, None) or (None, why no usable toolkit was found).

    Starts from torch's own guess (``cpp_extension.CUDA_HOME``) and, when it has nvcc but no
    headers, asks nvcc for the real root; torch is then pointed at that root.
    """
    guess = cpp_extension.CUDA_HOME
    if has_toolkit(guess):
        return guess, None
    set_by_user = bool(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
    if not guess:
        return None, (
            "no CUDA toolkit found (no nvcc on PATH, no /usr/local/cuda): install the CUDA "
            "toolkit or set CUDA_HOME to its root"
        )
    nvcc = os.path.join(guess, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return None, (
            f"no CUDA toolkit at CUDA_HOME={guess} (no bin/nvcc there): install the CUDA "
            "toolkit or set CUDA_HOME to its root"
        )
    real = None if set_by_user else toolkit_root_from_nvcc(nvcc)
    if not has_toolkit(real):
        return None, (
            f"the CUDA toolkit at {guess} has nvcc but no include/cuda_runtime.h: "
            "set CUDA_HOME to the toolkit root"
        )
    cpp_extension.CUDA_HOME = real  # read at call time by torch's path helpers
    os.environ["CUDA_HOME"] = real
    return real, None


def cuda_unavailable_reason():
    """Why the CUDA extension cannot be built here, or None when it can."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # ImportError, or OSError from a broken install
        return (
            f"torch is not importable in the build environment ({exc}): install torch first, "
            "then install with `pip install --no-build-isolation -e .`"
        )
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch "
            "(see https://pytorch.org/get-started/locally/)"
        )
    if not sources():
        return f"no CUDA sources under {CSRC} (build from a source checkout or an sdist that has csrc/)"
    return find_cuda_home(cpp_extension)[1]


# --- Compiler flags --------------------------------------------------------------------------


def parse_archs(spec):
    """'8.0;9.0a' -> [(8, 0, ''), (9, 0, 'a')], sorted by compute capability."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.?(\d)([af]?)", item)
        if not match:
            fail(
                f"FASTFORMER_CUDA_ARCHS: cannot read {item!r}; expected compute capabilities "
                "such as '8.0;8.6;9.0a'"
            )
        arch = (int(match.group(1)), int(match.group(2)), match.group(3))
        if arch not in archs:
            archs.append(arch)
    if not archs:
        fail("FASTFORMER_CUDA_ARCHS is empty")
    return sorted(archs)


def gencode_flags(archs):
    """Explicit -gencode flags (torch adds none of its own when it sees them) and the target
    names, e.g. ['sm_80', 'sm_90a', 'compute_90'].

    PTX is emitted for the highest arch without its suffix: 'a'/'f' PTX would only run on that
    exact GPU (family), while plain PTX is JIT-compiled on any newer GPU.
    """
    flags, targets = [], []
    for major, minor, suffix in archs:
        num = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        targets.append(f"sm_{num}")
    major, minor, _ = archs[-1]
    flags.append(f"-gencode=arch=compute_{major}{minor},code=compute_{major}{minor}")
    targets.append(f"compute_{major}{minor}")
    return flags, targets


def nvcc_thread_flags():
    threads = os.environ.get("NVCC_THREADS", "").strip()
    if not threads:
        return []
    if not threads.isdigit():
        fail(f"NVCC_THREADS={threads!r} is not a number")
    return ["--threads", threads]


def compile_args(targets):
    # The target list is baked into build_info(); commas and identifiers only, so that the
    # define survives the shell that ninja runs compile commands in (C++ stringifies it).
    archs_define = "-DFASTFORMER_CUDA_ARCHS=" + ",".join(targets)
    # No -std here: torch adds the standard its headers need (C++17 up to torch 2.9, C++20 from
    # 2.10); a lower one fails to compile. Kernel code is written in C++17.
    cxx = ["-O3", archs_define]
    nvcc = [
        "-O3",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # torch compiles extensions with the half/bfloat16 operators disabled; kernels want them.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        archs_define,
    ]
    return {"cxx": cxx, "nvcc": nvcc}


# --- Sources and include folders -------------------------------------------------------------


def sources():
    files = glob.glob(str(CSRC / "**" / "*.cpp"), recursive=True)
    files += glob.glob(str(CSRC / "**" / "*.cu"), recursive=True)
    return sorted(os.path.relpath(f, ROOT) for f in files)


def source_digest(csrc):
    """fastformer/cuda/source_digest.py's digest of ``csrc``, that module loaded by its path (the
    package is not importable while it builds)."""
    spec = importlib.util.spec_from_file_location("_fastformer_source_digest",
                                                  ROOT / "fastformer" / "cuda" / "source_digest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(csrc)


def source_digest_file():
    """build/generated/source_digest.cpp, defining ``fastformer::source_digest()`` (the digest of
    csrc/, for build_info()), rewritten only when the digest changes: a source of its own, so that
    ninja recompiles it alone."""
    path = ROOT / "build" / "generated" / "source_digest.cpp"
    text = ("// Generated by setup.py: the digest of the csrc/ sources this extension is built from.\n"
            f'namespace fastformer {{\nconst char* source_digest() {{ return "{source_digest(CSRC)}"; }}\n'
            "}  // namespace fastformer\n")
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return os.path.relpath(path, ROOT)


def package_locations(name):
    """The folders of installed package ``name`` (a namespace package may have several); [] if
    it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def nvidia_include_dirs():
    """The ``include`` folders of the nvidia-* wheels torch depends on (nvidia/cu13/include,
    nvidia/cublas/include, ...): minimal toolkits lack the cuBLAS/cuSPARSE headers that
    ATen/cuda/CUDAContext.h includes."""
    found = []
    for location in package_locations("nvidia"):
        found += glob.glob(os.path.join(location, "*", "include"))
    return sorted(d for d in set(found) if os.path.isdir(d))


def cutlass_include_dirs():
    """CUTLASS/CuTe headers from the ``nvidia-cutlass`` wheel (``cutlass_library/source/include``),
    so that no git submodule is needed. Empty when the wheel is not installed. No kernel includes
    them today (the attention kernels use inline PTX); a kernel that does must have the wheel
    installed before the build (Makefile, benchmarks/fetch_wheels.sh)."""
    includes = [os.path.join(location, "source", "include") for location in package_locations("cutlass_library")]
    return [d for d in includes if os.path.isfile(os.path.join(d, "cute", "tensor.hpp"))]


# --- The extension ---------------------------------------------------------------------------


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    archs = parse_archs(os.environ.get("FASTFORMER_CUDA_ARCHS") or DEFAULT_ARCHS)
    arch_flags, targets = gencode_flags(archs)
    args = compile_args(targets)
    args["nvcc"] += arch_flags + nvcc_thread_flags()
    ext = CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources() + [source_digest_file()],
        include_dirs=[str(CSRC)] + cutlass_include_dirs(),
        extra_compile_args=args,
    )
    # After torch's and the toolkit's own include folders, so that they win; these only fill gaps.
    ext.include_dirs += nvidia_include_dirs()
    log(f"building {EXTENSION_NAME} for {', '.join(targets)}")
    return ext


def tolerant_build_ext(base):
    """In auto mode a failed compilation must not fail the install: report it and go on."""

    class BuildExtOrSkip(base):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any compiler/toolkit failure
                log(
                    f"building {EXTENSION_NAME} failed ({type(exc).__name__}: {exc}); "
                    f"continuing without it. Run `{BUILD_HINT}` to see the error."
                )
                # Nothing was built: later steps (copying into the source tree for editable
                # installs, listing the wheel's files) must not look for the extension.
                self.extensions[:] = []

    return BuildExtOrSkip


# --- Reusing a previous build of the same inputs ----------------------------------------------

CACHE_ENTRIES_KEPT = 8


def _tool_version(command):
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    return out.stdout + out.stderr


def _portable(text):
    """``text`` with the checkout's and the Python environment's absolute paths replaced by
    placeholders: a fresh clone in another folder (as CI makes) has the same key."""
    for prefix, placeholder in ((str(ROOT), "<checkout>"), (sys.prefix, "<environment>")):
        text = text.replace(prefix, placeholder)
    return text


def build_key(ext):
    """A hash of everything the extension is built from: sources, flags and toolchain."""
    import torch
    from torch.utils import cpp_extension

    digest = hashlib.sha256()

    def add(text):
        digest.update(text.encode() + b"\0")

    add(source_digest(CSRC))
    digest.update(Path(__file__).read_bytes())
    add(_portable(repr((ext.sources, ext.include_dirs, ext.extra_compile_args, ext.define_macros))))
    add(f"{sys.version} {torch.__version__} {torch.version.cuda} {_portable(torch.__file__)}")
    for package in ("nvidia-cutlass",):
        try:
            add(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            add(f"{package} absent")
    add(_tool_version([os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc"), "--version"]))
    add(_tool_version([os.environ.get("CXX", "c++"), "--version"]))
    return digest.hexdigest()[:24]


def cached_build_ext(base, cache_root):
    """build_ext that copies a previous build with the same key instead of compiling, and stores
    new builds (the newest CACHE_ENTRIES_KEPT are kept)."""

    class CachedBuildExt(base):
        def build_extension(self, ext):
            target = Path(self.get_ext_fullpath(ext.name))
            entry = cache_root / build_key(ext)
            cached = entry / target.name
            if cached.is_file():
                log(f"reusing the build in {entry} (same sources, flags and toolchain)")
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + f".{os.getpid()}.tmp")
                shutil.copyfile(cached, partial)
                os.replace(partial, target)  # a new file: a process using the old one keeps it
                os.utime(entry)
                return
            # An entry is compiled from scratch, in a fresh object folder: ninja rebuilds an
            # object only when a file in its recorded header dependencies changed, and a record
            # that lost them (seen here: four attention objects whose dependency lists were empty)
            # would link objects of older sources into an entry stored under the new sources' key.
            build_temp = self.build_temp
            Path(build_temp).mkdir(parents=True, exist_ok=True)
            self.build_temp = tempfile.mkdtemp(prefix="fresh-", dir=build_temp)
            try:
                super().build_extension(ext)
            finally:
                shutil.rmtree(self.build_temp, ignore_errors=True)
                self.build_temp = build_temp
            try:
                entry.mkdir(parents=True, exist_ok=True)
                partial = entry / (target.name + f".{os.getpid()}.tmp")
                shutil.copyfile(target, partial)
                os.replace(partial, cached)  # atomic: a concurrent build never sees half a file
                entries = sorted((d for d in cache_root.iterdir() if d.is_dir()),
                                 key=lambda d: d.stat().st_mtime, reverse=True)
                for old in entries[CACHE_ENTRIES_KEPT:]:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as exc:  # a cache that cannot be written only costs time
                log(f"cannot store the build in {entry}: {exc}")

    return CachedBuildExt


def extension_setup_kwargs():
    mode = build_mode()
    if mode == "0":
        log(f"FASTFORMER_BUILD_CUDA=0: not building {EXTENSION_NAME}")
        return {}
    reason = cuda_unavailable_reason()
    if reason is not None:
        if mode == "1":
            fail(f"FASTFORMER_BUILD_CUDA=1 but cannot build {EXTENSION_NAME}: {reason}")
        log(f"skipping {EXTENSION_NAME}: {reason}")
        return {}
    from torch.utils.cpp_extension import BuildExtension

    build_ext = BuildExtension.with_options(use_ninja=True)
    cache = os.environ.get("FASTFORMER_BUILD_CACHE", "").strip()
    if cache:
        build_ext = cached_build_ext(build_ext, Path(cache).expanduser().resolve())
    if mode == "auto":
        build_ext = tolerant_build_ext(build_ext)
    return {"ext_modules": [cuda_extension()], "cmdclass": {"build_ext": build_ext}}


setup(**extension_setup_kwargs())
