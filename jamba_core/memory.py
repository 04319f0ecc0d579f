"""Memory planning: predict weights, KV cache, Mamba state and activations before allocating.

KV cache per token = 2 (K and V) x attention layers x kv_heads x head_dim x bytes per element; the
attention layers are the only part that grows with the context (Jamba paper, section 2 and Table 1:
for Jamba 1.5 Mini, 4 attention layers x 8 KV heads x 128 x 2 x 2 bytes = 16 KiB per token, 4 GiB at
256K tokens). Mamba state per sequence and layer: conv ``d_inner x (d_conv-1)`` in the model dtype and
SSM ``d_inner x d_state`` in fp32. ``runtime`` is the process itself before any weight is loaded.
"""

from __future__ import annotations

import operator
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cache import KV_BLOCK
from .config import JambaConfig, d_inner, is_attention_layer, parameter_count

# Resident memory of a process that serves a model, before its weights load: Python, torch (CPU build),
# transformers, jamba_core with its kernels, xgrammar and a 32K-entry tokenizer. Measured on this
# project's reference machine (torch 2.13 CPU, Linux x86-64): 239 MiB after importing torch and
# transformers, 307 MiB with the rest; rounded up. A planning figure, not a bound: other builds differ.
RUNTIME_BYTES = 320 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part; ``total`` is their sum."""

    weights: int
    kv_cache: int
    mamba_state: int
    activations: int
    parameters: int
    active_parameters: int
    runtime: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.mamba_state + self.activations + self.runtime

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype) -> torch.dtype:
    """A torch dtype from a name (``ValueError`` naming the choices for any other)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)} (weight quantization is quantization=)")
    return _DTYPES[str(dtype)]


def kv_capacity(tokens: int) -> int:
    """Token slots the cache allocates for ``tokens`` positions (grown in blocks of ``KV_BLOCK``)."""
    return -(-tokens // KV_BLOCK) * KV_BLOCK


def _config_of(name) -> JambaConfig:
    """A released checkpoint's config by Hub id, else the config.json of a folder (or the file itself)."""
    from .config import known_config, load_config
    from .loading import resolve_checkpoint

    known = known_config(str(name))
    if known is not None:
        return known
    path = Path(name).expanduser()
    return load_config(path if path.is_file() else resolve_checkpoint(name))


def estimate_memory(
    config: JambaConfig,
    context_tokens: int,
    batch_size: int = 1,
    dtype="bfloat16",
    prefill_chunk_tokens: int = 2048,
    weight_bytes_per_param: float | None = None,
    quantization=None,
    runtime_bytes: int = RUNTIME_BYTES,
    kv_cache_dtype=None,
) -> MemoryEstimate:
    """Predict memory for running ``config`` at ``context_tokens`` with ``batch_size`` sequences.

    ``kv_cache`` is exact to the byte against ``HybridCache.nbytes`` after the engine reserved
    ``context_tokens`` positions. ``activations`` bounds the prefill temporaries of one chunk
    (hidden states, the widest projection, the expert inputs and the last-position logits).
    ``weight_bytes_per_param`` overrides the dtype's size for all the weights (e.g. 1 for int8);
    ``quantization`` (``"int8"``, ``"bnb-nf4+mamba"``, a `jamba_core.quant.QuantConfig`) counts the
    quantized modules in their format, scales included, and the rest in ``dtype``
    (`jamba_core.quant.weight_bytes`). ``runtime_bytes`` is the process's own memory before the weights
    load (`RUNTIME_BYTES`, measured for the CPU build; pass 0 to count the model alone).
    ``kv_cache_dtype``: the K/V's dtype when it differs from ``dtype`` (as `Engine`'s ``kv_cache_dtype``).
    ``config`` may also be a checkpoint folder or a released Hub id (as ``jamba-local info --model``).
    A checkpoint saved quantized (its config's ``quantization_config``) counts its weights in that
    format; a ``quantization`` that contradicts it raises ``ValueError``, as loading does.

    Raises ``ValueError`` when ``context_tokens`` is negative or ``batch_size`` / ``prefill_chunk_tokens``
    are below 1 (and ``TypeError`` when they are not integers).
    """
    if isinstance(config, (str, os.PathLike)):
        config = _config_of(config)
    for name, value, least in (("context_tokens", context_tokens, 0), ("batch_size", batch_size, 1),
                               ("prefill_chunk_tokens", prefill_chunk_tokens, 1)):
        try:
            value = operator.index(value)  # ints and integer scalars (numpy, 0-d tensors); not floats or "4k"
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {value!r}") from None
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    dt = _dtype(dtype)
    esize = torch.tensor([], dtype=dt).element_size()
    params = parameter_count(config)
    hd = config.hidden_size // config.num_attention_heads
    n_attn = sum(is_attention_layer(config, i) for i in range(config.num_hidden_layers))
    n_mamba = config.num_hidden_layers - n_attn
    kv_size = torch.tensor([], dtype=_dtype(kv_cache_dtype)).element_size() if kv_cache_dtype is not None else esize
    kv = 2 * n_attn * batch_size * config.num_key_value_heads * hd * kv_size * kv_capacity(context_tokens) if context_tokens else 0
    di = d_inner(config)
    mamba = n_mamba * batch_size * di * ((config.mamba_d_conv - 1) * esize + config.mamba_d_state * 4)
    T = min(prefill_chunk_tokens, max(context_tokens, 1)) * batch_size
    # widest per-chunk temporaries: in_proj output (2*d_in), scan block (d_in x 256 x d_state fp32),
    # attention scores of one chunk against one key block (fp32), MLP intermediate, logits of one position
    act = (
        T * (6 * config.hidden_size + 4 * di + 3 * config.intermediate_size) * 4
        + batch_size * di * min(T, 256) * config.mamba_d_state * 4 * 2
        + config.num_attention_heads * T * min(max(context_tokens, 1), 512) * 4  # SDPA's CPU kernel works in key blocks
        + batch_size * config.vocab_size * 4
    )
    if getattr(config, "quantization_config", None):  # a checkpoint `save_quantized` wrote: its own format
        from .quant import resolve_for_checkpoint

        quantization = resolve_for_checkpoint(config, quantization)[0]  # refuses a contradicting request
    if quantization is not None:
        from .quant import weight_bytes

        weights = weight_bytes(config, quantization, esize)
    else:
        wb = weight_bytes_per_param if weight_bytes_per_param is not None else esize
        weights = int(params.total * wb)
    return MemoryEstimate(weights, kv, mamba, act, params.total, params.active_per_token, runtime_bytes)
