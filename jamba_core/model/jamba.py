import torch
from torch import nn

from ..cache import HybridCache
from ..config import JambaConfig, is_attention_layer, is_moe_layer
from .attention import Attention
from .linear import Linear
from .mamba import MambaMixer
from .moe import MLP, SparseMoE
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + mixer(norm(x))`` then ``x + feed_forward(norm(x))``; the mixer is
    attention (``self_attn``) or Mamba (``mamba``), the feed-forward an MLP or MoE."""

    def __init__(self, config: JambaConfig, i: int):
        super().__init__()
        self.is_attention = is_attention_layer(config, i)
        if self.is_attention:
            self.self_attn = Attention(config)
        else:
            self.mamba = MambaMixer(config)
        self.feed_forward = SparseMoE(config) if is_moe_layer(config, i) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, layer_cache, mask, key_mask):
        """``x`` is the fp32 residual stream ``(b, L, hidden)``; the sublayers compute in the weight dtype."""
        dtype = self.pre_ff_layernorm.weight.dtype
        h = self.input_layernorm(x).to(dtype)
        h = self.self_attn(h, layer_cache, key_mask) if self.is_attention else self.mamba(h, layer_cache, mask)
        x = x + h.float()
        return x + self.feed_forward(self.pre_ff_layernorm(x).to(dtype)).float()


class JambaModel(nn.Module):
    def __init__(self, config: JambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class JambaForCausalLM(nn.Module):
    """The Jamba causal LM with the Hub's weight names (``model.layers.{i}.mamba.in_proj.weight``, ...).

    ``forward(input_ids (b, L) long, cache=None, attention_mask=None, logits_to_keep=None)``
    -> logits ``(b, L, vocab)`` (or the last ``logits_to_keep`` positions; 0 gives ``(b, 0, vocab)``).
    With ``cache`` the forward continues it in place, with any number of tokens. ``attention_mask``
    (``(b, L)`` for the new tokens or ``(b, past + L)``, 1 = real token, 0 = left padding).
    """

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.config = config
        self.model = JambaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls take their activations in: the float weight dtype (fp32 or bf16).

        Read from the input embedding, which is never quantized, so that ``lm_head`` and the projections
        can hold int8 weights (`jamba_core.quant`). The residual stream is fp32 whatever this is."""
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, attention_mask: torch.Tensor | None = None, logits_to_keep: int | None = None) -> torch.Tensor:
        b, L = input_ids.shape
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -L:].bool()
            if bool(mask.all()) and (cache is None or cache.key_mask is None):
                mask = None
        if cache is not None:
            key_mask = cache.append_mask(mask, L)
        else:
            key_mask = mask
        # the residual stream stays fp32 whatever the weight dtype (as llama.cpp keeps activations in
        # f32): with bf16 weights only the matmuls round, not the running sum of 2 x layers updates
        x = self.model.embed_tokens(input_ids).float()
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cache.layers[i] if cache is not None else None, mask, key_mask)
        if cache is not None:
            cache.seen_tokens += L
        if logits_to_keep is not None:
            x = x[:, x.shape[1] - logits_to_keep :]
        return self.lm_head(self.model.final_layernorm(x).to(self.compute_dtype))
