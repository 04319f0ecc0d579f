"""Weight-only int8, one symmetric scale per output row ("W8A16").

Each row ``i`` of a weight ``W (out, in)`` is stored as ``q[i] = round(W[i] / s[i])`` in int8 with
``s[i] = max|W[i]| / 127`` (fp32), so ``W ~ q * s[:, None]``; activations stay in the compute dtype.
This is the scheme AI21 and vLLM use for Jamba's experts ("ExpertsInt8"): per-row absmax keeps the
error of each output independent of the other rows' outliers, and needs no calibration data.

The matmul is ``y = (x @ q.T) * s``: the scale factors out of the sum over ``in``. On CUDA with triton,
``"triton"``: `jamba_core.ops.int8_matmul`'s kernel (int8 tiles dequantized in the kernel, fp32
accumulation). On CPU (`kernel_path`):
- ``"gemv"``, for fewer than `GEMM_ROWS` rows (decode, and the few tokens an expert gets) with the
  ``"cpu"`` ops backend: `jamba_core.ops.cpu.int8_matmul`, a C++ kernel that streams the int8 matrix
  once and accumulates in fp32 with the activations as they are (fp32 or bf16; on AVX512-VNNI split into
  two int16 vectors with one scale, exact to max|x| 2^-31, for VPDPWSSD); decode is bound by memory
  bandwidth, so it reads a quarter of fp32's bytes.
- ``"int8pack"``, the same rows where that kernel is not built: PyTorch's weight-only int8 CPU kernel
  ``aten._weight_int8pack_mm`` with bf16 activations (measured on bench-small decode: about 5x slower
  than the C++ kernel, and it rounds fp32 activations to bf16).
- ``"dequant-gemm"``, for `GEMM_ROWS` rows and more (prefill): tiles of `TILE_ELEMENTS` weights cast to
  the compute dtype (exact: |q| <= 127) and a GEMM per tile, the scales applied to the output. The int8
  kernel works row by row (its time grows linearly with the rows, at about fp32 GEMV speed), so a GEMM is
  faster here once 32 rows share each weight (measured on this project's CPU: 1.3x in fp32 and 2.9x in
  bf16 at 4096 x 4096 and 256 rows); a tile is never more than 4 MiB, the whole matrix is never expanded.
  It is also the fallback where the int8 kernel is missing or cannot take the width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

# Rows quantized at a time: bounds the fp32 temporaries of `quantize_rows` for any matrix size.
_CHUNK_ELEMENTS = 1 << 22
_int8pack_mm = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight (out, in)`` in any float dtype -> ``(q (out, in) int8, scale (out,) fp32)``.

    Works through the rows in chunks, so the fp32 temporaries stay a few MiB whatever the matrix.
    An all-zero row gets scale 1 (its q is 0), so dequantizing never divides by zero.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    rows = max(1, _CHUNK_ELEMENTS // max(in_features, 1))
    for a in range(0, out_features, rows):
        w = weight[a : a + rows].float()  # (r, in)
        s = w.abs().amax(dim=1) / 127.0  # (r,)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[a : a + rows] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[a : a + rows] = s
    return q, scale


# aten._weight_int8pack_mm's CPU kernel reads the reduction dimension in blocks of 16 with no tail: on
# torch 2.13 every multiple of 16 checked (16..1088, 4096, 14336) is exact, while widths 8, 24, 40, 65, 100,
# 200 and 1000 give wrong sums or crash, so those layers take the GEMM path. Every Jamba width (hidden
# 4096/8192, intermediate 14336/24576, d_inner 8192/16384) is a multiple of 16.
KERNEL_IN_MULTIPLE = 16
GEMM_ROWS = 32  # from this many rows on, tiled dequantize + GEMM beats the int8 kernel (see the module doc)
TILE_ELEMENTS = 1 << 20


def kernel_path(device: torch.device | str = "cpu", in_features: int = 0, rows: int = 1) -> str:
    """Which matmul `Int8Linear` runs for ``rows`` input rows of width ``in_features`` on ``device``:
    ``"triton"`` (CUDA, `jamba_core.ops.int8_matmul`), ``"gemv"`` (the C++ kernel,
    `jamba_core.ops.cpu.int8_matmul`), ``"int8pack"`` (``aten._weight_int8pack_mm`` with bf16 activations)
    or ``"dequant-gemm"``."""
    device = torch.device(device)
    if device.type == "cuda" and ops.backend_for(device) == "triton":
        return "triton"
    if device.type != "cpu" or not 0 < rows < GEMM_ROWS:
        return "dequant-gemm"
    if ops.backend_for(device) == "cpu" and ops.cpu.available():
        return "gemv"
    return "int8pack" if _int8pack_mm is not None and in_features % KERNEL_IN_MULTIPLE == 0 else "dequant-gemm"


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and one fp32 scale per output row: ``y = (x @ weight.T) * scale + bias``.

    Buffers: ``weight (out, in)`` int8, ``scale (out,)`` fp32; ``bias (out,)`` a parameter in the compute
    dtype, or None. ``forward(x (..., in)) -> (..., out)`` in ``x``'s dtype.

    Few rows (decode) run an int8 GEMV kernel; many rows (prefill) a tiled GEMM in ``x``'s dtype
    (`kernel_path`). Where the C++ kernel is not built, few rows run ``aten._weight_int8pack_mm``: on
    torch 2.13 it is vectorised for bf16 activations only (its fp32 and fp16 paths are 10-20x slower than
    fp32 ``F.linear``), so fp32 inputs go through it in bf16 and the result comes back in fp32: the
    rounding that adds (relative 2^-9 per activation) is an order below the int8 weight error.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize an existing float linear layer (its bias is kept in its dtype)."""
        bias = linear.bias is not None
        module = cls(linear.in_features, linear.out_features, bias=bias, dtype=linear.weight.dtype, device=linear.weight.device)
        module.set_weight(linear.weight.detach())
        if bias:
            module.bias.data = linear.bias.detach().clone()
        return module

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float ``weight (out, in)`` into this module's buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for an Int8Linear of {(self.out_features, self.in_features)}")
        q, scale = quantize_rows(weight)
        self.weight.copy_(q)
        self.scale.copy_(scale)

    def dequantize(self) -> torch.Tensor:
        """The float weight ``weight * scale[:, None]`` (out, in) in fp32, for tests and inspection."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        path = kernel_path(x.device, self.in_features, x2.shape[0])
        y = ops.int8_matmul(x2, self.weight, self.scale) if path in ("triton", "gemv") else None
        if y is None and path != "dequant-gemm" and _int8pack_mm is not None and self.in_features % KERNEL_IN_MULTIPLE == 0:
            # the kernel wants 2-D activations with a contiguous last dim, and scales in their dtype
            y = _int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self._bf16_scale()).to(x.dtype)
        if y is None:
            y = self._dequant_gemm(x2)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def decode_weights(self):
        """``(weight, scale)`` for the fused decode kernels (`jamba_core.ops.ffn_decode`), or None with a bias."""
        return (self.weight, self.scale) if self.bias is None else None

    def _dequant_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """``(x2 @ weight.T) * scale`` with the int8 rows cast to ``x2``'s dtype a tile at a time."""
        rows = max(1, TILE_ELEMENTS // self.in_features)
        y = x2.new_empty(x2.shape[0], self.out_features)  # (T, out)
        for a in range(0, self.out_features, rows):
            y[:, a : a + rows] = x2 @ self.weight[a : a + rows].to(x2.dtype).t()
        return y.mul_(self.scale.to(x2.dtype))

    def _bf16_scale(self) -> torch.Tensor:
        """``scale`` in bf16 (the kernel takes scales in the activation dtype), converted once per change."""
        key = (self.scale.data_ptr(), self.scale._version)
        cached = self.__dict__.get("_scale_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_scale_cache"] = (key, self.scale.to(torch.bfloat16))
        return cached[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"decode_kernel={kernel_path(self.weight.device, self.in_features)}")
