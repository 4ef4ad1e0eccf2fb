"""Executes every notebook under notebooks/ from top to bottom, as a reader would.

Each notebook runs in a fresh `python3` kernel of this interpreter, registered in a temporary
Jupyter path (so the test does not depend on kernels installed on the machine), with a temporary
working directory. `RESEARCH_DATA_DIR` and `RESEARCH_CACHE_DIR` pass through from the
environment, and jax raises on implicit rank promotion as in the rest of the tests.
"""

import os
from pathlib import Path

import jax
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("**/*.ipynb"))
CELL_TIMEOUT_S = 300


def _ids(paths):
  return [str(p.relative_to(REPO / "notebooks")) for p in paths]


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory) -> Path:
  """A Jupyter data directory holding a `python3` kernelspec that runs sys.executable."""
  root = tmp_path_factory.mktemp("jupyter")
  ipykernel_kernelspec.write_kernel_spec(path=str(root / "kernels" / "python3"))
  return root


def test_notebooks_exist():
  assert NOTEBOOKS, f"no notebooks under {REPO / 'notebooks'}; the quickstart belongs there"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_clean(path):
  """Notebooks are committed valid and with outputs cleared, so diffs show only source."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells)
           if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))]
  assert not dirty, (f"{path.name}: code cells {dirty} hold outputs; clear them "
                     f"(`jupyter nbconvert --clear-output --inplace {path}`) before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, tmp_path, jupyter_path, monkeypatch):
  # The kernel inherits this environment: our kernelspec first, this checkout importable, and
  # scratch files (tempfile, Jupyter connection files) inside the test's temporary directory.
  monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
      [str(jupyter_path)] + [p for p in [os.environ.get("JUPYTER_PATH")] if p]))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setenv("JAX_NUMPY_RANK_PROMOTION", "raise")
  workdir = tmp_path / "cwd"
  workdir.mkdir()

  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(workdir)}})
  client.execute()
  errors = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]
  assert not errors, f"{path.name} produced errors: {errors}"
