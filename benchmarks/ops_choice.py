"""How the fast selective scan, state update and causal conv were chosen: candidates timed on bench-small
shapes (d_inner 1024, d_state 16, d_conv 4, batch 1, L = 1 and 2048), median of interleaved repetitions.

Repetitions: ``--reps`` at L = 2048, at least 101 at L = 1 (microseconds each, so one preemption by
another process would otherwise decide the median).

Candidates: the torch reference (``reference.py``), the C++ kernels (``cpu.py``), numba (``@njit(parallel=True,
fastmath=False, cache=True)``, parallel over (batch, d_inner); skipped when numba is not installed), and
``torch.compile`` of the reference recurrence written per block (skipped with ``--no-compile``).

Also the flash attention over past keys that chunked prefill runs (`jamba_core.ops.cpu.bf16_flash_ours` chooses
for bf16): our kernel against torch's CPU flash kernel, fp32 and bf16, bench-small's shape (2 KV heads x 4 query
heads x a 2,048-token chunk over ``--flash-keys`` past keys, head_dim 64), in GFLOP/s.

    python -m benchmarks.ops_choice [--reps 7] [--flash-keys 32768] [--out benchmarks/results/ops_choice.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from jamba_core.ops import cpu, reference

D_INNER, D_STATE, D_CONV = 1024, 16, 4


def _numba_kernels():
    try:
        import numba as nb
        import numpy as np
    except ImportError:
        return None

    @nb.njit(parallel=True, fastmath=False, cache=True)
    def scan(x, delta, A, B, C, D, z, state, y):  # x, delta, z, y: (b, L, d); B, C: (b, L, N); state (b, d, N)
        b, L, d = x.shape
        N = A.shape[1]
        for i in nb.prange(b * d):
            bi, c = i // d, i % d
            h = state[bi, c].copy()
            for t in range(L):
                dt = delta[bi, t, c]
                xv = x[bi, t, c]
                acc = np.float32(0.0)
                for n in range(N):
                    h[n] = np.exp(dt * A[c, n]) * h[n] + dt * B[bi, t, n] * xv
                    acc += h[n] * C[bi, t, n]
                zv = z[bi, t, c]
                y[bi, t, c] = (acc + D[c] * xv) * (zv / (np.float32(1.0) + np.exp(-zv)))
            state[bi, c] = h

    @nb.njit(parallel=True, fastmath=False, cache=True)
    def conv(x, w, bias, st, out):  # x, out: (b, L, d); w (d, K); st (b, d, K-1)
        b, L, d = x.shape
        K = w.shape[1]
        for i in nb.prange(b * d):
            bi, c = i // d, i % d
            hist = st[bi, c].copy()
            for t in range(L):
                acc = bias[c]
                for k in range(K - 1):
                    acc += w[c, k] * hist[k]
                acc += w[c, K - 1] * x[bi, t, c]
                for k in range(K - 2):
                    hist[k] = hist[k + 1]
                hist[K - 2] = x[bi, t, c]
                out[bi, t, c] = acc
            st[bi, c] = hist

    def run_scan(x, delta, A, B, C, D, z, state):
        xs, ds, zs = (t.transpose(1, 2).contiguous().numpy() for t in (x, delta, z))
        y = np.empty_like(xs)
        scan(xs, ds, A.numpy(), B.numpy(), C.numpy(), D.numpy(), zs, state.numpy(), y)
        return torch.from_numpy(y).transpose(1, 2)

    def run_conv(x, w, bias, st):
        xs = x.transpose(1, 2).contiguous().numpy()
        out = np.empty_like(xs)
        conv(xs, w.numpy(), bias.numpy(), st.numpy(), out)
        return torch.from_numpy(out).transpose(1, 2)

    return run_scan, run_conv


def _compiled_scan():
    """The reference recurrence with each block's discretisation compiled by inductor (the token loop
    stays in Python: a compiled graph cannot hold a 2048-step recurrence without unrolling it)."""

    @torch.compile(dynamic=False)
    def step_block(dt, A, B, x, C, h):  # dt, x: (b, d, T); B, C: (b, T, N); h (b, d, N)
        dA = torch.exp(dt[..., None] * A[None, :, None, :])
        dBx = dt[..., None] * B[:, None] * x[..., None]
        ys = []
        for t in range(dt.shape[-1]):
            h = dA[:, :, t] * h + dBx[:, :, t]
            ys.append((h * C[:, None, t]).sum(-1))
        return torch.stack(ys, -1), h

    def run(x, delta, A, B, C, D, z, state, T=16):
        L = x.shape[-1]
        h = state
        ys = []
        for s in range(0, L, T):
            e = min(s + T, L)
            y, h = step_block(delta[..., s:e], A, B[:, s:e], x[..., s:e].float(), C[:, s:e], h)
            ys.append(y)
        state.copy_(h)
        y = torch.cat(ys, -1) + x * D[None, :, None]
        return y * F.silu(z)

    return run


def inputs(L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, L, D_INNER, generator=g).transpose(1, 2)
    z = torch.randn(1, L, D_INNER, generator=g).transpose(1, 2)
    delta = F.softplus(torch.randn(1, L, D_INNER, generator=g) - 3).transpose(1, 2)
    A = -torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(D_INNER, 1)
    B = torch.randn(1, L, D_STATE, generator=g)
    C = torch.randn(1, L, D_STATE, generator=g)
    D = torch.ones(D_INNER)
    return x, delta, A, B, C, D, z, torch.zeros(1, D_INNER, D_STATE)


def flash_attention(keys: int, reps: int, chunk: int = 2048, kv: int = 2, group: int = 4, hd: int = 64) -> dict:
    """Median ms and GFLOP/s (QK^T and PV, 4 R S hd per KV head) of our flash kernel and torch's over ``keys``
    past keys, interleaved; a kernel that does not apply (ours without AVX-512 / AVX512-BF16) is left out."""
    torch_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    g = torch.Generator().manual_seed(1)
    q32, k32, v32 = (torch.randn(1, kv, n, hd, generator=g) for n in (group * chunk, keys, keys))
    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (t.to(dtype) for t in (q32, k32, v32))
        name = str(dtype).removeprefix("torch.")
        if cpu._flash_ours(q, k, v, hd**-0.5) is not None:
            cases[f"flash[ours {name}]"] = lambda q=q, k=k, v=v: cpu._flash_ours(q, k, v, hd**-0.5)
        if torch_flash is not None:
            cases[f"flash[torch {name}]"] = lambda q=q, k=k, v=v: torch_flash(q, k, v, 0.0, False, scale=hd**-0.5)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(reps + 1):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    flops = 4 * kv * group * chunk * keys * hd
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_ms": med * 1e3, "gflops": flops / med / 1e9}
        print(f"keys={keys} {name:22s} {med * 1e3:10.1f} ms {flops / med / 1e9:8.0f} GFLOP/s")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate (slow to compile)")
    ap.add_argument("--flash-keys", type=int, default=32768, help="past keys of the flash-attention case (0: skip it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    nb = _numba_kernels()
    if nb is not None:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    scans = {"reference": reference.selective_scan, "cpp": cpu.selective_scan}
    convs = {"reference": reference.causal_conv1d, "cpp": cpu.causal_conv1d}
    if nb is not None:
        scans["numba"], convs["numba"] = nb
    if not args.no_compile:
        scans["torch.compile"] = _compiled_scan()
    results: dict = {"threads": args.threads, "shapes": {"d_inner": D_INNER, "d_state": D_STATE, "d_conv": D_CONV},
                     "loadavg_start": os.getloadavg()}
    for L in (1, 2048):
        args_L = inputs(L)
        w = torch.randn(D_INNER, D_CONV)
        bias = torch.randn(D_INNER)
        cases = {f"scan[{k}]": (lambda f=f: f(*args_L[:7], args_L[7].clone())) for k, f in scans.items()}
        cases.update({f"conv[{k}]": (lambda f=f: f(args_L[0], w, bias, torch.zeros(1, D_INNER, D_CONV - 1))) for k, f in convs.items()})
        ref_y = reference.selective_scan(*args_L[:7], args_L[7].clone())
        errs = {}
        for name, fn in cases.items():
            out = fn()  # warm-up (numba / inductor compile here)
            if name.startswith("scan"):
                errs[name] = float((out - ref_y).abs().max() / ref_y.abs().max())
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.reps if L > 1 else max(args.reps, 101)):  # interleaved: drift hits every candidate alike
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        results[f"L={L}"] = {name: {"median_ms": statistics.median(ts) * 1e3, "max_rel_err": errs.get(name)} for name, ts in times.items()}
        for name, r in results[f"L={L}"].items():
            err = "" if r["max_rel_err"] is None else f"  max rel err {r['max_rel_err']:.1e}"
            print(f"L={L:5d} {name:22s} {r['median_ms']:10.3f} ms{err}")
    if args.flash_keys > 0:
        results["flash"] = flash_attention(args.flash_keys, args.reps)
    results["loadavg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
