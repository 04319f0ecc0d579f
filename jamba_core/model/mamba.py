import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..cache import MambaState
from ..config import d_inner
from .norm import RMSNorm


class MambaMixer(nn.Module):
    """Mamba-1 mixer with Jamba's RMSNorms on dt, B and C (Jamba paper, section 2; transformers'
    ``JambaMambaMixer``; Mamba paper, Gu & Dao 2023, Algorithm 2).

    ``forward(x (b, L, hidden), state (MambaState | None), mask (b, L) bool | None) -> (b, L, hidden)``.
    With a state, the conv continues ``state.conv`` and the scan starts from ``state.ssm`` (both updated
    in place), so any number of new tokens continues a cache exactly. Padded positions (mask False) are
    zeroed before the conv and before the scan, so they contribute nothing to either state.
    """

    def __init__(self, config):
        super().__init__()
        self.d_in = d_inner(config)
        self.d_state = config.mamba_d_state
        self.d_conv = config.mamba_d_conv
        self.dt_rank = config.mamba_dt_rank
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.d_in, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.d_in, self.d_in, self.d_conv, groups=self.d_in, padding=self.d_conv - 1, bias=config.mamba_conv_bias)
        self.x_proj = nn.Linear(self.d_in, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_in, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_in, 1))
        self.D = nn.Parameter(torch.ones(self.d_in))
        self.out_proj = nn.Linear(self.d_in, config.hidden_size, bias=config.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, eps=config.rms_norm_eps)
        self.b_layernorm = RMSNorm(self.d_state, eps=config.rms_norm_eps)
        self.c_layernorm = RMSNorm(self.d_state, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, state: MambaState | None, mask: torch.Tensor | None) -> torch.Tensor:
        b, L, _ = x.shape
        m = None if mask is None else mask[:, :, None].to(x.dtype)  # (b, L, 1)
        if m is not None:
            x = x * m
        xz = self.in_proj(x)  # (b, L, 2*d_in)
        xs, z = xz.chunk(2, dim=-1)
        if m is not None:
            xs = xs * m  # zero before the conv even with an in_proj bias
        if state is None:
            state = MambaState(b, self.d_in, self.d_conv, self.d_state, x.dtype, x.device)
        weight = self.conv1d.weight.squeeze(1)  # (d_in, K)
        xs = F.silu(ops.causal_conv1d(xs.transpose(1, 2), weight, self.conv1d.bias, state.conv))  # (b, d_in, L)
        if m is not None:
            xs = xs * m.transpose(1, 2)  # zero before the scan
        dt, B, C = self.x_proj(xs.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)  # (b, L, r), (b, L, N) x2
        # delta = softplus(W_dt dt + b_dt), in fp32 (transformers adds the bias inside the scan)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float())  # (b, L, d_in)
        A = -torch.exp(self.A_log.float())  # (d_in, N)
        zt = z.transpose(1, 2)
        if L == 1:
            y = ops.selective_state_update(xs[:, :, 0], delta[:, 0], A, B[:, 0], C[:, 0], self.D, zt[:, :, 0], state.ssm)[:, None, :]
        else:
            y = ops.selective_scan(xs, delta.transpose(1, 2), A, B, C, self.D, zt, state.ssm).transpose(1, 2)
        return self.out_proj(y.to(x.dtype))  # (b, L, hidden)
