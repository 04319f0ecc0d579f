"""Prefix-state reuse on a long multi-turn chat: per-turn prefill tokens and wall time, with and without.

A 10-turn chat on the ``bench-small`` checkpoint whose first user message holds a document of
``--doc-tokens`` tokens of Moby-Dick (``../shared/data``), then short questions. The same model runs
with reuse (snapshots at message boundaries) and without (every turn re-prefills the whole
conversation), turn by turn interleaved. Greedy tokens must agree; the benchmark checks it.

    python -m benchmarks.prefix_reuse --doc-tokens 8192 32768

Writes ``prefix_reuse.json`` and ``prefix_reuse.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from jamba_core.engine import Engine
from jamba_core.testing import make_checkpoint
from jamba_core.tokenizer import shared_dir

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who is the narrator?", "What is the ship called?", "Who is the captain?", "What does Ahab hunt?",
             "Where does the voyage start?", "Who is Queequeg?", "What is a harpoon?", "Who is Starbuck?",
             "How does the book end?", "Summarise the story."]


def document(engine: Engine, tokens: int) -> str:
    text = (shared_dir() / "data" / "moby-dick.txt").read_text(encoding="utf-8")
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return engine.tokenizer.decode(ids)


def run(engine_reuse: Engine, engine_plain: Engine, doc: str, turns: int, new_tokens: int) -> list[dict]:
    rows = []
    messages = [{"role": "system", "content": "Answer questions about the document."}]
    for t in range(turns):
        content = (f"Document:\n{doc}\n\n" if t == 0 else "") + QUESTIONS[t % len(QUESTIONS)]
        messages.append({"role": "user", "content": content})
        row = {"turn": t + 1}
        for name, engine in (("reuse", engine_reuse), ("plain", engine_plain)):
            t0 = time.perf_counter()
            result = engine.generate(messages, max_new_tokens=new_tokens)
            row[name] = {"wall_s": time.perf_counter() - t0, "prompt_tokens": result.usage.prompt_tokens,
                         "cached_tokens": result.usage.cached_tokens,
                         "prefilled_tokens": result.usage.prompt_tokens - result.usage.cached_tokens,
                         "ttft_s": result.timings.time_to_first_token_s,
                         "token_ids": result.token_ids}
        assert row["reuse"]["token_ids"] == row["plain"]["token_ids"], f"turn {t + 1}: outputs differ"
        row["speedup"] = row["plain"]["wall_s"] / row["reuse"]["wall_s"]
        row["ttft_speedup"] = row["plain"]["ttft_s"] / row["reuse"]["ttft_s"]
        rows.append(row)
        print(f"turn {t + 1:2d}: prompt {row['plain']['prompt_tokens']:6d}  prefilled reuse {row['reuse']['prefilled_tokens']:6d}  "
              f"wall reuse {row['reuse']['wall_s']:.2f} s  plain {row['plain']['wall_s']:.2f} s  x{row['speedup']:.1f}  "
              f"TTFT reuse {row['reuse']['ttft_s']:.3f} s  plain {row['plain']['ttft_s']:.2f} s  x{row['ttft_speedup']:.0f}", flush=True)
        messages.append({"role": "assistant", "content": engine_reuse.decode(row["reuse"]["token_ids"])})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / ".checkpoints" / "bench-small"))
    p.add_argument("--doc-tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = make_checkpoint(args.checkpoint, preset="bench-small")
    reuse = Engine.from_pretrained(path, progress=False)
    plain = Engine(reuse.model, reuse.config, reuse.tokenizer, reuse.path, prefix_cache_bytes=0)  # same weights
    results = {}
    for n in args.doc_tokens:
        print(f"-- document of {n} tokens")
        reuse.prefix_cache.clear()
        results[n] = run(reuse, plain, document(reuse, n), args.turns, args.new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for rows in results.values():
        for row in rows:
            for name in ("reuse", "plain"):
                row[name].pop("token_ids")
    (out / "prefix_reuse.json").write_text(json.dumps(results, indent=1))
    lines = ["| document | turn | prompt tokens | prefilled (reuse) | wall reuse (s) | wall full re-prefill (s) | speed-up | "
             "TTFT reuse (s) | TTFT full (s) | TTFT speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, rows in results.items():
        for row in rows:
            lines.append(f"| {n} | {row['turn']} | {row['plain']['prompt_tokens']} | {row['reuse']['prefilled_tokens']} | "
                         f"{row['reuse']['wall_s']:.2f} | {row['plain']['wall_s']:.2f} | {row['speedup']:.1f}x | "
                         f"{row['reuse']['ttft_s']:.3f} | {row['plain']['ttft_s']:.2f} | {row['ttft_speedup']:.0f}x |")
        later = [r["reuse"]["wall_s"] for r in rows[1:]]
        lines.append(f"| {n} | turns 2-{len(rows)} median | | | {statistics.median(later):.2f} | "
                     f"{statistics.median(r['plain']['wall_s'] for r in rows[1:]):.2f} | "
                     f"{statistics.median(r['speedup'] for r in rows[1:]):.1f}x | "
                     f"{statistics.median(r['reuse']['ttft_s'] for r in rows[1:]):.3f} | "
                     f"{statistics.median(r['plain']['ttft_s'] for r in rows[1:]):.2f} | "
                     f"{statistics.median(r['ttft_speedup'] for r in rows[1:]):.0f}x |")
    (out / "prefix_reuse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
