"""Check and time the CUDA kernels (`jamba_core/ops/triton_kernels.py`) on a CUDA machine.

Every kernel against the torch reference on random inputs, then timed (CUDA events, median of the
repetitions after a warm-up) against the torch path the model runs without it and, where installed,
against mamba-ssm / causal-conv1d, at bench-small and Jamba-Mini-like shapes:

- scan from a nonzero state (prefill, raw dt + bias, softplus in the kernel) and from zero (where
  mamba-ssm's ``selective_scan_fn`` applies); torch path: `reference.selective_scan`;
- one decode step (`selective_state_update`) at batch 1 and 8; mamba-ssm's ``selective_state_update``;
- causal conv, prefill and decode, where causal-conv1d is installed;
- the W8A16 matmul for each expert projection at 1 to 2048 rows; torch paths: `Int8Linear`'s tiled
  dequantize + GEMM (what CUDA runs without the kernel) and a dense bf16 ``F.linear`` (no quantization).

Prints a table, writes JSON (``--out``, default ``benchmarks/results/gpu_check.json``) and exits 1 if a
check fails. Without CUDA it says so and exits 0.

    python -m benchmarks.gpu_check [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# (d_inner, d_state, d_conv, hidden, intermediate): bench-small (jamba_core.testing) and Jamba Mini
SHAPES = {"bench-small": (1024, 16, 4, 512, 1408), "jamba-mini": (8192, 16, 4, 4096, 14336)}
PREFILL_TOKENS = 2048
MATMUL_ROWS = (1, 16, 256, 2048)  # decode; an expert's share of a prefill (2048 tokens x top-2 / 16 experts); a dense prefill
SCAN_REL = 1e-4  # fp32 recurrences; GPU exp is not torch's, and 2048 steps carry the difference
BF16_REL = 2.0**-7  # outputs rounded to bf16 (mamba-ssm's, causal-conv1d's, the bf16 matmul)
BUDGET_S = 0.4  # time spent timing one candidate (at least 3, at most 50 repetitions)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, as tests/test_ops.py."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def timed(fn) -> float:
    """Median milliseconds of ``fn()`` on the current stream."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(3, min(50, int(BUDGET_S * 1000 / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Report:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, kernel: str, shape: str, error: float | None, bound: float, ms: dict[str, float], note: str = ""):
        ok = error is not None and error <= bound
        self.rows.append(dict(kernel=kernel, shape=shape, rel_error=error, bound=bound, ok=ok, ms=ms, note=note))
        timing = "  ".join(f"{k} {v:8.3f} ms" for k, v in ms.items())
        print(f"{'ok  ' if ok else 'FAIL'} {kernel:30s} {shape:34s} err {error if error is not None else float('nan'):9.2e} "
              f"(<= {bound:.0e})  {timing}  {note}", flush=True)

    def fail(self, kernel: str, shape: str, err: BaseException):
        self.rows.append(dict(kernel=kernel, shape=shape, ok=False, error=f"{type(err).__name__}: {err}"))
        print(f"FAIL {kernel:30s} {shape:34s} {type(err).__name__}: {err}", flush=True)


def scan_inputs(b, d, L, N, dtype, gen):
    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda") * scale

    x, z = r(b, L, d).to(dtype).transpose(1, 2), r(b, L, d).to(dtype).transpose(1, 2)  # (b, d, L) token-major, as the mixer
    raw = (r(b, L, d) - 2.0).to(dtype).transpose(1, 2)  # dt projection before bias and softplus
    bias = r(d, scale=0.5)
    A = -torch.exp(r(d, N, scale=0.5) + 0.5)
    B, C = r(b, L, N).to(dtype), r(b, L, N).to(dtype)
    D = r(d)
    return x, raw, bias, A, B, C, D, z


def check_scan(rep: Report, name, d, N, dtype, tk, reference, ext, quick):
    gen = torch.Generator(device="cuda").manual_seed(0)
    L = 512 if quick else PREFILL_TOKENS
    x, raw, bias, A, B, C, D, z = scan_inputs(1, d, L, N, dtype, gen)
    delta = F.softplus(raw.float() + bias[:, None])
    shape = f"{name} b1 L{L} d{d} {str(dtype)[6:]}"
    for start in ("state", "zero"):
        state0 = torch.randn(1, d, N, generator=gen, device="cuda") if start == "state" else torch.zeros(1, d, N, device="cuda")
        s_ref, s_tri = state0.clone(), state0.clone()
        expected = reference.selective_scan(x, delta, A, B, C, D, z, s_ref)
        got = tk._triton_scan(x, raw, A, B, C, D, z, s_tri, bias, True)
        err = max(rel(got, expected), rel(s_tri, s_ref))
        ms = {"triton": timed(lambda: tk._triton_scan(x, raw, A, B, C, D, z, state0.clone(), bias, True)),
              "torch": timed(lambda: reference.selective_scan(x, F.softplus(raw.float() + bias[:, None]), A, B, C, D, z, state0.clone()))}
        rep.add(f"scan from {start}", shape, err, SCAN_REL, ms)
        if start == "zero" and ext.selective_scan_fn is not None:
            def mamba():
                return ext.selective_scan_fn(x, raw, A, B.transpose(1, 2), C.transpose(1, 2), D, z, bias, True, True)

            y, last = mamba()
            ms = {"mamba-ssm": timed(mamba), "triton": ms["triton"]}
            rep.add("mamba-ssm selective_scan_fn", shape, max(rel(y, expected), rel(last, s_ref)), BF16_REL, ms)


def check_state_update(rep: Report, name, d, N, dtype, tk, reference, ext):
    gen = torch.Generator(device="cuda").manual_seed(1)
    for b in (1, 8):
        x, raw, bias, A, B, C, D, z = scan_inputs(b, d, 1, N, dtype, gen)
        x, z, B, C = x[..., 0], z[..., 0], B[:, 0], C[:, 0]
        delta = F.softplus(raw[..., 0].float() + bias)
        state0 = torch.randn(b, d, N, generator=gen, device="cuda")
        s_ref, s_tri = state0.clone(), state0.clone()
        expected = reference.selective_state_update(x, delta, A, B, C, D, z, s_ref)
        got = tk._triton_scan(x[:, :, None], delta[:, :, None], A, B[:, None], C[:, None], D, z[:, :, None], s_tri)[:, :, 0]
        shape = f"{name} b{b} d{d} {str(dtype)[6:]}"
        s = state0.clone()
        ms = {"triton": timed(lambda: tk._triton_scan(x[:, :, None], delta[:, :, None], A, B[:, None], C[:, None], D, z[:, :, None], s)),
              "torch": timed(lambda: reference.selective_state_update(x, delta, A, B, C, D, z, s))}
        rep.add("state update (decode)", shape, max(rel(got, expected), rel(s_tri, s_ref)), SCAN_REL, ms)
        if ext.selective_state_update is not None:
            s_ext = state0.clone()
            y = ext.selective_state_update(s_ext, x, delta, A, B, C, D=D, z=z)
            ms = {"mamba-ssm": timed(lambda: ext.selective_state_update(s, x, delta, A, B, C, D=D, z=z)), "triton": ms["triton"]}
            rep.add("mamba-ssm state update", shape, max(rel(y, expected), rel(s_ext, s_ref)), BF16_REL, ms)


def check_conv(rep: Report, name, d, K, dtype, reference, ext, quick):
    if ext.causal_conv1d_fn is None and ext.causal_conv1d_update is None:
        return
    gen = torch.Generator(device="cuda").manual_seed(2)
    L = 512 if quick else PREFILL_TOKENS
    x = torch.randn(1, L, d, generator=gen, device="cuda").to(dtype).transpose(1, 2)
    w, bias = torch.randn(d, K, generator=gen, device="cuda").to(dtype), torch.randn(d, generator=gen, device="cuda").to(dtype)
    zero = torch.zeros(1, d, K - 1, device="cuda", dtype=dtype)
    expected = F.silu(reference.causal_conv1d(x, w, bias, zero.clone()))
    if ext.causal_conv1d_fn is not None:
        got = ext.causal_conv1d_fn(x, w, bias, activation="silu")
        ms = {"causal-conv1d": timed(lambda: ext.causal_conv1d_fn(x, w, bias, activation="silu")),
              "torch": timed(lambda: F.silu(reference.causal_conv1d(x, w, bias, zero.clone())))}
        rep.add("causal_conv1d_fn (prefill)", f"{name} b1 L{L} d{d} {str(dtype)[6:]}", rel(got, expected), BF16_REL, ms)
    if ext.causal_conv1d_update is not None:
        state = torch.randn(1, d, K - 1, generator=gen, device="cuda").to(dtype)
        s_ref, s_ext = state.clone(), state.clone()
        expected = F.silu(reference.causal_conv1d(x[..., :1], w, bias, s_ref))
        got = ext.causal_conv1d_update(x[..., :1].contiguous(), s_ext, w, bias, "silu")
        err = max(rel(got, expected), rel(s_ext, s_ref))
        ms = {"causal-conv1d": timed(lambda: ext.causal_conv1d_update(x[..., :1].contiguous(), state, w, bias, "silu")),
              "torch": timed(lambda: F.silu(reference.causal_conv1d(x[..., :1], w, bias, state)))}
        rep.add("causal_conv1d_update (decode)", f"{name} b1 d{d} {str(dtype)[6:]}", err, BF16_REL, ms)


def check_int8(rep: Report, name, hidden, intermediate, tk, quick):
    from jamba_core.quant import Int8Linear

    gen = torch.Generator(device="cuda").manual_seed(3)
    for proj, (out_f, in_f) in (("gate/up", (intermediate, hidden)), ("down", (hidden, intermediate))):
        dense = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            dense.weight.normal_(0, 0.02, generator=gen)
        module = Int8Linear.from_float(dense)
        q, scale = module.weight, module.scale
        for M in MATMUL_ROWS[:3] if quick else MATMUL_ROWS:
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(M, in_f, generator=gen, device="cuda").to(dtype)
                expected = (x.float() @ q.float().t()) * scale
                got = tk.int8_matmul(x, q, scale)
                ms = {"triton": timed(lambda: tk.int8_matmul(x, q, scale)),
                      "torch dequant-gemm": timed(lambda: module._dequant_gemm(x))}
                if dtype == torch.bfloat16:
                    ms["dense bf16 F.linear"] = timed(lambda: F.linear(x, dense.weight))
                rep.add(f"int8 matmul {proj}", f"{name} M{M} N{out_f} K{in_f} {str(dtype)[6:]}", rel(got, expected),
                        2e-5 if dtype == torch.float32 else BF16_REL, ms)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_check.json"))
    parser.add_argument("--quick", action="store_true", help="512-token prefill, matmuls up to 256 rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (the Triton kernels are tested in the interpreter "
              "by tests/test_triton_kernels.py)")
        return 0

    from jamba_core import ops
    from jamba_core.ops import reference, triton_kernels as tk

    ext = tk.external_kernels()
    found = [k for k, v in vars(ext).items() if v is not None]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  dispatch for cuda: {ops.backend_for('cuda')}  "
          f"mamba-ssm/causal-conv1d functions: {found or 'none installed'}", flush=True)
    rep, t0 = Report(), time.time()
    for name, (d, N, K, hidden, intermediate) in SHAPES.items():
        for kernel, run in (
            ("scan", lambda dt: check_scan(rep, name, d, N, dt, tk, reference, ext, args.quick)),
            ("state update", lambda dt: check_state_update(rep, name, d, N, dt, tk, reference, ext)),
            ("conv", lambda dt: check_conv(rep, name, d, K, dt, reference, ext, args.quick)),
        ):
            for dtype in (torch.bfloat16, torch.float32):
                try:
                    run(dtype)
                except Exception as err:  # report it and go on: one broken kernel must not hide the others
                    rep.fail(kernel, f"{name} {str(dtype)[6:]}", err)
        try:
            check_int8(rep, name, hidden, intermediate, tk, args.quick)
        except Exception as err:
            rep.fail("int8 matmul", name, err)
    failed = [r for r in rep.rows if not r["ok"]]
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
               triton=__import__("triton").__version__, external=found, dispatch_cuda=ops.backend_for("cuda"),
               quick=args.quick, seconds=round(time.time() - t0, 1), rows=rep.rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(rep.rows) - len(failed)} passed, {len(failed)} failed in {out['seconds']} s; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
