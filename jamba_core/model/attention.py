import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..cache import KVCache
from .linear import Linear


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
        self.q_proj = Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kv: KVCache | None, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, self.n_heads, self.head_dim).transpose(1, 2)  # (b, h, L, hd)
        k = self.k_proj(x).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)  # (b, kv, L, hd)
        v = self.v_proj(x).view(b, L, self.n_kv, self.head_dim).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(k, v)
            q = q.to(k.dtype)  # a K/V cache narrower than the model (kv_cache_dtype): attention in its dtype
        S = k.shape[2]
        if key_mask is None and L < S:
            out = _attend_past_and_chunk(q, k, v, self.n_kv)  # chunked prefill and decode: no (L, S) mask
        else:
            mask = _attention_mask(L, S, key_mask, x.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and L > 1, enable_gqa=self.n_kv != self.n_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, L, -1).to(x.dtype))


_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
PAST_KEY_BLOCK = 32768  # past keys per flash-attention call in chunked prefill


def _attend_past_and_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Causal attention of L new queries (the last L positions) over all S cached keys, with no mask:
    the S-L past keys are visible to every query, the L new keys causally. Shapes: q ``(b, h, L, hd)``,
    k, v ``(b, kv, S, hd)``; returns ``(b, h, L, hd)``.

    The past part folds each KV head's query group into the query axis (GQA without repeating K/V:
    memory stays the cache, at any context) and runs in blocks of ``PAST_KEY_BLOCK`` keys, through
    `ops.flash_attention_lse` where the backend has a kernel for them (fp32 on AVX-512, bf16 on AVX512-BF16) and
    torch's CPU flash kernel otherwise; the chunk's
    own keys go through the causal kernel; the partial softmaxes are merged by their log-sum-exp (the
    flash-attention combination, Dao et al. 2022).
    The boolean (L, S) mask this replaces is 512 MiB for a 2048-token chunk at 256K.
    """
    b, h, L, hd = q.shape
    S = k.shape[2]
    g = h // n_kv
    qg = q.reshape(b, n_kv, g * L, hd)  # query heads j*g .. j*g+g-1 use KV head j
    if L == 1:  # decode: one query sees every key
        return F.scaled_dot_product_attention(qg, k, v).view(b, h, 1, hd)
    if _flash is None or q.device.type != "cpu":  # no CPU flash kernel with log-sum-exp: the masked form
        mask = _attention_mask(L, S, None, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=g > 1)
    kn, vn = k[:, :, S - L :], v[:, :, S - L :]
    if g > 1:
        kn, vn = kn.repeat_interleave(g, dim=1), vn.repeat_interleave(g, dim=1)  # only the chunk's keys
    out, lse = _flash(q, kn, vn, 0.0, True)  # (b, h, L, hd), (b, h, L)
    out, lse = out.float(), lse.reshape(b, h, L, 1)
    # the past keys in blocks: the kernel's working copies (bf16 packs K and V) stay block-sized
    for s in range(0, S - L, PAST_KEY_BLOCK):
        e = min(s + PAST_KEY_BLOCK, S - L)
        # our kernel where it applies (bf16 ~2x, fp32 ~1.1x torch's on a Zen 4 EPYC), else torch's
        blk = ops.flash_attention_lse(qg, k[:, :, s:e], v[:, :, s:e], hd**-0.5)
        blk_out, blk_lse = blk if blk is not None else _flash(qg, k[:, :, s:e], v[:, :, s:e])  # (b, kv, g*L, hd), (b, kv, g*L)
        blk_lse = blk_lse.reshape(b, h, L, 1)
        m = torch.maximum(lse, blk_lse)
        w_acc, w_new = torch.exp(lse - m), torch.exp(blk_lse - m)
        out = (out * w_acc + blk_out.reshape(b, h, L, hd).float() * w_new) / (w_acc + w_new)
        lse = m + torch.log(w_acc + w_new)
    return out.to(q.dtype)


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
