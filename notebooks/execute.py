"""Re-run notebooks in place, top to bottom, with their default checkpoint, and save their outputs.

    .venv/bin/python notebooks/execute.py 01_quickstart.ipynb 03_llamaindex_long_context_rag.ipynb

Each runs in a fresh kernel of this interpreter (nbclient), in notebooks/ as its working directory, with
``JAMBA_LOCAL_MODEL`` unset (so the trained checkpoint); the notebook's kernelspec is kept as it was.
"""

import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    os.environ.pop("JAMBA_LOCAL_MODEL", None)
    specs = Path(tempfile.mkdtemp())
    write_kernel_spec(specs / "jamba-local", overrides={"display_name": "jamba-local"})  # argv[0]: this python
    for name in names:
        nb = nbformat.read(HERE / name, as_version=4)
        kernelspec = nb.metadata.get("kernelspec")
        km = KernelManager(kernel_name="jamba-local", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]))
        nbclient.NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(HERE)}}).execute()
        if kernelspec is not None:
            nb.metadata["kernelspec"] = kernelspec
        nbformat.write(nb, HERE / name)
        print(f"executed and saved {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))))
