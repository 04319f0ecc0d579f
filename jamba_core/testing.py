"""Small checkpoints in the real format, for tests, demos and benchmarks.

`trained_checkpoint` is the small Jamba trained here (``checkpoints/jamba-tiny-chat``, made by
``python -m jamba_core.train``): it answers needle questions over long text, calls tools and extracts
JSON, so demos and integration tests get real answers.

`make_checkpoint` writes what a Hub Jamba folder holds: ``config.json`` (a `JambaConfig`),
``model.safetensors`` with the Hub's weight names (per-expert MoE weights) and random weights, and a
real tokenizer trained on real text with the Jamba 1.5+ special tokens and chat template.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import JambaConfig
from .model import JambaForCausalLM
from .tokenizer import train_tokenizer

PRESETS: dict[str, dict] = {
    # fast tests: every layer kind present (attention, Mamba, MoE, dense MLP) in 4 layers
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, num_experts=4, num_experts_per_tok=2,
                 expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2),
    # the benchmark model: about 157M parameters, Jamba's layer pattern at 1/8 of the depth
    "bench-small": dict(vocab_size=65536, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, attn_layer_period=8, attn_layer_offset=4, num_experts=8, num_experts_per_tok=2,
                        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2),
}


TRAINED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "jamba-tiny-chat"


def trained_checkpoint(missing_ok: bool = False) -> Path | None:
    """The trained small checkpoint's folder (``$JAMBA_LOCAL_TRAINED`` overrides its place); with
    ``missing_ok``, None where it is missing.

    Raises:
        FileNotFoundError: the folder or its ``model.safetensors`` is missing (an installed package
            without the repository; train one with ``python -m jamba_core.train --out FOLDER``).
    """
    path = Path(os.environ.get("JAMBA_LOCAL_TRAINED") or TRAINED_CHECKPOINT)
    if not (path / "model.safetensors").is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(f"no trained checkpoint at {path} (model.safetensors missing); it ships in the "
                                f"repository's checkpoints/ folder, or make one: python -m jamba_core.train --out {path}")
    return path


def random_weights(config: JambaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights with the Hub's names, initialised as Mamba / transformers do: linear and
    embedding weights N(0, initializer_range), ``A_log = log(1..d_state)``, ``D = 1``, ``dt_proj.bias``
    the inverse softplus of dt ~ log-uniform[1e-3, 1e-1] (Mamba paper, section 3.6), norms 1. The
    ``lm_head`` is scaled so that logits spread (std about 2) and greedy choices are not ties."""
    g = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in JambaForCausalLM(config).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("A_log"):
            t = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif name.endswith(".D") or "norm" in name:
            t = torch.ones(shape)
        elif name.endswith("dt_proj.bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            t = dt + torch.log(-torch.expm1(-dt))
        elif name == "lm_head.weight":
            t = torch.randn(shape, generator=g) * (2.0 / math.sqrt(config.hidden_size))
        elif name.endswith("conv1d.weight"):
            t = torch.randn(shape, generator=g) * (1.0 / math.sqrt(config.mamba_d_conv))
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        out[name] = t.contiguous()
    return out


def make_config(preset: str = "tiny", **overrides) -> JambaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    return JambaConfig(**{**PRESETS[preset], "max_position_embeddings": 262144, **overrides})


def make_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight Jamba checkpoint folder and return its path.

    ``preset``: "tiny" (about 0.6M parameters, for fast tests) or "bench-small" (about 157M).
    ``config_overrides`` are `JambaConfig` fields. The tokenizer is trained on real text (see
    `jamba_core.tokenizer.train_tokenizer`) with at most ``vocab_size`` entries; the model's vocabulary
    may be larger, as real checkpoints pad theirs. Reuses an existing folder made with the same
    arguments and rewrites one made with others.

    Raises:
        FileExistsError: ``path`` holds a checkpoint this function did not make (a ``config.json`` or
            safetensors file and no stamp): a real or trained checkpoint is never overwritten.
    """
    path = Path(path)
    stamp = {"preset": preset, "seed": seed, "overrides": config_overrides, "version": 1}
    stamp_file = path / "jamba_local_checkpoint.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and (path / "model.safetensors").is_file():
        return path
    if not stamp_file.is_file() and ((path / "config.json").is_file() or any(path.glob("*.safetensors"))):
        raise FileExistsError(f"{path} holds a checkpoint that make_checkpoint did not make; refusing to overwrite it "
                              "with random weights (choose another folder)")
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size=min(config_overrides.get("vocab_size", PRESETS.get(preset, {}).get("vocab_size", 4096)), 65536))
    eom = tokenizer.convert_tokens_to_ids("<|eom|>")
    config = make_config(preset, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=[tokenizer.eos_token_id, eom], **config_overrides)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size={config.vocab_size}")
    config.architectures = ["JambaForCausalLM"]
    config.save_pretrained(path)
    save_file(random_weights(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    stamp_file.write_text(json.dumps(stamp))
    return path
