"""Budgets: what `--target-bpw` and `--target-size` mean, in bytes the solver can spend.

bpw is llama.cpp's: 8 × (bytes of all tensor data) / (elements of all tensors),
no header, no padding. A size target counts the whole file — header, metadata
and the alignment padding after every tensor — so the solver is given each
option's padded size and the header is subtracted from the budget first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bpwopt.errors import BpwoptError

_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1}
for _power, _prefix in enumerate("kmgt", start=1):
    _UNITS |= {_prefix: 1000**_power, f"{_prefix}b": 1000**_power, f"{_prefix}ib": 1024**_power}


def parse_size(text: str) -> int:
    """Bytes from `1.5gb`, `1500MB`, `800MiB`, `2G` or plain `123456`: decimal units ×1000, binary ×1024."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise BpwoptError(f"invalid size {text!r}; expected e.g. 1.5gb, 1500MB, 800MiB, 2G or a number of bytes")
    multiplier = _UNITS.get(match["unit"].lower())
    if multiplier is None:
        raise BpwoptError(f"invalid size unit in {text!r}; use B, kB, MB, GB, TB or KiB, MiB, GiB, TiB")
    size = float(match["number"]) * multiplier
    if not math.isfinite(size) or size < 1:
        raise BpwoptError(f"invalid size {text!r}: must be at least one byte")
    return int(size)


@dataclass(frozen=True)
class Target:
    """A budget: at most `bits_per_weight` (bpw target) or at most `file_bytes` (size target)."""

    bits_per_weight: float | None = None
    file_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.bits_per_weight is None) == (self.file_bytes is None):
            raise BpwoptError("give exactly one of --target-bpw and --target-size")
        bpw = self.bits_per_weight
        if bpw is not None and not (math.isfinite(bpw) and 0 < bpw <= 32):
            raise BpwoptError(f"invalid --target-bpw {self.bits_per_weight}: expected a number of bits such as 4.5")

    @property
    def counts_whole_file(self) -> bool:
        """Size targets count header and padding; bpw targets count tensor data only."""
        return self.file_bytes is not None

    def describe(self) -> str:
        """Canonical text, stored with plans: `bpw<=4.5` or `size<=1500000000`."""
        if self.file_bytes is not None:
            return f"size<={self.file_bytes}"
        return f"bpw<={self.bits_per_weight:g}"

    def file_label(self) -> str:
        """For the default output name: ggml-model-4.5bpw.gguf, ggml-model-1500000000B.gguf."""
        return f"{self.file_bytes}B" if self.file_bytes is not None else f"{self.bits_per_weight:g}bpw"

    def data_budget(self, elements: int) -> int:
        """The most tensor-data bytes a bpw target allows for this many elements."""
        assert self.bits_per_weight is not None
        return math.floor(self.bits_per_weight * elements / 8)
