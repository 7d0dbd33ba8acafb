"""examples/notebook.ipynb runs from top to bottom (small settings), so it cannot rot."""

import os

import nbclient
import nbformat
import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow


def test_the_example_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_STEPS", "20")
    monkeypatch.setenv("NOTEBOOK_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert (tmp_path / "runs" / "export" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "checkpoints" / "last.ckpt").exists()
    assert "5e-05" in outputs  # the continued model took the fine-tuning rate from the export
