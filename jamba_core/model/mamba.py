import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..cache import MambaState
from ..config import d_inner
from .linear import Linear
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
        self.in_proj = Linear(config.hidden_size, 2 * self.d_in, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.d_in, self.d_in, self.d_conv, groups=self.d_in, padding=self.d_conv - 1, bias=config.mamba_conv_bias)
        self.x_proj = Linear(self.d_in, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = Linear(self.dt_rank, self.d_in, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_in, 1))
        self.D = nn.Parameter(torch.ones(self.d_in))
        self.out_proj = Linear(self.d_in, config.hidden_size, bias=config.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, eps=config.rms_norm_eps)
        self.b_layernorm = RMSNorm(self.d_state, eps=config.rms_norm_eps)
        self.c_layernorm = RMSNorm(self.d_state, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, state: MambaState | None, mask: torch.Tensor | None) -> torch.Tensor:
        b, L, _ = x.shape
        m = None if mask is None else mask[:, :, None].to(x.dtype)  # (b, L, 1)
        if m is not None:
            x = x * m
        xz = self.in_proj(x)  # (b, L, 2*d_in)
        if state is None:
            state = MambaState(b, self.d_in, self.d_conv, self.d_state, x.dtype, x.device)
        if L == 1 and m is None:
            y = self._fused_decode_step(xz[:, 0], state)
            if y is not None:
                return self.out_proj(y[:, None, :].to(x.dtype))
        xs, z = xz.chunk(2, dim=-1)
        if m is not None:
            xs = xs * m  # zero before the conv even with an in_proj bias
        weight = self.conv1d.weight.squeeze(1)  # (d_in, K)
        xs = ops.causal_conv1d_silu(xs.transpose(1, 2), weight, self.conv1d.bias, state.conv)  # (b, d_in, L)
        if m is not None:
            xs = xs * m.transpose(1, 2)  # zero before the scan
        dt, B, C = self.x_proj(xs.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)  # (b, L, r), (b, L, N) x2
        # delta = softplus(W_dt dt + b_dt), in fp32 (transformers adds the bias inside the scan, as does ours)
        dt = ops.linear(dt, self.dt_proj.weight)  # (b, L, d_in)
        A = -torch.exp(self.A_log.float())  # (d_in, N)
        zt = z.transpose(1, 2)
        if L == 1:
            delta = F.softplus(dt.float() + self.dt_proj.bias.float())
            y = ops.selective_state_update(xs[:, :, 0], delta[:, 0], A, B[:, 0], C[:, 0], self.D, zt[:, :, 0], state.ssm)[:, None, :]
        else:
            y = ops.selective_scan(xs, dt.transpose(1, 2), A, B, C, self.D, zt, state.ssm,
                                   delta_bias=self.dt_proj.bias, delta_softplus=True).transpose(1, 2)
        return self.out_proj(y.to(x.dtype))  # (b, L, hidden)

    def _fused_decode_step(self, xz: torch.Tensor, state: MambaState) -> torch.Tensor | None:
        """Everything between in_proj and out_proj for one token as one kernel (``ops.mamba_decode_step``),
        or None when the backend has none (the separate ops above then run)."""
        conv_wT, conv_b, dt_bias, A, D = self._decode_constants()
        return ops.mamba_decode_step(xz, conv_wT, conv_b, self.x_proj.weight, self.dt_layernorm.weight, self.b_layernorm.weight,
                                     self.c_layernorm.weight, self.dt_layernorm.eps, self.dt_proj.weight, dt_bias, A, D,
                                     state.conv, state.ssm)

    def _decode_constants(self):
        """fp32 tensors derived from the parameters (conv weight transposed, biases, ``A = -exp(A_log)``, D),
        recomputed only when a parameter moves or changes (decode would otherwise redo them every token;
        a parameter made under ``torch.inference_mode`` has no version, so only a move shows there)."""
        params = (self.conv1d.weight, self.conv1d.bias, self.dt_proj.bias, self.A_log, self.D)
        key = tuple((p.data_ptr(), None if p.is_inference() else p._version) if p is not None else None for p in params)
        cached = self.__dict__.get("_constants")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                conv_b = None if self.conv1d.bias is None else self.conv1d.bias.float().contiguous()
                values = (self.conv1d.weight.squeeze(1).float().t().contiguous(), conv_b, self.dt_proj.bias.float().contiguous(),
                          -torch.exp(self.A_log.float()), self.D.float().contiguous())
            cached = self.__dict__["_constants"] = (key, values)
        return cached[1]
