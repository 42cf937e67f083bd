"""Split GGUF models (gguf-split's shards), read and named as llama.cpp reads and names them.

A model split into N files is named PREFIX-00001-of-0000N.gguf … ; the first
shard holds all metadata plus split.no, split.count and split.tensors.count,
the others only those three keys and their tensors. `open_model` is how the
pipeline opens its input: one file, or the first shard of a split model,
becomes one `ModelFiles` whose metadata is the first shard's and whose tensors
are the union, each memory-mapped from its own shard — so the rest of the
pipeline never asks whether a model is split. The shards are checked as
llama_model_loader checks them, so what bpwopt accepts llama.cpp loads.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import gguf

from bpwopt.errors import BpwoptError
from bpwopt.formats.files import file_sha256
from bpwopt.formats.gguf_reader import open_gguf

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS_COUNT = "split.tensors.count"
SPLIT_KEYS = frozenset({SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT})
_GGUF_SUFFIX = ".gguf"


def split_path(prefix: str | Path, shard: int, count: int) -> Path:
    """The file of shard `shard` (from 0) of `count` (llama_split_path)."""
    return Path(f"{prefix}-{shard + 1:05d}-of-{count:05d}.gguf")


def split_prefix(path: str | Path, shard: int, count: int) -> str | None:
    """PREFIX of a shard's file name, or None when the name is not PREFIX-0000k-of-0000N.gguf (llama_split_prefix)."""
    text, postfix = str(path), f"-{shard + 1:05d}-of-{count:05d}.gguf"
    return text[: -len(postfix)] if len(text) > len(postfix) and text.endswith(postfix) else None


def keep_split_prefix(output_path: Path) -> Path:
    """The PREFIX of --keep-split shards for OUT, as llama-quantize forms it.

    It drops the last five characters whenever OUT contains ".gguf" anywhere
    (normally its extension); a drop-in keeps that rule for any OUT.
    """
    text = str(output_path)
    return Path(text[: -len(_GGUF_SUFFIX)]) if _GGUF_SUFFIX in text else output_path


@dataclass(frozen=True)
class ModelFiles:
    """A model as llama.cpp loads it: the readers of its files (one, or every shard in order).

    It reads like one gguf reader: `fields` are the first file's metadata,
    `tensors` the tensors of all files, shard by shard in file order.
    """

    paths: tuple[Path, ...]
    readers: tuple[gguf.GGUFReader, ...]

    @property
    def fields(self) -> dict[str, gguf.ReaderField]:
        return self.readers[0].fields

    @functools.cached_property
    def tensors(self) -> list[gguf.ReaderTensor]:
        return [tensor for reader in self.readers for tensor in reader.tensors]

    @functools.cached_property
    def shard_of(self) -> dict[str, int]:
        """Tensor name -> index (from 0) of the file that holds it."""
        return {tensor.name: index for index, reader in enumerate(self.readers) for tensor in reader.tensors}

    @property
    def file_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.paths)


def open_model(path: str | Path) -> ModelFiles:
    """Open a GGUF model, and with its first shard every other shard of a split model.

    Refuses, in one line each, what llama.cpp refuses: a later shard named
    instead of the first, a first shard whose name does not carry its
    number, a missing shard, a shard with another split.no or split.count, a
    tensor in two shards, and a split.tensors.count other than the tensors found.
    """
    path = Path(path)
    first = open_gguf(path)
    count = _split_value(first, SPLIT_COUNT, path, required=False)
    if count <= 1:
        return ModelFiles((path,), (first,))
    number = _split_value(first, SPLIT_NO, path)
    if number != 0:
        prefix = split_prefix(path, number, count)
        hint = f"; give {split_path(prefix, 0, count)}" if prefix is not None else ""
        raise BpwoptError(f"{path} is shard {number + 1} of a split model of {count}, not its first{hint}")
    prefix = split_prefix(path, 0, count)
    if prefix is None:
        raise BpwoptError(f"{path}: the first of {count} shards must be named PREFIX-00001-of-{count:05d}.gguf")
    paths, readers = [path], [first]
    for shard in range(1, count):
        shard_path = split_path(prefix, shard, count)
        if not shard_path.exists():
            raise BpwoptError(f"{shard_path}: missing shard {shard + 1} of {count} of {path}")
        reader = open_gguf(shard_path)
        for key, expected in ((SPLIT_NO, shard), (SPLIT_COUNT, count)):
            found = _split_value(reader, key, shard_path)
            if found != expected:
                raise BpwoptError(f"{shard_path}: {key} is {found}, expected {expected} (shard {shard + 1} of {path})")
        paths.append(shard_path)
        readers.append(reader)
    model = ModelFiles(tuple(paths), tuple(readers))
    _check_union(model)
    expected_tensors = _split_value(first, SPLIT_TENSORS_COUNT, path)
    if expected_tensors != len(model.tensors):
        found = len(model.tensors)
        raise BpwoptError(f"{path}: split.tensors.count is {expected_tensors}, the {count} shards hold {found} tensors")
    return model


def _check_union(model: ModelFiles) -> None:
    seen: dict[str, int] = {}
    for index, reader in enumerate(model.readers):
        for tensor in reader.tensors:
            if tensor.name in seen:
                raise BpwoptError(
                    f"tensor {tensor.name} is in both {model.paths[seen[tensor.name]]} and {model.paths[index]}"
                )
            seen[tensor.name] = index


def _split_value(reader: gguf.GGUFReader, key: str, path: Path, required: bool = True) -> int:
    """An integer split.* key; absent is 0 unless required."""
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise BpwoptError(f"{path}: a shard of a split model needs the key {key}")
        return 0
    value = field.contents()
    if not isinstance(value, int) or isinstance(value, bool):
        raise BpwoptError(f"{path}: {key} is {value!r}, not an integer")
    return value


def model_sha256(model: ModelFiles) -> str:
    """The model's identity in state files: its file's sha256; a split model's, the sha256 of its shards' ones.

    Hashes are computed once per process while a file is unchanged (same inode,
    size and mtime), like its reader: re-solving in one process hashes once.
    """
    hashes = []
    for path in model.paths:
        status = path.stat()
        hashes.append(_sha256_unchanged(path.resolve(), status.st_ino, status.st_size, status.st_mtime_ns))
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _sha256_unchanged(path: Path, inode: int, size: int, mtime_ns: int) -> str:
    return file_sha256(path)
