"""jamba_core: the Jamba hybrid model, its cache, kernels and generation engine."""

import os

# PyTorch's bf16 / fp16 CPU matmuls run oneDNN, which keeps the primitive it built for every distinct
# shape in two caches of 1,024 entries each (ideep's, sized by LRU_CACHE_CAPACITY, and oneDNN's own,
# ONEDNN_PRIMITIVE_CACHE_CAPACITY), about 260 KiB per shape. Prompts of every length and the MoE's
# per-expert token groups make new shapes all the time: a bf16 prefill of 32K tokens on bench-small kept
# 200 MiB more than an fp32 one, growing until the caches fill (up to ~500 MiB). Capped here unless the
# user has set them; the caps are read when the first such matmul runs, so this holds whenever jamba_core
# is imported before one. Measured: prefill speed unchanged (a new shape costs a build either way).
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

from .config import JambaConfig, layer_layout, load_config, parameter_count
from .memory import MemoryEstimate, estimate_memory

__all__ = ["Engine", "JambaConfig", "estimate_memory", "MemoryEstimate", "load_config", "layer_layout", "parameter_count"]


def __getattr__(name):  # the engine imports the chat stack; load it on first use
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)
