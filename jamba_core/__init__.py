"""jamba_core: the Jamba hybrid model, its cache, kernels and generation engine."""

from .config import JambaConfig, layer_layout, load_config, parameter_count
from .memory import MemoryEstimate, estimate_memory

__all__ = ["Engine", "JambaConfig", "estimate_memory", "MemoryEstimate", "load_config", "layer_layout", "parameter_count"]


def __getattr__(name):  # the engine imports the chat stack; load it on first use
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)
