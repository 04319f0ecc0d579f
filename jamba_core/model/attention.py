import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache


class Attention(nn.Module):
    """Grouped-query self-attention with no positional encoding (Jamba paper, section 2: the Mamba
    layers carry position). q/k/v/o projections without bias, scale ``head_dim**-0.5``, causal.

    ``forward(x (b, L, hidden), kv (KVCache | None), key_mask (b, S) bool | None) -> (b, L, hidden)``.
    Attention runs through ``scaled_dot_product_attention`` over the cached K/V.
    """

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kv: KVCache | None, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, self.n_heads, self.head_dim).transpose(1, 2)  # (b, h, L, hd)
        k = self.k_proj(x).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)  # (b, kv, L, hd)
        v = self.v_proj(x).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(k, v)
        S = k.shape[2]
        mask = _attention_mask(L, S, key_mask, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and L > 1, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, L, -1))


def _attention_mask(L: int, S: int, key_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean mask ``(b or 1, 1, L, S)``: query i (absolute position S-L+i) sees keys j <= S-L+i that
    are not padding. A padded query row keeps its own position so it never becomes all-masked (NaN)."""
    if key_mask is None and (L == 1 or L == S):
        return None  # plain causal (or a single query seeing everything): SDPA's fast paths
    q_pos = torch.arange(S - L, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = k_pos <= q_pos  # (L, S)
    if key_mask is not None:
        mask = mask & key_mask[:, None, :].bool()  # (b, L, S)
        mask = mask | (k_pos == q_pos)
        return mask[:, None]
    return mask[None, None]
