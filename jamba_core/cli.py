"""`jamba-local` command line: generate, chat, info, eval, bench, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
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
    """Turns through `jamba_core.chat.api.chat_stream`: the answer on stdout (a reasoning model's thinking on
    stderr), and the parsed answer, not the raw text, kept as the assistant's turn. A turn that fails (the
    conversation outgrew the context window) is reported and dropped; the chat goes on."""
    from .chat.api import ChatDone, chat_stream
    from .chat.reasoning import ReasoningDelta
    from .chat.tool_calls import ContentDelta
    from .engine import check_sampling

    sampling = _sampling(args)
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)  # before the first line
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
        result = None
        try:
            for event in chat_stream(engine, messages, **sampling):
                if isinstance(event, ContentDelta):
                    print(event.text, end="", flush=True)
                elif isinstance(event, ReasoningDelta):
                    print(event.text, end="", file=sys.stderr, flush=True)
                elif isinstance(event, ChatDone):
                    result = event.result
        except ValueError as err:
            print(f"\nerror: {err}; this turn is dropped", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": result.content})
    return 0


def cmd_info(args) -> int:
    from .config import layer_layout, parameter_count
    from .memory import _config_of, estimate_memory

    if args.fits is not None and not (0 < args.fits < float("inf")):
        raise ValueError(f"--fits must be a positive number of GiB, got {args.fits}")
    config = _config_of(args.model)
    params = parameter_count(config)
    per_1k = estimate_memory(config, 1024, 1, args.dtype, kv_cache_dtype=args.kv_cache_dtype).kv_cache
    est = estimate_memory(config, args.context, args.batch, args.dtype, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype)
    from .quant import resolve_for_checkpoint

    quantization = resolve_for_checkpoint(config, args.quantization)[0]  # a checkpoint saved quantized: its own
    quantization = str(quantization) if quantization is not None else None
    beyond = args.context > config.max_position_embeddings
    info = {
        "parameters": params.total,
        "active_parameters_per_token": params.active_per_token,
        "layers": layer_layout(config),
        "context_window": config.max_position_embeddings,
        "kv_cache_bytes_per_1k_tokens": per_1k,
        "estimate": {"context_tokens": args.context, "batch_size": args.batch, "dtype": args.dtype,
                     "kv_cache_dtype": args.kv_cache_dtype or args.dtype, "quantization": quantization,
                     "within_context_window": not beyond, **est.as_dict()},
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
    weights = args.dtype + (f", {quantization} weights" if quantization else "")
    print(f"at {args.context:,} tokens x batch {args.batch} ({weights}):")
    if beyond:
        print(f"  (past the model's context window of {config.max_position_embeddings:,} tokens: the engine refuses "
              "such a request; the figures are the arithmetic only)")
    for part in ("weights", "kv_cache", "mamba_state", "activations", "runtime"):
        print(f"  {part:12s} {getattr(est, part) / 2**30:10.3f} GiB")
    print(f"  {'total':12s} {est.total / 2**30:10.3f} GiB")
    if args.fits is not None:
        print(f"fits in {args.fits:g} GiB: {'yes' if info['fits']['fits'] else 'no'}")
    return 0


def _tokens(text: str) -> int:
    """"4k" -> 4096, "128K" -> 131072, "1000" -> 1000 (an argparse type: bad text is a usage error)."""
    text = text.strip().lower()
    try:
        n = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 4096 or 4k)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"a token count must be at least 1, got {text!r}")
    return n


def _token_list(text: str) -> list[int]:
    return [_tokens(n) for n in text.split(",")]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _depths(text: str) -> list[float]:
    try:
        depths = [float(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of percentages, e.g. 0,50,100") from None
    if not all(0 <= d <= 100 for d in depths):
        raise argparse.ArgumentTypeError(f"depths are percentages from 0 to 100, got {text!r}")
    return depths


def cmd_eval(args) -> int:
    from langchain_jamba import ChatJamba

    from .eval import Haystack, evaluate, summarize, write_report

    chat = ChatJamba(model=args.model, temperature=0.0, max_tokens=args.max_new_tokens, dtype=args.dtype,
                     device=args.device, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    tokenizer = chat.engine.tokenizer
    window = chat.engine.context_window
    too_long = [n for n in args.lengths if n + args.max_new_tokens > window]
    if too_long:  # refused before any sample runs, rather than failing at the first such cell
        raise ValueError(f"--lengths {', '.join(map(str, too_long))} with --max-new-tokens {args.max_new_tokens} do not fit "
                         f"the model's context window of {window} tokens")

    done = []

    def progress(cell):
        done.append(cell)
        print(f"{cell['task']:18s} {cell['length']:>7d} tokens  depth {cell['depth']:5.1f}%  accuracy {cell['accuracy']:.2f}  "
              f"{cell['latency_s']:.1f} s", file=sys.stderr, flush=True)

    grid = (args.tasks.split(","), args.lengths, args.depths, args.samples)
    try:
        text = Path(args.haystack).read_text(encoding="utf-8") if args.haystack else None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--haystack {args.haystack}: {type(err).__name__}: {err}") from err
    try:
        haystack = Haystack(tokenizer, text=text) if text is not None else None
        results = evaluate(chat, *grid, tokenizer, seed=args.seed, max_new_tokens=args.max_new_tokens,
                           haystack=haystack, progress=progress)
    except (Exception, KeyboardInterrupt) as err:  # a failed sample or Ctrl-C: keep the cells already scored
        if done:
            why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
            paths = write_report(summarize(chat, done, *grid, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                           error=why), args.out)
            print(f"stopped after {len(done)} cells ({why}); wrote them to {', '.join(str(p) for p in paths.values())}",
                  file=sys.stderr)
        raise
    paths = write_report(results, args.out)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def cmd_bench(rest: list[str]) -> int:
    # the benchmarks live beside the package in a checkout (an editable install), not in the wheel
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "bench.py").is_file():
        raise FileNotFoundError("the benchmark ships with the repository, not the installed package: run "
                                "`python -m benchmarks.bench` in a checkout of jamba-local")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.bench import main as bench_main

    return bench_main(rest)


def cmd_demo(rest: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(rest)


_PASS_THROUGH = {"bench": cmd_bench, "demo": cmd_demo}  # their own argument parsers take every argument after the name


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _PASS_THROUGH:
        return _run(argv[0], _PASS_THROUGH[argv[0]], argv[1:])
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
    p.add_argument("--context", type=_tokens, default=262144, help="tokens, e.g. 262144 or 256k")
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, help=_QUANT_HELP)
    p.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "float16"], help=_KV_HELP)
    p.add_argument("--fits", type=float, default=None, metavar="GIB", help="say whether the total fits in this many GiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("eval", help="RULER-style long-context accuracy (needles, variable tracking) over Moby-Dick")
    p.add_argument("model", metavar="MODEL_PATH", help="checkpoint folder or Hub id")
    p.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,variable_tracking")
    p.add_argument("--lengths", type=_token_list, default="1k,4k,16k", help="context lengths in tokens, e.g. 1k,4k,16k or 2000")
    p.add_argument("--depths", type=_depths, default="0,25,50,75,100", help="needle depths in percent")
    p.add_argument("--samples", type=_positive_int, default=2, help="samples per (task, length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--out", default="ruler-results", help="folder for results.json, results.md, heatmap.png")
    p.add_argument("--haystack", default=None, help="a UTF-8 text file to hide the needles in (default: "
                                                     "$JAMBA_LOCAL_SHARED/data/moby-dick.txt, ../shared beside a checkout)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantization", default=None, help=_QUANT_HELP)
    p.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16"], help=_KV_HELP)
    p.set_defaults(func=cmd_eval)
    for name, text in (("bench", "speed and memory against transformers (`jamba-local bench --help`)"),
                       ("demo", "the main job: RAG over a long document (`jamba-local demo --help`)")):
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; main() hands their arguments on before parsing
    args = parser.parse_args(argv)
    return _run(args.command, args.func, args)


def _run(command: str, func, arg) -> int:
    try:
        return func(arg)
    except (OSError, ValueError, ImportError) as err:  # bad input (missing or unreadable files, bad values, an extra
        # not installed): a message, not a traceback
        print(f"jamba-local {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
