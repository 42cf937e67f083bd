"""The walkthrough notebook runs top to bottom on the demo model and shows its three plots."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow  # the walkthrough end to end on the demo model
def test_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("BPWOPT_NOTEBOOK_WORK", str(tmp_path))  # the kernel inherits it: output stays in tmp_path
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 3  # trade-off, plan bits, tensor errors
    assert (tmp_path / "smollm2-5.5bpw.gguf").stat().st_size > 0
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == [
        "plan-4-bits.png", "plan-4-bits.svg", "tensor-errors.png", "tensor-errors.svg", "tradeoff.png", "tradeoff.svg",
    ]  # fmt: skip
