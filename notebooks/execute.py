"""Run notebooks/quickstart.ipynb in a fresh Jupyter kernel and save it with its outputs.

    python notebooks/execute.py          # the venv's python; needs the `notebook` extra (pip install -e ".[notebook]")

Every cell runs in order at the size the notebook's "parameters" cell gives, in a kernel of this
interpreter that imports rlpa_jax from this checkout, with notebooks/ as its working directory (as
Jupyter opens it). The notebook is saved with its outputs and, in its metadata, a hash of its code
cells' sources: tests/test_notebook.py checks that the stored outputs came from the stored code, so
after editing a code cell run this again and commit the result. The run goes to runs/quickstart (an
earlier one is moved aside).

tests/test_notebook.py runs the same `execute` with a parameters cell of its own (a seconds-long size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent / "quickstart.ipynb"
REPO = NOTEBOOK.parents[1]
KERNEL_NAME = "rlpa-jax-checkout"
METADATA_KEY = "rlpa_jax"  # notebook.metadata[METADATA_KEY]["code_sha256"]: the hash of the executed code
PARAMETERS_TAG = "parameters"  # papermill's names for the cell of parameters and the one it adds after it
INJECTED_TAG = "injected-parameters"


def code_hash(notebook: nbformat.NotebookNode) -> str:
    """sha256 of the code cells' sources, in order (markdown may change without a re-run)."""
    digest = hashlib.sha256()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode("utf-8") + b"\0")
    return digest.hexdigest()


def with_parameters(notebook: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    """A copy of `notebook` with a code cell of `source` after its "parameters" cell (papermill's
    convention: the new cell's assignments override the defaults)."""
    notebook = nbformat.from_dict(json.loads(json.dumps(notebook)))
    tagged = [index for index, cell in enumerate(notebook.cells) if PARAMETERS_TAG in cell.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{NOTEBOOK.name}: expected one cell tagged {PARAMETERS_TAG!r}, found {len(tagged)}")
    cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
    cell.metadata["tags"] = [INJECTED_TAG]
    notebook.cells.insert(tagged[0] + 1, cell)
    return notebook


def write_kernel_spec(directory: Path) -> None:
    """A kernel spec for this interpreter that puts this checkout first on the import path (a
    kernel named "python3" could be another Python, or import an installed rlpa_jax)."""
    spec_dir = directory / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python", "env": {"PYTHONPATH": str(REPO)}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")


def execute(notebook: nbformat.NotebookNode, cwd: Path, timeout: int | None = None) -> nbformat.NotebookNode:
    """Run every cell of `notebook` in place, in a fresh kernel working in `cwd`; an error in a cell
    raises nbclient's CellExecutionError (the cell and its traceback). `timeout`: seconds per cell."""
    with tempfile.TemporaryDirectory(prefix="rlpa-kernel-") as kernels:
        write_kernel_spec(Path(kernels))
        manager = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
        client = NotebookClient(notebook, km=manager, timeout=timeout, record_timing=False,
                                resources={"metadata": {"path": str(cwd)}})
        client.execute()
    notebook.metadata.kernelspec = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds a cell may run (default: 3600)")
    args = parser.parse_args(argv)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    started = time.perf_counter()
    execute(notebook, NOTEBOOK.parent, args.timeout)
    notebook.metadata[METADATA_KEY] = {"code_sha256": code_hash(notebook)}
    nbformat.validate(notebook)
    nbformat.write(notebook, NOTEBOOK)
    print(f"{NOTEBOOK.relative_to(REPO)}: executed in {time.perf_counter() - started:.0f} s and saved with its outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
