"""Every notebook in notebooks/ runs top to bottom, and is committed without outputs.

Notebooks are found by globbing, so a new `notebooks/*.ipynb` is tested without touching this
file; each test is parametrized by the notebook's file name, so a failure names its notebook.

The kernel is always this interpreter (the virtualenv pytest runs in): the test writes its own
kernelspec whose argv is `sys.executable` into a temporary directory and hands nbclient a kernel
manager that only looks there. A `python3` kernelspec elsewhere on the Jupyter path (a user-level
one pointing at another Python, or none at all in a fresh virtualenv) cannot change which Python
runs the notebook; the first executed cell asserts it.
"""

import json
import pathlib
import sys

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "python3"   # what the notebooks' metadata names; resolved to this interpreter
CELL_TIMEOUT_S = 600


def _code_cells(nb):
  return [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def test_notebooks_found():
  assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
  """Outputs belong to the reader's run, not to the repository (diffs, size, stale results)."""
  nb = json.loads(path.read_text(encoding="utf-8"))
  dirty = [i for i, cell in _code_cells(nb)
           if cell.get("outputs") or cell.get("execution_count") is not None]
  assert not dirty, (
      f"{path.name}: code cells {dirty} have outputs or an execution count; clear them before "
      f"committing, e.g. `jupyter nbconvert --clear-output --inplace {path.name}`")


def _kernel_manager(tmp_path):
  """An AsyncKernelManager whose only kernelspec runs `sys.executable -m ipykernel_launcher`."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  spec_dir = tmp_path / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (test interpreter)",
      "language": "python",
  }))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  import nbclient
  import nbformat
  from nbclient.exceptions import CellExecutionError

  nb = nbformat.read(path, as_version=4)
  # First cell (test only, not saved): fail loudly if another Python would run the notebook.
  check = nbformat.v4.new_code_cell(
      "import sys\n"
      f"assert sys.executable == {sys.executable!r}, sys.executable\n"
      f"assert sys.prefix == {sys.prefix!r}, sys.prefix")
  check.id = "test-interpreter-check"
  nb.cells.insert(0, check)
  client = nbclient.NotebookClient(
      nb, km=_kernel_manager(tmp_path), kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}})  # cwd: notebooks/, as in Jupyter
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell raised\n{e}", pytrace=False)
  assert nb.cells[0].outputs == [], nb.cells[0].outputs
