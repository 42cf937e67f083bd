"""`bpwopt inspect`: what a GGUF holds, per tensor, per layer and in total.

Reads only the header and tensor table (the file is memory-mapped), so it is
cheap on any model size. bpw here is llama.cpp's: 8 × bytes of tensor data /
elements. `open_gguf` is also how every other stage opens a GGUF, through
`gguf_reader.LazyGGUFReader`, which checks each count and offset against the
file as it walks the header, so a hostile or damaged file is refused in one line.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bpwopt.formats.splits import open_model

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    shape: tuple[int, ...]  # ggml order: row length first
    elements: int
    data_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.data_bytes / self.elements

    @property
    def layer(self) -> int | None:
        match = _LAYER.match(self.name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class GroupTotal:
    """Elements and bytes of a set of tensors (a layer, a type, the whole model)."""

    label: str
    tensors: int
    elements: int
    data_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.data_bytes / self.elements if self.elements else 0.0


@dataclass(frozen=True)
class ModelSummary:
    path: Path
    architecture: str
    file_bytes: int  # all files of a split model
    tensors: list[TensorInfo]
    shards: int = 1  # files: more than one for a split model

    def total(self) -> GroupTotal:
        return _group("total", self.tensors)

    def by_layer(self) -> list[GroupTotal]:
        groups = defaultdict(list)
        for tensor in self.tensors:
            groups[tensor.layer].append(tensor)
        layers = sorted(key for key in groups if key is not None)
        totals = [_group(f"blk.{layer}", groups[layer]) for layer in layers]
        if None in groups:
            totals.append(_group("other", groups[None]))
        return totals

    def by_type(self) -> list[GroupTotal]:
        groups = defaultdict(list)
        for tensor in self.tensors:
            groups[tensor.type_name].append(tensor)
        return [_group(name, members) for name, members in sorted(groups.items())]


def _group(label: str, tensors: list[TensorInfo]) -> GroupTotal:
    return GroupTotal(
        label, len(tensors), sum(t.elements for t in tensors), sum(t.data_bytes for t in tensors)
    )




def inspect_gguf(path: str | Path) -> ModelSummary:
    """What the model at path holds; a split model's first shard stands for all of its shards."""
    reader = open_model(path)
    architecture = reader.fields.get("general.architecture")
    tensors = [
        TensorInfo(
            name=tensor.name,
            type_name=tensor.tensor_type.name,
            shape=tuple(int(n) for n in tensor.shape),
            elements=int(tensor.n_elements),
            data_bytes=int(tensor.n_bytes),
        )
        for tensor in reader.tensors
    ]
    return ModelSummary(
        path=Path(path),
        architecture=architecture.contents() if architecture is not None else "unknown",
        file_bytes=reader.file_bytes,
        tensors=tensors,
        shards=len(reader.paths),
    )


def _total_row(total: GroupTotal) -> str:
    return (
        f"{total.label:<28} {total.tensors:>7} {total.elements:>14,} {total.data_bytes:>14,} "
        f"{total.bits_per_weight:>7.3f}"
    )


def format_summary(summary: ModelSummary, per_tensor: bool = False) -> str:
    """The human-readable report: types, layers, totals (and every tensor if asked)."""
    header = f"{'':<28} {'tensors':>7} {'elements':>14} {'bytes':>14} {'bpw':>7}"
    lines = [
        f"{summary.path}: {summary.architecture}, {len(summary.tensors)} tensors, "
        f"{summary.file_bytes:,} bytes on disk" + (f" in {summary.shards} shards" if summary.shards > 1 else ""),
        "",
        "by type",
        header,
        *(_total_row(total) for total in summary.by_type()),
        "",
        "by layer",
        header,
        *(_total_row(total) for total in summary.by_layer()),
        "",
        _total_row(summary.total()),
    ]
    if per_tensor:
        lines += ["", f"{'tensor':<32} {'type':<8} {'shape':<18} {'bytes':>12} {'bpw':>7}"]
        lines += [
            f"{t.name:<32} {t.type_name:<8} {'x'.join(map(str, t.shape)):<18} "
            f"{t.data_bytes:>12,} {t.bits_per_weight:>7.3f}"
            for t in summary.tensors
        ]
    return "\n".join(lines)


def summary_as_dict(summary: ModelSummary) -> dict:
    """The same report as plain data, for --json."""

    def total(group: GroupTotal) -> dict:
        return {
            "label": group.label,
            "tensors": group.tensors,
            "elements": group.elements,
            "bytes": group.data_bytes,
            "bpw": group.bits_per_weight,
        }

    return {
        "path": str(summary.path),
        "architecture": summary.architecture,
        "file_bytes": summary.file_bytes,
        "shards": summary.shards,
        "total": total(summary.total()),
        "by_type": [total(group) for group in summary.by_type()],
        "by_layer": [total(group) for group in summary.by_layer()],
        "tensors": [
            {
                "name": t.name,
                "type": t.type_name,
                "shape": list(t.shape),
                "elements": t.elements,
                "bytes": t.data_bytes,
                "bpw": t.bits_per_weight,
            }
            for t in summary.tensors
        ],
    }
