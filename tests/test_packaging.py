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
