"""The CUDA path: Triton kernels, and mamba-ssm / causal-conv1d where they are installed and apply.

Registered with the dispatch as ``"triton"`` when a CUDA device is present and triton imports
(`jamba_core.ops`); CUDA tensors then run here unless the reference is chosen. Never imported on a
CPU-only machine, except by the tests, which run the kernels in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported; CPU tensors).

- `selective_scan`: the scan from a given SSM state, the final state written back. mamba-ssm's
  ``selective_scan_fn`` starts from zero only, so chunked prefill and continuing a cache need this one.
  One program per (batch, block of channels) holds its ``(BLOCK_D, d_state)`` state in registers and walks
  the tokens in order: the design of mamba-ssm's Triton ``selective_state_update``, run for L tokens.
- `selective_state_update`: one decode step (the same kernel with L = 1).
- `int8_matmul`: W8A16 for `jamba_core.quant.Int8Linear` (the MoE experts): int8 weight tiles converted
  to the activation dtype in the kernel (exact: |q| <= 127), fp32 accumulation, the per-row scale
  applied to the output tile.

mamba-ssm / causal-conv1d (the ``cuda`` extra), imported on first use and only for CUDA tensors: decode
runs their ``selective_state_update`` and ``causal_conv1d_update``; prefill from a zero state their
``selective_scan_fn`` and ``causal_conv1d_fn``; everything else the kernels here. Their results come
back in the input dtype (rounded there; ours are fp32) and are returned in fp32.

Every function has the signature and result of its reference (`reference.py`); an input the kernels
cannot take (CPU tensors outside the interpreter, a non-fp32 state) runs the reference.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SCAN_FUSES_DELTA = True  # selective_scan takes delta_bias / delta_softplus (see jamba_core.ops.selective_scan)
EXTERNAL_DEVICES = ("cuda",)  # where mamba-ssm's and causal-conv1d's kernels run (the tests add "cpu" with fakes)
EXTERNAL_D_CONV = (2, 3, 4)  # the conv widths causal-conv1d's kernels take


def _runs_here(*tensors: torch.Tensor) -> bool:
    device = "cpu" if INTERPRET else "cuda"
    return all(t.device.type == device for t in tensors)


# -- selective scan ---------------------------------------------------------------------------------
@triton.jit
def _scan_kernel(x_ptr, dt_ptr, z_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, state_ptr, y_ptr, L, d, N,
                 sx_b, sx_d, sx_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sA_d, sA_n, sB_b, sB_l, sB_n,
                 sC_b, sC_l, sC_n, ss_b, ss_d, ss_n, sy_b, sy_l, sy_d,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    md, mn = offs_d < d, offs_n < N
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mdn, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + b * ss_b + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n
    h = tl.load(s_ptrs, mask=mdn, other=0.0)  # (BLOCK_D, BLOCK_N) fp32
    x_ptrs = x_ptr + b * sx_b + offs_d * sx_d
    dt_ptrs = dt_ptr + b * sdt_b + offs_d * sdt_d
    z_ptrs = z_ptr + b * sz_b + offs_d * sz_d
    B_ptrs = B_ptr + b * sB_b + offs_n * sB_n
    C_ptrs = C_ptr + b * sC_b + offs_n * sC_n
    y_ptrs = y_ptr + b * sy_b + offs_d * sy_d
    for t in range(L):
        x = tl.load(x_ptrs + t * sx_l, mask=md, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptrs + t * sdt_l, mask=md, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:  # torch's softplus (threshold 20), as mamba-ssm's kernels
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        z = tl.load(z_ptrs + t * sz_l, mask=md, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptrs + t * sB_l, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptrs + t * sC_l, mask=mn, other=0.0).to(tl.float32)
        # Mamba eq. 4 (zero-order hold for A, Euler for B) into the recurrence eq. 2a; eq. 2b for y
        h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1) + Dv * x
        tl.store(y_ptrs + t * sy_l, y * z * tl.sigmoid(z), mask=md)
    tl.store(s_ptrs, h, mask=mdn)


def _scan_block_d(N: int) -> tuple[int, int]:
    """(channels per program, warps): mamba-ssm's hand-tuned choice for its state update (by d_state)."""
    return (32, 4) if N <= 16 else (16, 4) if N <= 32 else (8, 4) if N <= 64 else (4, 4) if N <= 128 else (4, 8)


def _triton_scan(x, delta, A, B, C, D, z, state, delta_bias=None, delta_softplus=False) -> torch.Tensor:
    """Launch `_scan_kernel`; shapes as `reference.selective_scan`, any strides. Returns y ``(b, d_in, L)``
    fp32, a view of a ``(b, L, d_in)`` buffer (coalesced stores; ``y.transpose(1, 2)`` is contiguous)."""
    b, d, L = x.shape
    N = A.shape[-1]
    y = torch.empty(b, L, d, dtype=torch.float32, device=x.device)
    if b == 0 or d == 0 or L == 0:
        return y.transpose(1, 2)
    block_d, warps = _scan_block_d(N)
    bias = delta_bias if delta_bias is not None else D  # a placeholder pointer when HAS_BIAS is off
    _scan_kernel[(triton.cdiv(d, block_d), b)](
        x, delta, z, A, B, C, D, bias, state, y, L, d, N,
        *x.stride(), *delta.stride(), *z.stride(), *A.stride(), *B.stride(), *C.stride(), *state.stride(), *y.stride(),
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), BLOCK_D=block_d,
        BLOCK_N=triton.next_power_of_2(N), num_warps=warps)
    return y.transpose(1, 2)


def _reference_scan(x, delta, A, B, C, D, z, state, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta.float() + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta.float())
    return reference.selective_scan(x, delta.float(), A, B, C, D, z, state)


def selective_scan(x, delta, A, B, C, D, z, state, delta_bias=None, delta_softplus=False):
    """As `reference.selective_scan` (updates ``state`` in place; returns y ``(b, d_in, L)`` fp32). With
    ``delta_bias`` ``(d_in,)`` / ``delta_softplus`` (as mamba-ssm's ``selective_scan_fn``), ``delta`` is
    the raw dt projection, any float dtype, and the step is ``softplus(delta + delta_bias)`` in fp32.

    A zero ``state`` (checked: one device sync) with mamba-ssm installed and x, delta, B, C, z in one dtype
    runs mamba-ssm's ``selective_scan_fn`` (``return_last_state=True``), else the Triton kernel."""
    if not _runs_here(x, delta, A, B, C, D, z, state) or state.dtype != torch.float32 or (
            delta_bias is not None and not _runs_here(delta_bias)):
        return _reference_scan(x, delta, A, B, C, D, z, state, delta_bias, delta_softplus)
    scan_fn = _external(x.device).selective_scan_fn
    if (scan_fn is not None and x.shape[-1] > 0 and all(t.dtype == x.dtype for t in (delta, B, C, z))
            and not bool(state.any())):
        y, last = scan_fn(x, delta, A.float(), B.transpose(1, 2), C.transpose(1, 2), D.float(), z,
                          None if delta_bias is None else delta_bias.float(), bool(delta_softplus), True)
        state.copy_(last)
        return y.float()
    return _triton_scan(x, delta, A, B, C, D, z, state, delta_bias, delta_softplus)


def selective_state_update(x, delta, A, B, C, D, z, state):
    """As `reference.selective_state_update`: x, z ``(b, d_in)``; delta ``(b, d_in)`` after softplus;
    B, C ``(b, N)``; state ``(b, d_in, N)`` fp32, updated in place. Returns y ``(b, d_in)`` fp32.
    mamba-ssm's ``selective_state_update`` (the reference design) when installed, else our scan kernel
    with L = 1."""
    if not _runs_here(x, delta, A, B, C, D, z, state) or state.dtype != torch.float32:
        return reference.selective_state_update(x, delta, A, B, C, D, z, state)
    update = _external(x.device).selective_state_update
    if update is not None:
        return update(state, x, delta, A, B, C, D=D, z=z).float()
    return _triton_scan(x[:, :, None], delta[:, :, None], A, B[:, None], C[:, None], D, z[:, :, None], state)[:, :, 0]


# -- causal conv: causal-conv1d where it applies, else the reference ---------------------------------
def _conv(x, weight, bias, conv_state, silu: bool):
    b, d, L = x.shape
    K = weight.shape[-1]
    ext = _external(x.device)
    usable = K in EXTERNAL_D_CONV and conv_state.dtype == x.dtype and L > 0
    activation = "silu" if silu else None
    w = weight.to(x.dtype).contiguous()
    bx = None if bias is None else bias.to(x.dtype).contiguous()
    if usable and L == 1 and ext.causal_conv1d_update is not None:  # updates conv_state; (b, d, 1)
        return ext.causal_conv1d_update(x.contiguous(), conv_state, w, bx, activation)
    if usable and ext.causal_conv1d_fn is not None and not bool(conv_state.any()):
        out = ext.causal_conv1d_fn(x, w, bx, activation=activation)
        # the new state: the last K-1 inputs, zeros in front when fewer than K-1 were seen
        conv_state.copy_(torch.cat([conv_state, x], dim=-1)[:, :, L:])
        return out
    out = reference.causal_conv1d(x, weight, bias, conv_state)
    return F.silu(out) if silu else out


def causal_conv1d(x, weight, bias, conv_state):
    """As `reference.causal_conv1d`: x ``(b, d_in, L)``, weight ``(d_in, K)``, conv_state ``(b, d_in, K-1)``
    updated in place; returns ``(b, d_in, L)`` in x's dtype."""
    return _conv(x, weight, bias, conv_state, silu=False)


def causal_conv1d_silu(x, weight, bias, conv_state):
    """``silu(causal_conv1d(...))``, the activation fused into causal-conv1d's kernels where they run."""
    return _conv(x, weight, bias, conv_state, silu=True)


# -- W8A16 matmul -----------------------------------------------------------------------------------
@triton.jit
def _int8_mm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, sx_m, sx_k, sw_n, sw_k, sy_m, sy_n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mm, mn = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        a = tl.load(x_ptr + offs_m[:, None] * sx_m + kk[None, :] * sx_k, mask=mm[:, None] & mk[None, :], other=0.0)
        q = tl.load(w_ptr + kk[:, None] * sw_k + offs_n[None, :] * sw_n, mask=mk[:, None] & mn[None, :], other=0)
        w = q.to(tl.float32)  # (BLOCK_K, BLOCK_N) dequantized; exact in bf16 / fp16 too (|q| <= 127)
        if FP32_DOT:  # full fp32 products (not TF32); same sums as a bf16 dot's exact products
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    scale = tl.load(s_ptr + offs_n, mask=mn, other=0.0)  # the per-row scale factors out of the sum over K
    acc = acc * scale[None, :]
    tl.store(y_ptr + offs_m[:, None] * sy_m + offs_n[None, :] * sy_n, acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def _mm_blocks(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps) by rows: decode's few rows stream the weight in narrow column
    tiles (more programs to read it); prefill uses square tiles that reuse each weight tile across rows."""
    if M <= 16:
        return 16, 32, 128, 4
    if M <= 64:
        return 64, 64, 64, 4
    return 128, 128, 64, 8


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ weight.T) * scale``: x ``(M, K)`` fp32 / bf16 / fp16, weight ``(N, K)`` int8, scale ``(N,)``
    fp32 -> ``(M, N)`` in x's dtype, accumulated in fp32 (`jamba_core.quant.int8`'s W8A16). Any M, N, K
    (tails masked). Raises ``ValueError`` for mismatched shapes or dtypes."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or scale.shape != (weight.shape[0],):
        raise ValueError(f"int8_matmul: x {tuple(x.shape)}, weight {tuple(weight.shape)}, scale {tuple(scale.shape)}; "
                         "expected (M, K), (N, K), (N,)")
    if weight.dtype != torch.int8 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"int8_matmul: weight must be int8 and x fp32/bf16/fp16, got {weight.dtype} and {x.dtype}")
    if not _runs_here(x, weight, scale):
        return (F.linear(x.float(), weight.float()) * scale.float()).to(x.dtype)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    bm, bn, bk, warps = _mm_blocks(M)
    scale = scale.float()
    _int8_mm_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, weight, scale, y, M, N, K, *x.stride(), *weight.stride(), *y.stride(),
        # fp32 dot for fp32 activations, and in Triton's interpreter, whose tl.dot multiplies bf16 bit
        # patterns (triton-lang/triton#11584)
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP32_DOT=x.dtype == torch.float32 or INTERPRET, num_warps=warps)
    return y


# -- mamba-ssm / causal-conv1d ----------------------------------------------------------------------
_EXTERNAL = {
    "selective_scan_fn": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
}
_NONE = SimpleNamespace(**{name: None for name in _EXTERNAL})


@functools.cache
def external_kernels() -> SimpleNamespace:
    """mamba-ssm's and causal-conv1d's functions that import (None for those that do not), imported once."""
    found = {}
    for name, (module, attr) in _EXTERNAL.items():
        try:
            found[name] = getattr(importlib.import_module(module), attr)
        except Exception:  # not installed, or built against another torch / CUDA: ours run instead
            found[name] = None
    return SimpleNamespace(**found)


def _external(device: torch.device) -> SimpleNamespace:
    return external_kernels() if device.type in EXTERNAL_DEVICES else _NONE
