"""Small file helpers every stage stands on: content hashes, durable names, the cache folder.

They sit on the bottom floor so that the state, the source and the quality
tools can share them without importing one another.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bpwopt.errors import BpwoptError

CACHE_VARIABLE = "BPWOPT_CACHE"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (memory stays flat for any model size)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError as error:
        raise BpwoptError(f"cannot read {path}: {error.strerror}") from None
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name (a directory's, so that a rename in it is durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def cache_dir() -> Path:
    """bpwopt's cache folder: $BPWOPT_CACHE, else $XDG_CACHE_HOME/bpwopt, else ~/.cache/bpwopt."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bpwopt"
