"""Evaluation: KL divergence of a quantized model's next-token distribution from its base model's.

The check after the write stage. Both models run through llama.cpp's own
runtime (llama-cpp-python) on the same text, exactly as `llama-perplexity
--kl-divergence` runs them: the text is tokenized with the base model, cut
into non-overlapping windows of `ctx` tokens (the first replaced by BOS where
the vocabulary adds one), and only the second half of each window is scored,
so every scored token has at least ctx/2 tokens of context. Per scored token:
KLD(base ‖ quant) in nats, whether the two argmax tokens agree, and the
negative log-likelihood of the actual next token under each model.

The base model's log-probabilities are cached on disk (float16, one row of
n_vocab per scored token) keyed by the base file's sha256, the text's sha256,
ctx and the number of chunks, so comparing many quantizations with one base
evaluates the base once. Float16 rounding of the base log-probs changes a
KLD by about 1e-7 nats (the distribution is renormalized after reading, so
the error enters at second order), far below any quantization's KLD.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bpwopt.errors import BpwoptError
from bpwopt.formats.files import cache_dir, file_sha256
from bpwopt.formats.gguf_reader import open_gguf
from bpwopt.state.store import StateFile, read_identity

DEFAULT_CTX = 512
CACHE_BUDGET_BYTES = 200 << 20  # default chunk count: as many as keep one base cache entry under this
MIN_DEFAULT_CHUNKS = 4  # but never fewer than this (large vocabularies), text permitting
CACHE_FORMAT = 1
_LOG_PROB_FLOOR = np.float32(-1e4)  # exp() of it is 0 exactly, and 0 * floor stays finite


@dataclass(frozen=True)
class EvalResult:
    """KL divergence and perplexity of QUANT against BASE over the same scored tokens.

    KLD values are in nats per token; perplexities are exp(mean negative
    log-likelihood of the actual next token); seconds is wall time.
    """

    mean_kld: float
    mean_kld_stderr: float  # standard error of mean_kld over tokens
    median_kld: float
    p99_kld: float
    max_kld: float
    same_top_rate: float  # fraction of scored tokens where both models' argmax token agree
    ppl_base: float
    ppl_quant: float
    tokens: int  # scored tokens
    chunks: int
    ctx: int
    base_from_cache: bool
    seconds: float
    kld_per_token: np.ndarray = field(repr=False, compare=False)  # float64 (tokens,), for paired comparisons

    def as_dict(self) -> dict:
        """Every field but the per-token array, for JSON output."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "kld_per_token"}


@dataclass(frozen=True)
class BaseLogProbs:
    """The base model's side of an evaluation; what the cache holds.

    tokens: int32 (chunks * ctx,) the evaluated tokens, before BOS replacement.
    log_probs: float16 (chunks * scored_per_chunk(ctx), n_vocab) log-softmax of the scored positions.
    top_token: int32 (same rows,) argmax of the float32 logits (exact, unlike the float16 copy).
    nll: float64 (same rows,) negative log-likelihood of the actual next token, in nats.
    """

    tokens: np.ndarray
    log_probs: np.ndarray
    top_token: np.ndarray
    nll: np.ndarray


@dataclass(frozen=True)
class _Request:
    base_path: Path
    quant_path: Path
    ctx: int
    threads: int | None
    progress: bool


def scored_per_chunk(ctx: int) -> int:
    """Tokens scored in one window of ctx tokens: the second half, as llama-perplexity scores it."""
    return ctx - 1 - ctx // 2


def default_chunks(ctx: int, n_vocab: int, available: int) -> int:
    """Chunks evaluated when none are asked for: the cache stays under CACHE_BUDGET_BYTES.

    For SmolLM2 (49152 tokens) at ctx 512 that is 8 chunks, 2040 scored
    tokens, 191 MiB of float16 log-probs.
    """
    chunk_bytes = scored_per_chunk(ctx) * n_vocab * 2
    return max(1, min(available, max(MIN_DEFAULT_CHUNKS, CACHE_BUDGET_BYTES // chunk_bytes)))


def default_cache_dir() -> Path:
    """cache_dir()/base-logprobs: $BPWOPT_CACHE/base-logprobs, else ~/.cache/bpwopt/base-logprobs.

    Per user rather than per working directory: an entry depends only on the
    model file and the text, is disposable, and is large enough that it
    should not land in a project tree or its backups.
    """
    return cache_dir() / "base-logprobs"


def cache_key(base_sha256: str, text_sha256: str, ctx: int, chunks: int) -> str:
    """The cache entry's name: everything the base log-probs depend on, hashed."""
    identity = f"v{CACHE_FORMAT}:{base_sha256}:{text_sha256}:{ctx}:{chunks}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


# --- llama.cpp through llama-cpp-python ----------------------------------------------------------


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """llama.cpp logs to file descriptor 2 even with verbose=False; send it to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _llama(path: Path, *, ctx: int, threads: int | None, vocab_only: bool = False):
    """A llama_cpp.Llama for path keeping every logit (or only its vocabulary); closed, silenced, on exit."""
    try:
        import llama_cpp
    except ImportError as error:
        raise BpwoptError("evaluation needs llama-cpp-python; run: pip install llama-cpp-python") from error
    with _native_stderr_silenced():
        try:
            llm = llama_cpp.Llama(
                str(path), n_ctx=ctx, n_batch=ctx, logits_all=not vocab_only, vocab_only=vocab_only, verbose=False,
                n_threads=threads, n_threads_batch=threads,
            )  # fmt: skip
        except (ValueError, RuntimeError, OSError) as error:
            raise BpwoptError(f"{path}: llama.cpp cannot load this model") from error
    try:
        yield llm
    finally:
        with _native_stderr_silenced():
            llm.close()


def _tokenize(llm, text: str) -> np.ndarray:
    """int32 tokens of text, BOS first where the vocabulary adds one (llama-perplexity's tokenization)."""
    return np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), dtype=np.int32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 (rows, n_vocab) logits -> float32 log-probabilities, normalizing sums taken in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64)).astype(np.float32)
    return shifted - log_sum[:, None]


def _chunk_logits(llm, window: np.ndarray) -> np.ndarray:
    """Evaluate one window of ctx tokens from an empty cache; float32 logits of the scored positions."""
    ctx = window.size
    tokens = window.copy()
    bos = llm.tokenize(b"", add_bos=True, special=False)  # [BOS] where the vocabulary adds one, else []
    if bos:
        tokens[0] = bos[0]
    llm.reset()
    llm.eval(tokens.tolist())
    return llm.scores[ctx // 2:ctx - 1]


def _targets(window: np.ndarray) -> np.ndarray:
    """The actual next tokens of the scored positions of a window."""
    ctx = window.size
    return window[ctx // 2 + 1:ctx]


def _windows(tokens: np.ndarray, ctx: int) -> np.ndarray:
    return tokens.reshape(-1, ctx)


# --- the base side and its cache -------------------------------------------------------------------


def _evaluate_base(request: _Request, tokens: np.ndarray) -> BaseLogProbs:
    """Run the base model over every window of tokens (chunks * ctx)."""
    log_probs, top_token, nll = [], [], []
    with _llama(request.base_path, ctx=request.ctx, threads=request.threads) as llm:
        for window in tqdm(_windows(tokens, request.ctx), desc="base", unit="chunk", disable=not request.progress):
            logits = _chunk_logits(llm, window)
            chunk_log_probs = _log_softmax(logits)
            targets = _targets(window)
            log_probs.append(chunk_log_probs.astype(np.float16))
            top_token.append(logits.argmax(axis=1).astype(np.int32))
            nll.append(-chunk_log_probs[np.arange(targets.size), targets].astype(np.float64))
    return BaseLogProbs(tokens, np.concatenate(log_probs), np.concatenate(top_token), np.concatenate(nll))


def _read_cache(path: Path, identity: dict) -> BaseLogProbs | None:
    """The cached entry at path, or None when absent, unreadable or not for this identity."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["identity"])) != identity:
                return None
            entry = BaseLogProbs(data["tokens"], data["log_probs"], data["top_token"], data["nll"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    rows = identity["chunks"] * scored_per_chunk(identity["ctx"])
    if entry.log_probs.shape != (rows, identity["n_vocab"]) or entry.nll.shape != (rows,):
        return None
    return entry


def _write_cache(path: Path, identity: dict, base: BaseLogProbs) -> None:
    """Store an entry atomically: a temporary file beside it, fsynced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            np.savez(
                handle, identity=np.array(json.dumps(identity, sort_keys=True)), tokens=base.tokens,
                log_probs=base.log_probs, top_token=base.top_token, nll=base.nll,
            )  # fmt: skip
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise BpwoptError(f"cannot write the evaluation cache {path}: {error.strerror or error}") from error


def _vocabulary(path: Path, text: str, request: _Request) -> tuple[np.ndarray, int]:
    """(tokens of text, vocabulary size) of the model at path, from its vocabulary alone (fast)."""
    with _llama(path, ctx=request.ctx, threads=request.threads, vocab_only=True) as llm:
        return _tokenize(llm, text), llm.n_vocab()


def _check_same_vocabulary(request: _Request, text: str) -> tuple[np.ndarray, int]:
    """The base model's (tokens, n_vocab), after checking the quantized model shares them."""
    tokens, n_vocab = _vocabulary(request.base_path, text, request)
    quant_tokens, quant_n_vocab = _vocabulary(request.quant_path, text, request)
    if quant_n_vocab != n_vocab:
        raise BpwoptError(
            f"{request.quant_path}: vocabulary of {quant_n_vocab} tokens, the base model has {n_vocab}; "
            "KL divergence needs the same vocabulary"
        )
    if not np.array_equal(quant_tokens, tokens):
        raise BpwoptError(f"{request.quant_path}: tokenizes the text differently from {request.base_path}")
    return tokens, n_vocab


def _base_log_probs(
    request: _Request, text: str, tokens: np.ndarray, n_vocab: int, chunks: int | None, cache_dir: Path
) -> tuple[BaseLogProbs, bool]:
    """The base side for text, from the cache when there; returns (base, whether it came from the cache)."""
    available = tokens.size // request.ctx
    if available < 1:
        raise BpwoptError(f"the text is too short: {tokens.size} tokens, one chunk needs ctx = {request.ctx}")
    chunks = min(chunks, available) if chunks is not None else default_chunks(request.ctx, n_vocab, available)
    tokens = tokens[:chunks * request.ctx]
    identity = {
        "format": CACHE_FORMAT, "base_sha256": file_sha256(request.base_path),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "ctx": request.ctx, "chunks": chunks,
        "n_vocab": n_vocab,
    }  # fmt: skip
    path = cache_dir / f"base-{cache_key(identity['base_sha256'], identity['text_sha256'], request.ctx, chunks)}.npz"
    cached = _read_cache(path, identity)
    if cached is not None and np.array_equal(cached.tokens, tokens):
        return cached, True
    base = _evaluate_base(request, tokens)
    _write_cache(path, identity, base)
    return base, False


# --- the comparison ---------------------------------------------------------------------------------


def _kld_rows(quant_log_probs: np.ndarray, base_log_probs16: np.ndarray) -> np.ndarray:
    """KLD(base ‖ quant) per row in nats, float64; the float16 base rows are renormalized first."""
    base = np.maximum(base_log_probs16.astype(np.float32), _LOG_PROB_FLOOR)
    base -= _log_softmax_norm(base)[:, None]
    quant = np.maximum(quant_log_probs, _LOG_PROB_FLOOR)
    return (np.exp(base) * (base - quant)).sum(axis=1, dtype=np.float64)


def _log_softmax_norm(log_probs: np.ndarray) -> np.ndarray:
    """log Σ exp(row), float32, for rows that are already nearly normalized."""
    peak = log_probs.max(axis=1)
    return (peak + np.log(np.exp(log_probs - peak[:, None]).sum(axis=1, dtype=np.float64))).astype(np.float32)


@dataclass
class _QuantSide:
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)


def _evaluate_quant(request: _Request, base: BaseLogProbs) -> _QuantSide:
    side = _QuantSide()
    rows = scored_per_chunk(request.ctx)
    with _llama(request.quant_path, ctx=request.ctx, threads=request.threads) as llm:
        windows = _windows(base.tokens, request.ctx)
        for index, window in enumerate(tqdm(windows, desc="quant", unit="chunk", disable=not request.progress)):
            logits = _chunk_logits(llm, window)
            log_probs = _log_softmax(logits)
            targets = _targets(window)
            scored = slice(index * rows, (index + 1) * rows)
            side.kld.append(_kld_rows(log_probs, base.log_probs[scored]))
            side.same_top.append(logits.argmax(axis=1) == base.top_token[scored])
            side.nll.append(-log_probs[np.arange(targets.size), targets].astype(np.float64))
    return side


def _check_inputs(base_path: Path, quant_path: Path, ctx: int, chunks: int | None) -> None:
    for path in (base_path, quant_path):
        if not path.is_file():
            raise BpwoptError(f"{path}: no such file")
    if ctx < 8:
        raise BpwoptError(f"ctx must be at least 8 tokens, got {ctx}")
    if chunks is not None and chunks < 1:
        raise BpwoptError(f"chunks must be at least 1, got {chunks}")


def evaluate(
    base_path: str | Path,
    quant_path: str | Path,
    text: str,
    *,
    ctx: int = DEFAULT_CTX,
    chunks: int | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """KL divergence, same-top-token rate and perplexities of quant_path against base_path on text.

    ctx: window length in tokens (llama-perplexity's -c); chunks: windows to
    evaluate (default: default_chunks(), capped by the text); cache_dir: where
    base log-probs are cached (default: default_cache_dir()); threads: llama.cpp
    threads (default: llama-cpp-python's). Raises BpwoptError for missing or
    unloadable files, different vocabularies, or a text shorter than ctx tokens.
    """
    started = time.perf_counter()
    base_path, quant_path = Path(base_path), Path(quant_path)
    _check_inputs(base_path, quant_path, ctx, chunks)
    request = _Request(base_path, quant_path, ctx, threads, progress)
    tokens, n_vocab = _check_same_vocabulary(request, text)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    base, from_cache = _base_log_probs(request, text, tokens, n_vocab, chunks, cache_dir)
    side = _evaluate_quant(request, base)
    kld = np.concatenate(side.kld)
    return EvalResult(
        mean_kld=float(kld.mean()),
        mean_kld_stderr=float(kld.std(ddof=1) / np.sqrt(kld.size)) if kld.size > 1 else 0.0,
        median_kld=float(np.median(kld)),
        p99_kld=float(np.percentile(kld, 99)),
        max_kld=float(kld.max()),
        same_top_rate=float(np.concatenate(side.same_top).mean()),
        ppl_base=float(np.exp(base.nll.mean())),
        ppl_quant=float(np.exp(np.concatenate(side.nll).mean())),
        tokens=int(kld.size),
        chunks=base.tokens.size // ctx,
        ctx=ctx,
        base_from_cache=from_cache,
        seconds=time.perf_counter() - started,
        kld_per_token=kld,
    )


def record_evaluation(state_path: Path, quant_path: Path, result: EvalResult, text: str) -> int:
    """Store an evaluation in a state file, linked to the stored plan whose types the quantized file has.

    Returns the evaluation's id. A file that matches no stored plan is kept too, with no plan.
    """
    written = {tensor.name: tensor.tensor_type.name for tensor in open_gguf(quant_path).tensors}
    with StateFile.open(state_path, read_identity(state_path), create=False) as state:
        plan_id = next((plan_id for plan_id, plan in reversed(state.plans()) if plan.types == written), None)
        metrics = {key: value for key, value in result.as_dict().items() if isinstance(value, float)}
        return state.add_evaluation(plan_id, str(quant_path), metrics, hashlib.sha256(text.encode()).hexdigest())
