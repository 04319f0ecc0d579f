"""The hybrid cache: K/V for attention layers, conv + SSM state for Mamba layers.

Attention layers keep K and V as ``(batch, kv_heads, tokens, head_dim)`` in the model dtype, grown in
blocks of ``KV_BLOCK`` tokens. Mamba layers keep the conv state ``(batch, d_inner, d_conv - 1)`` (the
last inputs of the causal conv, model dtype) and the SSM state ``(batch, d_inner, d_state)`` in fp32;
their size is constant whatever the context (Jamba paper, section 2: only the attention layers' K/V
grow with the context).
"""

from __future__ import annotations

import torch

from .config import JambaConfig, d_inner, is_attention_layer

KV_BLOCK = 1024


class KVCache:
    """K/V of one attention layer; ``update`` appends and returns the whole prefix."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 0):
        capacity = -(-capacity // KV_BLOCK) * KV_BLOCK
        self.k = torch.empty(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def reserve(self, tokens: int) -> None:
        """Grow capacity to at least ``tokens`` (rounded up to ``KV_BLOCK``)."""
        if tokens <= self.k.shape[2]:
            return
        capacity = -(-tokens // KV_BLOCK) * KV_BLOCK
        b, h, _, d = self.k.shape
        k = self.k.new_empty(b, h, capacity, d)
        v = self.v.new_empty(b, h, capacity, d)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` ``(b, kv_heads, L, head_dim)``; return views of all cached K, V."""
        end = self.length + k.shape[2]
        self.reserve(end)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class MambaState:
    """Conv state ``(b, d_inner, d_conv-1)`` (model dtype) and SSM state ``(b, d_inner, d_state)`` (fp32)."""

    def __init__(self, batch: int, d_in: int, d_conv: int, d_state: int, dtype: torch.dtype, device):
        self.conv = torch.zeros(batch, d_in, d_conv - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, d_in, d_state, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()


class HybridCache:
    """Per-layer state for a batch of sequences (`layers[i]` is a `KVCache` or a `MambaState`).

    ``seen_tokens`` counts positions consumed so far (padding included). ``key_mask``
    ``(batch, seen_tokens)`` bool is kept only once a padded batch was seen (None otherwise).
    """

    def __init__(self, config: JambaConfig, batch_size: int = 1, dtype: torch.dtype = torch.float32, device="cpu", capacity: int = 0):
        head_dim = config.hidden_size // config.num_attention_heads
        self.layers: list[KVCache | MambaState] = []
        for i in range(config.num_hidden_layers):
            if is_attention_layer(config, i):
                self.layers.append(KVCache(batch_size, config.num_key_value_heads, head_dim, dtype, device, capacity))
            else:
                self.layers.append(MambaState(batch_size, d_inner(config), config.mamba_d_conv, config.mamba_d_state, dtype, device))
        self.batch_size = batch_size
        self.seen_tokens = 0
        self.key_mask: torch.Tensor | None = None

    def reserve(self, tokens: int) -> None:
        """Preallocate K/V for ``tokens`` positions in every attention layer."""
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.reserve(tokens)

    def append_mask(self, mask: torch.Tensor | None, new_tokens: int) -> torch.Tensor | None:
        """Record the key mask of ``new_tokens`` positions; returns the full key mask or None."""
        if mask is None and self.key_mask is None:
            return None
        if mask is None:
            mask = torch.ones(self.batch_size, new_tokens, dtype=torch.bool, device=self.key_mask.device)
        if self.key_mask is None:
            self.key_mask = torch.ones(self.batch_size, self.seen_tokens, dtype=torch.bool, device=mask.device)
        self.key_mask = torch.cat([self.key_mask, mask.bool()], dim=1)
        return self.key_mask

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's tensors (allocated capacity, not only the used prefix)."""
        return sum(layer.nbytes for layer in self.layers)
