"""`jamba-local` command line: generate, chat, info, eval, bench, demo."""

from __future__ import annotations

import argparse
import json
import sys


def _engine(args):
    from .engine import Engine

    return Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                                  kv_cache_dtype=args.kv_cache_dtype)


def _add_model_args(p):
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantization", default=None, help=_QUANT_HELP)
    p.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16"], help=_KV_HELP)


_KV_HELP = "K/V cache dtype when it should differ from --dtype (bfloat16 with float32 weights halves the KV cache)"
_QUANT_HELP = ("weight quantization: int8, bnb-int8 or bnb-nf4, optionally with +attention, +mamba, +lm_head "
               "(e.g. int8+lm_head); the feed-forward and expert weights are quantized, Mamba stays float by default")


def _add_sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop)


def cmd_generate(args) -> int:
    engine = _engine(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    last = None
    for chunk in engine.stream(prompt, **_sampling(args)):
        print(chunk.text, end="", flush=True)
        last = chunk
    print()
    t = last.timings
    print(f"[{last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} new tokens, finish={last.finish_reason}, "
          f"TTFT {t.time_to_first_token_s:.3f} s, prefill {t.prefill_tokens_per_s:.1f} tok/s, decode {t.decode_tokens_per_s:.1f} tok/s]",
          file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    engine = _engine(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for chunk in engine.stream(messages, **_sampling(args)):
            print(chunk.text, end="", flush=True)
            reply.append(chunk.text)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_info(args) -> int:
    from .config import known_config, layer_layout, load_config, parameter_count
    from .loading import resolve_checkpoint
    from .memory import estimate_memory

    config = known_config(args.model) or load_config(resolve_checkpoint(args.model))
    params = parameter_count(config)
    per_1k = estimate_memory(config, 1024, 1, args.dtype, kv_cache_dtype=args.kv_cache_dtype).kv_cache
    est = estimate_memory(config, args.context, args.batch, args.dtype, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype)
    info = {
        "parameters": params.total,
        "active_parameters_per_token": params.active_per_token,
        "layers": layer_layout(config),
        "context_window": config.max_position_embeddings,
        "kv_cache_bytes_per_1k_tokens": per_1k,
        "estimate": {"context_tokens": args.context, "batch_size": args.batch, "dtype": args.dtype,
                     "kv_cache_dtype": args.kv_cache_dtype or args.dtype, "quantization": args.quantization, **est.as_dict()},
    }
    if args.fits is not None:
        info["fits"] = {"device_gib": args.fits, "fits": est.total <= args.fits * 2**30}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"parameters: {params.total / 1e6:,.1f} M ({params.active_per_token / 1e6:,.1f} M active per token)")
    print(f"context window: {config.max_position_embeddings:,} tokens")
    print("layers: " + ", ".join(f"{i}:{kind}" for i, kind in enumerate(info["layers"])))
    print(f"KV cache per 1K tokens ({args.kv_cache_dtype or args.dtype}): {per_1k / 2**20:.2f} MiB")
    weights = args.dtype + (f", {args.quantization} weights" if args.quantization else "")
    print(f"at {args.context:,} tokens x batch {args.batch} ({weights}):")
    for part in ("weights", "kv_cache", "mamba_state", "activations", "runtime"):
        print(f"  {part:12s} {getattr(est, part) / 2**30:10.3f} GiB")
    print(f"  {'total':12s} {est.total / 2**30:10.3f} GiB")
    if args.fits is not None:
        print(f"fits in {args.fits:g} GiB: {'yes' if info['fits']['fits'] else 'no'}")
    return 0


def _tokens(text: str) -> int:
    """"4k" -> 4096, "128K" -> 131072, "1000" -> 1000."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def cmd_eval(args) -> int:
    from langchain_jamba import ChatJamba

    from .eval import evaluate, write_report

    chat = ChatJamba(model=args.model, temperature=0.0, max_tokens=args.max_new_tokens, dtype=args.dtype,
                     device=args.device, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    tokenizer = chat.engine.tokenizer

    def progress(cell):
        print(f"{cell['task']:18s} {cell['length']:>7d} tokens  depth {cell['depth']:5.1f}%  accuracy {cell['accuracy']:.2f}  "
              f"{cell['latency_s']:.1f} s", file=sys.stderr, flush=True)

    results = evaluate(chat, args.tasks.split(","), [_tokens(n) for n in args.lengths.split(",")],
                       [float(d) for d in args.depths.split(",")], args.samples, tokenizer, seed=args.seed,
                       max_new_tokens=args.max_new_tokens, progress=progress)
    paths = write_report(results, args.out)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from benchmarks.bench import main as bench_main

    return bench_main(args.rest)


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args.rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jamba-local", description="Run Jamba checkpoints locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="complete a prompt (argument or stdin), streaming")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("prompt", nargs="?")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat with the checkpoint's chat template")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("info", help="parameters, layer layout, cache bytes and a memory estimate")
    p.add_argument("--model", required=True, help="checkpoint folder, config.json, or a released Hub id (e.g. ai21labs/AI21-Jamba-1.5-Mini)")
    p.add_argument("--context", type=int, default=262144)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, help=_QUANT_HELP)
    p.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "float16"], help=_KV_HELP)
    p.add_argument("--fits", type=float, default=None, metavar="GIB", help="say whether the total fits in this many GiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("eval", help="RULER-style long-context accuracy (needles, variable tracking) over Moby-Dick")
    p.add_argument("model", metavar="MODEL_PATH", help="checkpoint folder or Hub id")
    p.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,variable_tracking")
    p.add_argument("--lengths", default="1k,4k,16k", help="context lengths in tokens, e.g. 1k,4k,16k or 2000")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent")
    p.add_argument("--samples", type=int, default=2, help="samples per (task, length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default="ruler-results", help="folder for results.json, results.md, heatmap.png")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantization", default=None, help=_QUANT_HELP)
    p.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16"], help=_KV_HELP)
    p.set_defaults(func=cmd_eval)
    for name, func, text in (("bench", cmd_bench, "speed and memory against transformers"), ("demo", cmd_demo, "the main job: RAG over a long document")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: a message, not a traceback
        print(f"jamba-local {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
