"""Every notebook runs top to bottom in its small setting (papermill, outputs to a temp folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no numbered notebooks found"


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook, tmp_path):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / "out"
    papermill.execute_notebook(
        str(notebook), str(tmp_path / notebook.name),
        parameters={"OUT": str(out), "FULL": False},
        cwd=str(notebook.parent), kernel_name="python3", progress_bar=False,
    )
    # Every notebook saves its figures as PNG.
    assert list(out.rglob("*.png")), f"{notebook.name} saved no figure"
