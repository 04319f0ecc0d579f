"""Parity with transformers' JambaForCausalLM on the same weights (the model contract)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import JambaConfig
from transformers import JambaForCausalLM as ReferenceJamba

from jamba_core.cache import HybridCache
from jamba_core.config import load_config
from jamba_core.loading import load_model

REL_BOUND = 1e-4  # max |logit diff| <= 1e-4 * max |logit|, fp32

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
            expert_layer_period=2, expert_layer_offset=0, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2)
CONFIGS = {
    "attn-odd-moe-even": {},
    "attn-period4-offset0-mha": dict(attn_layer_period=4, attn_layer_offset=0, num_key_value_heads=4, num_hidden_layers=5),
    "gqa4-top1-8experts": dict(num_attention_heads=8, num_key_value_heads=2, num_experts=8, num_experts_per_tok=1, expert_layer_offset=1),
    "dense-only": dict(num_experts=1, num_experts_per_tok=1),
    "dstate16-dconv2-expand1": dict(mamba_d_state=16, mamba_d_conv=2, mamba_expand=1, attn_layer_period=3, attn_layer_offset=2, num_hidden_layers=6),
    "dtrank7-dconv3-mqa-moe-every-layer": dict(mamba_dt_rank=7, mamba_d_conv=3, num_key_value_heads=1, expert_layer_period=1, expert_layer_offset=0),
    "expand3-proj-bias-no-conv-bias": dict(mamba_expand=3, mamba_proj_bias=True, mamba_conv_bias=False, attn_layer_period=8, attn_layer_offset=3),
}


def reference_model(overrides, seed=0):
    torch.manual_seed(seed)
    config = JambaConfig(**{**BASE, **overrides})
    model = ReferenceJamba(config).eval()
    with torch.no_grad():  # realistic dt (Mamba init) and nonzero biases so every term matters
        for name, p in model.named_parameters():
            if name.endswith("dt_proj.bias"):
                p.uniform_(-5.0, -2.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def load_ours(model, tmp_path):
    model.save_pretrained(tmp_path)
    return load_model(tmp_path, load_config(tmp_path), progress=False)


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_fp32(name, tmp_path):
    ref = reference_model(CONFIGS[name])
    ours = load_ours(ref, tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert max_rel(got, expected) <= REL_BOUND


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_prefill_matches_token_by_token(chunk, tmp_path):
    ref = reference_model(CONFIGS["attn-odd-moe-even"])
    ours = load_ours(ref, tmp_path)
    config = ours.config
    ids = torch.randint(0, BASE["vocab_size"], (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = HybridCache(config)
        token_by_token = torch.cat([ours(ids[:, i : i + 1], cache=cache) for i in range(ids.shape[1])], 1)
        cache = HybridCache(config)
        chunked = torch.cat([ours(ids[:, s : s + chunk], cache=cache) for s in range(0, ids.shape[1], chunk)], 1)
    assert max_rel(chunked, token_by_token) <= REL_BOUND
    # and token-by-token decode is what transformers computes for the whole prompt
    assert max_rel(token_by_token, ref(ids).logits.detach()) <= REL_BOUND


def test_continuing_a_cache_with_several_tokens_matches_decode(tmp_path):
    ours = load_ours(reference_model(CONFIGS["gqa4-top1-8experts"]), tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = HybridCache(ours.config)
        ours(ids[:, :2], cache=cache)  # shorter than d_conv
        parts = [ours(ids[:, a:b], cache=cache) for a, b in [(2, 3), (3, 20), (20, 21), (21, 40)]]
        full = ours(ids)
    assert max_rel(torch.cat(parts, 1), full[:, 2:]) <= REL_BOUND


def test_left_padded_batch_equals_each_prompt_alone(tmp_path):
    ours = load_ours(reference_model(CONFIGS["expand3-proj-bias-no-conv-bias"]), tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, BASE["vocab_size"], (n,), generator=g) for n in (9, 23, 16)]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p) :] = p
        mask[r, L - len(p) :] = 1
    with torch.no_grad():
        cache = HybridCache(ours.config, batch_size=len(prompts))
        batched = ours(ids, cache=cache, attention_mask=mask)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], 1)
        step = ours(torch.tensor([[5], [6], [7]]), cache=cache, attention_mask=mask)
        for r, p in enumerate(prompts):
            alone_cache = HybridCache(ours.config)
            alone = ours(p[None], cache=alone_cache)
            assert max_rel(batched[r, L - len(p) :], alone[0]) <= REL_BOUND
            alone_step = ours(torch.tensor([[5 + r]]), cache=alone_cache)
            assert max_rel(step[r], alone_step[0]) <= REL_BOUND


def test_greedy_generation_matches_transformers_generate(tmp_path):
    ref = reference_model(CONFIGS["attn-odd-moe-even"], seed=5)
    ours = load_ours(ref, tmp_path)
    prompt = torch.randint(0, BASE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(6))
    expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32, eos_token_id=None, pad_token_id=0)
    tokens = prompt[0].tolist()
    with torch.no_grad():
        cache = HybridCache(ours.config)
        logits = ours(prompt, cache=cache)[0, -1]
        for _ in range(32):
            tokens.append(int(logits.argmax()))
            logits = ours(torch.tensor([[tokens[-1]]]), cache=cache)[0, -1]
    assert tokens == expected[0].tolist()


def test_fused_expert_layout_loads(tmp_path):
    """transformers 5 keeps experts fused in memory (gate_up_proj (E, 2I, H), down_proj (E, H, I))."""
    ref = reference_model({})
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref.config.save_pretrained(tmp_path)
    ours = load_model(tmp_path, load_config(tmp_path), progress=False)
    ids = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        assert max_rel(ours(ids), ref(ids).logits) <= REL_BOUND


def test_sharded_save_pretrained_loads(tmp_path):
    ref = reference_model({})
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_model(tmp_path, load_config(tmp_path), progress=False)
    ids = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        assert max_rel(ours(ids), ref(ids).logits) <= REL_BOUND


def test_older_config_keys_are_accepted(tmp_path):
    ref = reference_model({})
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(num_logits_to_keep=1, sliding_window=None, eos_token_id=[2, 518], use_mamba_kernels=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_config(tmp_path)
    assert config.eos_token_id == [2, 518]
    load_model(tmp_path, config, progress=False)
