import torch
from torch import nn

from .. import ops


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) computed in fp32 whatever the input dtype, as transformers'
    ``JambaRMSNorm``: ``weight * (x / sqrt(mean(x^2) + eps)).to(input dtype)``. Shape-preserving.
    The formula is `jamba_core.ops.rms_norm_reference`; the dispatch may run it as one kernel."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)
