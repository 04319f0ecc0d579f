import operator
import weakref

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
        if x.shape[1] == 1 and mask is None and layer_cache is not None and (key_mask is None or not self.is_attention):
            y = self._fused_decode(x, layer_cache)
            if y is not None:
                return y
        dtype = self.pre_ff_layernorm.weight.dtype
        h = self.input_layernorm(x).to(dtype)
        h = self.self_attn(h, layer_cache, key_mask) if self.is_attention else self.mamba(h, layer_cache, mask)
        x = x + h.float()
        return x + self.feed_forward(self.pre_ff_layernorm(x).to(dtype)).float()

    def _fused_decode(self, x: torch.Tensor, state) -> torch.Tensor | None:
        """The whole layer for one token per sequence as one kernel call (`ops.mamba_layer_decode`,
        `ops.attention_layer_decode`), or None when the backend has none, the weights do not fit it, or
        autograd must see the ops.

        The kernel's plan is made once and kept while `_Snapshot` finds every submodule, parameter and
        buffer of the layer unreplaced, unmoved and unchanged (quantizing, ``.to()`` or an in-place update
        make a new plan, and with it the mixer's derived constants). Gathering the weights anew at every
        token cost about 1 ms per decode step on bench-small, as much as a third of its kernels' time.

        The whole check runs at the first decode step of each layer ``state`` (each cache: a request) and
        when the states alternate; at the other tokens only the tensors' data pointers are compared (on
        bench-small the whole check cost 5-17 microseconds per layer, 3-4% of a bf16 decode step; the
        pointers about a third of it). So a weight given new memory (``.data =``, ``.to()``,
        ``share_memory()``, which moves a storage in place) makes a new plan at once, and the kernels never
        read freed memory; a weight replaced by another module or parameter object, or changed in place,
        is used from the next cache on (the plan's snapshot keeps the old objects alive until then)."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        backend = ops.backend_for(x.device)
        plan = self.__dict__.get("_decode_plan")
        checked = self.__dict__.get("_checked_for")
        new_state = checked is None or checked() is not state
        if plan is None or plan[0] != backend or plan[1].moved() or (new_state and not plan[1].current()):
            constants = None if self.is_attention else self.mamba._decode_constants()
            weights = self._decode_weights(constants)
            prepared = None if weights is None else ops.prepare_layer(weights, x)
            plan = self.__dict__["_decode_plan"] = (backend, _Snapshot(self), prepared, constants)  # constants kept alive
        if new_state:
            self.__dict__["_checked_for"] = weakref.ref(state)
        if plan[2] is None:
            return None
        if not self.is_attention:
            y = ops.mamba_layer_decode(plan[2], x.view(x.shape[0], -1), state.conv, state.ssm)
        else:
            state.reserve(state.length + 1)
            y = ops.attention_layer_decode(plan[2], x.view(x.shape[0], -1), state.k, state.v, state.length)
            if y is not None:
                state.length += 1
        return None if y is None else y.view(x.shape)

    def __getstate__(self) -> dict:
        """Without the decode plan (its backend module, ctypes pointer arrays and weakref do not pickle or
        deepcopy; it is made again at the next decode step), so ``copy.deepcopy`` and ``torch.save`` of a
        model that has generated work as before its first token."""
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("_decode_plan", "_checked_for")}

    def _decode_weights(self, constants) -> dict | None:
        """This layer's tensors as `ops.prepare_layer` takes them (None: a module without that form);
        ``constants``: the mixer's `MambaMixer._decode_constants` (None for attention)."""
        form = self.feed_forward.decode_form()
        if form is None or self.input_layernorm.eps != self.pre_ff_layernorm.eps:  # the kernels take one eps
            return None
        router, experts, top_k = form
        common = dict(ln1=self.input_layernorm.weight, ln2=self.pre_ff_layernorm.weight, eps=self.input_layernorm.eps,
                      router=router, experts=experts, top_k=top_k)
        if self.is_attention:
            a = self.self_attn
            if any(getattr(p, "bias", None) is not None for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)):
                return None
            return dict(common, kind="attention", q_proj=a.q_proj.weight, k_proj=a.k_proj.weight, v_proj=a.v_proj.weight,
                        o_proj=a.o_proj.weight, heads=a.n_heads, kv_heads=a.n_kv, head_dim=a.head_dim)
        m = self.mamba
        conv_wT, conv_b, dt_bias, A, D = constants
        return dict(common, kind="mamba", in_proj=m.in_proj.weight, in_bias=getattr(m.in_proj, "bias", None),
                    in_scale=getattr(m.in_proj, "scale", None), out_proj=m.out_proj.weight,
                    out_bias=getattr(m.out_proj, "bias", None), out_scale=getattr(m.out_proj, "scale", None),
                    conv_wT=conv_wT, conv_b=conv_b,
                    x_proj=m.x_proj.weight, dt_norm=m.dt_layernorm.weight, b_norm=m.b_layernorm.weight,
                    c_norm=m.c_layernorm.weight, eps_dt=m.dt_layernorm.eps, dt_proj=m.dt_proj.weight, dt_bias=dt_bias,
                    A=A, D=D)


class _Snapshot:
    """Which submodules, parameters and buffers a module tree holds, where their data live and at which
    version, so that `current` tells cheaply (about 5 microseconds for a MoE layer: the comparisons run
    in C through ``map``) whether any was replaced, reassigned, moved or changed in place since."""

    def __init__(self, module: nn.Module):
        mods = list(module.modules())
        slots = [(m._modules, name, child) for m in mods for name, child in m._modules.items()]
        slots += [(d, name, t) for m in mods for d in (m._parameters, m._buffers) for name, t in d.items()]  # None too: a bias set later shows
        self.dicts, self.names, self.objects = (list(c) for c in zip(*slots)) if slots else ([], [], [])
        self.tensors = [t for _, _, t in slots if isinstance(t, torch.Tensor)]
        self.ptrs = list(map(torch.Tensor.data_ptr, self.tensors))
        # inference tensors (made under torch.inference_mode) keep no version: only their place is checked
        self.versioned = [t for t in self.tensors if not t.is_inference()]
        self.versions = list(map(_VERSION, self.versioned))

    def moved(self) -> bool:
        """Whether any tensor's data now lives elsewhere (a third of `current`'s cost)."""
        return list(map(torch.Tensor.data_ptr, self.tensors)) != self.ptrs

    def current(self) -> bool:
        return (all(map(operator.is_, map(dict.get, self.dicts, self.names), self.objects))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs
                and list(map(_VERSION, self.versioned)) == self.versions)


_VERSION = operator.attrgetter("_version")


class JambaModel(nn.Module):
    def __init__(self, config: JambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class JambaForCausalLM(nn.Module):
    """The Jamba causal LM with the Hub's weight names (``model.layers.{i}.mamba.in_proj.weight``, ...).

    ``forward(input_ids (b, L) long, cache=None, attention_mask=None, logits_to_keep=None, logits_at=None)``
    -> logits ``(b, L, vocab)`` (or the last ``logits_to_keep`` positions; 0 gives ``(b, 0, vocab)``;
    or with ``logits_at``, a ``(b, L)`` bool mask, those positions' rows alone, ``(n, vocab)`` in row-major
    order, as ``logits[logits_at]``: training's loss, the LM head never run on padding).
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

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, attention_mask: torch.Tensor | None = None, logits_to_keep: int | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
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
            if logits_to_keep == 0:  # a prefill chunk before the last: no LM head on no rows (bitsandbytes'
                # 4-bit CPU kernel divides by the row count: SIGFPE)
                return x.new_empty(b, 0, self.config.vocab_size, dtype=self.compute_dtype)
        if logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.model.final_layernorm(x).to(self.compute_dtype))
