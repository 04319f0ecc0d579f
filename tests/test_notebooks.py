"""Every notebook in notebooks/ runs top to bottom on a tiny random-weight checkpoint.

Each notebook is executed with nbclient in a fresh kernel of this interpreter (the virtual
environment's python, whatever is on PATH), with ``JAMBA_LOCAL_MODEL`` set to the session's tiny
checkpoint; a cell that raises fails the test. The committed notebooks are never written to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra: pip install -e '.[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra: pip install -e '.[notebooks]'")
pytest.importorskip("ipykernel", reason="the notebooks extra: pip install -e '.[notebooks]'")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (comes with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

from jamba_core.tokenizer import shared_dir  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300
KERNEL_NAME = "jamba-local-tests"
MODEL_NOTEBOOKS = ["01_quickstart.ipynb", "02_langchain_tools_and_agents.ipynb", "03_llamaindex_long_context_rag.ipynb"]


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A kernelspec that starts this very interpreter: a "python3" spec can name whichever `python`
    is first on PATH, which need not be the one with jamba_core installed."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(root / KERNEL_NAME, overrides={"display_name": "jamba-local tests"})
    spec = json.loads((root / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return [str(root)]


def execute(name: str, kernel_dirs: list[str]):
    """Run notebooks/<name> in memory; return the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    return nb


def text_of(nb) -> str:
    """Everything the notebook printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/markdown", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_committed_notebooks_carry_the_outputs_of_a_run():
    # readers see results without running anything: every code cell ran, in order, without an error
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), f"{path.name}: run it top to bottom and save"
        errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name} was saved with an error: {errors[0].get('ename')}"


@pytest.fixture
def tiny_model(tiny_checkpoint, monkeypatch) -> Path:
    monkeypatch.setenv("JAMBA_LOCAL_MODEL", str(tiny_checkpoint))  # the kernel inherits the environment
    return tiny_checkpoint


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(MODEL_NOTEBOOKS + ["04_performance.ipynb"])


@pytest.mark.parametrize("name", MODEL_NOTEBOOKS)
def test_notebook_runs_on_the_tiny_checkpoint(name, tiny_model, kernel_dirs):
    nb = execute(name, kernel_dirs)
    out = text_of(nb)
    assert "(from JAMBA_LOCAL_MODEL)" in out and "random weights" in out
    if name.startswith("03") and (shared_dir() / "data" / "moby-dick.txt").is_file():
        assert "Moby-Dick:" in out


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "03_llamaindex_long_context_rag.ipynb"])
def test_notebook_runs_on_its_default_the_trained_checkpoint(name, monkeypatch, kernel_dirs):
    """Without JAMBA_LOCAL_MODEL the notebooks use the trained checkpoint, and hide facts for it to find."""
    from jamba_core.testing import TRAINED_CHECKPOINT

    if not (TRAINED_CHECKPOINT / "model.safetensors").is_file():  # the notebooks' default is the repository's folder
        pytest.skip("no trained checkpoint in this tree")
    monkeypatch.delenv("JAMBA_LOCAL_MODEL", raising=False)
    out = text_of(execute(name, kernel_dirs))
    assert "(the small Jamba trained by this project)" in out and "random weights" not in out
    assert ("hidden: One of the special magic numbers" if name.startswith("01") else "the question: 'What is the special magic") in out


def test_performance_notebook_says_when_the_results_are_absent(tmp_path, monkeypatch, kernel_dirs):
    monkeypatch.setenv("JAMBA_LOCAL_BENCH_JSON", str(tmp_path / "absent.json"))
    nb = execute("04_performance.ipynb", kernel_dirs)
    assert "NO BENCHMARK RESULTS" in text_of(nb)


def _synthetic_results() -> dict:
    """bench.json's shape (benchmarks/bench.py) with made-up figures, to exercise the plots."""
    rows = []
    for system, dtype, speed, memory in (("ours", "float32", 1.0, 1.0), ("ours", "bfloat16", 1.3, 0.7), ("reference", "float32", 0.5, 3.0)):
        rows.append({"phase": "decode", "tokens": 1024, "system": system, "dtype": dtype, "reps": 3, "tok_s": 40 * speed,
                     "bound_tok_s": 100.0, "pct_of_bound": 40 * speed, "peak_mib": 900 * memory})
        for n in (1024, 8192):
            rows.append({"phase": "prefill", "tokens": n, "system": system, "dtype": dtype, "reps": 3, "tok_s": 2000 * speed,
                         "bound_tok_s": 5000.0, "pct_of_bound": 40 * speed, "prefill_s": n / (2000 * speed),
                         "ttft_s": n / (2000 * speed), "peak_mib": (900 + n / 16) * memory})
    for r in rows:
        if r["system"] == "ours":
            r["ratio_to_reference"] = 2.0
    machine = {"cpu": "test CPU", "cores": 2, "torch": "2.x", "python": "3.x", "memory_gib": 8.0}
    bounds = {"copy_gb_s": 10.0, "read_gb_s": 12.0, "bandwidth_gb_s": 12.0, "matmul_gflop_s": {"float32": 100.0, "bfloat16": 150.0}}
    return {"runs": [{"started": "2025-01-01T00:00:00+00:00", "machine": machine, "bounds": bounds, "entries": []}],
            "config": {}, "summary": {"rows": rows, "bounds": bounds}}


def test_performance_notebook_plots_the_benchmark(tmp_path, monkeypatch, kernel_dirs):
    real = NOTEBOOKS.parent / "benchmarks" / "results" / "bench.json"
    path = real if real.is_file() else tmp_path / "bench.json"
    if not real.is_file():
        path.write_text(json.dumps(_synthetic_results()))
    monkeypatch.setenv("JAMBA_LOCAL_BENCH_JSON", str(path))
    nb = execute("04_performance.ipynb", kernel_dirs)
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert images == 2, "both figures should be drawn"
    assert "| decode |" in text_of(nb)
