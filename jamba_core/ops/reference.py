"""Plain PyTorch reference ops: the test oracle for every fast path.

Written as the recurrences they are (Mamba paper, Gu & Dao 2023, section 3.2 / Algorithm 2), in fp32,
following `transformers`' `mamba_selective_scan` / `mamba_selective_state_update`
(models/jamba/modeling_jamba.py). Unlike that implementation, the scan starts from a given SSM state,
so a prompt can be prefilled in chunks and a cache continued with any number of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per block of discretised tensors: bounds the (batch, d_inner, block, d_state) temporaries.
SCAN_BLOCK = 256


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """Selective scan from a given state; updates ``state`` in place.

    Shapes: x, z ``(b, d_in, L)`` (any float dtype); delta ``(b, d_in, L)`` fp32, already
    ``softplus(dt + dt_bias)``; A ``(d_in, N)`` fp32 (``-exp(A_log)``); B, C ``(b, L, N)``;
    D ``(d_in,)``; state ``(b, d_in, N)`` fp32.

    Recurrence (Mamba eq. 2a/2b with zero-order-hold A and Euler B, section 2):
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t``, ``y_t = C_t . h_t + D x_t``, output
    ``y * silu(z)``. Returns y ``(b, d_in, L)`` in fp32.
    """
    b, d_in, L = x.shape
    xf, Bf, Cf = x.float(), B.float(), C.float()
    h = state
    ys = []
    for s in range(0, L, SCAN_BLOCK):
        e = min(s + SCAN_BLOCK, L)
        dt = delta[:, :, s:e]  # (b, d_in, T)
        dA = torch.exp(dt[..., None] * A[None, :, None, :])  # (b, d_in, T, N)
        dBx = dt[..., None] * Bf[:, None, s:e, :] * xf[:, :, s:e, None]  # (b, d_in, T, N)
        for t in range(e - s):
            h = dA[:, :, t] * h + dBx[:, :, t]  # (b, d_in, N)
            ys.append(torch.einsum("bdn,bn->bd", h, Cf[:, s + t]))
    state.copy_(h)
    y = torch.stack(ys, dim=-1) if ys else xf.new_zeros(b, d_in, 0)
    y = y + xf * D.float()[None, :, None]
    return y * F.silu(z.float())


def selective_state_update(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One decode step of the selective scan; updates ``state`` in place.

    Shapes: x, z ``(b, d_in)``; delta ``(b, d_in)`` fp32 (after softplus); A ``(d_in, N)``;
    B, C ``(b, N)``; state ``(b, d_in, N)`` fp32. Returns y ``(b, d_in)`` fp32.
    """
    xf = x.float()
    dA = torch.exp(delta[..., None] * A)  # (b, d_in, N)
    dBx = delta[..., None] * B.float()[:, None, :] * xf[..., None]  # (b, d_in, N)
    state.mul_(dA).add_(dBx)
    y = torch.einsum("bdn,bn->bd", state, C.float()) + xf * D.float()
    return y * F.silu(z.float())


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv continuing ``conv_state``; updates ``conv_state`` in place.

    Shapes: x ``(b, d_in, L)``; weight ``(d_in, K)``; bias ``(d_in,)``; conv_state ``(b, d_in, K-1)``
    (the last K-1 inputs seen, zeros at the start). Returns the conv output ``(b, d_in, L)`` before
    the activation, in x's dtype. Same as transformers' ``causal_conv1d_fn`` (left zero padding) when
    the state is zero.
    """
    K = weight.shape[-1]
    xs = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (b, d_in, K-1+L)
    conv_state.copy_(xs[:, :, xs.shape[-1] - (K - 1):])
    return F.conv1d(xs, weight.unsqueeze(1).to(x.dtype), bias.to(x.dtype) if bias is not None else None, groups=x.shape[1])


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with no mask, and its log-sum-exp (the oracle for the flash kernels; it materialises the
    ``(b, kv, R, S)`` scores, so it is for tests): ``out = softmax(scale q k^T) v`` and
    ``lse = logsumexp(scale q k^T)`` over the keys, in fp32 (Vaswani et al. 2017, eq. 1; the log-sum-exp is
    what lets flash attention merge blocks, Dao et al. 2022).

    q ``(b, kv, R, hd)``, k and v ``(b, kv, S, hd)`` any float dtype -> out ``(b, kv, R, hd)`` fp32 and lse
    ``(b, kv, R)`` fp32.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()), lse
