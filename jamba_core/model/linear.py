from torch import nn

from .. import ops


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same result) whose forward goes through the kernel dispatch,
    `jamba_core.ops.linear`: decode-sized inputs (a few rows) take a GEMV kernel that streams the weights
    once at memory bandwidth, which torch's bf16 path for a few rows does not."""

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def decode_weights(self):
        """``(weight, None)`` for the fused decode kernels (`jamba_core.ops.ffn_decode`), or None with a bias."""
        return (self.weight, None) if self.bias is None else None
