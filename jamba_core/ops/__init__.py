"""Kernels behind one dispatch.

Each op has a plain PyTorch reference (`reference.py` and the short compositions below: the test
oracle) and, where one exists, a faster path. `use(name)` switches the active implementation for the
whole process; tests run every path against the reference.

Backends: ``"reference"`` and ``"cpu"`` (C++ kernels compiled on first use, `cpu.py`). The default is
``"cpu"`` when a C++ compiler is found (if the build then fails, its ops run the reference, with one
warning), else ``"reference"``; ``JAMBA_LOCAL_OPS=reference`` (or ``cpu``) chooses explicitly.
An op that a backend lacks runs its reference composition.

CUDA tensors: where a CUDA device is present and triton imports, ``"triton"`` (`triton_kernels.py`:
Triton kernels, and mamba-ssm / causal-conv1d where installed) is registered and runs every op on CUDA
tensors whatever backend is active, except ``"reference"``, which stays the oracle everywhere
(`backend_for`). On a CPU-only machine triton is never imported.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import cpu, reference

_BACKENDS = {"reference": reference, "cpu": cpu}
_active = {"name": "reference", "module": reference}


def register(name: str, module) -> None:
    _BACKENDS[name] = module


def use(name: str) -> None:
    """Select the kernel backend (``"reference"``, ``"cpu"`` or a registered fast path)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; available: {sorted(_BACKENDS)}")
    _active.update(name=name, module=_BACKENDS[name])


def active() -> str:
    return _active["name"]


def backends() -> list[str]:
    return sorted(_BACKENDS)


@contextmanager
def using(name: str):
    """``with ops.using("reference"): ...`` runs a block on one backend and restores the previous one."""
    previous = active()
    use(name)
    try:
        yield
    finally:
        use(previous)


def backend_for(device) -> str:
    """The backend that runs ops on tensors of ``device``: the active one, except that CUDA tensors run
    ``"triton"`` when it is registered and the active backend is not ``"reference"``."""
    if torch.device(device).type == "cuda" and "triton" in _BACKENDS and _active["name"] != "reference":
        return "triton"
    return _active["name"]


def _module(t: torch.Tensor):
    return _BACKENDS[backend_for(t.device)] if t.is_cuda else _active["module"]


def _default_backend() -> str:
    chosen = os.environ.get("JAMBA_LOCAL_OPS")
    if chosen:
        return chosen
    return "cpu" if cpu.can_build() else "reference"


def _op(name: str, t: torch.Tensor):
    return getattr(_module(t), name, None)


# -- the ops ---------------------------------------------------------------------------------------
def selective_scan(x, delta, A, B, C, D, z, state, delta_bias=None, delta_softplus=False):
    """`reference.selective_scan`; with ``delta_bias`` / ``delta_softplus``, ``delta`` is the raw dt
    projection and ``softplus(delta + delta_bias)`` (in fp32) is the step size, fused where the backend can."""
    module = _module(x)
    fn = module.selective_scan
    if delta_bias is None and not delta_softplus:
        return fn(x, delta, A, B, C, D, z, state)
    if getattr(module, "SCAN_FUSES_DELTA", False):
        return fn(x, delta, A, B, C, D, z, state, delta_bias=delta_bias, delta_softplus=delta_softplus)
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return fn(x, delta, A, B, C, D, z, state)


def selective_state_update(x, *args, **kwargs):
    return _module(x).selective_state_update(x, *args, **kwargs)


def causal_conv1d(x, *args, **kwargs):
    return _module(x).causal_conv1d(x, *args, **kwargs)


def causal_conv1d_silu(x, weight, bias, conv_state):
    """``silu(causal_conv1d(x, weight, bias, conv_state))``; shapes as `reference.causal_conv1d`."""
    fn = _op("causal_conv1d_silu", x)
    if fn is not None:
        return fn(x, weight, bias, conv_state)
    return F.silu(_module(x).causal_conv1d(x, weight, bias, conv_state))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``."""
    fn = _op("linear", x)
    return fn(x, weight, bias) if fn is not None else F.linear(x, weight, bias)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``(x @ weight.T) * scale`` (x ``(M, K)`` float, weight ``(N, K)`` int8, scale ``(N,)`` fp32 -> ``(M, N)``
    in x's dtype) by the backend for x's device, or None where it has no int8 kernel (`Int8Linear` then
    runs its own paths)."""
    fn = _op("int8_matmul", x)
    return None if fn is None else fn(x, weight, scale)


def flash_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """`reference.attention_lse` (attention with no mask, and its log-sum-exp; q ``(b, kv, R, hd)``, k, v
    ``(b, kv, S, hd)`` -> out ``(b, kv, R, hd)`` fp32, lse ``(b, kv, R)`` fp32) by the backend's flash
    kernel, or None where it has none for these inputs (the CPU backend: fp32 on AVX-512, bf16 on AVX512-BF16); the caller
    then runs torch's. The reference backend has none: its (R, S) scores are for tests only."""
    fn = _op("flash_attention_lse", q)
    return None if fn is None else fn(q, k, v, scale)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019) in fp32 whatever the input dtype, as transformers'
    ``JambaRMSNorm``: ``weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)``. Shape-preserving."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fn = _op("rms_norm", x)
    return fn(x, weight, eps) if fn is not None else rms_norm_reference(x, weight, eps)


def ffn_decode(x: torch.Tensor, router_weight: torch.Tensor | None, experts, top_k: int) -> torch.Tensor | None:
    """The feed-forward of a few tokens (decode) fused, or None when the active backend has none or the
    inputs do not fit it (the module then runs its own ops, which are the reference: `model.moe`).

    x ``(T, hidden)`` in the compute dtype. ``experts``: per expert ``((gate_w, gate_scale), (up_w,
    up_scale), (down_w, down_scale))``, weights ``(intermediate, hidden)`` / ``(hidden, intermediate)`` in
    x's dtype with scale None, or int8 with fp32 row scales (`jamba_core.quant.int8`). ``router_weight``
    ``(experts, hidden)``: the MoE (softmax over the router's logits in fp32, the ``top_k`` most probable
    experts weighted by their probability, not renormalised: transformers' ``JambaSparseMoeBlock``);
    None: one expert, the dense SwiGLU MLP ``down(silu(gate(x)) * up(x))``. Returns ``(T, hidden)`` in
    x's dtype.
    """
    fn = _op("ffn_decode", x)
    return None if fn is None else fn(x, router_weight, experts, top_k)


def mamba_decode_step(xz, conv_wT, conv_b, x_proj_weight, dt_norm_weight, b_norm_weight, c_norm_weight, eps,
                      dt_proj_weight, dt_bias, A, D, conv_state, ssm_state):
    """The Mamba mixer between in_proj and out_proj for one token, fused, or None when the active
    backend has no fused step (the mixer then runs the separate ops, which are its reference).

    xz ``(b, 2 d_in)`` (in_proj output, model dtype); conv_wT ``(d_conv, d_in)`` fp32; conv_b, dt_bias
    ``(d_in,)`` fp32 (conv_b may be None); x_proj / dt_proj / norm weights in the model dtype; eps the
    RMSNorm epsilon; A ``(d_in, d_state)`` fp32 (``-exp(A_log)``); D ``(d_in,)`` fp32; conv_state and
    ssm_state as in `jamba_core.cache.MambaState`, updated in place. Returns y ``(b, d_in)`` fp32 (gated
    by ``silu(z)``, before out_proj).
    """
    fn = _op("mamba_decode_step", xz)
    if fn is None:
        return None
    return fn(xz, conv_wT, conv_b, x_proj_weight, dt_norm_weight, b_norm_weight, c_norm_weight, eps,
              dt_proj_weight, dt_bias, A, D, conv_state, ssm_state)


def prepare_layer(weights: dict, like: torch.Tensor):
    """Check a decoder layer's weights once for `mamba_layer_decode` / `attention_layer_decode`; returns an
    opaque plan for the backend that runs ``like``'s device, or None when that backend has no such kernel or
    the weights do not fit it. ``weights["kind"]`` is ``"mamba"`` or ``"attention"``; both have ``ln1``,
    ``ln2`` (the two RMSNorm weights, ``eps``) and the feed-forward as `ffn_decode` takes it (``router`` or
    None for a dense MLP, ``experts``, ``top_k``). Mamba: ``in_proj`` / ``out_proj``, ``in_bias`` /
    ``out_bias`` (None without), ``in_scale`` / ``out_scale`` (None, or the fp32 row scales of int8
    projections: `jamba_core.quant.int8`), the mixer's tensors as `mamba_decode_step` takes them (``conv_wT``,
    ``conv_b``, ``x_proj``, ``dt_norm``, ``b_norm``, ``c_norm``, ``eps_dt``, ``dt_proj``, ``dt_bias``, ``A``,
    ``D``). Attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (no bias), ``heads``, ``kv_heads``,
    ``head_dim``."""
    module = _module(like)
    fn = getattr(module, f"prepare_{weights['kind']}_layer", None)
    plan = None if fn is None else fn(weights)
    return None if plan is None else (module, plan)


def mamba_layer_decode(prepared, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor | None:
    """A whole Mamba decoder layer for one token per sequence (``x + mixer(norm1(x))``, then ``+
    feed_forward(norm2(.))``: `jamba_core.model.jamba.DecoderLayer`) in one call, from a plan of
    `prepare_layer`; the same result as the modules' ops bit for bit. ``x`` ``(b, hidden)`` fp32 (the
    residual stream); the states as in `jamba_core.cache.MambaState`, updated in place. Returns the new
    residual stream ``(b, hidden)`` fp32, or None when the backend changed since the plan or the inputs do
    not fit (the modules then run)."""
    module, plan = prepared
    if module is not _module(x):
        return None
    return module.mamba_layer_decode(plan, x, conv_state, ssm_state)


def attention_layer_decode(prepared, x: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, pos: int) -> torch.Tensor | None:
    """A whole attention decoder layer for one token per sequence, no padding, in one call, from a plan of
    `prepare_layer`: this token's K, V written at ``pos`` of the stores ``(b, kv_heads, capacity,
    head_dim)`` (`jamba_core.cache.KVStore`; the caller reserves and advances), attention over positions
    ``0..pos`` (scores, softmax and sum in fp32: equal to ``scaled_dot_product_attention`` within float
    rounding), o_proj, then the feed-forward half as `mamba_layer_decode`. Returns the new residual stream
    ``(b, hidden)`` fp32, or None when the backend changed or the inputs do not fit."""
    module, plan = prepared
    if module is not _module(x):
        return None
    return module.attention_layer_decode(plan, x, k_store, v_store, pos)


use(_default_backend())
if torch.cuda.is_available():  # never imports triton on a CPU-only machine
    try:
        from . import triton_kernels
    except Exception:  # no triton, or one that cannot load: CUDA tensors run the reference ops
        pass
    else:
        register("triton", triton_kernels)
