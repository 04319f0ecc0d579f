"""The hybrid cache: K/V for attention layers, conv + SSM state for Mamba layers.

Attention layers keep K and V as ``(batch, kv_heads, tokens, head_dim)`` in the model dtype, grown in
blocks of ``KV_BLOCK`` tokens. Mamba layers keep the conv state ``(batch, d_inner, d_conv - 1)`` (the
last inputs of the causal conv, model dtype) and the SSM state ``(batch, d_inner, d_state)`` in fp32;
their size is constant whatever the context (Jamba paper, section 2: only the attention layers' K/V
grow with the context).
"""

from __future__ import annotations

import weakref

import torch

from .config import JambaConfig, d_inner, is_attention_layer

KV_BLOCK = 1024


class KVStore:
    """Append-only K/V storage of one attention layer, shared by a cache and the snapshots of its
    prefixes. ``k``, ``v``: ``(batch, kv_heads, capacity, head_dim)``. Positions below a snapshot's
    length are never rewritten while that snapshot lives (``pinned`` maps snapshot id -> length)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 0):
        capacity = -(-capacity // KV_BLOCK) * KV_BLOCK
        self.k = torch.empty(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.pinned: dict[int, int] = {}
        self.writer: weakref.ref | None = None  # the `KVCache` appending to this store, while it lives

    def in_use(self) -> bool:
        """True while a live cache appends to this store (a request in progress, or a paused stream)."""
        return self.writer is not None and self.writer() is not None

    def reserve(self, tokens: int, keep: int) -> None:
        """Grow capacity to at least ``tokens`` (rounded up to ``KV_BLOCK``), keeping ``keep`` positions."""
        if tokens <= self.k.shape[2]:
            return
        capacity = -(-tokens // KV_BLOCK) * KV_BLOCK
        b, h, _, d = self.k.shape
        keep = max([keep, *self.pinned.values()])
        k, v = self.k.new_empty(b, h, capacity, d), self.v.new_empty(b, h, capacity, d)
        k[:, :, :keep] = self.k[:, :, :keep]
        v[:, :, :keep] = self.v[:, :, :keep]
        self.k, self.v = k, v

    def writable_from(self, length: int) -> bool:
        """True when no live snapshot needs positions at or after ``length``."""
        return all(n <= length for n in self.pinned.values())

    def copy_prefix(self, length: int, capacity: int) -> "KVStore":
        """A new store holding a copy of the first ``length`` positions (a fork)."""
        b, h, _, d = self.k.shape
        new = KVStore(b, h, d, self.k.dtype, self.k.device, max(capacity, length))
        new.k[:, :, :length] = self.k[:, :, :length]
        new.v[:, :, :length] = self.v[:, :, :length]
        return new

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class KVCache:
    """K/V of one attention layer for one request: a `KVStore` and how many positions are in use.
    ``update`` appends and returns the whole prefix."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 0,
                 store: KVStore | None = None, length: int = 0):
        self.store = store if store is not None else KVStore(batch, kv_heads, head_dim, dtype, device, capacity)
        self.store.writer = weakref.ref(self)
        self.length = length

    @property
    def k(self) -> torch.Tensor:
        return self.store.k

    @property
    def v(self) -> torch.Tensor:
        return self.store.v

    def reserve(self, tokens: int) -> None:
        """Grow capacity to at least ``tokens`` (rounded up to ``KV_BLOCK``)."""
        self.store.reserve(tokens, self.length)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` ``(b, kv_heads, L, head_dim)``; return views of all cached K, V."""
        end = self.length + k.shape[2]
        self.reserve(end)
        self.store.k[:, :, self.length : end] = k
        self.store.v[:, :, self.length : end] = v
        self.length = end
        return self.store.k[:, :, :end], self.store.v[:, :, :end]

    @property
    def nbytes(self) -> int:
        return self.store.nbytes


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

    ``dtype`` is the model's (conv state); ``kv_dtype`` (default: ``dtype``) the attention layers' K/V.
    ``seen_tokens`` counts positions consumed so far (padding included). ``key_mask``
    ``(batch, seen_tokens)`` bool is kept only once a padded batch was seen (None otherwise).
    """

    def __init__(self, config: JambaConfig, batch_size: int = 1, dtype: torch.dtype = torch.float32, device="cpu", capacity: int = 0,
                 kv_dtype: torch.dtype | None = None):
        head_dim = config.hidden_size // config.num_attention_heads
        kv_dtype = kv_dtype or dtype  # K/V may be stored narrower than the model computes (e.g. bf16 for fp32)
        self.layers: list[KVCache | MambaState] = []
        for i in range(config.num_hidden_layers):
            if is_attention_layer(config, i):
                self.layers.append(KVCache(batch_size, config.num_key_value_heads, head_dim, kv_dtype, device, capacity))
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

    def snapshot(self) -> "CacheSnapshot":
        """The state at ``seen_tokens``: K/V shared with this cache (nothing copied: the store is
        append-only below a live snapshot's length), Mamba conv and SSM states copied (they cannot be
        rolled back). Batch 1, unpadded caches only."""
        if self.batch_size != 1 or self.key_mask is not None:
            raise ValueError("snapshots are taken of batch-1, unpadded caches")
        layers = [(layer.store, layer.length) if isinstance(layer, KVCache) else (layer.conv.clone(), layer.ssm.clone())
                  for layer in self.layers]
        return CacheSnapshot(layers, self.seen_tokens)


class CacheSnapshot:
    """A hybrid cache at one position. ``restore`` gives a new cache continuing from it; restoring the
    same snapshot any number of times, after any other use, gives the same state bit for bit."""

    def __init__(self, layers: list, tokens: int):
        self.layers = layers
        self.tokens = tokens
        for entry in layers:
            if isinstance(entry[0], KVStore):
                entry[0].pinned[id(self)] = tokens

    def release(self) -> None:
        """Let the K/V stores rewrite positions this snapshot needed."""
        for entry in self.layers:
            if isinstance(entry[0], KVStore):
                entry[0].pinned.pop(id(self), None)

    @property
    def nbytes(self) -> int:
        """Bytes this snapshot holds on its own: the Mamba states (the K/V are shared)."""
        return sum(t.numel() * t.element_size() for entry in self.layers if not isinstance(entry[0], KVStore) for t in entry)

    def restore(self, config: JambaConfig, capacity: int = 0) -> HybridCache:
        """A cache at this snapshot's position. K/V continue in place when no other snapshot needs the
        positions after it and no live cache is appending to the store, otherwise the prefix is copied
        to a new store (a fork). (Two streams read in turn in one thread both continued in place from
        one snapshot and wrote their K/V over each other's.)"""
        cache = HybridCache.__new__(HybridCache)
        cache.layers = []
        for entry in self.layers:
            if isinstance(entry[0], KVStore):
                store, length = entry
                others_need_more = any(n > length for sid, n in store.pinned.items() if sid != id(self))
                if others_need_more or store.in_use():
                    store = store.copy_prefix(length, capacity)
                kv = KVCache(0, 0, 0, None, None, store=store, length=length)
                kv.reserve(capacity)
                cache.layers.append(kv)
            else:
                conv, ssm = entry
                state = MambaState.__new__(MambaState)
                state.conv, state.ssm = conv.clone(), ssm.clone()
                cache.layers.append(state)
        cache.batch_size, cache.seen_tokens, cache.key_mask = 1, self.tokens, None
        return cache


class PrefixCache:
    """Snapshots keyed by the token ids that produced them: a new request resumes from the longest
    snapshot whose ids start its own. Bounded by ``budget_bytes`` (Mamba states plus the K/V stores
    the snapshots keep alive), least recently used evicted first; pinned entries are never evicted.

    ``logits`` (the last position's, fp32 ``(vocab,)``) may be kept with a snapshot so that a prompt
    equal to its ids needs no prefill at all.
    """

    def __init__(self, budget_bytes: int = 1 << 30):
        self.budget_bytes = budget_bytes
        self.entries: dict[tuple, dict] = {}  # key -> {"snapshot", "logits", "pinned"}; order = recency
        self._by_length: dict[int, set[tuple]] = {}

    def lookup(self, ids: list[int]) -> tuple[int, CacheSnapshot, object] | None:
        """Longest usable snapshot for ``ids``: ``(tokens, snapshot, logits or None)``, or None."""
        for n in sorted(self._by_length, reverse=True):
            if n > len(ids):
                continue
            key = tuple(ids[:n])
            entry = self.entries.get(key)
            if entry is None or (n == len(ids) and entry["logits"] is None):
                continue
            self.entries[key] = self.entries.pop(key)  # most recently used
            return n, entry["snapshot"], entry["logits"]
        return None

    def add(self, ids: list[int], snapshot: CacheSnapshot, logits=None, pinned: bool = False) -> tuple:
        key = tuple(ids)
        old = self.entries.pop(key, None)
        if old is not None:
            pinned = pinned or old["pinned"]
            if old["snapshot"] is not snapshot:
                old["snapshot"].release()
        self.entries[key] = {"snapshot": snapshot, "logits": logits, "pinned": pinned}
        self._by_length.setdefault(len(key), set()).add(key)
        self.evict()
        return key

    def unpin(self, key: tuple) -> None:
        if key in self.entries:
            self.entries[key]["pinned"] = False
            self.evict()

    def remove(self, key: tuple) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            entry["snapshot"].release()
            keys = self._by_length[len(key)]
            keys.discard(key)
            if not keys:
                del self._by_length[len(key)]

    @property
    def nbytes(self) -> int:
        """Mamba states of every snapshot plus each K/V store they keep alive, counted once."""
        stores = {}
        total = 0
        for entry in self.entries.values():
            snap = entry["snapshot"]
            total += snap.nbytes + (entry["logits"].numel() * 4 if entry["logits"] is not None else 0)
            for layer in snap.layers:
                if isinstance(layer[0], KVStore):
                    stores[id(layer[0])] = layer[0].nbytes
        return total + sum(stores.values())

    def evict(self) -> None:
        while self.nbytes > self.budget_bytes:
            victim = next((k for k, e in self.entries.items() if not e["pinned"]), None)
            if victim is None:
                return
            self.remove(victim)

    def clear(self) -> None:
        for key in list(self.entries):
            self.remove(key)
