"""Speed and memory of jamba-local against transformers' ``JambaForCausalLM``: same weights, same run.

On a checkpoint made by ``jamba_core.testing.make_checkpoint(preset="bench-small")``, each measurement
runs in its own subprocess (so its peak resident memory is its own: the high-water mark is reset after
the model is loaded and warmed up, then read after the phase), and the systems are interleaved
repetition by repetition, so that drift on a shared machine hits them alike; figures are medians.

Systems: ours in fp32 and with bf16 weights, and transformers' ``JambaForCausalLM`` in fp32 on its
pure-PyTorch path (what a CPU user gets: prefill with ``logits_to_keep=1``, decode one token at a time
through its cache). Phases: decode (``--decode-new`` greedy tokens after a ``--decode-prompt`` prompt,
batch 1) and prefill at each context (time to first token = prefill + the first greedy pick).

The machine's bounds are measured in the same run (before and after the measurements; the better of
the two is used): memory bandwidth (a large copy, and a large read), matmul FLOP rate in fp32 and bf16
(best of the model's prefill shapes). The bandwidth is also measured in each decode repetition's process,
just before and after it (the better of the two): on a shared VM it drifts by tens of percent within
seconds, and the "best repetition" table gives the median of each repetition over its own bound too.
Decode bound = bandwidth / weight bytes read per token (active
parameters less the embedding table, of which one row is read); prefill bound = FLOP rate /
(2 x those parameters less the LM head, which prefill runs for the last position only, + the attention
scores' FLOPs at that context).

    python -m benchmarks.bench                       # everything the machine can hold, up to 256K
    python -m benchmarks.bench --max-context 8192    # a quick run
    python -m benchmarks.bench --contexts 32768 --merge   # add a context to the saved results

Writes ``bench.json`` (every repetition, bounds, machine), ``bench.md`` (the tables) and ``bench.png``
(prefill time and peak memory against context, log axes) into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_CHECKPOINT = ROOT / ".checkpoints" / "bench-small"
ALL_CONTEXTS = [1024, 8192, 32768, 131072, 262144]
SYSTEMS = [("ours", "float32"), ("ours", "bfloat16"), ("reference", "float32")]
MiB = 2**20


# -- command line ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="bench-small checkpoint folder (made if absent)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--max-context", type=int, default=262144, help="largest prefill context for ours")
    p.add_argument("--ref-max-context", type=int, default=32768,
                   help="largest prefill context for the reference (it needs about 9 GiB at 32K, 16 GiB at 64K)")
    p.add_argument("--contexts", default=None,
                   help="comma-separated prefill contexts (default: 1K, 8K, 32K, 128K, 256K up to --max-context; '' for none)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement up to 8K tokens")
    p.add_argument("--long-reps", type=int, default=1, help="repetitions above 8K tokens")
    p.add_argument("--decode-prompt", type=int, default=1024)
    p.add_argument("--decode-new", type=int, default=64)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default: 2, as the targets)")
    p.add_argument("--systems", default=",".join(f"{s}:{d}" for s, d in SYSTEMS), help="e.g. ours:float32,reference:float32")
    p.add_argument("--no-decode", action="store_true", help="skip the decode phase")
    p.add_argument("--merge", action="store_true", help="add to the results already in --out instead of replacing them")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed for one measurement")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """Command line (``python -m benchmarks.bench``, ``jamba-local bench``); returns the exit status."""
    args = add_arguments(argparse.ArgumentParser(prog="jamba-local bench", description="jamba-local benchmark against transformers")).parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    results = run(args)
    return 0 if results["summary"]["rows"] else 1


# -- one measurement, in a subprocess ---------------------------------------------------------------------
def _mem() -> dict:
    """Resident and peak resident MiB of this process (Linux /proc; ru_maxrss elsewhere)."""
    try:
        text = Path("/proc/self/status").read_text()
        kb = {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}
        return {"rss_mib": kb["VmRSS"] / 1024, "peak_mib": kb["VmHWM"] / 1024}
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"rss_mib": peak, "peak_mib": peak}


def _reset_peak() -> bool:
    """Reset the peak-RSS mark (``echo 5 > /proc/self/clear_refs``), so the next peak is the phase's own."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _prompt(n: int, vocab: int, seed: int = 0):
    import torch

    return torch.randint(4, vocab, (1, n), generator=torch.Generator().manual_seed(seed + n))


def _worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["phase"] == "bounds":
        return _machine_bounds()
    if spec["phase"] == "baseline":
        import transformers  # noqa: F401  (the runtime both systems carry)

        import jamba_core  # noqa: F401

        return _mem()
    dtype = getattr(torch, spec["dtype"])
    t0 = time.perf_counter()
    if spec["system"] == "ours":
        from jamba_core import ops
        from jamba_core.engine import Engine

        engine = Engine.from_pretrained(spec["checkpoint"], dtype=dtype, progress=False)
        config = engine.config
        backend = f"{ops.active()} ({ops.cpu.status()})" if ops.active() == "cpu" else ops.active()

        def new_cache(capacity):
            return engine.new_cache(1, capacity=capacity)

        def prefill(ids, cache):
            return engine.prefill(ids, cache)

        def step(token, cache):
            return engine.decode_one_token(token, cache)
    else:
        from transformers import JambaForCausalLM

        model = JambaForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype).eval()
        config = model.config
        backend = "transformers " + __import__("transformers").__version__
        box = {}

        def new_cache(capacity):
            return box

        def prefill(ids, cache):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache["c"] = getattr(out, "cache", None) or out.past_key_values
            return out.logits[:, -1].float()

        def step(token, cache):
            out = model(input_ids=token, cache=cache["c"], use_cache=True)
            cache["c"] = getattr(out, "cache", None) or out.past_key_values
            return out.logits[:, -1].float()

    load_s = time.perf_counter() - t0
    after_load = _mem()
    vocab = min(config.vocab_size, 8192)  # ids the tokenizer can produce
    with torch.inference_mode():  # warm-up: kernels loaded, oneDNN primitives made, pages touched
        cache = new_cache(64 + 2)
        logits = prefill(_prompt(64, vocab, seed=99), cache)
        step(logits.argmax(-1, keepdim=True), cache)
        del cache, logits
    # decode reads the weights at memory bandwidth, which drifts on a shared machine within seconds: it is
    # measured beside each repetition too, before the peak is reset and after the phase's memory is read
    before = max(_bandwidth()) if spec["phase"] == "decode" else None
    reset = _reset_peak()
    result = {"load_s": load_s, "after_load": after_load, "peak_reset": reset, "backend": backend}
    with torch.inference_mode():
        if spec["phase"] == "prefill":
            n = spec["tokens"]
            ids = _prompt(n, vocab)
            t = time.perf_counter()
            cache = new_cache(n + 1)
            logits = prefill(ids, cache)
            t_prefill = time.perf_counter()
            first = int(logits[0].argmax())
            t_first = time.perf_counter()
            result.update(prefill_s=t_prefill - t, ttft_s=t_first - t, tokens=n, first_token=first,
                          prefill_tok_s=n / (t_prefill - t))
            if spec["system"] == "ours":
                result.update(_cache_check(config, cache, n + 1, dtype, engine.prefill_chunk_tokens))
        else:  # decode
            n, new = spec["tokens"], spec["new_tokens"]
            cache = new_cache(n + new + 1)
            logits = prefill(_prompt(n, vocab), cache)
            tokens = [int(logits[0].argmax())]
            steps = []
            t = time.perf_counter()
            for _ in range(new):
                ts = time.perf_counter()
                logits = step(torch.tensor([[tokens[-1]]]), cache)
                tokens.append(int(logits[0].argmax()))
                steps.append(time.perf_counter() - ts)
            decode_s = time.perf_counter() - t
            result.update(decode_s=decode_s, new_tokens=new, decode_tok_s=new / decode_s, token_ids=tokens, step_s=steps)
    result["phase_mem"] = _mem()
    if before is not None:
        result["bandwidth_beside_gb_s"] = max(before, *_bandwidth())  # the better of before and after
    return result


def _cache_check(config, cache, capacity: int, dtype, chunk: int) -> dict:
    """estimate_memory against what the engine allocated for ``capacity`` positions."""
    from jamba_core.cache import KVCache
    from jamba_core.memory import estimate_memory

    est = estimate_memory(config, capacity, 1, dtype, chunk)
    kv = sum(layer.nbytes for layer in cache.layers if isinstance(layer, KVCache))
    return {"estimate": est.as_dict(), "cache_nbytes": cache.nbytes, "kv_nbytes": kv,
            "kv_exact": kv == est.kv_cache, "cache_exact": cache.nbytes == est.kv_cache + est.mamba_state}


def _timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bandwidth(mib: int = 256, reps: int = 5) -> tuple[float, float]:
    """(copy, read) memory bandwidth in GB/s: copy counts bytes read + written, read is a reduction;
    ``mib`` MiB of fp32 each way (256: far beyond any cache), in huge pages where the engine's weights are
    (`jamba_core.loading.huge_page_empty`); median of ``reps``."""
    import torch

    from jamba_core.loading import huge_page_empty

    n = mib * MiB // 4
    x, y = huge_page_empty([torch.empty(n)] * 2) or (torch.empty(n), torch.empty(n))
    x.fill_(1.0)
    copy = 2 * x.numel() * 4 / _timed(lambda: y.copy_(x), reps) / 1e9
    read = x.numel() * 4 / _timed(lambda: x.sum(), reps) / 1e9
    return copy, read


def _machine_bounds() -> dict:
    """Memory bandwidth (`_bandwidth`) and matmul FLOP rates."""
    import torch

    copy, read = _bandwidth()
    shapes = [(2048, 512, 2048), (2048, 512, 1408), (2048, 1408, 512), (2048, 1024, 512), (2048, 2048, 2048)]
    rates = {}
    for dt in (torch.float32, torch.bfloat16):
        best = 0.0
        for M, K, N in shapes:
            a, w = torch.randn(M, K).to(dt), torch.randn(N, K).to(dt)
            best = max(best, 2 * M * K * N / _timed(lambda: torch.nn.functional.linear(a, w), 5) / 1e9)
        rates[str(dt).removeprefix("torch.")] = best
    return {"copy_gb_s": copy, "read_gb_s": read, "bandwidth_gb_s": max(copy, read),
            "matmul_gflop_s": rates}


def _spawn(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks.bench", "--worker", json.dumps(spec)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["wall_s"] = time.perf_counter() - t
            return out
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"error": f"exit {proc.returncode}: {tail}"}


# -- the run ------------------------------------------------------------------------------------------------
def _bounds_for(config, bounds: dict, dtype: str, context: int | None = None) -> dict:
    from jamba_core.config import is_attention_layer, parameter_count

    esize = 4 if dtype == "float32" else 2
    pc = parameter_count(config)
    VH = config.vocab_size * config.hidden_size
    read_params = pc.active_per_token - VH  # the embedding table: one row per token
    out = {"decode_bytes_per_token": read_params * esize,
           "decode_tok_s": bounds["bandwidth_gb_s"] * 1e9 / (read_params * esize)}
    if context is not None:
        n_attn = sum(is_attention_layer(config, i) for i in range(config.num_hidden_layers))
        lm_head = 0 if config.tie_word_embeddings else VH
        # q.k and p.v: 2 x 2 x heads*head_dim MACs per visible key; on average context/2 keys visible
        attn = n_attn * 4 * config.hidden_size * context / 2
        flops = 2 * (pc.active_per_token - VH - lm_head) + attn
        # bf16 weights may run their matmuls in fp32 on upcast copies where that is faster
        # (jamba_core.ops.cpu.bf16_matmul_upcast): their bound is the faster of the two rates
        rates = bounds["matmul_gflop_s"]
        rate = max(rates["float32"], rates["bfloat16"]) if dtype == "bfloat16" else rates[dtype]
        out.update(prefill_flop_per_token=flops, prefill_tok_s=rate * 1e9 / flops)
    return out


def run(args) -> dict:
    """Run the benchmark described by ``args`` (see `add_arguments`); returns the results dict and
    writes bench.json / bench.md / bench.png into ``args.out``."""
    from jamba_core.config import load_config
    from jamba_core.testing import make_checkpoint

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(args.checkpoint, preset="bench-small")
    config = load_config(ckpt)
    if args.contexts is not None:  # "" measures decode only
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    else:
        contexts = [c for c in ALL_CONTEXTS if c <= args.max_context]
    systems = [tuple(s.split(":")) for s in args.systems.split(",")]
    base = {"checkpoint": str(ckpt), "threads": args.threads}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def measure(spec):
        res = _spawn({**base, **spec}, args.timeout)
        if "error" in res:
            log(f"  {spec} failed: {res['error'][-300:]}")
        return res

    run_info = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:],
                "machine": _machine(), "loadavg_start": _loadavg()}
    log("machine bounds (start)")
    bounds = [measure({"phase": "bounds"})]
    baseline = measure({"phase": "baseline"})
    entries: list[dict] = []
    plan = []
    if not args.no_decode:
        plan += [("decode", args.decode_prompt, rep) for rep in range(args.reps)]
    for n in contexts:
        plan += [("prefill", n, rep) for rep in range(args.reps if n <= 8192 else args.long_reps)]
    for phase, n, rep in plan:
        for system, dtype in systems:
            if phase == "prefill" and n > (args.ref_max_context if system == "reference" else args.max_context):
                continue
            log(f"{phase:7s} {n:7d} tokens  {system:9s} {dtype:8s} rep {rep + 1}")
            res = measure({"phase": phase, "system": system, "dtype": dtype, "tokens": n, "new_tokens": args.decode_new})
            entries.append({"phase": phase, "tokens": n, "system": system, "dtype": dtype, "rep": rep, **res})
            if "error" not in res:
                fig = res.get("decode_tok_s") or res.get("prefill_tok_s")
                log(f"    {fig:9.1f} tokens/s   peak {res['phase_mem']['peak_mib']:8.0f} MiB")
    log("machine bounds (end)")
    bounds.append(measure({"phase": "bounds"}))
    good = [b for b in bounds if "error" not in b]
    best = {"copy_gb_s": max(b["copy_gb_s"] for b in good), "read_gb_s": max(b["read_gb_s"] for b in good),
            "bandwidth_gb_s": max(b["bandwidth_gb_s"] for b in good),
            "matmul_gflop_s": {k: max(b["matmul_gflop_s"][k] for b in good) for k in ("float32", "bfloat16")}}
    run_info.update(bounds_measured=bounds, bounds=best, baseline_mem=baseline, loadavg_end=_loadavg(),
                    finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), entries=entries)
    path = out_dir / "bench.json"
    results = merge_base(out_dir, run_info["machine"]["cpu"], log) if args.merge else {"runs": []}
    results["runs"].append(run_info)
    results["config"] = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_experts", "num_experts_per_tok", "mamba_d_state", "mamba_d_conv",
                                                         "mamba_expand", "attn_layer_period", "num_key_value_heads")}
    results["summary"] = summarize(results, config)
    path.write_text(json.dumps(results, indent=1))
    (out_dir / "bench.md").write_text(markdown(results))
    plot(results, out_dir / "bench.png")
    log(f"wrote {path}, bench.md, bench.png")
    print(markdown(results))
    return results


def merge_base(out_dir: Path, cpu: str, log=print) -> dict:
    """The saved results a ``--merge`` run on ``cpu`` adds to: ``out_dir/bench.json`` when its runs were on
    the same CPU model; otherwise (ratios from two machines never share a table) its bench.json / .md /
    .png move to ``bench-<their cpu>.*``, and this CPU's own saved runs, when a ``bench-*.json`` holds them
    (set aside by an earlier switch of machines), move back to ``bench.*`` and are returned; else the run
    starts anew (``{"runs": []}``)."""
    path = out_dir / "bench.json"
    if path.is_file():
        results = json.loads(path.read_text())
        cpus = {r["machine"]["cpu"] for r in results["runs"]}
        if not cpus - {cpu}:
            return results
        slug = _slug(cpus)
        for name in ("bench.json", "bench.md", "bench.png"):
            if (out_dir / name).is_file():
                os.replace(out_dir / name, out_dir / name.replace("bench", f"bench-{slug}"))
        log(f"the saved runs were on {', '.join(sorted(cpus))}: kept as bench-{slug}.*")
    for other in sorted(out_dir.glob("bench-*.json")):
        try:
            saved = json.loads(other.read_text())
            cpus = {r["machine"]["cpu"] for r in saved["runs"]}
        except (ValueError, KeyError, TypeError):
            continue
        if cpus == {cpu}:
            for suffix in (".json", ".md", ".png"):
                if other.with_suffix(suffix).is_file():
                    os.replace(other.with_suffix(suffix), out_dir / f"bench{suffix}")
            log(f"this machine's saved runs ({other.stem}.*) are bench.* again")
            return saved
    log(f"no saved runs on {cpu}: this machine starts its own")
    return {"runs": []}


def _slug(cpus) -> str:
    return re.sub(r"[^a-z0-9]+", "-", " ".join(sorted(cpus)).lower().replace("(r)", "")).strip("-")


def vector_isa(flags: set[str]) -> str:
    """The widest vector instructions among /proc/cpuinfo's ``flags``, as the kernels use them: "AVX-512 BF16",
    "AVX-512", "AVX2", "AVX", or "" (none of these: another architecture)."""
    for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return name
    return ""


def _machine() -> dict:
    """The CPU as a table key: its model name and vector instructions ("AMD EPYC, AVX2"). Cloud VMs of one
    model name differ (this project's "AMD EPYC" VMs were AVX-512 BF16 ones and AVX2 ones, with the kernels'
    speed and the bf16 matmul rate far apart), so the name alone would merge two machines' runs."""
    import torch

    cpu, flags = platform.processor(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))))
    except (OSError, StopIteration):
        pass
    isa = vector_isa(flags)
    return {"cpu": f"{cpu}, {isa}" if isa else cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1) if hasattr(os, "sysconf") else None}


def _loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


# -- summary, table, plot ------------------------------------------------------------------------------------
def summarize(results: dict, config) -> dict:
    """Medians per (phase, tokens, system, dtype) over the latest run that measured them, with ratios to
    the reference and percentages of that run's bounds."""
    latest: dict[tuple, tuple[dict, list[dict]]] = {}
    for run_info in results["runs"]:
        groups: dict[tuple, list[dict]] = {}
        for e in run_info["entries"]:
            if "error" not in e:
                groups.setdefault((e["phase"], e["tokens"], e["system"], e["dtype"]), []).append(e)
        for key, es in groups.items():
            latest[key] = (run_info, es)
    rows = []
    for (phase, n, system, dtype), (run_info, es) in sorted(latest.items()):
        row = {"phase": phase, "tokens": n, "system": system, "dtype": dtype, "reps": len(es),
               "peak_mib": statistics.median(e["phase_mem"]["peak_mib"] for e in es),
               "after_load_mib": statistics.median(e["after_load"]["rss_mib"] for e in es)}
        bounds = _bounds_for(config, run_info["bounds"], dtype, n if phase == "prefill" else None)
        if phase == "decode":
            row["tok_s"] = statistics.median(e["decode_tok_s"] for e in es)
            row["best_tok_s"] = max(e["decode_tok_s"] for e in es)
            steps = [t for e in es for t in e.get("step_s", [])]
            if steps:  # robust to bursts of other processes: the typical step, and the fastest one
                row["median_step_tok_s"] = 1 / statistics.median(steps)
                row["fastest_step_tok_s"] = 1 / min(steps)
            row["bound_tok_s"] = bounds["decode_tok_s"]
            row["token_ids"] = es[0]["token_ids"]
            if all("bandwidth_beside_gb_s" in e for e in es):  # each repetition over the bound measured beside it
                per_gb_s = bounds["decode_tok_s"] / run_info["bounds"]["bandwidth_gb_s"]
                row["pct_of_bound_beside"] = statistics.median(
                    100 * e["decode_tok_s"] / (per_gb_s * e["bandwidth_beside_gb_s"]) for e in es)
        else:
            row["tok_s"] = statistics.median(e["prefill_tok_s"] for e in es)
            row["best_tok_s"] = max(e["prefill_tok_s"] for e in es)
            row["ttft_s"] = statistics.median(e["ttft_s"] for e in es)
            row["prefill_s"] = statistics.median(e["prefill_s"] for e in es)
            row["bound_tok_s"] = bounds["prefill_tok_s"]
            if "estimate" in es[0]:
                row.update(estimate_total_mib=es[0]["estimate"]["total"] / MiB, kv_exact=es[0]["kv_exact"],
                           cache_exact=es[0]["cache_exact"], kv_mib=es[0]["kv_nbytes"] / MiB)
        row["pct_of_bound"] = 100 * row["tok_s"] / row["bound_tok_s"]
        rows.append(row)
    for row in rows:
        ref = next((r for r in rows if r["system"] == "reference" and r["phase"] == row["phase"] and r["tokens"] == row["tokens"]), None)
        if ref is not None and row["system"] == "ours":
            row["ratio_to_reference"] = row["tok_s"] / ref["tok_s"]
            row["memory_ratio_to_reference"] = row["peak_mib"] / ref["peak_mib"]
            row["best_ratio_to_reference"] = row["best_tok_s"] / ref["best_tok_s"]
            if row["phase"] == "decode":
                row["same_tokens_as_reference"] = row["token_ids"] == ref["token_ids"]
    return {"rows": rows, "bounds": results["runs"][-1]["bounds"]}


def _fmt(v, spec=".1f", suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(results: dict) -> str:
    s = results["summary"]
    rows = s["rows"]
    last = results["runs"][-1]

    def get(phase, n, system, dtype):
        return next((r for r in rows if (r["phase"], r["tokens"], r["system"], r["dtype"]) == (phase, n, system, dtype)), None)

    lines = [
        f"Machine: {last['machine']['cpu']}, {last['machine']['cores']} cores, {last['machine']['memory_gib']} GiB; "
        f"torch {last['machine']['torch']}, {_threads(results)} threads. Runs merged here (each figure comes from the "
        "latest run that measured it, and its % of bound from that run's bounds; a load average above 0 means other "
        "processes were running):",
        "",
        "| run started (UTC) | measured | load avg start / end | bandwidth GB/s (copy, read) | matmul GFLOP/s fp32 / bf16 |",
        "|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        what = sorted({f"{e['phase']} {_ctx(e['tokens'])}" for e in r["entries"] if "error" not in e})
        load = [v and v[0] for v in (r["loadavg_start"], r["loadavg_end"])]
        rb = r["bounds"]
        lines.append(f"| {r['started']} | {', '.join(what)} | {_fmt(load[0])} / {_fmt(load[1])} | "
                     f"{rb['bandwidth_gb_s']:.1f} ({rb['copy_gb_s']:.1f}, {rb['read_gb_s']:.1f}) | "
                     f"{rb['matmul_gflop_s']['float32']:.0f} / {rb['matmul_gflop_s']['bfloat16']:.0f} |")
    lines += [
        "",
        "| figure | ours fp32 | ours bf16 | reference fp32 | fp32 / ref | bf16 / ref | fp32 % of bound | bf16 % of bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def line(label, phase, n, key, spec=".1f", pct=True, ratio=True, scale=1.0):
        o32, o16, ref = get(phase, n, "ours", "float32"), get(phase, n, "ours", "bfloat16"), get(phase, n, "reference", "float32")

        def val(r):
            return None if r is None or r.get(key) is None else r[key] * scale

        def rat(r):
            if not ratio or r is None or ref is None or val(ref) in (None, 0):
                return "—"
            return f"{val(r) / val(ref):.2f}x"

        cells = [label, _fmt(val(o32), spec), _fmt(val(o16), spec), _fmt(val(ref), spec), rat(o32), rat(o16),
                 _fmt(o32 and o32["pct_of_bound"], ".0f", "%") if pct else "—", _fmt(o16 and o16["pct_of_bound"], ".0f", "%") if pct else "—"]
        lines.append("| " + " | ".join(cells) + " |")

    decode = [r for r in rows if r["phase"] == "decode"]
    for n in sorted({r["tokens"] for r in decode}):
        line(f"decode tokens/s ({_ctx(n)} prompt, batch 1, greedy)", "decode", n, "tok_s")
    ctxs = sorted({r["tokens"] for r in rows if r["phase"] == "prefill"})
    for n in ctxs:
        line(f"prefill tokens/s at {_ctx(n)}", "prefill", n, "tok_s")
    for n in ctxs:
        line(f"time to first token at {_ctx(n)} (s)", "prefill", n, "ttft_s", ".2f", pct=False)
    for n in sorted({r["tokens"] for r in decode}):
        line("peak RSS, decode phase (MiB)", "decode", n, "peak_mib", ".0f", pct=False)
    for n in ctxs:
        line(f"peak RSS, prefill {_ctx(n)} (MiB)", "prefill", n, "peak_mib", ".0f", pct=False)
    lines += ["", "Ratios are tokens/s (or seconds, MiB) of ours over the reference's; % of bound is tokens/s over the "
              "bound for that dtype (decode: bandwidth / weight bytes per token; prefill: matmul rate / FLOPs per token).", ""]
    lines += ["Best repetition instead of the median (the machine's capability with the least interference):", "",
              "| tokens/s, best repetition | ours fp32 | ours bf16 | reference fp32 | fp32 / ref | bf16 / ref |",
              "|---|---:|---:|---:|---:|---:|"]
    for r0 in rows:
        if r0["system"] != "reference":
            continue
        o32, o16 = get(r0["phase"], r0["tokens"], "ours", "float32"), get(r0["phase"], r0["tokens"], "ours", "bfloat16")
        label = f"{r0['phase']} {_ctx(r0['tokens'])}"
        cells = [label, _fmt(o32 and o32["best_tok_s"]), _fmt(o16 and o16["best_tok_s"]), _fmt(r0["best_tok_s"]),
                 _fmt(o32 and o32["best_tok_s"] / r0["best_tok_s"], ".2f", "x"), _fmt(o16 and o16["best_tok_s"] / r0["best_tok_s"], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    for r0 in rows:
        if r0["system"] == "reference" and r0["phase"] == "decode" and "median_step_tok_s" in r0:
            o32, o16 = get("decode", r0["tokens"], "ours", "float32"), get("decode", r0["tokens"], "ours", "bfloat16")

            for key, what in (("median_step_tok_s", "1 / median step time"), ("fastest_step_tok_s", "1 / fastest step")):
                def med(r, key=key):
                    return r.get(key) if r else None

                cells = [f"decode {_ctx(r0['tokens'])}, {what}", _fmt(med(o32)), _fmt(med(o16)), _fmt(med(r0)),
                         _fmt(med(o32) and med(o32) / med(r0), ".2f", "x"), _fmt(med(o16) and med(o16) / med(r0), ".2f", "x")]
                lines.append("| " + " | ".join(cells) + " |")
            pct = [_fmt(100 * r["fastest_step_tok_s"] / r["bound_tok_s"], ".0f", "%") if r and "fastest_step_tok_s" in r else "—"
                   for r in (o32, o16)]
            lines.append(f"| decode {_ctx(r0['tokens'])}, fastest step as % of the decode bound | {pct[0]} | {pct[1]} | — | — | — |")
            beside = [_fmt(r.get("pct_of_bound_beside"), ".0f", "%") if r else "—" for r in (o32, o16)]
            lines.append(f"| decode {_ctx(r0['tokens'])}, % of the bound from the bandwidth measured beside each repetition "
                         f"(median) | {beside[0]} | {beside[1]} | — | — | — |")
    lines.append("")
    same = [(r.get("same_tokens_as_reference"), len(r["token_ids"]) - 1) for r in decode if r["system"] == "ours" and r["dtype"] == "float32"
            and r.get("same_tokens_as_reference") is not None]
    if same:
        lines.append(f"Greedy decode, ours fp32 vs reference: {'the same' if all(v for v, _ in same) else 'DIFFERENT'} "
                     f"{same[0][1] + 1} tokens.")
    lines += ["", "Memory of ours (fp32 and bf16) against `estimate_memory`, prefill phase:", "",
              "| context | dtype | peak RSS (MiB) | estimate total (MiB) | peak / estimate | KV cache (MiB) | KV part exact | cache exact |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if r["phase"] == "prefill" and r["system"] == "ours" and "estimate_total_mib" in r:
            lines.append(f"| {_ctx(r['tokens'])} | {r['dtype']} | {r['peak_mib']:.0f} | {r['estimate_total_mib']:.0f} | "
                         f"{r['peak_mib'] / r['estimate_total_mib']:.2f} | {r['kv_mib']:.1f} | {r['kv_exact']} | {r['cache_exact']} |")
    base = last.get("baseline_mem", {})
    if base and "rss_mib" in base:
        lines.append(f"\nPeak RSS includes the runtime (python + torch + transformers imported: {base['rss_mib']:.0f} MiB); "
                     "`estimate_memory` counts it as its `runtime` part (a measured constant, `RUNTIME_BYTES`).")
    for dtype in ("float32", "bfloat16"):
        pts = sorted((r["tokens"], r["peak_mib"]) for r in rows if r["phase"] == "prefill" and r["system"] == "ours" and r["dtype"] == dtype)
        big = [p for p in pts if p[0] >= 8192]
        if len(big) >= 2:
            (n0, m0), (n1, m1) = big[0], big[-1]
            lines.append(f"Resident memory growth, ours {dtype}, {_ctx(n0)} -> {_ctx(n1)}: "
                         f"{(m1 - m0) * MiB / (n1 - n0):.0f} bytes per prompt token.")
    return "\n".join(lines) + "\n"


def _threads(results: dict) -> int | str:
    argv = results["runs"][-1]["argv"]
    if "--threads" in argv:
        return argv[argv.index("--threads") + 1]
    return min(2, os.cpu_count() or 1)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    rows = [r for r in results["summary"]["rows"] if r["phase"] == "prefill"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {("ours", "float32"): ("ours fp32", "C0", "o-"), ("ours", "bfloat16"): ("ours bf16", "C2", "s-"),
              ("reference", "float32"): ("transformers fp32", "C3", "^--")}
    for key, (label, color, style) in styles.items():
        pts = sorted((r["tokens"], r["prefill_s"], r["peak_mib"]) for r in rows if (r["system"], r["dtype"]) == key)
        if not pts:
            continue
        n, t, m = zip(*pts)
        ax1.plot(n, t, style, color=color, label=label)
        ax2.plot(n, [v / 1024 for v in m], style, color=color, label=label)
    for ax, title, ylabel in ((ax1, "prefill time", "seconds"), (ax2, "peak resident memory (prefill)", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("bench-small: jamba-local vs transformers JambaForCausalLM (same weights, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
