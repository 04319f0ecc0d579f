"""Evaluate the trained small Jamba (issue #10) and a random-weight model of the same shape.

    python -m benchmarks.trained_eval                       # the grid below, ~30 min on 2 cores
    python -m benchmarks.trained_eval --lengths 1k,4k --long none --samples 1   # a quick look

Writes ``benchmarks/results/trained/``: ``{trained,random}/results.{json,md}`` and ``heatmap.png``
(RULER-style accuracy by task x length x depth, `jamba_core.eval.ruler`), ``tools.json`` (tool calls, JSON
extraction and copying on held-out names and values, tool calls naming real places (`evaluate_place_calls`), and a needle in the forms applications send,
`jamba_core.eval.tools`), and ``summary.md`` (the figures
the issue asks for, with the training time and parameter count from the checkpoint's training.json).
Long lengths cost: the attention layers are quadratic, so one 128K sample takes minutes here; the
``--long`` stage runs fewer tasks and depths there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

OUT = Path(__file__).parent / "results" / "trained"


def _tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def random_twin(path: Path, folder: Path, seed: int = 1) -> Path:
    """A copy of the checkpoint folder with random weights (same config and tokenizer)."""
    from jamba_core.config import load_config
    from jamba_core.testing import random_weights

    folder.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, folder / f.name)
    save_file(random_weights(load_config(path), seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def run(model: Path, name: str, args, out: Path) -> dict:
    from jamba_core.eval import evaluate, write_report
    from jamba_core.eval.ruler import Haystack
    from jamba_core.eval.tools import evaluate_copying, evaluate_json, evaluate_needle_forms, evaluate_place_calls, evaluate_tool_calls
    from langchain_jamba import ChatJamba

    chat = ChatJamba(model=str(model), temperature=0.0, max_tokens=48)
    tokenizer = chat.engine.tokenizer
    haystack = Haystack(tokenizer)
    depths = [float(d) for d in args.depths.split(",")]

    def progress(cell):
        print(f"  {name} {cell['task']:18s} {cell['length']:>7,} depth {cell['depth']:5.1f}: {cell['accuracy']:.2f} "
              f"({cell['latency_s']:.1f} s/sample)", flush=True)

    results = evaluate(chat, args.tasks.split(","), [_tokens(n) for n in args.lengths.split(",")], depths, args.samples,
                       tokenizer, seed=args.seed, haystack=haystack, progress=progress)
    if args.long != "none":
        for spec in args.long.split(";"):  # "64k:niah_single,niah_multikey:0,50,100"
            length, tasks, long_depths = spec.split(":")
            more = evaluate(chat, tasks.split(","), [_tokens(length)], [float(d) for d in long_depths.split(",")], 1,
                            tokenizer, seed=args.seed, haystack=haystack, progress=progress)
            results["cells"] += more["cells"]
            results["means"] += more["means"]
            results["lengths"] = sorted(set(results["lengths"]) | set(more["lengths"]))
            results["depths"] = sorted(set(results["depths"]) | set(more["depths"]))
    write_report(results, out / name)
    start = time.perf_counter()
    tools = evaluate_tool_calls(chat, samples=args.tool_samples, seed=args.seed)
    places = evaluate_place_calls(chat)
    structured = evaluate_json(chat, samples=args.json_samples, seed=args.seed)
    copying = evaluate_copying(chat.bind(max_tokens=96), samples=args.copy_samples, seed=args.seed)
    forms = evaluate_needle_forms(chat, samples=args.form_samples, seed=args.seed, max_chars=args.form_chars)
    print(f"  {name} tools: parsed {tools['parsed']:.2f} correct {tools['correct']:.2f} answer {tools['answer']:.2f}; "
          f"real places: parsed {places['parsed']:.2f} correct {places['correct']:.2f}; "
          f"json exact {structured['exact']:.2f}; copying exact {copying['exact']:.2f} words {copying['word_accuracy']:.2f}; "
          f"needle forms {forms['forms']} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"ruler_means": results["means"], "tools": tools, "places": places, "json": structured, "copying": copying, "needle_forms": forms}


def summary(figures: dict, training: dict | None) -> str:
    lines = ["# Trained small Jamba: evaluation", ""]
    if training:
        runs = [*training.get("earlier_runs", []), training]  # a continued checkpoint: every run that made it
        each = ", ".join(f"{r['steps_run']} steps in {r['train_seconds'] / 60:.0f} min (seed {r['seed']})" for r in runs)
        lines += [f"Parameters: {training['parameters']:,}; training on {training['torch_threads']} CPU threads: "
                  f"{sum(r['train_seconds'] for r in runs) / 60:.0f} min in all, {len(runs)} run(s): {each}.", ""]
    names = list(figures)
    lines += ["## Needle retrieval and variable tracking (mean over depths)", "",
              "| task | length | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    keys = sorted({(m["task"], m["length"]) for m in figures[names[0]]["ruler_means"]}, key=lambda k: (k[0], k[1]))
    for task, length in keys:
        row = []
        for n in names:
            hits = [m["accuracy"] for m in figures[n]["ruler_means"] if (m["task"], m["length"]) == (task, length)]
            row.append(f"{hits[0]:.2f}" if hits else "-")
        lines.append(f"| {task} | {length:,} | " + " | ".join(row) + " |")
    lines += ["", "## Tool calls (held-out names and values, unconstrained) and JSON extraction", "",
              "| model | parsed | correct name + args | answer quotes the result | real places: correct (parsed) | JSON exact (json_schema) | copying exact (words) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        t, j, c, pl = figures[n]["tools"], figures[n]["json"], figures[n].get("copying"), figures[n].get("places")
        copied = f"{c['exact']:.2f} ({c['word_accuracy']:.2f})" if c else "-"
        placed = f"{pl['correct']:.2f} ({pl['parsed']:.2f})" if pl else "-"
        lines.append(f"| {n} | {t['parsed']:.2f} | {t['correct']:.2f} | {t['answer']:.2f} | {placed} | {j['exact']:.2f} | {copied} |")
    with_forms = [n for n in names if figures[n].get("needle_forms")]
    if with_forms:
        first = figures[with_forms[0]]["needle_forms"]
        forms = list(first["forms"])
        lines += ["", f"## A needle in the forms applications send (`evaluate_needle_forms`: the demo's document, "
                      f"{first['chars']:,} characters, held-out keys, depths spread over 0-100%)", "",
                  "| model | samples | " + " | ".join(forms) + " |", "|---|---:|" + "---:|" * len(forms)]
        for n in with_forms:
            f = figures[n]["needle_forms"]
            lines.append(f"| {n} | {f['samples']} | " + " | ".join(f"{f['forms'].get(k, float('nan')):.2f}" for k in forms) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from jamba_core.testing import trained_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the trained checkpoint")
    p.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,variable_tracking")
    p.add_argument("--lengths", default="1k,2k,4k,8k,16k,32k")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--long", default="64k:niah_single,niah_multikey:0,50,100;128k:niah_single:0,50,100",
                   help="extra stages LENGTH:TASKS:DEPTHS separated by ';' (1 sample per cell), or 'none'")
    p.add_argument("--random-lengths", default="1k,4k", help="lengths for the random-weight model (no --long)")
    p.add_argument("--tool-samples", type=int, default=100)
    p.add_argument("--json-samples", type=int, default=50)
    p.add_argument("--copy-samples", type=int, default=50, help="held-out sequences to repeat verbatim (copying)")
    p.add_argument("--form-samples", type=int, default=8, help="needles per form in the demo's document (evaluate_needle_forms)")
    p.add_argument("--form-chars", type=int, default=48_000, help="characters of the demo's document (all of it: 47K characters, ~31K tokens with the committed tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    model = args.model or trained_checkpoint()
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {"trained": run(model, "trained", args, args.out)}
    with tempfile.TemporaryDirectory() as tmp:
        twin = random_twin(model, Path(tmp) / "random")
        quick = argparse.Namespace(**{**vars(args), "lengths": args.random_lengths, "long": "none", "form_samples": min(4, args.form_samples)})
        figures["random"] = run(twin, "random", quick, args.out)
    (args.out / "tools.json").write_text(json.dumps({n: {k: f[k] for k in ("tools", "places", "json", "copying", "needle_forms")} for n, f in figures.items()},
                                                    indent=1, default=str))
    training_file = model / "training.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else None
    text = summary(figures, training)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
