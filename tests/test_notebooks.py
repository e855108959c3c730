"""Every notebook runs top to bottom in its small setting (papermill, outputs to a temp folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no numbered notebooks found"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_valid_nbformat_with_unique_cell_ids(notebook):
    import json

    nbformat = pytest.importorskip("nbformat")
    # Read as plain JSON: nbformat's reader fills in missing ids itself (with a warning).
    raw = json.loads(notebook.read_text(encoding="utf-8"))
    ids = [cell.get("id") for cell in raw["cells"]]
    # nbformat 4.5 requires an id per cell (missing ones are a warning today, an error in later versions).
    assert None not in ids and len(set(ids)) == len(ids), f"{notebook.name}: missing or repeated cell ids"
    nbformat.validate(nbformat.from_dict(raw))


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
