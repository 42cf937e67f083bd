"""How a solved plan is shown: a table for people (`--dry-run`, the log) and a dict for `--json`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from bpwopt.jobs.optimize import OptimizeReport


def format_plan(report: OptimizeReport, per_tensor: bool = False) -> str:
    """The plan in a few lines: types used, size, bpw, predicted error, gap, and presets next to it."""
    lines = []
    if per_tensor:
        lines.append(f"{'tensor':<40s} {'type':<7s} {'bytes':>12s} {'bpw':>6s} {'predicted error':>16s}")
        for t in report.tensors:
            bpw = 8.0 * t.data_bytes / t.elements
            error = f"{t.error:16.6g}" if t.varied else f"{'(fixed)':>16s}"
            lines.append(f"{t.name:<40s} {t.qtype:<7s} {t.data_bytes:12,d} {bpw:6.2f} {error}")
        lines.append("")
    lines.append(f"bpwopt: target {report.target.describe()}: {_types_summary(report)}")
    lines.append(
        f"bpwopt: {report.data_bytes / 2**20:.2f} MiB of tensor data ({report.bits_per_weight:.4f} BPW), "
        f"file {report.file_bytes:,} bytes, predicted error {report.predicted_error:.6g}, "
        f"optimality gap {report.gap:.2e}, solved in {report.solve_seconds:.2f} s"
    )
    took = f" in {report.measure_seconds:.1f} s" if report.measured else ""
    dominated = f" ({report.dominated} left at a small sample as dominated)" if report.dominated else ""
    pairs = f"{report.measured} (tensor, type) pairs{took}{dominated}, reused {report.reused}"
    lines.append(f"bpwopt: measured {pairs} from the state")
    for c in report.comparisons:
        ratio = c.optimized_error / c.predicted_error if c.predicted_error > 0 else float("nan")
        lines.append(
            f"bpwopt: preset {c.name} ({c.bits_per_weight:.4f} BPW) predicted error {c.predicted_error:.6g}; "
            f"bpwopt at that size {c.optimized_error:.6g} ({ratio:.2f}x)"
        )
    if report.state_path is not None:
        lines.append(f"bpwopt: state {report.state_path}")
    if report.output_path is not None:
        written = describe_written(report.output_path, report.shards, report.file_bytes)
        lines.append(f"bpwopt: wrote {written} in {report.write_seconds:.1f} s")
    return "\n".join(lines)


def describe_written(first_path: Path, shards: int, file_bytes: int) -> str:
    """What a write produced, for the log: the file to load, and how many shards come with it."""
    if shards == 1:
        return f"{first_path} ({file_bytes:,} bytes)"
    return f"{shards} shards, {first_path} first ({file_bytes:,} bytes in all)"


def _types_summary(report: OptimizeReport) -> str:
    counts: dict[str, int] = {}
    for t in report.tensors:
        counts[t.qtype] = counts.get(t.qtype, 0) + 1
    return ", ".join(f"{count} {name}" for name, count in sorted(counts.items(), key=lambda item: -item[1]))


def report_as_dict(report: OptimizeReport) -> dict:
    """Everything in the report as JSON-ready values."""
    summary = asdict(report)
    summary["target"] = report.target.describe()
    summary["bits_per_weight"] = report.bits_per_weight
    summary["output_path"] = str(report.output_path) if report.output_path else None
    summary["state_path"] = str(report.state_path) if report.state_path else None
    return summary
