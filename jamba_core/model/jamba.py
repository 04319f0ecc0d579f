import torch
from torch import nn

from .. import ops
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
        if x.shape[1] == 1 and mask is None and layer_cache is not None and not self.is_attention:
            y = self._fused_decode(x, layer_cache)
            if y is not None:
                return y
        dtype = self.pre_ff_layernorm.weight.dtype
        h = self.input_layernorm(x).to(dtype)
        h = self.self_attn(h, layer_cache, key_mask) if self.is_attention else self.mamba(h, layer_cache, mask)
        x = x + h.float()
        return x + self.feed_forward(self.pre_ff_layernorm(x).to(dtype)).float()


    def _fused_decode(self, x: torch.Tensor, state) -> torch.Tensor | None:
        """The whole Mamba layer for one token per sequence as one kernel call (`ops.mamba_layer_decode`),
        or None when the backend has none, the weights do not fit it, or autograd must see the ops."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        weights = self._decode_weights()
        if weights is None:
            return None
        key = tuple(t.data_ptr() if isinstance(t, torch.Tensor) else t for t in _flat(weights))
        cached = self.__dict__.get("_decode_plan")
        if cached is None or cached[0] != key or cached[1] != ops.backend_for(x.device):
            cached = self.__dict__["_decode_plan"] = (key, ops.backend_for(x.device), ops.prepare_mamba_layer(weights, x))
        if cached[2] is None:
            return None
        y = ops.mamba_layer_decode(cached[2], x.view(x.shape[0], -1), state.conv, state.ssm)
        return None if y is None else y.view(x.shape)

    def _decode_weights(self) -> dict | None:
        """This Mamba layer's tensors as `ops.prepare_mamba_layer` takes them (None: a module without that form)."""
        m, ff = self.mamba, self.feed_forward
        conv_wT, conv_b, dt_bias, A, D = m._decode_constants()
        if isinstance(ff, SparseMoE):
            router = getattr(ff.router, "decode_weights", lambda: None)()
            if router is None or router[1] is not None:
                return None
            router, experts, top_k = router[0], [e.decode_weights() for e in ff.experts], ff.top_k
        else:
            router, experts, top_k = None, [ff.decode_weights()], 1
        return dict(ln1=self.input_layernorm.weight, ln2=self.pre_ff_layernorm.weight, eps=self.input_layernorm.eps,
                    in_proj=m.in_proj.weight, in_bias=getattr(m.in_proj, "bias", None), out_proj=m.out_proj.weight,
                    out_bias=getattr(m.out_proj, "bias", None), conv_wT=conv_wT, conv_b=conv_b, x_proj=m.x_proj.weight,
                    dt_norm=m.dt_layernorm.weight, b_norm=m.b_layernorm.weight, c_norm=m.c_layernorm.weight,
                    eps_dt=m.dt_layernorm.eps, dt_proj=m.dt_proj.weight, dt_bias=dt_bias, A=A, D=D, router=router,
                    experts=experts, top_k=top_k)


def _flat(weights: dict):
    """Every tensor (and number) of a `DecoderLayer._decode_weights` dict, in a fixed order."""
    for value in weights.values():
        if isinstance(value, list):
            for expert in value:
                for pair in expert or (None,):
                    yield from pair or (None,)
        else:
            yield value


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
