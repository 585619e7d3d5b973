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
    assert "no TPU or multi-GPU runtime (cpu, 1 device(s)): one device, no mesh" in text
    assert "dspark_jax is already installed" in text  # the install cell found the package and ran no pip
    assert "on 1 device(s)" in text and "(not sharded)" in text
    assert "same tokens as generate: True" in text
    assert "same tokens as AR: True" in text  # greedy speculative decoding reproduces AR (float32 on CPU)
    assert "speedup S = " in text
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the acceptance plot is shown"
    if builtin_pair_exists():
        assert os.environ.get("DSPARK_NOTEBOOK_TARGET") is None


def install_cell_namespace(monkeypatch) -> dict:
    """Run the notebook's install cell here (the package is importable, so it installs nothing) and return its
    namespace, whose `plan_install` decides what a fresh runtime would install."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "DSPARK_SOURCE = " in code[0].source.splitlines()[1], "the source line is at the top of the first cell"
    monkeypatch.delenv("DSPARK_SOURCE", raising=False)
    namespace: dict = {}
    exec(compile(code[0].source, "install cell", "exec"), namespace)
    assert namespace["command"] is None
    return namespace


def test_install_cell_installs_from_the_repository_only(tmp_path, monkeypatch):
    ns = install_cell_namespace(monkeypatch)
    plan = ns["plan_install"]
    repo = NOTEBOOK.parent.parent
    assert plan("", repo / "notebooks", installed=True) is None
    # inside a checkout (the notebooks/ directory of the repository): that checkout, editable, with plots
    cmd = plan("", repo / "notebooks", installed=False)
    assert cmd[-2:] == ["-e", f"{repo.resolve()}[plots]"] and cmd[1:4] == ["-m", "pip", "install"]
    assert plan("git+https://example.invalid/x.git", repo, installed=False)[-1] == f"{repo.resolve()}[plots]"
    # a directory whose pyproject names another project is not a checkout
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "dspark-jax-fork-of-something"\n')
    assert ns["find_checkout"](other / "sub") is None
    # outside a checkout: the marked source, a URL or a clone's path; never the bare (unpublished) PyPI name
    url = "git+https://example.invalid/dspark_jax.git@abc123"
    assert plan(url, other / "sub", installed=False)[-1] == f"dspark-jax[plots] @ {url}"
    clone = tmp_path / "clone"
    clone.mkdir()
    assert plan(str(clone), other, installed=False)[-2:] == ["-e", f"{clone.resolve()}[plots]"]
    with pytest.raises(RuntimeError, match="set DSPARK_SOURCE at the top of this cell"):
        plan("", other, installed=False)
    for command in (plan(url, other, installed=False), plan(str(clone), other, installed=False)):
        assert "dspark-jax" not in command or command[-1].startswith("dspark-jax[plots] @ ")
