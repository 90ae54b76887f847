"""The notebooks run top to bottom in a real Jupyter kernel (nbclient), and make their plots."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_plots(path, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("GEOSEG_NB_SIZE", "512")
    monkeypatch.setenv("GEOSEG_NB_EPOCHS", "2")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's work folder (tempfile.mkdtemp) goes with the test's
    nb = nbformat.read(path, as_version=4)
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    # a cell that raises fails here (CellExecutionError) with the cell and its traceback
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        for i, cell in enumerate(nb.cells):  # a user runs a cell that writes outputs again
            if cell.cell_type == "code" and "to_zarr(" in cell.source:
                client.execute_cell(cell, i)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3, f"{path.name} made {len(pngs)} plots"
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "IProgress not found" not in stderr and "Traceback" not in stderr
    assert [p.name for p in tmp_path.glob("geoseg-nb-*/model")], "the notebook's outputs are not in its TMPDIR"
