"""The Jamba modules: RMSNorm, attention, Mamba mixer, MoE, decoder and causal LM."""

from .jamba import DecoderLayer, JambaForCausalLM, JambaModel

__all__ = ["JambaForCausalLM", "JambaModel", "DecoderLayer"]
