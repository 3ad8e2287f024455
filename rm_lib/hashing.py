"""Content hashes for manifests: the same bytes give the same hash, whatever the file times."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(folder: str | Path, names: list[str] | None = None) -> str:
    """One hash over the named files (default: every file) of a folder, by relative path."""
    folder = Path(folder)
    paths = [folder / n for n in names] if names else sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()
