"""Per-step cost of grammar-constrained decoding on a 65536-token vocabulary.

Walks each constraint (forced tool call, named tool, JSON schema, JSON mode) along a valid output and
times the engine's per-step calls (`mask_logits` on a (vocab,) float32 logits vector, then `accept`), also
with 64 tokens left at every step (the closing rules' walk, done in a budget's last 64 tokens), and
the grammar compile time (cold: the compiler cache cleared; warm: cached). With ``--decode-step-ms`` (a
decode step of the model, e.g. from the engine benchmark) it also prints the mask time as a fraction of it.

    python benchmarks/grammar_overhead.py [--tokenizer PATH] [--decode-step-ms 12.5] [--llguidance] [--json OUT]

Without ``--tokenizer``, a 65536-token byte-level BPE is trained on Moby-Dick plus Python's standard library
source (about 20 s, cached under benchmarks/results/tmp/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jamba_core.chat.grammar import GrammarConstraint, _context, response_format_constraint, tool_choice_constraint  # noqa: E402
from jamba_core.tokenizer import load_tokenizer, shared_dir, train_tokenizer  # noqa: E402

VOCAB = 65536
CACHE = ROOT / "benchmarks" / "results" / "tmp" / f"tokenizer-{VOCAB}"

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "search_documents", "parameters": {
        "type": "object", "properties": {
            "query": {"type": "string", "maxLength": 200},
            "filters": {"type": "object", "properties": {"year": {"type": "integer"},
                                                         "tags": {"type": "array", "items": {"type": "string"}}}},
            "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
        "required": ["query"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
BOOK = {"type": "object", "properties": {
    "title": {"type": "string"}, "author": {"type": "string"}, "year": {"type": "integer"},
    "genres": {"type": "array", "items": {"type": "string"}},
    "characters": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "role": {"enum": ["captain", "mate", "harpooneer", "narrator"]}},
        "required": ["name", "role"]}}},
    "required": ["title", "author", "year", "genres", "characters"]}
BOOK_VALUE = {"title": "Moby-Dick; or, The Whale", "author": "Herman Melville", "year": 1851,
              "genres": ["adventure", "epic", "sea story"],
              "characters": [{"name": "Ahab", "role": "captain"}, {"name": "Starbuck", "role": "mate"},
                             {"name": "Queequeg", "role": "harpooneer"}, {"name": "Ishmael", "role": "narrator"}]}
CALL_BODY = ('[\n    {"name": "search_documents", "arguments": {"query": "white whale sightings near the Azores", '
             '"filters": {"year": 1851, "tags": ["whaling", "logbook"]}, "limit": 5}}\n]')


def training_text() -> str:
    parts = []
    book = shared_dir() / "data" / "moby-dick.txt"
    if book.is_file():
        parts.append(book.read_text(encoding="utf-8"))
    size = sum(map(len, parts))
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size > 25_000_000:
            break
        part = path.read_text(encoding="utf-8", errors="replace")
        parts.append(part)
        size += len(part)
    return "\n".join(parts)


def get_tokenizer(path: str | None):
    if path:
        return load_tokenizer(path)
    if (CACHE / "tokenizer.json").is_file():
        return load_tokenizer(CACHE)
    start = time.perf_counter()
    tok = train_tokenizer(vocab_size=VOCAB, text=training_text())
    print(f"trained a {len(tok)}-token tokenizer in {time.perf_counter() - start:.1f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(CACHE)
    return tok


def ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def walk(constraint, forced: list[int], vocab: int, remaining: int | None = None) -> list[float]:
    """Times (ms) of mask_logits + accept along ``forced`` token ids; with ``remaining``, the constraint is
    told at every step that this many tokens are left (`GrammarConstraint.remaining_tokens`)."""
    logits, times = torch.randn(vocab), []
    for token in forced:
        constraint.remaining_tokens = remaining
        work = logits.clone()
        start = time.perf_counter()
        constraint.mask_logits(work)
        constraint.accept(token)
        times.append(ms(start))
        # (with ``remaining``, the closing rules may mask the path's next token: the grammar still allows it)
        assert remaining is not None or work[token] > float("-inf"), "the path left the grammar"
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"steps": len(times), "median_ms": statistics.median(times),
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))], "max_ms": ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a checkpoint folder whose tokenizer to use")
    parser.add_argument("--decode-step-ms", type=float, help="a model decode step, to report the mask's share")
    parser.add_argument("--llguidance", action="store_true", help="also time llguidance's mask (if installed)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tok = get_tokenizer(args.tokenizer)
    vocab = max(len(tok), VOCAB)
    ids = tok.get_vocab()
    stops = sorted({tok.eos_token_id, ids.get("<|eom|>", tok.eos_token_id)})
    eos = stops[0]
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731

    start = time.perf_counter()
    ctx = _context(tok, vocab)
    results = {"tokenizer_tokens": len(tok), "mask_size": vocab, "tokenizer_info_ms": ms(start), "cases": {}}
    space = enc(" ")
    cases = {
        "tool_choice=any": (lambda: tool_choice_constraint(tok, TOOLS, "any", vocab_size=vocab, stop_token_ids=stops),
                            space + [ids["<tool_calls>"]] + enc(CALL_BODY) + [ids["</tool_calls>"], eos]),
        "tool_choice=<name>": (lambda: tool_choice_constraint(tok, TOOLS, "search_documents", vocab_size=vocab,
                                                              stop_token_ids=stops),
                               [ids["<tool_calls>"]] + enc(CALL_BODY) + [ids["</tool_calls>"], eos]),
        "json_schema": (lambda: response_format_constraint(tok, {"type": "json_schema",
                                                                 "json_schema": {"schema": BOOK}},
                                                           vocab_size=vocab, stop_token_ids=stops),
                        enc(json.dumps(BOOK_VALUE)) + [eos]),
        "json_object": (lambda: response_format_constraint(tok, {"type": "json_object"}, vocab_size=vocab,
                                                           stop_token_ids=stops),
                        enc(json.dumps(BOOK_VALUE)) + [eos]),
    }
    for name, (build, path) in cases.items():
        ctx.compiler.clear_cache()
        start = time.perf_counter()
        build()
        cold = ms(start)
        start = time.perf_counter()
        constraint = build()
        warm = ms(start)
        times, closing = [], []
        for _ in range(3):
            times += walk(build(), path, vocab)
            # as if within a budget's last 64 tokens at every step: each step plans its closing
            closing += walk(build(), path, vocab, remaining=GrammarConstraint.last_item_window)
        results["cases"][name] = {"compile_cold_ms": cold, "build_warm_ms": warm, **summary(times),
                                  "closing": summary(closing)}
        del constraint

    if args.llguidance:
        results["llguidance"] = time_llguidance(tok, vocab, enc(json.dumps(BOOK_VALUE)))

    print(f"vocabulary {len(tok)} tokens, mask {vocab}; tokenizer info (once per tokenizer) "
          f"{results['tokenizer_info_ms']:.0f} ms")
    print(f"{'case':<20}{'compile ms':>12}{'cached ms':>11}{'mask+accept median ms':>23}{'p90':>8}{'max':>8}"
          f"{'share of decode step':>22}")
    for name, r in results["cases"].items():
        share = f"{r['median_ms'] / args.decode_step_ms:.2%}" if args.decode_step_ms else "n/a"
        r["share_of_decode_step"] = r["median_ms"] / args.decode_step_ms if args.decode_step_ms else None
        print(f"{name:<20}{r['compile_cold_ms']:>12.1f}{r['build_warm_ms']:>11.2f}{r['median_ms']:>23.3f}"
              f"{r['p90_ms']:>8.3f}{r['max_ms']:>8.2f}{share:>22}")
    print(f"the same in a budget's last {GrammarConstraint.last_item_window} tokens (each step plans the closing):")
    for name, r in results["cases"].items():
        c = r["closing"]
        print(f"{name:<20}{'':>23}{c['median_ms']:>23.3f}{c['p90_ms']:>8.3f}{c['max_ms']:>8.2f}")
    if "llguidance" in results:
        r = results["llguidance"]
        print(f"llguidance json_schema: tokenizer {r['tokenizer_ms']:.0f} ms, compile {r['compile_ms']:.1f} ms, "
              f"mask median {r['median_ms']:.3f} ms (p90 {r['p90_ms']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def time_llguidance(tok, vocab: int, path: list[int]) -> dict:
    """llguidance's tokenizer build, compile and mask-fill times on the same JSON-schema path."""
    import llguidance
    import llguidance.hf
    import llguidance.torch as lgt

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=tok.eos_token_id)
    tokenizer_ms = ms(start)
    schema = {**BOOK, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
    grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
    start = time.perf_counter()
    llguidance.LLMatcher(lltok, grammar)
    compile_ms = ms(start)
    bitmask, times = lgt.allocate_token_bitmask(1, vocab), []
    for _ in range(3):
        matcher = llguidance.LLMatcher(lltok, grammar)
        for token in path[:-1]:
            start = time.perf_counter()
            lgt.fill_next_token_bitmask(matcher, bitmask)
            times.append(ms(start))
            assert matcher.consume_token(token), matcher.get_error()
    return {"tokenizer_ms": tokenizer_ms, "compile_ms": compile_ms, **summary(times)}


if __name__ == "__main__":
    main()
