"""Writing `ruler.evaluate`'s results: results.json, a Markdown table and an accuracy heat map."""

from __future__ import annotations

import json
from pathlib import Path


def accuracy_grid(results: dict, task: str) -> list[list[float | None]]:
    """Accuracy of `task` as rows of lengths x columns of depths (None for a missing cell)."""
    cells = {(c["length"], c["depth"]): c["accuracy"] for c in results["cells"] if c["task"] == task}
    return [[cells.get((n, d)) for d in results["depths"]] for n in results["lengths"]]


def _markdown(results: dict) -> str:
    depths = results["depths"]
    means = {(m["task"], m["length"]): m["accuracy"] for m in results["means"]}
    model = results["model"].get("model") or results["model"].get("class", "")
    lines = [f"# RULER-style accuracy: {model}", "",
             f"split {results['split']}, seed {results['seed']}, {results['samples_per_cell']} sample(s) per cell; "
             "accuracy is the fraction of answers found in the reply (0..1).", ""]
    if results.get("partial"):  # an interrupted run (`ruler.summarize`): say so before the figures
        lines += [f"**Partial results**: the run stopped after {len(results['cells'])} cells ({results.get('error')}); "
                  "empty cells did not run, and a mean covers the depths that did.", ""]
    lines += ["| task | length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
             "|---|---:|" + "---:|" * (len(depths) + 1)]
    for task in results["tasks"]:
        for length, row in zip(results["lengths"], accuracy_grid(results, task)):
            if all(a is None for a in row) and not results.get("partial"):
                continue  # a length run for other tasks only (a long-context stage); a partial run shows what did not run
            values = " | ".join("" if a is None else f"{a:.2f}" for a in row)
            mean = means.get((task, length))
            lines.append(f"| {task} | {length} | {values} | {'' if mean is None else f'{mean:.2f}'} |")
    return "\n".join(lines) + "\n"


def _heatmap(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks, lengths, depths = results["tasks"], results["lengths"], results["depths"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.5 + (1 + 0.7 * len(depths)) * len(tasks), 2 + 0.5 * len(lengths)),
                             squeeze=False, sharey=True, constrained_layout=True)
    for ax, task in zip(axes[0], tasks):
        grid = [[float("nan") if a is None else a for a in row] for row in accuracy_grid(results, task)]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                if a == a:  # not a missing cell (nan)
                    ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set(title=task, xlabel="depth (%)")
    axes[0][0].set_ylabel("length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir) -> dict[str, Path]:
    """Write results.json, results.md (task x length rows, depth columns, a mean column) and heatmap.png
    (one panel per task: length up, depth across, accuracy 0..1) into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "heatmap": out / "heatmap.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    paths["markdown"].write_text(_markdown(results), encoding="utf-8")
    _heatmap(results, paths["heatmap"])
    return paths
