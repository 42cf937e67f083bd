"""Sensitivities: how much KL divergence a unit of the solver's error in each group of tensors costs.

The solver adds up, per tensor, an error measured on the weights alone;
tensors are not equally important, so that sum predicts KLD badly.
`bpwopt calibrate` measures the missing factor on the model's own output: for
each group of tensors (tensor class × third of the layers by default) it
writes a copy of the model in which every tensor of the group is perturbed,
measures the KLD that copy has against the unperturbed model on the
calibration text (never the evaluation text) through llama.cpp, and divides
by the group's summed error: sensitivity = KLD / Σ_group error.

Two probes. `quant` (the default) is ExLlamaV3's measurement: each tensor goes
through its measured type nearest PROBE_BPW, exactly as the writer would
quantize it, and the error is the one the state measured for that type under
PROBE_OBJECTIVE, so the weight is calibrated against the very error the solver
minimizes, with quantization's own error shape (noise spreads its error evenly
over the columns; quantization with an imatrix does not). `noise` adds
Gaussian noise of relative error exactly ρ² to each tensor (the linearity idea
of HIGGS, Malinovskii et al. 2024), per unit of `relative` error. For small
errors KLD is linear in the injected error, so Σ_t sensitivity_t · error_t
predicts a quantization's KLD.

Each group's value is stored in the state's `sensitivities` table as soon as
it is measured (a killed run resumes), and the whole set is written to the
`weights` table, which every later solve multiplies into the objective unless
`--ignore-tensor-importance` (`bpwopt.solve.objective.group_weight`). Groups not
calibrated (a partial run) get the median sensitivity as their weight.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_writer import TensorSlot, copied_kv, write_gguf
from bpwopt.formats.imatrix import Imatrix, load_imatrix
from bpwopt.formats.splits import SPLIT_KEYS, ModelFiles, model_sha256, open_model
from bpwopt.measure.records import Measurement
from bpwopt.policy.llama import read_model_info
from bpwopt.quality.evaluate import evaluate
from bpwopt.quality.testbed import tensor_seed
from bpwopt.quality.texts import calibration_text
from bpwopt.quant.codec import dequantize, quantize
from bpwopt.solve.objective import DEFAULT_GROUPING, PROBE_BPW_KEY, group_key, option_errors
from bpwopt.source.rows import expert_count, rows_to_float, tensor_rows
from bpwopt.state.store import StateFile, TensorRecord, read_identity
from bpwopt.write.model_writer import output_alignment

DEFAULT_NOISE = 1e-3  # ρ²: relative error injected into each tensor of a group (linear regime, see README)
PROBES = ("quant", "noise")
DEFAULT_PROBE = "quant"
PROBE_BPW = 4.5  # the quant probe: each tensor's measured type nearest this many bits per weight
PROBE_OBJECTIVE = "per-weight"  # the error a quant probe's sensitivity is KLD per unit of
# Windows of the calibration text per group and their length (second halves scored): the setting behind the
# sensitivity rows of benchmarks/RESULTS.md.
DEFAULT_CHUNKS = 2
DEFAULT_CTX = 256
SLAB_ELEMENTS = 4 << 20  # elements summed at a time in float64
# Settings stored beside the sensitivities: a resumed run reuses only values measured under the same ones.
_SETTING_KEYS = (
    "calibration.noise", "calibration.chunks", "calibration.ctx", "calibration.seed", PROBE_BPW_KEY,
)  # fmt: skip


@dataclass(frozen=True)
class GroupSensitivity:
    """One group's calibration: KLD caused by noise of relative error ρ² in each of its tensors."""

    key: str  # group key, as bpwopt.solve.objective.group_key writes it
    tensors: tuple[str, ...]
    summed_error: float  # Σ over the group's tensors of the injected error (quant: PROBE_OBJECTIVE's; noise: n · ρ²)
    mean_kld: float  # nats per token, against the unperturbed model on the calibration text
    mean_kld_stderr: float
    sensitivity: float  # mean_kld / summed_error
    reused: bool  # taken from the state, not measured by this run


@dataclass(frozen=True)
class CalibrationReport:
    groups: tuple[GroupSensitivity, ...]
    weights: dict[str, float]  # what was written to the state's weights table
    probe: str  # PROBES
    noise: float
    chunks: int
    ctx: int


# --- noise of an exact relative size -------------------------------------------------------------


def _column_squares(values: np.ndarray) -> np.ndarray:
    """Σ_rows values², float64 (n_per_row,), summed a slab of rows at a time."""
    rows_per_slab = max(1, SLAB_ELEMENTS // values.shape[1])
    total = np.zeros(values.shape[1], dtype=np.float64)
    for start in range(0, values.shape[0], rows_per_slab):
        slab = values[start:start + rows_per_slab].astype(np.float64)
        total += (slab * slab).sum(axis=0)
    return total


def weighted_energy(values: np.ndarray, weights: np.ndarray | None) -> float:
    """Σ w x² of values, float32 (n_expert · rows_per_expert, n_per_row); weights (n_expert, n_per_row) or None."""
    if weights is None:
        return float(_column_squares(values).sum())
    experts = values.reshape(weights.shape[0], -1, values.shape[1])
    return float(sum(_column_squares(rows) @ w.astype(np.float64) for rows, w in zip(experts, weights, strict=True)))


def scaled_noise(
    values: np.ndarray, weights: np.ndarray | None, relative_error: float, rng: np.random.Generator
) -> np.ndarray:
    """Gaussian noise, float32 like values (rows, n_per_row), scaled so that Σ w n² / Σ w x² = relative_error.

    w is the tensor's imatrix weights (n_expert, n_per_row; rows split evenly
    among experts) or 1, the same weights the objective's relative error uses.
    The ratio holds to float32 rounding of the noise (about 1e-7 relative).
    """
    if relative_error < 0:
        raise BpwoptError(f"the relative error must be non-negative, got {relative_error}")
    noise = rng.standard_normal(values.shape, dtype=np.float32)
    signal = weighted_energy(values, weights)
    drawn = weighted_energy(noise, weights)
    if signal <= 0 or drawn <= 0:
        return np.zeros_like(values)
    noise *= np.float32(math.sqrt(relative_error * signal / drawn))
    return noise


def relative_error(values: np.ndarray, perturbed: np.ndarray, weights: np.ndarray | None) -> float:
    """Σ w (x − y)² / Σ w x²: the objective's relative error of perturbed against values."""
    difference = perturbed.astype(np.float64) - values.astype(np.float64)
    return weighted_energy(difference, weights) / weighted_energy(values, weights)


def _tensor_weights(tensor: gguf.ReaderTensor, imatrix: Imatrix | None) -> np.ndarray | None:
    if imatrix is None:
        return None
    n_expert = expert_count(tensor)
    return imatrix.weights_for(tensor.name, int(tensor.shape[0]), n_expert)


# A tensor's perturbed values from its float32 rows (n_expert · rows_per_expert, n_per_row) and its imatrix
# weights (n_expert, n_per_row) or None.
Perturbation = Callable[[gguf.ReaderTensor, np.ndarray, "np.ndarray | None"], np.ndarray]


def noise_perturbation(noise: float, seed: int) -> Perturbation:
    """Gaussian noise of relative error `noise` (ρ²), seeded per tensor."""

    def perturb(tensor: gguf.ReaderTensor, values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        rng = np.random.default_rng(tensor_seed(seed, tensor.name))
        return values + scaled_noise(values, weights, noise, rng)

    return perturb


def quant_perturbation(probe_types: Mapping[str, GGMLQuantizationType], rounding: str) -> Perturbation:
    """A round trip through each tensor's probe type, with its imatrix weights and the state's rounding, as the
    writer would quantize it."""

    def perturb(tensor: gguf.ReaderTensor, values: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        qtype = probe_types[tensor.name]
        experts = values.reshape(expert_count(tensor), -1, values.shape[1])
        rows = [dequantize(quantize(np.ascontiguousarray(rows), qtype, None if weights is None else weights[e],
                                    rounding), qtype) for e, rows in enumerate(experts)]  # fmt: skip
        return np.concatenate(rows).reshape(values.shape)

    return perturb


def write_perturbed(
    reader: ModelFiles,
    names: Sequence[str],
    out_path: Path,
    perturbation: Perturbation,
    imatrix: Imatrix | None,
) -> int:
    """Copy the model to out_path with each tensor in names perturbed.

    Perturbed tensors are written as F32 (dequantized first if the source is
    quantized); every other tensor is copied byte for byte. One tensor is held
    in memory at a time; a split model becomes one file. Returns the file's bytes.
    """
    perturbed = set(names)
    missing = perturbed - {t.name for t in reader.tensors}
    if missing:
        raise BpwoptError(f"no tensor {sorted(missing)[0]} in the model")
    slots = [
        TensorSlot(
            t.name,
            tuple(int(n) for n in t.shape),
            GGMLQuantizationType.F32 if t.name in perturbed else GGMLQuantizationType(t.tensor_type),
            int(t.n_elements) * 4 if t.name in perturbed else int(t.n_bytes),
        )
        for t in reader.tensors
    ]

    def produce(index: int) -> Iterator[np.ndarray]:
        tensor = reader.tensors[index]
        raw = tensor_rows(tensor)
        if tensor.name not in perturbed:
            yield raw
            return
        values = rows_to_float(raw, GGMLQuantizationType(tensor.tensor_type), tensor.name)  # new float32 rows
        yield np.ascontiguousarray(perturbation(tensor, values, _tensor_weights(tensor, imatrix)), dtype=np.float32)

    kept = [field for name, field in reader.fields.items() if not name.startswith("GGUF.") and name not in SPLIT_KEYS]
    kv = [copied_kv(field) for field in kept]
    return write_gguf(out_path, kv, slots, produce, alignment=output_alignment(reader))


def probe_types(
    records: Mapping[str, TensorRecord], measurements: Mapping[tuple[str, str], Measurement], bpw: float = PROBE_BPW
) -> dict[str, GGMLQuantizationType]:
    """Each measured tensor's probe: its measured type whose bits per weight are nearest bpw (the smaller on a tie).

    A tensor's source type is never its probe (its round trip adds nothing).
    """
    options: dict[str, list[tuple[float, float, str]]] = {}
    for (tensor, qtype), measurement in measurements.items():
        record = records.get(tensor)
        if record is None or measurement.nbytes == 0 or qtype == record.source_type:
            continue
        bits = 8.0 * measurement.nbytes / record.elements
        options.setdefault(tensor, []).append((abs(bits - bpw), bits, qtype))
    return {tensor: GGMLQuantizationType[min(found)[2]] for tensor, found in options.items()}


def probe_error(
    names: Sequence[str],
    probes: Mapping[str, GGMLQuantizationType],
    records: Mapping[str, TensorRecord],
    measurements: Mapping[tuple[str, str], Measurement],
) -> float:
    """Σ over the group of the objective's error (PROBE_OBJECTIVE) of each tensor's probe, as the state measured it."""
    return float(sum(
        option_errors(PROBE_OBJECTIVE, [measurements[name, probes[name].name]], records[name])[0] for name in names
    ))  # fmt: skip


# --- groups and the calibration run ----------------------------------------------------------------


def tensor_groups(
    records: Sequence[TensorRecord], n_layer: int, grouping: str = DEFAULT_GROUPING
) -> dict[str, tuple[str, ...]]:
    """Group key -> names of its tensors, in the records' order."""
    groups: dict[str, list[str]] = {}
    for record in records:
        groups.setdefault(group_key(record, n_layer, grouping), []).append(record.name)
    return {key: tuple(names) for key, names in groups.items()}


def solver_weights(sensitivities: dict[str, float], group_keys: Sequence[str]) -> dict[str, float]:
    """The weights table: each group's sensitivity, the median of the measured ones where not measured."""
    measured = {key: value for key, value in sensitivities.items() if key in group_keys}
    if not measured:
        return {}
    fill = statistics.median(measured.values())
    return {key: measured.get(key, fill) for key in group_keys}


def _open_state(state_path: Path, model_path: Path, imatrix: Imatrix | None) -> StateFile:
    """The state measured for this model and imatrix; anything else is refused with the reason."""
    if not state_path.is_file():
        raise BpwoptError(f"{state_path}: no such state file; measure the model first (bpwopt … --state-file)")
    identity = read_identity(state_path)
    if model_sha256(open_model(model_path)) != identity.model_sha256:
        raise BpwoptError(f"{state_path} was measured for another model than {model_path}")
    wanted = imatrix.sha256 if imatrix is not None else None
    if wanted != identity.imatrix_sha256:
        need = "was measured with an imatrix: pass the same --imatrix" if identity.imatrix_sha256 else (
            "was measured without an imatrix: drop --imatrix")
        raise BpwoptError(f"{state_path} {need} (noise is sized with the objective's weights)")
    return StateFile.open(state_path, identity, create=False)


def calibrate(
    model_path: str | Path,
    state_path: str | Path,
    *,
    imatrix_path: str | Path | None = None,
    grouping: str = DEFAULT_GROUPING,
    probe: str = DEFAULT_PROBE,
    noise: float = DEFAULT_NOISE,
    chunks: int = DEFAULT_CHUNKS,
    ctx: int = DEFAULT_CTX,
    only: Sequence[str] | None = None,
    seed: int = 0,
    fresh: bool = False,
    work_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> CalibrationReport:
    """Measure the sensitivity of every group of the state's tensors and store them as the solver's weights.

    model_path: the unquantized GGUF the state was measured for; probe: how a
    group is perturbed (PROBES: `quant`, a round trip through each tensor's type
    nearest PROBE_BPW, sensitivity per unit of PROBE_OBJECTIVE's error; `noise`,
    Gaussian noise of relative error `noise` = ρ² per tensor, sensitivity per
    unit of relative error); chunks, ctx: calibration text windows
    (bpwopt.quality.evaluate); only: calibrate just these group keys; fresh:
    discard stored sensitivities instead of resuming; work_dir: where the
    perturbed copies are written (one at a time; default: a temporary
    directory); cache_dir: the base log-probs cache (default:
    bpwopt.quality.evaluate's). Raises BpwoptError for a state of another model
    or imatrix, or an empty state.
    """
    if probe not in PROBES:
        raise BpwoptError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if probe == "noise" and not noise > 0:
        raise BpwoptError(f"--noise must be positive, got {noise}")
    model_path, state_path = Path(model_path), Path(state_path)
    imatrix = load_imatrix(imatrix_path) if imatrix_path is not None else None
    reader = open_model(model_path)
    n_layer = read_model_info(reader).n_layer_all
    text = calibration_text()
    probe_bpw = PROBE_BPW if probe == "quant" else 0.0
    setting_values = (noise if probe == "noise" else 0.0, float(chunks), float(ctx), float(seed), probe_bpw)
    settings = dict(zip(_SETTING_KEYS, setting_values, strict=True))
    with _open_state(state_path, model_path, imatrix) as state:
        records = state.tensors()
        if not records:
            raise BpwoptError(f"{state_path} holds no measured tensors yet; measure the model first")
        measurements = state.measurements()
        probes = probe_types(records, measurements)
        groups = tensor_groups([r for r in records.values() if probe == "noise" or r.name in probes], n_layer, grouping)
        unknown = set(only or ()) - set(groups)
        if unknown:
            raise BpwoptError(f"no group {sorted(unknown)[0]}; groups: {', '.join(groups)}")
        stored = {} if fresh else state.values("sensitivities")
        before_probes = {PROBE_BPW_KEY: 0.0}  # values stored before quantization probes existed were noise probes
        if any(stored.get(key, before_probes.get(key)) != value for key, value in settings.items()):
            stored = {}  # measured under other settings: start over
        if probe == "quant":
            perturbation = quant_perturbation(probes, state.identity.rounding)
        else:
            perturbation = noise_perturbation(noise, seed)
        results = []
        todo = [key for key in groups if only is None or key in only]
        with tempfile.TemporaryDirectory(prefix="bpwopt-calibrate-", dir=work_dir) as directory:
            perturbed_path = Path(directory) / "perturbed.gguf"
            for key in tqdm(todo, desc="calibrating", unit="group", disable=not progress):
                names = groups[key]
                summed = probe_error(names, probes, records, measurements) if probe == "quant" else noise * len(names)
                if key in stored:
                    results.append(GroupSensitivity(key, names, summed, stored[key] * summed, 0.0, stored[key], True))
                    continue
                write_perturbed(reader, names, perturbed_path, perturbation, imatrix)
                result = evaluate(
                    model_path, perturbed_path, text, ctx=ctx, chunks=chunks, cache_dir=cache_dir, threads=threads,
                    progress=False,
                )  # fmt: skip
                sensitivity = result.mean_kld / summed if summed > 0 else 0.0
                results.append(
                    GroupSensitivity(key, names, summed, result.mean_kld, result.mean_kld_stderr, sensitivity, False)
                )
                stored = {**settings, **{k: v for k, v in stored.items() if k not in settings}, key: sensitivity}
                state.set_values("sensitivities", stored)  # committed now: a killed run resumes here
        measured = {r.key: r.sensitivity for r in results}
        all_stored = {k: v for k, v in stored.items() if k not in settings and k in groups} | measured
        weights = solver_weights(all_stored, list(groups))
        state.set_values("weights", weights)
    return CalibrationReport(tuple(results), weights, probe, noise, chunks, ctx)


def format_report(report: CalibrationReport) -> str:
    """One line per group, most sensitive first."""
    lines = [f"{'group':<24} {'tensors':>7} {'Σ error':>12} {'KLD':>10} {'±':>9} {'sensitivity':>11}"]
    for group in sorted(report.groups, key=lambda g: -g.sensitivity):
        stderr = "reused" if group.reused else f"{group.mean_kld_stderr:.2e}"
        lines.append(
            f"{group.key:<24} {len(group.tensors):>7} {group.summed_error:>12.3g} "
            f"{group.mean_kld:>10.3e} {stderr:>9} {group.sensitivity:>11.4g}"
        )
    return "\n".join(lines)
