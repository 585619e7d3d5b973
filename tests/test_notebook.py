"""notebooks/quickstart.ipynb runs top to bottom on CPU (nbclient), so it cannot rot.

It uses the built-in trained pair when the package ships one; otherwise the notebook's environment
variables point it at the tiny pair of `tiny_checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def builtin_pair_exists() -> bool:
    from dspark_jax import assets

    return (assets.TARGET / "config.json").exists() and (assets.DSPARK_DRAFT / "config.json").exists()


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_quickstart_executes(tmp_path, tmp_path_factory, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    if not builtin_pair_exists():
        from tiny_checkpoint import session_pair

        target, draft = session_pair(tmp_path_factory)
        monkeypatch.setenv("DSPARK_NOTEBOOK_TARGET", str(target))
        monkeypatch.setenv("DSPARK_NOTEBOOK_DRAFT", str(draft))
    monkeypatch.setenv("DSPARK_NOTEBOOK_MAX_NEW_TOKENS", "16")
    monkeypatch.setenv("DSPARK_NOTEBOOK_REPETITIONS", "2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(outputs_text(c) for c in code)
    assert "no TPU (cpu)" in text
    assert "same tokens as generate: True" in text
    assert "same tokens as AR: True" in text  # greedy speculative decoding reproduces AR (float32 on CPU)
    assert "speedup S = " in text
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the acceptance plot is shown"
    if builtin_pair_exists():
        assert os.environ.get("DSPARK_NOTEBOOK_TARGET") is None
