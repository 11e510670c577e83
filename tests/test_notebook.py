"""examples/direct_decoder_tour.ipynb runs top to bottom (nbclient, a real kernel) on the tiny pipeline and shows its
pictures inline: the example a user opens first keeps working."""
from __future__ import annotations

import json
from pathlib import Path

import nbclient  # with nbformat and ipykernel: pinned in requirements.txt
import nbformat

from helpers import load_pt

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "direct_decoder_tour.ipynb"


def _with_parameters(nb, **values) -> None:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged `parameters`"
    names = {line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line}
    assert set(values) <= names, f"unknown parameters {set(values) - names}"
    cells[0].source += "\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())


def test_notebook_runs_on_the_tiny_pipeline(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    built = tmp_path / "built_features.pt"
    labels = load_pt(tiny_pipeline.features)["labels"]
    _with_parameters(nb, TEACHER=str(tiny_pipeline.teacher), STUDENT=str(tiny_pipeline.student),
                     FEATURES=str(tiny_pipeline.features), BUILT_FEATURES=str(built), DEVICE="cpu",
                     TARGET_CLASS=int(labels[0]))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 4, f"{len(pictures)} inline pictures (generate, anchors, hooks, attribution expected)"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{len(labels)} reference images from {tiny_pipeline.features}" in text
    assert not built.exists(), "the notebook re-extracted features although FEATURES fit the pair"


def test_committed_notebook_is_small_and_clean():
    """Outputs, if committed, keep the notebook under ~1 MB; no cell is left with an error."""
    assert NOTEBOOK.stat().st_size < 1_000_000
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
