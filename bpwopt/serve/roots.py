"""The folders a server may read and write, and the one check every path from a request passes.

A path from a request is resolved (symlinks followed) before it is compared with
the roots, so neither `..` nor a link that points outside lets a request reach a
file the person who started the server did not hand over.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bpwopt.errors import BpwoptError

STATE_SUFFIX = ".bpw_state"
_LATER_SHARD = re.compile(r"-(?!00001-)\d{5}-of-\d{5}\.gguf$")  # a split model is listed by its first file


class PathRefusedError(BpwoptError):
    """A request named a path outside the roots, or one that does not exist."""


@dataclass(frozen=True)
class Roots:
    """Resolved folders; every path a request names must lie inside one of them."""

    folders: tuple[Path, ...]

    @classmethod
    def of(cls, folders: Sequence[str | os.PathLike]) -> Roots:
        resolved = []
        for folder in folders:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise BpwoptError(f"--root {folder}: not a folder")
            resolved.append(path)
        if not resolved:
            raise BpwoptError("give at least one --root folder")
        return cls(tuple(dict.fromkeys(resolved)))

    def inside(self, text: str, must_exist: bool = True) -> Path:
        """The resolved path text names (relative: to the first root that has it); refused outside the roots."""
        if "\x00" in text or not text.strip():
            raise PathRefusedError(f"not a path: {text!r}")
        path = Path(text)
        try:
            if not path.is_absolute():
                path = next((root / path for root in self.folders if (root / path).exists()), self.folders[0] / path)
            resolved = path.resolve()
            is_file = resolved.is_file()
        except OSError as error:  # a name too long, a loop of links: no file a request can have
            raise PathRefusedError(f"{text[:200]}: {error.strerror or error}") from None
        if not self.holds(resolved):
            raise PathRefusedError(f"{text} is outside the folders this server was given")
        if must_exist and not is_file:
            raise PathRefusedError(f"{text}: no such file under the server's folders")
        return resolved

    def holds(self, resolved: Path) -> bool:
        return any(resolved.is_relative_to(root) for root in self.folders)

    def relative(self, path: Path) -> str:
        """path as a request would name it: relative to the first root that holds it."""
        for root in self.folders:
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return str(path)

    def files(self, suffix: str) -> Iterator[Path]:
        """Every file under the roots whose name ends in suffix, resolved, each once, sorted per root."""
        seen = set()
        for root in self.folders:
            for path in sorted(root.rglob(f"*{suffix}")):
                resolved = path.resolve()
                if resolved in seen or not resolved.is_file() or not self.holds(resolved):
                    continue
                seen.add(resolved)
                yield resolved

    def models(self) -> Iterator[Path]:
        """GGUF models under the roots (a split model by its first file)."""
        return (path for path in self.files(".gguf") if not _LATER_SHARD.search(path.name))

    def states(self) -> Iterator[Path]:
        return self.files(STATE_SUFFIX)


def file_id(path: Path) -> str:
    """A short stable id of a resolved path, for URLs (no path text in them to escape or to leak)."""
    return hashlib.sha256(str(path).encode()).hexdigest()[:16]
