import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .linear import Linear

# up to this many tokens the feed-forward tries the fused decode kernel (`ops.ffn_decode`) first
DECODE_TOKENS = 8
# bf16 / fp16 CPU matmuls (oneDNN) build a kernel for every new row count: each expert's token group is
# padded to a multiple of this many rows (repeats of its first token, dropped after), so that a few row
# counts recur instead of a new one per expert and chunk (see jamba_core/__init__.py)
GROUP_ROWS = 16


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (transformers' ``JambaMLP``)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= DECODE_TOKENS * x.shape[-1]:  # decode: one kernel call where the backend has one
            y = _ffn_decode(x, self)
            if y is not None:
                return y
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode_weights(self):
        """``((gate_w, gate_scale), (up_w, up_scale), (down_w, down_scale))`` for `jamba_core.ops.ffn_decode`,
        or None when a projection has no such form (a bias, a bitsandbytes module)."""
        mats = tuple(getattr(p, "decode_weights", lambda: None)() for p in (self.gate_proj, self.up_proj, self.down_proj))
        return None if None in mats else mats

    def decode_form(self):
        """``(router_weight, experts, top_k)`` as `jamba_core.ops.ffn_decode` takes them (no router: the
        dense MLP), or None when a projection has no such form."""
        mats = self.decode_weights()
        return None if mats is None else (None, [mats], 1)


def _ffn_decode(x: torch.Tensor, module) -> torch.Tensor | None:
    """`ops.ffn_decode` of an `MLP` or `SparseMoE` on ``x (..., hidden)`` (None when the module or the
    backend cannot take it, or when autograd must see the ops: the kernel has no backward)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return None
    form = module.decode_form()
    if form is None:
        return None
    y = ops.ffn_decode(x.reshape(-1, x.shape[-1]), *form)
    return None if y is None else y.view(x.shape)


class SparseMoE(nn.Module):
    """Mixture of experts (Jamba paper, section 2; transformers' ``JambaSparseMoeBlock``).

    Router: ``softmax(router(x))`` over all experts in fp32, then top-k; the k weights are not
    renormalised. Each expert runs only on the tokens routed to it (tokens are grouped per expert),
    never all experts on all tokens. ``forward(x (b, L, hidden)) -> (b, L, hidden)``.
    """

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts))

    def decode_form(self):
        """``(router_weight, experts, top_k)`` as `jamba_core.ops.ffn_decode` takes them, or None when the
        router or an expert has no such form (int8 router, a bias, a bitsandbytes module)."""
        router = getattr(self.router, "decode_weights", lambda: None)()
        if router is None or router[1] is not None:
            return None
        experts = [e.decode_weights() for e in self.experts]
        return None if None in experts else (router[0], experts, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, hidden)
        if x.shape[0] <= DECODE_TOKENS:  # decode: router, top-k and the k experts in one kernel call where the backend has one
            y = _ffn_decode(x, self)
            if y is not None:
                return y.view(shape)
        probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)  # (T, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (T, k)
        weights = weights.to(x.dtype)
        if x.shape[0] == 1:  # decode: k experts, no grouping needed
            out = torch.zeros_like(x)
            for j, e in enumerate(chosen[0].tolist()):  # the weight as a tensor: autograd reaches the router
                out += weights[0, j] * self.experts[e](x)
            return out.view(shape)
        flat = chosen.flatten()  # (T*k,)
        order = torch.argsort(flat, stable=True)  # (T*k,) slots grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token_of = order // self.top_k
        ys = x.new_empty(flat.shape[0], shape[-1])  # (T*k, hidden) expert outputs, grouped by expert
        pad = GROUP_ROWS if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else 1
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = token_of[start : start + n]
                if n % pad and n > DECODE_TOKENS:  # small groups take the decode kernel
                    rows = torch.cat([rows, rows[:1].expand(pad - n % pad)])
                ys[start : start + n] = self.experts[e](x[rows])[:n]
            start += n
        # back to (token, slot) order with a gather, then the weighted sum over the k slots (a scatter-add
        # into the output is several times slower on CPU)
        ys = ys[torch.argsort(order)].view(-1, self.top_k, shape[-1])  # (T, k, hidden)
        out = torch.bmm(weights[:, None, :], ys)  # (T, 1, hidden)
        return out.view(shape)
