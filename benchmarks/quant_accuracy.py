"""Accuracy, memory and decode speed of the quantized formats on bench-small (or another preset), against fp32.

Accuracy: 1,024 positions of real text (Moby-Dick from "Call me Ishmael", the checkpoint's tokenizer)
through the fp32 model and each quantized one in one forward; per format the relative logit error
``||q - f|| / ||f||`` over all positions and the vocabulary, the mean KL divergence ``KL(p_f || p_q)``
per position, and how often the top token agrees. A second figure re-runs each format with every MoE
router's output replaced by the fp32 model's (the experts chosen and their weights pinned): bench-small's
routers have random weights and near-ties in their top-2, which any perturbation flips for a few percent
of the tokens, so this separates the quantization error from those discrete flips. The fp32 model with
bf16 weights (the project's own bf16 mode) is measured alike, for scale.

Memory: each format loads in its own subprocess; peak RSS (VmHWM) while quantizing on load against the
resident size once loaded, and the model's own bytes (parameters and buffers) against fp32's.

Speed: each system decodes in its own subprocess (a 256-token prompt of the same text, then greedy
tokens one at a time), systems interleaved repetition by repetition; medians. Ours in fp32 and each
format, and transformers' ``JambaForCausalLM`` in fp32 (the reference implementation).

    python -m benchmarks.quant_accuracy                  # everything (about 10 minutes on 2 cores)
    python -m benchmarks.quant_accuracy --skip-speed     # accuracy and memory only
    python -m benchmarks.quant_accuracy --preset tiny    # the tiny test model: a quick check of the script
    python -m benchmarks.quant_accuracy --model checkpoints/jamba-tiny-chat --skip-speed   # a trained checkpoint

Writes ``quant_accuracy.json`` and ``quant_accuracy.md`` into ``--out`` (``quant_accuracy-{preset}.*`` for a
preset other than bench-small, ``quant_accuracy-{folder name}.*`` for ``--model``, so a quick run never
replaces the published figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / ".checkpoints"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
FORMATS = ["int8", "int8+lm_head", "int8+mamba", "bnb-int8", "bnb-int8+mamba", "bnb-nf4", "bnb-nf4+mamba"]
MEMORY_SYSTEMS = [None, "int8", "int8+lm_head", "int8+mamba", "bnb-int8", "bnb-nf4"]
SPEED_SYSTEMS = [("ours", None), ("ours", "int8"), ("ours", "int8+lm_head"), ("ours", "int8+mamba"), ("ours", "bnb-int8"),
                 ("ours", "bnb-nf4"), ("reference", None)]
GATES = {"int8_rel_error": 0.01, "int8_bytes_ratio": 0.4, "peak_over_final": 1.2, "decode_vs_ours_fp32": 2.0,
         "decode_vs_reference_fp32": 9.0}
MiB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", default="bench-small", help="the random-weight model measured (a jamba_core.testing preset: "
                   "bench-small, or tiny for a quick check of the script)")
    p.add_argument("--checkpoint", default=None, help="its checkpoint folder (made if absent; default .checkpoints/PRESET)")
    p.add_argument("--model", default=None, help="measure this existing checkpoint folder instead of a preset (never written to)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--positions", type=int, default=1024, help="text positions for the accuracy figures")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt before decoding, speed section")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 by default: with 2 OpenMP threads on 2 shared cores, one busy neighbour "
                        "makes every barrier wait and decode steps vary tenfold)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-reference", action="store_true", help="leave transformers out of the speed section")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))))
        return 0
    from jamba_core.testing import make_checkpoint

    if args.model:  # an existing checkpoint, e.g. the trained one: its weights are what is measured
        if args.checkpoint:
            raise SystemExit("give --model or --checkpoint, not both")
        if not (Path(args.model) / "config.json").is_file():
            raise SystemExit(f"{Path(args.model) / 'config.json'} not found: --model takes a checkpoint folder")
        args.checkpoint, args.preset = str(args.model), Path(args.model).resolve().name
    else:
        args.checkpoint = str(args.checkpoint or CHECKPOINTS / args.preset)
        make_checkpoint(args.checkpoint, preset=args.preset)
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quant_accuracy" if args.preset == "bench-small" else f"quant_accuracy-{args.preset}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def run(args) -> dict:
    from jamba_core.quant import bnb

    bnb_reason = bnb.unavailable_reason()
    formats = [f for f in FORMATS if not (f.startswith("bnb") and bnb_reason)]
    started = time.time()
    results = {"machine": _machine(args.threads), "preset": args.preset, "checkpoint": str(args.checkpoint),
               "bitsandbytes": bnb_reason or _bnb_version(), "gates": GATES, "command": "python -m benchmarks.quant_accuracy " + " ".join(sys.argv[1:])}
    _log("accuracy ...")
    results["accuracy"] = _spawn({"phase": "accuracy", "checkpoint": args.checkpoint, "positions": args.positions,
                                  "formats": formats, "threads": max(args.threads, os.cpu_count() or 1)}, 1800)
    _log("memory ...")
    results["memory"] = {str(q): _spawn({"phase": "memory", "checkpoint": args.checkpoint, "quantization": q, "threads": args.threads}, 600)
                         for q in MEMORY_SYSTEMS if not (q and q.startswith("bnb") and bnb_reason)}
    if not args.skip_speed:
        systems = [(s, q) for s, q in SPEED_SYSTEMS if not (q and q.startswith("bnb") and bnb_reason)
                   and not (s == "reference" and args.skip_reference)]
        runs = {_label(s, q): [] for s, q in systems}
        for rep in range(args.reps):
            for s, q in systems:
                _log(f"speed rep {rep + 1}/{args.reps}: {_label(s, q)}")
                runs[_label(s, q)].append(_spawn({"phase": "speed", "system": s, "quantization": q, "checkpoint": args.checkpoint,
                                                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                                  "threads": args.threads}, 900))
        results["speed"] = runs
        results["speed_settings"] = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "reps": args.reps}
    results["machine"]["load_average_end"] = _loadavg()
    results["elapsed_s"] = time.time() - started
    results["summary"] = summarize(results)
    return results


def _label(system: str, quantization: str | None) -> str:
    return ("reference" if system == "reference" else "ours") + " " + (quantization or "fp32")


# -- the measurements (each in its own process) -------------------------------------------------------------
def _worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    return {"accuracy": _accuracy, "memory": _memory, "speed": _speed}[spec["phase"]](spec)


def _text_ids(tokenizer, n: int) -> list[int]:
    from jamba_core.tokenizer import shared_dir

    book = shared_dir() / "data" / "moby-dick.txt"  # $JAMBA_LOCAL_SHARED when set and not empty, else ../shared
    text = book.read_text(encoding="utf-8")
    start = text.find("Call me Ishmael")
    ids = tokenizer(text[max(start, 0) : max(start, 0) + 40 * n])["input_ids"]
    if len(ids) < n:
        raise ValueError(f"{book} gives only {len(ids)} tokens, fewer than the {n} asked for")
    return ids[:n]


def _accuracy(spec: dict) -> dict:
    import torch

    from jamba_core import Engine

    fp32 = Engine.from_pretrained(spec["checkpoint"], progress=False, prefix_cache_bytes=0)
    ids = torch.tensor([_text_ids(fp32.tokenizer, spec["positions"])])
    routers = {}
    hooks = [m.register_forward_hook(_recorder(routers, n)) for n, m in fp32.model.named_modules() if n.endswith("router")]
    with torch.inference_mode():
        ref = fp32.model(ids)[0].float()  # (L, V)
    for h in hooks:
        h.remove()
    ref_logp = torch.log_softmax(ref, dim=-1)
    del fp32
    out = {"positions": int(ids.shape[1]), "first_tokens": ids[0, :12].tolist(), "formats": {}}
    for name in [*spec["formats"], "bf16 weights (no quantization)"]:
        quantization = None if name.startswith("bf16") else name
        dtype = "bfloat16" if name.startswith("bf16") else "float32"
        engine = Engine.from_pretrained(spec["checkpoint"], dtype=dtype, quantization=quantization, progress=False, prefix_cache_bytes=0)
        with torch.inference_mode():
            logits = engine.model(ids)[0].float()
            row = _compare(logits, ref, ref_logp)
            hooks = [m.register_forward_hook(_replayer(routers, n)) for n, m in engine.model.named_modules() if n.endswith("router")]
            pinned = engine.model(ids)[0].float()
            for h in hooks:
                h.remove()
            row["rel_error_routing_pinned"] = _rel(pinned, ref)
            row["mean_kl_routing_pinned"] = _mean_kl(ref_logp, pinned)
        out["formats"][name] = row
        _log(f"  {name}: rel {row['rel_error']:.4f} (pinned {row['rel_error_routing_pinned']:.4f}), KL {row['mean_kl']:.5f}")
        del engine, logits, pinned
    return out


def _recorder(store: dict, name: str):
    def hook(module, inputs, output):
        store[name] = output.detach().float().clone()

    return hook


def _replayer(store: dict, name: str):
    def hook(module, inputs, output):
        return store[name].to(output.dtype)  # the fp32 model's router logits: same experts, same weights

    return hook


def _rel(q, f) -> float:
    return float((q - f).norm() / f.norm())


def _mean_kl(ref_logp, logits, block: int = 128) -> float:
    """Mean over positions of KL(p_f || p_q), in blocks of positions to bound the temporaries."""
    import torch

    total = 0.0
    for a in range(0, logits.shape[0], block):
        p_log = ref_logp[a : a + block]
        q_log = torch.log_softmax(logits[a : a + block], dim=-1)
        total += float((p_log.exp() * (p_log - q_log)).sum())
    return total / logits.shape[0]


def _compare(logits, ref, ref_logp) -> dict:
    return {"rel_error": _rel(logits, ref), "mean_kl": _mean_kl(ref_logp, logits),
            "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}


def _rss() -> dict:
    text = Path("/proc/self/status").read_text()
    kb = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines() if line.startswith(("VmRSS", "VmHWM"))}
    return {"rss": kb["VmRSS"] * 1024, "peak": kb["VmHWM"] * 1024}


def _memory(spec: dict) -> dict:
    import resource

    import torch

    from jamba_core.config import load_config
    from jamba_core.loading import load_model
    from jamba_core.model import JambaForCausalLM
    from jamba_core.quant import bnb, resident_bytes
    from jamba_core.testing import make_config

    if spec["quantization"] and spec["quantization"].startswith("bnb"):
        bnb._bnb()
    with torch.device("meta"):  # the first meta model pulls in torch's lazy imports (~150 MiB): runtime, not model
        JambaForCausalLM(make_config("tiny"))
    baseline = _rss()["rss"]
    folder = Path(spec["checkpoint"])
    t = time.perf_counter()
    model = load_model(folder, load_config(folder), progress=False, quantization=spec["quantization"])
    load_s = time.perf_counter() - t
    final = _rss()
    ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_rss": baseline, "final_rss": final["rss"], "peak_rss": max(final["peak"], ru_peak),
            "model_bytes": resident_bytes(model), "load_s": load_s}


def _speed(spec: dict) -> dict:
    import torch

    from jamba_core.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    if spec["system"] == "ours":
        from jamba_core import Engine

        engine = Engine.from_pretrained(spec["checkpoint"], quantization=spec["quantization"], progress=False, prefix_cache_bytes=0)

        def start(ids, capacity):
            cache = engine.new_cache(1, capacity=capacity)
            return engine.prefill(ids, cache), cache

        def step(token, cache):
            return engine.decode_one_token(token, cache), cache
    else:
        from transformers import JambaForCausalLM

        model = JambaForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()

        def start(ids, capacity):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float(), out.past_key_values

        def step(token, cache):
            out = model(input_ids=token, cache=cache, use_cache=True)
            return out.logits[:, -1].float(), out.past_key_values
    load_s = time.perf_counter() - t0
    ids = torch.tensor([_text_ids(load_tokenizer(spec["checkpoint"]), spec["prompt_tokens"])])
    new = spec["new_tokens"]
    with torch.inference_mode():
        logits, cache = start(ids[:, :16], 20)  # warm-up: kernels loaded, pages touched
        step(logits.argmax(-1, keepdim=True), cache)
        t = time.perf_counter()
        logits, cache = start(ids, ids.shape[1] + new + 1)
        prefill_s = time.perf_counter() - t
        tokens, steps = [int(logits[0].argmax())], []
        for _ in range(new):
            ts = time.perf_counter()
            logits, cache = step(torch.tensor([[tokens[-1]]]), cache)
            tokens.append(int(logits[0].argmax()))
            steps.append(time.perf_counter() - ts)
    decode_s = sum(steps)
    return {"load_s": load_s, "prefill_tok_s": ids.shape[1] / prefill_s, "decode_tok_s": new / decode_s,
            "decode_tok_s_median_step": 1 / statistics.median(steps), "tokens": tokens, "loadavg": _loadavg()}


# -- processes, machine ---------------------------------------------------------------------------------------
def _spawn(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.quant_accuracy", "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stderr.splitlines():
        if line.startswith("[quant]"):
            print(line, file=sys.stderr, flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {spec['phase']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _log(msg: str) -> None:
    print(f"[quant] {msg}", file=sys.stderr, flush=True)


def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


def _machine(threads: int) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "load_average_start": _loadavg(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# -- summary and report ----------------------------------------------------------------------------------------
def decode_bytes(config, quantization=None) -> int:
    """Weight bytes one decode step reads with fp32 weights and int8 ``quantization``: every weight once,
    except one row of the embedding table and, in MoE layers, the top-k experts of the E (on average)."""
    import torch

    from jamba_core.model import JambaForCausalLM
    from jamba_core.quant import target_names

    with torch.device("meta"):
        model = JambaForCausalLM(config)
    targets = set(target_names(model, quantization)) if quantization else set()
    total = 0.0
    for name, p in model.named_parameters():
        module, _, kind = name.rpartition(".")
        if name == "model.embed_tokens.weight":
            n = p.shape[1] * 4
        elif module in targets and kind == "weight":
            n = p.numel() + 4 * p.shape[0]  # int8 matrix + fp32 row scales
        else:
            n = p.numel() * 4
        total += n * (config.num_experts_per_tok / config.num_experts if ".experts." in name else 1)
    return int(total)


def summarize(results: dict) -> dict:
    from jamba_core.config import known_config, load_config
    from jamba_core.memory import estimate_memory

    acc = results["accuracy"]["formats"]
    mem = results["memory"]
    fp32_bytes = mem["None"]["model_bytes"]
    config = load_config(results["checkpoint"])
    mini = known_config("AI21-Jamba-1.5-Mini")
    summary = {
        "int8_rel_error": acc["int8"]["rel_error"],
        "int8_bytes_ratio": mem["int8"]["model_bytes"] / fp32_bytes,
        "int8+lm_head_rel_error": acc["int8+lm_head"]["rel_error"],
        "int8+lm_head_bytes_ratio": mem["int8+lm_head"]["model_bytes"] / fp32_bytes,
        "int8_bytes_ratio_jamba_1.5_mini_formula": estimate_memory(mini, 0, 1, "float32", quantization="int8").weights
        / estimate_memory(mini, 0, 1, "float32").weights,
        "peak_over_final": {k: v["peak_rss"] / v["final_rss"] for k, v in mem.items()},
        "decode_bytes_per_token": {"fp32": decode_bytes(config), "int8": decode_bytes(config, "int8"),
                                   "int8+mamba": decode_bytes(config, "int8+mamba"),
                                   "int8+lm_head": decode_bytes(config, "int8+lm_head"),
                                   "int8+mamba+lm_head": decode_bytes(config, "int8+mamba+lm_head"),
                                   "lm_head alone, fp32": config.vocab_size * config.hidden_size * 4},
    }
    speed = results.get("speed")
    if speed:
        med = {k: statistics.median(r["decode_tok_s"] for r in runs) for k, runs in speed.items()}
        summary["decode_tok_s_median"] = med
        summary["decode_vs_ours_fp32"] = {k: v / med["ours fp32"] for k, v in med.items() if k != "ours fp32"}
        if "reference fp32" in med:
            summary["decode_vs_reference_fp32"] = {k: v / med["reference fp32"] for k, v in med.items() if k != "reference fp32"}
        summary["prefill_tok_s_median"] = {k: statistics.median(r["prefill_tok_s"] for r in runs) for k, runs in speed.items()}
        summary["greedy_tokens_match_fp32"] = {k: runs[0]["tokens"] == speed["ours fp32"][0]["tokens"] for k, runs in speed.items()}
    return summary


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**fail**"


def markdown(results: dict) -> str:
    m, s = results["machine"], results["summary"]
    acc, preset = results["accuracy"], results.get("preset", "bench-small")
    lines = [
        f"# Quantization on {preset}: accuracy, memory, decode speed", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} thread(s); load average at start / end "
        f"{m['load_average_start']:.1f} / {m['load_average_end']:.1f} (shared machine: other processes when above 0). "
        f"bitsandbytes: {results['bitsandbytes']}. Command: `{results['command'].strip()}`.", "",
        f"## Accuracy against fp32 ({acc['positions']} positions of Moby-Dick, one forward)", "",
        "| format | rel. logit error | mean KL / position | top-1 agreement | rel. error, routing pinned | KL, routing pinned |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in acc["formats"].items():
        lines.append(f"| {name} | {r['rel_error']:.4f} | {r['mean_kl']:.5f} | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['rel_error_routing_pinned']:.4f} | {r['mean_kl_routing_pinned']:.5f} |")
    lines += ["", "Rel. logit error = ||q - f|| / ||f|| over all positions and the vocabulary; KL = KL(p_fp32 || p_q). "
              "Routing pinned: every MoE router's output replaced by the fp32 model's, so the same experts run with the "
              "same weights (the random routers have near-ties that small perturbations flip).", "",
              "## Memory (each load in its own process)", "",
              "| weights | model bytes (MiB) | vs fp32 | RSS after load (MiB) | peak RSS while loading (MiB) | peak / after "
              "| runtime before load (MiB) | load s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    fp32_bytes = results["memory"]["None"]["model_bytes"]
    for name, r in results["memory"].items():
        lines.append(f"| {'fp32' if name == 'None' else name} | {r['model_bytes'] / MiB:.0f} | {r['model_bytes'] / fp32_bytes:.2f}x | "
                     f"{r['final_rss'] / MiB:.0f} | {r['peak_rss'] / MiB:.0f} | {r['peak_rss'] / r['final_rss']:.3f} | "
                     f"{r['baseline_rss'] / MiB:.0f} | {r['load_s']:.1f} |")
    speed = results.get("speed")
    if speed:
        st = results["speed_settings"]
        lines += ["", f"## Decode speed ({st['new_tokens']} greedy tokens, batch 1, after a {st['prompt_tokens']}-token prompt "
                  f"of the same text; {st['reps']} repetitions interleaved; medians)", "",
                  "| system | decode tok/s | 1 / median step | prefill tok/s | vs ours fp32 | vs reference fp32 | same greedy tokens as ours fp32 |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, runs in speed.items():
            dec = statistics.median(r["decode_tok_s"] for r in runs)
            step = statistics.median(r["decode_tok_s_median_step"] for r in runs)
            pre = statistics.median(r["prefill_tok_s"] for r in runs)
            vs_ours = s["decode_vs_ours_fp32"].get(name)
            vs_ref = s.get("decode_vs_reference_fp32", {}).get(name)
            lines.append(f"| {name} | {dec:.1f} | {step:.1f} | {pre:.0f} | {'—' if vs_ours is None else f'{vs_ours:.2f}x'} | "
                         f"{'—' if vs_ref is None else f'{vs_ref:.2f}x'} | {s['greedy_tokens_match_fp32'][name]} |")
    db = s["decode_bytes_per_token"]
    lines += ["", "Weights read per decoded token (fp32 compute; one embedding row; top-k of the experts), the bound "
              "on decode speed-ups where decode is bandwidth-bound:", ""]
    lines += [f"- {k}: {v / MiB:.1f} MiB" + ("" if k.startswith("lm_head") or k == "fp32" else f" ({db['fp32'] / v:.2f}x fewer than fp32)")
              for k, v in db.items()]
    g = results["gates"]
    lines += ["", "## Gates (issue 7)", "",
              f"- int8 (Mamba in float) relative logit error <= {g['int8_rel_error']:.0%}: {s['int8_rel_error']:.4f} "
              f"{_verdict(s['int8_rel_error'] <= g['int8_rel_error'])}",
              f"- int8 model bytes <= {g['int8_bytes_ratio']}x fp32: {s['int8_bytes_ratio']:.3f}x "
              f"{_verdict(s['int8_bytes_ratio'] <= g['int8_bytes_ratio'])} ({preset}; Jamba 1.5 Mini's shapes by "
              f"`estimate_memory`: {s['int8_bytes_ratio_jamba_1.5_mini_formula']:.3f}x)",
              f"- peak RSS while quantizing on load <= {g['peak_over_final']}x the resident size after: int8 "
              f"{s['peak_over_final']['int8']:.3f} {_verdict(s['peak_over_final']['int8'] <= g['peak_over_final'])}"]
    if speed:
        r = s["decode_vs_ours_fp32"]["ours int8"]
        lines.append(f"- int8 decode >= {g['decode_vs_ours_fp32']}x ours fp32: {r:.2f}x {_verdict(r >= g['decode_vs_ours_fp32'])}")
        if "decode_vs_reference_fp32" in s:
            r = s["decode_vs_reference_fp32"]["ours int8"]
            lines.append(f"- int8 decode >= {g['decode_vs_reference_fp32']}x the reference's fp32: {r:.2f}x "
                         f"{_verdict(r >= g['decode_vs_reference_fp32'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
