"""Jamba configuration: `transformers`' `JambaConfig`, plus what follows from it.

The config object is the single source of every dimension. This module adds the layer layout
(which layers are attention, Mamba, MoE) and the parameter / memory formulas used by
`estimate_memory` and `jamba-local info`.

Layout rules (transformers `JambaConfig.layers_block_type` / `layers_num_experts`, and the Jamba
paper, Lieber et al. 2024, section 2): layer ``i`` is attention when
``i % attn_layer_period == attn_layer_offset`` (Mamba otherwise) and MoE when ``num_experts > 1`` and
``i % expert_layer_period == expert_layer_offset`` (a dense MLP otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import JambaConfig

__all__ = ["JambaConfig", "load_config", "is_attention_layer", "is_moe_layer", "layer_layout", "d_inner"]


def load_config(path: str | Path) -> JambaConfig:
    """Read ``config.json`` from a checkpoint folder (or the file itself).

    Accepts keys that older checkpoints carry (``num_logits_to_keep``, ``sliding_window``, a list
    ``eos_token_id``). Raises ``FileNotFoundError`` naming the missing file and ``ValueError`` naming
    the file when it is not valid JSON, not a Jamba config (``model_type`` other than ``"jamba"``), lacks
    one of the sizes or layout fields in `REQUIRED`, or they are out of range (`check_config`).
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint folder {path} (looked for {file})")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{file} holds a JSON {type(raw).__name__}, not an object of config fields")
    model_type = raw.get("model_type")
    if model_type != "jamba":
        raise ValueError(
            f"{file} has model_type={model_type!r}; jamba-local runs only Jamba checkpoints (model_type 'jamba')"
        )
    raw.pop("auto_map", None)  # never remote code
    missing = [name for name in REQUIRED if name not in raw]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}: a Jamba config.json names every size and the layer layout "
                         "(transformers' defaults are Jamba-v0.1's, which would not match these weights)")
    from huggingface_hub.errors import StrictDataclassError  # transformers' typed-field checks raise it

    try:
        config = JambaConfig.from_dict(raw)
        check_config(config)
    except (TypeError, ValueError, StrictDataclassError) as err:
        raise ValueError(f"{file}: {err}") from err
    return config


# the fields every tensor shape and the layer layout follow from: a config.json without one is refused rather
# than given transformers' default (Jamba-v0.1's sizes), which only surfaces later as a shape mismatch
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_experts", "attn_layer_period", "attn_layer_offset", "expert_layer_period",
            "expert_layer_offset", "mamba_d_state", "mamba_d_conv", "mamba_expand")
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "num_experts", "num_experts_per_tok", "attn_layer_period", "expert_layer_period",
             "mamba_d_state", "mamba_d_conv", "mamba_expand", "max_position_embeddings")


def check_config(config: JambaConfig) -> None:
    """Raise ``ValueError`` naming the field when a size the model divides by or allocates with is not a
    positive integer (``max_position_embeddings``, the context window, included), a layer offset is not in
    ``0 .. period - 1`` (transformers checks only that it is below the period; -1 would make no layer
    attention, or none MoE), the attention heads do not divide the hidden size or group the K/V heads, or the
    router's top-k exceeds the experts (``num_experts_per_tok <= num_experts`` where ``num_experts > 1``;
    with one expert every layer is a dense MLP and top-k is unused)."""
    for name in _POSITIVE:
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for kind in ("attn", "expert"):
        offset, period = getattr(config, f"{kind}_layer_offset", None), getattr(config, f"{kind}_layer_period")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < period:
            raise ValueError(f"{kind}_layer_offset must be an integer in 0..{period - 1} ({kind}_layer_period {period}), "
                             f"got {offset!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_attention_heads {config.num_attention_heads} is not a multiple of num_key_value_heads "
                         f"{config.num_key_value_heads}")
    if config.num_experts > 1 and config.num_experts_per_tok > config.num_experts:  # one expert: no MoE layer, no router
        raise ValueError(f"num_experts_per_tok {config.num_experts_per_tok} exceeds num_experts {config.num_experts} "
                         "(the router picks top-k of the experts)")


def is_attention_layer(config: JambaConfig, i: int) -> bool:
    return i % config.attn_layer_period == config.attn_layer_offset


def is_moe_layer(config: JambaConfig, i: int) -> bool:
    return config.num_experts > 1 and i % config.expert_layer_period == config.expert_layer_offset


def d_inner(config: JambaConfig) -> int:
    """Mamba inner width: ``mamba_expand * hidden_size``."""
    return config.mamba_expand * config.hidden_size


def layer_layout(config: JambaConfig) -> list[str]:
    """One string per layer, e.g. ``["mamba+mlp", "mamba+moe", ..., "attention+mlp", ...]``."""
    return [
        ("attention" if is_attention_layer(config, i) else "mamba") + ("+moe" if is_moe_layer(config, i) else "+mlp")
        for i in range(config.num_hidden_layers)
    ]


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active_per_token: int


def parameter_count(config: JambaConfig) -> ParameterCount:
    """Parameters of the model, and those active per token (top-k experts instead of all)."""
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = H // config.num_attention_heads
    di, N, K, r = d_inner(config), config.mamba_d_state, config.mamba_d_conv, config.mamba_dt_rank
    attn = H * config.num_attention_heads * hd * 2 + 2 * H * config.num_key_value_heads * hd
    mamba = (
        H * 2 * di + di * K + di * (r + 2 * N) + r * di + di + di * N + di + di * H + r + 2 * N
        + (di if config.mamba_conv_bias else 0) + ((2 * di + H) if config.mamba_proj_bias else 0)
    )
    mlp = 3 * H * I
    total = V * H + (0 if config.tie_word_embeddings else V * H) + H
    active = total
    for i in range(config.num_hidden_layers):
        mixer = attn if is_attention_layer(config, i) else mamba
        if is_moe_layer(config, i):
            ff_total, ff_active = config.num_experts * mlp + H * config.num_experts, config.num_experts_per_tok * mlp + H * config.num_experts
        else:
            ff_total = ff_active = mlp
        total += mixer + ff_total + 2 * H
        active += mixer + ff_active + 2 * H
    return ParameterCount(total, active)


_MINI = dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, num_experts=16, num_experts_per_tok=2, attn_layer_period=8, attn_layer_offset=4,
             expert_layer_period=2, expert_layer_offset=1, max_position_embeddings=262144)
_LARGE = {**_MINI, "hidden_size": 8192, "intermediate_size": 24576, "num_hidden_layers": 72, "num_attention_heads": 64}
# Released shapes (the config.json of each public checkpoint), so memory can be planned before downloading.
KNOWN_CONFIGS: dict[str, dict] = {
    "ai21labs/Jamba-v0.1": _MINI,  # its config.json has 1.5 Mini's sizes and layout
    "ai21labs/AI21-Jamba-1.5-Mini": _MINI,
    "ai21labs/AI21-Jamba-Mini-1.6": _MINI,
    "ai21labs/AI21-Jamba-Mini-1.7": _MINI,
    "ai21labs/AI21-Jamba-1.5-Large": _LARGE,
    "ai21labs/AI21-Jamba-Large-1.6": _LARGE,
    "ai21labs/AI21-Jamba-Large-1.7": _LARGE,
}


def known_config(name: str) -> JambaConfig | None:
    """The config of a released Jamba checkpoint by Hub id (case-insensitive, org optional), or None."""
    wanted = name.lower().removeprefix("ai21labs/")
    for hub_id, fields in KNOWN_CONFIGS.items():
        if hub_id.lower().removeprefix("ai21labs/") == wanted:
            return JambaConfig(**fields)
    return None
