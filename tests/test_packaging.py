"""The source distribution: it must carry what building and testing fastformer need."""

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the tracked files are the reference)")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


def test_sdist_carries_the_extension_sources_and_the_test_suite(tmp_path):
    """Without a manifest the sdist held no header (and with FASTFORMER_BUILD_CUDA=0 no csrc/ file
    at all): the CUDA extension could not be built from it, and its tests missed their helpers."""
    tracked = _tracked_files()
    source = tmp_path / "src"
    for name in tracked:  # a copy of the checkout's tracked files: nothing built or generated
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    env = {"PATH": "/usr/bin:/bin", "FASTFORMER_BUILD_CUDA": "0"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=source, env=env,
                   check=True, capture_output=True, timeout=300)
    (archive,) = (tmp_path / "dist").glob("fastformer-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {member.name.split("/", 1)[1] for member in tar.getmembers() if member.isfile() and "/" in member.name}
    wanted = [name for name in tracked if name.split("/")[0] in ("csrc", "fastformer", "tests", "benchmarks")]
    missing = sorted(set(wanted) - names)
    assert not missing, f"not in the sdist: {missing[:10]}"
    assert not [name for name in names if name.endswith((".so", ".o", ".pyc"))]


# --------------------------------------------------------------------------------------------
# FASTFORMER_BUILD_CACHE: whole builds kept under a hash of their inputs
# --------------------------------------------------------------------------------------------
def _setup_module(monkeypatch):
    """setup.py's functions, without running setup()."""
    import importlib.util

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("FASTFORMER_BUILD_CUDA", "0")
    spec = importlib.util.spec_from_file_location("fastformer_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_cache_compiles_a_new_entry_from_fresh_objects_and_reuses_it(monkeypatch, tmp_path):
    """A cache miss compiles in an empty object folder (so that no object of older sources is
    linked into an entry keyed by the new ones), stores the result, and a hit copies it."""
    from setuptools import Extension

    setup_module = _setup_module(monkeypatch)
    monkeypatch.setattr(setup_module, "build_key", lambda ext: "key")
    build_temp = tmp_path / "temp"
    (build_temp / "stale.o").parent.mkdir(parents=True)
    (build_temp / "stale.o").write_text("an object of older sources")
    target = tmp_path / "lib" / "_C.so"
    compiled_in = []

    class FakeBuildExt:
        def __init__(self):
            self.build_temp = str(build_temp)

        def get_ext_fullpath(self, name):
            return str(target)

        def build_extension(self, ext):
            folder = Path(self.build_temp)
            compiled_in.append((folder, sorted(p.name for p in folder.iterdir())))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"built in {folder.name}")

    builder = setup_module.cached_build_ext(FakeBuildExt, tmp_path / "cache")()
    extension = Extension("fastformer._C", sources=[])
    builder.build_extension(extension)
    (folder, contents), = compiled_in
    assert folder != build_temp and contents == [] and not folder.exists()  # fresh, then removed
    assert builder.build_temp == str(build_temp) and (build_temp / "stale.o").exists()
    assert (tmp_path / "cache" / "key" / "_C.so").read_text() == target.read_text()

    target.unlink()
    builder.build_extension(extension)  # a hit: copied, nothing compiled
    assert len(compiled_in) == 1 and target.read_text() == f"built in {folder.name}"
