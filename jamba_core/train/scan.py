"""A differentiable selective scan for training (the ops backend ``"train"``).

Inference scans (`jamba_core.ops`) update a cache in place and have no backward. Training needs
gradients through thousands of tokens: `selective_scan` here is a `torch.autograd.Function` over two
kernels of the CPU library (``jl_train_scan_fwd`` / ``jl_train_scan_bwd`` in ``ops/cpu_kernels.cpp``: the
recurrence forward, and its adjoint run in reverse, recomputing each channel's states in cache instead of
storing ``(b, d_in, L, N)`` of them; vectorised over the state index). The D skip term and the
``silu(z)`` gate stay in torch. Recurrence and shapes as `jamba_core.ops.reference.selective_scan`
(Mamba paper, Gu & Dao 2023, eq. 2a/2b); training always starts from a zero state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import cpu, reference


def _kernels():
    """The CPU library. Raises RuntimeError when it cannot be built (training has no reference path:
    the plain recurrence would hold ``(b, d_in, L, N)`` per layer for autograd)."""
    lib = cpu._lib()
    if lib is None:
        raise RuntimeError(f"training needs the compiled CPU kernels: {cpu.status()}")
    return lib


class _Scan(torch.autograd.Function):
    """``y_t = C_t . h_t`` with ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t``, ``h_{-1} = 0``.
    x, delta ``(b, d, L)``; A ``(d, N)``; B, C ``(b, L, N)``; all fp32. Returns y ``(b, d, L)``."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C):
        x, delta, A, B, C = (t.float().contiguous() for t in (x, delta, A, B, C))
        b, d, L = x.shape
        y = torch.empty_like(x)
        _kernels().jl_train_scan_fwd(b, d, L, A.shape[1], x.data_ptr(), delta.data_ptr(), A.data_ptr(),
                                     B.data_ptr(), C.data_ptr(), y.data_ptr(), torch.get_num_threads())
        ctx.save_for_backward(x, delta, A, B, C)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, delta, A, B, C = ctx.saved_tensors
        gy = gy.float().contiguous()
        b, d, L = x.shape
        dx, ddelta, dA = torch.empty_like(x), torch.empty_like(delta), torch.empty_like(A)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        _kernels().jl_train_scan_bwd(b, d, L, A.shape[1], *(t.data_ptr() for t in (x, delta, A, B, C, gy, dx, ddelta, dA, dB, dC)),
                                     torch.get_num_threads())
        return dx, ddelta, dA, dB, dC


def selective_scan(x, delta, A, B, C, D, z, state):
    """`reference.selective_scan`'s contract from a zero ``state`` (asserted), differentiable in every
    input. The final state is not computed (training never continues a cache); ``state`` is left as is."""
    if A.shape[1] > cpu.MAX_D_STATE:  # the kernels hold at most 64 state lanes (4 vectors of 16, 8 of 8, 16 of 4)
        raise ValueError(f"d_state {A.shape[1]} > {cpu.MAX_D_STATE} is not supported by the training scan")
    if bool(state.any()):
        raise ValueError("the training scan starts from a zero SSM state")
    y = _Scan.apply(x, delta, A, B, C)
    y = y + x.float() * D.float()[None, :, None]
    return y * F.silu(z.float())


def causal_conv1d(x, weight, bias, conv_state):
    """The reference conv from a zero state, differentiable (the state is not updated)."""
    K = weight.shape[-1]
    return F.conv1d(F.pad(x, (K - 1, 0)), weight.unsqueeze(1).to(x.dtype), bias, groups=x.shape[1])


selective_state_update = reference.selective_state_update
