"""The llama-quantize job as one function: read, choose types (policy), write.

`quantize_file` is what the command line calls for `bpwopt IN [OUT] TYPE`;
it is plain data in (a QuantizeJob) and plain data out (a QuantizeReport).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFValueType

from bpwopt import __version__
from bpwopt.errors import BpwoptError
from bpwopt.imatrix import check_imatrix_fits, load_imatrix
from bpwopt.inspector import open_gguf
from bpwopt.model_writer import KeyValue, WriteRequest, output_row_bytes, write_model
from bpwopt.policy import QuantizeOptions, TensorPlan, TypePlan, plan_types, read_model_info, read_tensor_specs
from bpwopt.presets import parse_type_argument

_IMATRIX_TEXT_LIMIT = 127  # llama-quantize truncates these strings to its 128-byte override buffer


@dataclass
class QuantizeJob:
    """One `bpwopt IN [OUT] TYPE` invocation, as plain data."""

    input_path: Path
    output_path: Path | None
    type_text: str
    options: QuantizeOptions = field(default_factory=QuantizeOptions)
    imatrix_path: Path | None = None
    overrides: dict[str, KeyValue] = field(default_factory=dict)
    threads: int | None = None
    dry_run: bool = False
    progress: bool = True


@dataclass(frozen=True)
class QuantizeReport:
    output_path: Path | None
    type_reading: str  # which reading of TYPE was used, for the log
    plan: TypePlan
    input_bytes: int
    output_data_bytes: int  # tensor data only, as llama.cpp's size line counts it
    file_bytes: int | None  # the whole written file; None for a dry run
    elements: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.output_data_bytes / self.elements


def default_output_path(input_path: Path, type_name: str) -> Path:
    """llama-quantize's default: ggml-model-<TYPE>.gguf beside the input."""
    return input_path.parent / f"ggml-model-{type_name}.gguf"


def _imatrix_keys(imatrix, entries: int) -> dict[str, KeyValue]:
    file_name = str(imatrix.path)[:_IMATRIX_TEXT_LIMIT]
    keys: dict[str, KeyValue] = {"quantize.imatrix.file": (GGUFValueType.STRING, file_name)}
    if imatrix.datasets:
        dataset = imatrix.datasets[0][:_IMATRIX_TEXT_LIMIT]
        keys["quantize.imatrix.dataset"] = (GGUFValueType.STRING, dataset)
    keys["quantize.imatrix.entries_count"] = (GGUFValueType.UINT32, entries)
    if imatrix.chunk_count > 0:
        keys["quantize.imatrix.chunks_count"] = (GGUFValueType.UINT32, imatrix.chunk_count)
    return keys


def quantize_file(job: QuantizeJob) -> QuantizeReport:
    """Quantize job.input_path with llama.cpp's policy for the preset in job.type_text."""
    if job.options.prune_layers:
        raise BpwoptError("--prune-layers is not supported by bpwopt yet")
    reader = open_gguf(job.input_path)
    model = read_model_info(reader)
    choice = parse_type_argument(job.type_text, is_clip=model.architecture == "clip")
    specs = read_tensor_specs(reader)
    imatrix = None
    options = job.options
    if job.imatrix_path is not None:
        imatrix = load_imatrix(job.imatrix_path)
        check_imatrix_fits(imatrix, {spec.name for spec in specs})
        imatrix = imatrix.filtered(list(options.include_weights), list(options.exclude_weights))
        options = QuantizeOptions(**{**options.__dict__, "imatrix_names": frozenset(imatrix.entries)})
    plan = plan_types(specs, model, choice.preset, options)
    unsupported = plan.unsupported_types()
    if unsupported:
        name, ggml_type = next(iter(unsupported.items()))
        raise BpwoptError(f"bpwopt cannot produce {ggml_type.name} yet (needed for {name} by {choice.preset.name})")
    output_path = job.output_path or default_output_path(job.input_path, choice.preset.name)
    if not job.dry_run and output_path.exists() and os.path.samefile(output_path, job.input_path):
        raise BpwoptError(f"input and output files are the same: {output_path}")
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    elements = sum(int(by_name[t.source_name].n_elements) for t in plan.tensors)
    data_bytes = sum(int(by_name[t.source_name].n_elements) // t.shape[0] * _row_bytes(t) for t in plan.tensors)
    file_bytes = None
    if not job.dry_run:
        overrides = dict(job.overrides)
        if imatrix is not None:
            overrides |= _imatrix_keys(imatrix, len(imatrix.entries))
        file_type = plan.file_type if plan.file_type is not None else _input_file_type(reader)
        request = WriteRequest(
            reader=reader,
            target_types=plan.types(),
            file_type=file_type,
            imatrix=imatrix,
            overrides=overrides,
            provenance={
                "bpwopt.version": (GGUFValueType.STRING, __version__),
                "bpwopt.recipe": (GGUFValueType.STRING, choice.preset.name),
            },
            progress=job.progress,
        )
        file_bytes = write_model(request, output_path)
    return QuantizeReport(
        output_path=None if job.dry_run else output_path,
        type_reading=choice.describe(),
        plan=plan,
        input_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        output_data_bytes=data_bytes,
        file_bytes=file_bytes,
        elements=elements,
    )


def _row_bytes(tensor: TensorPlan) -> int:
    return output_row_bytes(tensor.target_type, tensor.shape[0])


def _input_file_type(reader) -> int:
    """COPY keeps the input's general.file_type (llama-quantize's only_copy)."""
    field = reader.fields.get("general.file_type")
    return int(field.contents()) if field is not None else 0
