"""The steps every job shares — open the source, plan types, write — and the llama-quantize job.

`quantize_file` is what the command line calls for `bpwopt IN [OUT] TYPE`;
it is plain data in (a QuantizeJob) and plain data out (a QuantizeReport).
The optimizer (`bpwopt.jobs.optimize`) uses the same steps with its own types.
A split input is opened whole from its first shard (`bpwopt.formats.splits`), so
these steps see one model; only --keep-split asks which shard a tensor is in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from bpwopt import __version__
from bpwopt.errors import BpwoptError
from bpwopt.formats.imatrix import Imatrix, check_imatrix_fits, load_imatrix
from bpwopt.formats.output_paths import check_free_space, writable_output
from bpwopt.formats.splits import ModelFiles, keep_split_prefix, open_model, split_path
from bpwopt.policy.clip import CLIP_ARCHITECTURE, plan_clip_types
from bpwopt.policy.llama import (
    ModelInfo,
    QuantizeOptions,
    TensorSpec,
    TypePlan,
    llama_cpp_order,
    plan_types,
    read_model_info,
    read_tensor_specs,
    renumber_layers,
)
from bpwopt.policy.presets import TypeChoice, parse_type_argument
from bpwopt.quant.types import DEFAULT_ROUNDING, row_bytes
from bpwopt.write.model_writer import KeyValue, WriteRequest, planned_file_bytes, write_model

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
    rounding: str = DEFAULT_ROUNDING  # --rounding; ggml's bytes, as llama-quantize writes them, unless "best"
    dry_run: bool = False
    progress: bool = True


@dataclass(frozen=True)
class QuantizeReport:
    output_path: Path | None  # the file to load: the only one, or with --keep-split the first shard
    type_reading: str  # which reading of TYPE was used, for the log
    plan: TypePlan
    input_bytes: int
    output_data_bytes: int  # tensor data only, as llama.cpp's size line counts it
    file_bytes: int | None  # the whole written file (all shards); None for a dry run
    elements: int
    shards: int  # files written: 1, the --keep-split shards, or 0 for a dry run

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.output_data_bytes / self.elements


@dataclass(frozen=True)
class SourceModel:
    """An input GGUF opened for quantizing: the memory-mapped readers, model facts, tensors and imatrix."""

    path: Path  # as given: the only file, or the first shard
    reader: ModelFiles  # every shard's reader, read as one
    model: ModelInfo
    specs: list[TensorSpec]
    imatrix: Imatrix | None  # after --include-weights / --exclude-weights
    options: QuantizeOptions  # the user's, with the imatrix's entry names filled in

    @property
    def tensors_by_name(self) -> dict[str, gguf.ReaderTensor]:
        return {tensor.name: tensor for tensor in self.reader.tensors}

    @property
    def input_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.reader.tensors)

    @property
    def source_names(self) -> dict[str, str]:
        """Written tensor name -> source tensor name; they differ only where --prune-layers renumbered a block."""
        return {new: old for old, new in self._renumbered()[0].items()}

    @property
    def pruned_block_count(self) -> int | None:
        """{arch}.block_count after --prune-layers (llama.cpp rewrites only this key); None without pruning."""
        return self._renumbered()[1] if self.options.prune_layers else None

    def _renumbered(self) -> tuple[dict[str, str], int]:
        return renumber_layers(llama_cpp_order(spec.name for spec in self.specs), self.options.prune_layers)


def open_source(input_path: Path, imatrix_path: Path | None, options: QuantizeOptions) -> SourceModel:
    """Open the input and its imatrix; refuses what llama-quantize refuses before planning."""
    reader = open_model(input_path)
    model = read_model_info(reader)
    specs = read_tensor_specs(reader)
    if not specs:
        raise BpwoptError(f"{input_path}: the GGUF holds no tensors, nothing to quantize")
    imatrix = None
    if imatrix_path is not None:
        imatrix = load_imatrix(imatrix_path)
        check_imatrix_fits(imatrix, {spec.name for spec in specs})
        imatrix = imatrix.filtered(list(options.include_weights), list(options.exclude_weights))
        options = replace(options, imatrix_names=frozenset(imatrix.entries))
    return SourceModel(Path(input_path), reader, model, specs, imatrix, options)


def plan_preset(source: SourceModel, type_text: str) -> tuple[TypeChoice, TypePlan]:
    """llama.cpp's types for the preset TYPE names, refusing types bpwopt cannot write.

    A CLIP / mmproj file follows clip-quantize-cli's rules instead (`bpwopt.policy.clip`).
    """
    is_clip = source.model.architecture == CLIP_ARCHITECTURE
    choice = parse_type_argument(type_text, is_clip=is_clip)
    if is_clip:
        plan = plan_clip_types(source.specs, choice.preset, source.options)
    else:
        plan = plan_types(source.specs, source.model, choice.preset, source.options)
    unsupported = plan.unsupported_types()
    if unsupported:
        name, ggml_type = next(iter(unsupported.items()))
        raise BpwoptError(f"bpwopt cannot produce {ggml_type.name} yet (needed for {name} by {choice.preset.name})")
    return choice, plan


def default_output_path(input_path: Path, type_name: str) -> Path:
    """llama-quantize's default: ggml-model-<TYPE>.gguf beside the input."""
    return input_path.parent / f"ggml-model-{type_name}.gguf"


def output_base(output_path: Path, options: QuantizeOptions) -> Path:
    """The path write_model takes: OUT itself, or with --keep-split the shards' prefix llama-quantize makes of it."""
    return keep_split_prefix(output_path) if options.keep_split else output_path


def check_outputs(source: SourceModel, output_path: Path, file_bytes: int | None = None) -> list[Path]:
    """The files a write of source to output_path makes, refused before any work where one cannot be written.

    OUT, or with --keep-split one shard per input shard; each must pass
    bpwopt.formats.output_paths (no directory, no missing directory, not one
    of the input's files or its imatrix under any name, …) and, once the
    written size is known (file_bytes, all files), fit the free space.
    """
    count = len(source.reader.paths)
    paths = [split_path(output_path, i, count) for i in range(count)] if source.options.keep_split else [output_path]
    inputs = [*source.reader.paths, *([source.imatrix.path] if source.imatrix is not None else [])]
    targets = [writable_output(path, inputs) for path in paths]
    if file_bytes is not None:
        check_free_space(targets, file_bytes)
    return paths


def plan_data_bytes(source: SourceModel, types: dict[str, GGMLQuantizationType]) -> tuple[int, int]:
    """(elements, tensor data bytes) of the output, as llama.cpp's size line counts them (no padding)."""
    by_name, source_names = source.tensors_by_name, source.source_names
    tensors = {name: by_name[source_names[name]] for name in types}
    elements = sum(int(tensor.n_elements) for tensor in tensors.values())
    data_bytes = sum(tensor_output_bytes(tensors[name], ggml_type) for name, ggml_type in types.items())
    return elements, data_bytes


def tensor_output_bytes(tensor: gguf.ReaderTensor, ggml_type: GGMLQuantizationType) -> int:
    """Bytes of one tensor's data once converted to ggml_type (no alignment padding)."""
    n_per_row = int(tensor.shape[0])
    return int(tensor.n_elements) // n_per_row * row_bytes(ggml_type, n_per_row)


def write_request(
    source: SourceModel,
    types: dict[str, GGMLQuantizationType],
    file_type: int | None,
    overrides: dict[str, KeyValue],
    provenance: dict[str, KeyValue],
    progress: bool = True,
    rounding: str = DEFAULT_ROUNDING,
) -> WriteRequest:
    """What the write stage needs for these types: metadata as llama-quantize writes it, plus ours."""
    overrides = dict(overrides)
    if source.imatrix is not None:
        overrides |= _imatrix_keys(source.imatrix, len(source.imatrix.entries))
    if source.pruned_block_count is not None:  # set after the overrides, as llama.cpp does
        block_count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=source.model.architecture)
        overrides.pop(block_count_key, None)
        overrides[block_count_key] = (GGUFValueType.UINT32, source.pruned_block_count)
    shard_of = source.reader.shard_of
    source_names = source.source_names
    return WriteRequest(
        reader=source.reader,
        target_types=types,
        shard_of={name: shard_of[source_names[name]] for name in types} if source.options.keep_split else None,
        file_type=file_type if file_type is not None else _input_file_type(source.reader),
        source_names={new: old for new, old in source_names.items() if new != old},
        imatrix=source.imatrix,
        overrides=overrides,
        provenance={
            "bpwopt.version": (GGUFValueType.STRING, __version__),
            "bpwopt.rounding": (GGUFValueType.STRING, rounding),
            **provenance,
        },
        progress=progress,
        rounding=rounding,
    )


def _imatrix_keys(imatrix: Imatrix, entries: int) -> dict[str, KeyValue]:
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
    source = open_source(job.input_path, job.imatrix_path, job.options)
    choice, plan = plan_preset(source, job.type_text)
    output_path = output_base(job.output_path or default_output_path(job.input_path, choice.preset.name), job.options)
    types = plan.types()
    elements, data_bytes = plan_data_bytes(source, types)
    recipe = {"bpwopt.recipe": (GGUFValueType.STRING, choice.preset.name)}
    request = write_request(source, types, plan.file_type, job.overrides, recipe, job.progress, job.rounding)
    written, file_bytes = [], None
    if not job.dry_run:
        written = check_outputs(source, output_path, planned_file_bytes(request))
        file_bytes = write_model(request, output_path)
    return QuantizeReport(
        output_path=written[0] if written else None,
        type_reading=choice.describe(),
        plan=plan,
        input_bytes=source.input_bytes,
        output_data_bytes=data_bytes,
        file_bytes=file_bytes,
        elements=elements,
        shards=len(written),
    )


def _input_file_type(reader: ModelFiles) -> int:
    """COPY keeps the input's general.file_type (llama-quantize's only_copy)."""
    field = reader.fields.get("general.file_type")
    return int(field.contents()) if field is not None else 0
