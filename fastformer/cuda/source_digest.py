"""The digest of the CUDA sources (csrc/) that an extension is built from.

setup.py bakes it into ``fastformer._C`` (``build_info()["source_digest"]``); at run time a source
checkout compares it with its own csrc/ to tell an extension built from other sources (csrc/
edited, or checked out at another commit, since the build) from a current one. setup.py loads
this file by its path, before fastformer is importable: the standard library only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h", ".hpp")  # not the READMEs: a doc edit changes nothing


def source_digest(csrc: str | Path) -> str:
    """24 hex digits of SHA-256 over csrc's source files: each relative path and content, in order."""
    csrc = Path(csrc)
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]
