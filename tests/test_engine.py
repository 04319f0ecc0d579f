"""The engine: generation, streaming, stops, sampling, memory prediction and bad input."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from jamba_core import Engine, estimate_memory
from jamba_core.cache import HybridCache
from jamba_core.config import load_config
from jamba_core.testing import make_checkpoint

PROMPT = "Call me Ishmael. Some years ago, never mind how long precisely,"


def test_stream_joins_to_generate_text(tiny_engine):
    result = tiny_engine.generate(PROMPT, max_new_tokens=24)
    chunks = list(tiny_engine.stream(PROMPT, max_new_tokens=24))
    assert "".join(c.text for c in chunks) == result.text
    assert sum(len(c.token_ids) for c in chunks) == len(result.token_ids) == result.usage.completion_tokens == 24
    assert chunks[-1].finish_reason == result.finish_reason == "length"
    assert result.usage.prompt_tokens == len(tiny_engine.encode(PROMPT))
    assert result.timings.time_to_first_token_s > 0 and result.timings.decode_tokens_per_s > 0


def test_streamed_deltas_never_split_a_character(tiny_engine):
    # force multi-byte output: a constraint that only allows the byte tokens of a CJK/emoji string
    text = "鯨と海🐋"
    ids = tiny_engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    class Replay:
        def __init__(self):
            self.i = 0

        def mask_logits(self, logits):
            keep = ids[self.i] if self.i < len(ids) else 2
            logits.fill_(float("-inf"))
            logits[keep] = 0.0

        def accept(self, token):
            self.i += 1

        def is_terminated(self):
            return False

    chunks = [c.text for c in tiny_engine.stream(PROMPT, max_new_tokens=30, constraint=Replay())]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


def test_stop_string_spanning_tokens_is_not_echoed(tiny_engine):
    full = tiny_engine.generate(PROMPT, max_new_tokens=24).text
    stop = full[6:11]
    assert len(tiny_engine.tokenizer(stop, add_special_tokens=False)["input_ids"]) >= 1
    result = tiny_engine.generate(PROMPT, max_new_tokens=24, stop=[stop, "never-appears"])
    assert result.text == full[: full.index(stop)]
    assert result.finish_reason == "stop"
    streamed = "".join(c.text for c in tiny_engine.stream(PROMPT, max_new_tokens=24, stop=stop))
    assert streamed == result.text


def test_generation_stops_on_every_eos_id(tiny_engine):
    assert tiny_engine.tokenizer.convert_tokens_to_ids("<|eom|>") in tiny_engine.stop_ids
    for eos in sorted(tiny_engine.stop_ids):

        class ForceAfterTwo:
            n = 0

            def mask_logits(self, logits, eos=eos):
                if self.n == 2:
                    logits.fill_(float("-inf"))
                    logits[eos] = 0

            def accept(self, token):
                self.n += 1

            def is_terminated(self):
                return False

        result = tiny_engine.generate(PROMPT, max_new_tokens=10, constraint=ForceAfterTwo())
        assert result.finish_reason == "stop" and result.usage.completion_tokens == 2


def test_sampling_is_reproducible_with_a_seed(tiny_engine):
    a = tiny_engine.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    b = tiny_engine.generate(PROMPT, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    greedy = tiny_engine.generate(PROMPT, max_new_tokens=12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != greedy.token_ids


def test_chat_messages_render_with_the_template(tiny_engine):
    messages = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi"}]
    ids = tiny_engine.encode(messages)
    text = tiny_engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<|startoftext|><|bom|><|system|> Sys.<|eom|><|bom|><|user|> Hi<|eom|><|bom|><|assistant|>"
    assert tiny_engine.count_tokens(messages) == len(ids)
    assert tiny_engine.generate(messages, max_new_tokens=4).usage.prompt_tokens == len(ids)


def test_engine_prefill_in_chunks_matches_whole_prompt(tiny_checkpoint):
    whole = Engine.from_pretrained(tiny_checkpoint, progress=False)
    ids = torch.tensor([whole.encode(PROMPT * 6)])
    ref_logits = whole.prefill(ids, whole.new_cache())
    for chunk in (1, 7, 64):
        whole.prefill_chunk_tokens = chunk
        got = whole.prefill(ids, whole.new_cache())
        assert ((got - ref_logits).abs().max() / ref_logits.abs().max()).item() <= 1e-4


def test_bf16_greedy_tokens_match_fp32_for_32_steps(tiny_checkpoint):
    fp32 = Engine.from_pretrained(tiny_checkpoint, progress=False)
    bf16 = Engine.from_pretrained(tiny_checkpoint, dtype="bfloat16", progress=False)
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.model.layers[0].mamba.A_log.dtype == torch.float32
    for prompt in (PROMPT, "The whale"):
        assert bf16.generate(prompt, max_new_tokens=32).token_ids == fp32.generate(prompt, max_new_tokens=32).token_ids


def test_cache_bytes_match_the_prediction(tiny_engine):
    for tokens in (1, 1000, 5000):
        cache = tiny_engine.new_cache(capacity=tokens)
        est = estimate_memory(tiny_engine.config, tokens, 1, tiny_engine.dtype)
        assert cache.nbytes == est.kv_cache + est.mamba_state


def test_bf16_kv_cache_for_fp32_weights_halves_the_kv_bytes_and_keeps_greedy_tokens(tiny_checkpoint, tiny_engine):
    """kv_cache_dtype="bfloat16" with fp32 weights (as llama.cpp's f16 cache): K/V stored in bf16, the rest
    of the cache and the model as before; its bytes as predicted; greedy output as the fp32 cache's."""
    engine = Engine.from_pretrained(tiny_checkpoint, kv_cache_dtype="bfloat16", progress=False)
    assert engine.dtype == torch.float32 and engine.kv_dtype == torch.bfloat16
    cache, fp32_cache = engine.new_cache(capacity=5000), tiny_engine.new_cache(capacity=5000)
    kv = [layer for layer in cache.layers if hasattr(layer, "store")]
    assert kv and all(layer.k.dtype == torch.bfloat16 for layer in kv)
    est = estimate_memory(engine.config, 5000, 1, "float32", kv_cache_dtype="bfloat16")
    assert cache.nbytes == est.kv_cache + est.mamba_state
    assert est.kv_cache * 2 == estimate_memory(engine.config, 5000, 1, "float32").kv_cache
    assert fp32_cache.nbytes - cache.nbytes == est.kv_cache
    for prompt in (PROMPT, "The whale"):
        assert engine.generate(prompt, max_new_tokens=24).token_ids == tiny_engine.generate(prompt, max_new_tokens=24).token_ids


def test_unknown_kv_cache_dtype_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown dtype 'int8'.*bfloat16"):
        Engine.from_pretrained(tiny_checkpoint, kv_cache_dtype="int8", progress=False)


def test_published_kv_cache_figures():
    from transformers import JambaConfig

    mini = JambaConfig()  # Jamba 1.5 Mini shape: 32 layers, 4 attention, 8 KV heads of 128
    assert estimate_memory(mini, 262144, 1, "bfloat16").kv_cache == 4 * 2**30
    params = estimate_memory(mini, 1, 1, "bfloat16")
    assert 51e9 < params.parameters < 53e9 and 11.5e9 < params.active_parameters < 12.5e9


# -- bad input ---------------------------------------------------------------------------------

def test_rejects_empty_prompt_and_bad_max_new_tokens(tiny_engine):
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.generate("", max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.generate([], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_engine.generate(PROMPT, max_new_tokens=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=-1, temperature=1.0), "top_k must be an integer >= 0"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_rejects_sampling_settings_no_sampler_takes(tiny_engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_engine.generate(PROMPT, max_new_tokens=2, **kwargs)


def test_sampling_settings_that_are_not_numbers_are_named():
    from jamba_core.engine import check_sampling

    for kwargs in (dict(temperature="hot"), dict(top_p="1"), dict(temperature=None)):
        with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be a number, got"):
            check_sampling(4, **kwargs)


def test_stop_strings_end_free_text_but_not_a_constrained_call(tiny_engine):
    """The grammar's own text holds newlines ('<tool_calls>[\n    {'): stop=["\n"] cut a forced call
    after four tokens (an invalid call, and `with_structured_output` returned None)."""
    from jamba_core.chat.api import chat

    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
    result = chat(tiny_engine, [{"role": "user", "content": "add 2 and 5"}], tools=tools, tool_choice="add",
                  max_new_tokens=64, stop=["\n", "["])
    assert [c["name"] for c in result.tool_calls] == ["add"] and not result.invalid_tool_calls
    free = tiny_engine.generate(PROMPT, max_new_tokens=40)
    stop = free.text.strip().split()[1]
    assert stop not in tiny_engine.generate(PROMPT, max_new_tokens=40, stop=[stop]).text


def test_stop_strings_skip_a_free_call_s_markup_and_apply_after_it():
    """With tool_choice="auto" nothing constrains the call, and stop=["\n"] cut the model's own call at
    '<tool_calls>[' (an invalid call): stop strings are looked for only outside the call markers' blocks,
    and a block not closed yet holds nothing back."""
    from jamba_core.engine import _find_stop, _stop_prefix_start

    markup = ("<tool_calls>", "</tool_calls>")
    text = 'Sure.<tool_calls>[\n{"name": "f", "arguments": {}}\n]</tool_calls>\nthen\n'
    assert _find_stop(text, ["\n"], markup) == text.index("</tool_calls>") + len("</tool_calls>")
    assert _find_stop(text, ["\n"]) == text.index("[") + 1  # without the markup: inside the call
    assert _find_stop(text, ["]"], markup) is None and _find_stop("a. b", ["."], markup) == 1
    assert _find_stop('x<tool_calls>[\n{"a', ["\n", "{"], markup) is None
    assert _stop_prefix_start("hi<tool_calls>[\nab", ["ab!"], markup) == len("hi<tool_calls>[\nab")  # inside: sent
    assert _stop_prefix_start("hi</b>ab", ["ab!"], markup) == len("hi</b>")
    assert _stop_prefix_start("ab", ["ab!"], ("<b>", "</b>")) == 0
    assert _stop_prefix_start("<b>x</b>ab", [">ab!"]) == len("<b>x</b") and _stop_prefix_start("<b>x</b>ab", [">ab!"], ("<b>", "</b>")) == 10


def test_a_free_call_survives_a_newline_stop():
    """The reported case end to end: `bind_tools` with the default "auto" and stop=["\n"] (the Jamba call
    format writes a newline after '<tool_calls>[')."""
    from jamba_core.testing import trained_checkpoint
    from langchain_jamba import ChatJamba

    trained = trained_checkpoint(missing_ok=True)
    if trained is None:
        pytest.skip("no trained checkpoint")

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    llm = ChatJamba(model=str(trained), max_tokens=60).bind_tools([multiply])
    for stop in (["\n"], ["]", "\n"]):
        reply = llm.invoke("What is 6 times 7?", stop=stop)
        assert reply.tool_calls and reply.tool_calls[0]["name"] == "multiply" and not reply.invalid_tool_calls


def test_a_long_answer_budget_does_not_allocate_the_whole_window_up_front(tiny_engine, monkeypatch):
    """max_new_tokens may be the rest of the window (ChatJamba's max_tokens=None): the K/V for all of it
    was allocated for every call (384 MiB for a 22-token chat on the tiny model; 4 GiB for Jamba 1.5
    Mini at 256K, held on a GPU). Room for `ANSWER_RESERVE` tokens is made up front, and the cache grows
    past it as the answer does."""
    from jamba_core.engine import ANSWER_RESERVE

    asked = []
    start = tiny_engine.start
    monkeypatch.setattr(tiny_engine, "start", lambda ids, capacity=0: asked.append(capacity) or start(ids, capacity))
    ids = tiny_engine.encode(PROMPT)
    window = tiny_engine.context_window
    short = tiny_engine.generate(ids, max_new_tokens=window - len(ids), stop=[" "])
    assert window - len(ids) > ANSWER_RESERVE and asked == [len(ids) + ANSWER_RESERVE]
    assert short.text == tiny_engine.generate(ids, max_new_tokens=8, stop=[" "]).text


def test_a_tokenizer_past_the_model_s_vocabulary_is_named(tiny_checkpoint, tmp_path):
    """Ids the checkpoint's own tokenizer gives past vocab_size died in the embedding (IndexError)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "small-vocab"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 300
    (folder / "config.json").write_text(json.dumps(config))
    weights = {k: v[:300].contiguous() if k in ("model.embed_tokens.weight", "lm_head.weight") else v
               for k, v in load_file(folder / "model.safetensors").items()}
    save_file(weights, folder / "model.safetensors")
    engine = Engine.from_pretrained(folder, progress=False)
    with pytest.raises(ValueError, match=r"tokenizer gave token id \d+, past the model's vocabulary \(vocab_size 300.*small-vocab"):
        engine.generate("Call me Ishmael. Some years ago, the harpooneer", max_new_tokens=2)
    with pytest.raises(ValueError, match="past the model's vocabulary"):
        engine.count_tokens([{"role": "user", "content": "the harpooneer"}])


def test_rejects_prompts_and_counts_of_the_wrong_kind(tiny_engine):
    vocab = tiny_engine.config.vocab_size
    for ids in ([vocab], [-1], [1, 2, vocab + 7]):
        with pytest.raises(ValueError, match=f"token id {ids[-1]} is outside the vocabulary \\(0..{vocab - 1}\\)"):
            tiny_engine.generate(ids, max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt must be.*got None"):
        tiny_engine.generate(None, max_new_tokens=2)
    for ids, shown in (([1, True], "the bool True"), (np.array([1, 0], dtype=bool), "the bool"),
                       (torch.tensor([1, 2]) > 1, "the bool"), ([1, 2.0], r"the element 2.0 \(float\)"),
                       (torch.ones(1, 3, dtype=torch.long), r"the element tensor\(\[1, 1, 1\]\)")):
        with pytest.raises(TypeError, match=f"list of token ids.*got {shown}"):  # True was token 1
            tiny_engine.generate(ids, max_new_tokens=2)
    want = tiny_engine.generate([1, 5, 9], max_new_tokens=3).text  # a tokenizer's tensors and arrays pass as ids
    assert tiny_engine.generate(torch.tensor([1, 5, 9]), max_new_tokens=3).text == want
    assert tiny_engine.generate(np.array([1, 5, 9], dtype=np.int32), max_new_tokens=3).text == want
    with pytest.raises(TypeError, match="max_new_tokens must be an integer, got 2.5"):
        tiny_engine.generate(PROMPT, max_new_tokens=2.5)


def test_settings_of_the_wrong_kind_are_named(tiny_engine, tiny_checkpoint):
    """Each failed deep inside or passed silently: seed=1.5 (torch's RuntimeError), seed=2**70 ("Overflow
    when unpacking long long"), top_k=True (a torch TypeError), max_new_tokens=True (taken as 1), bytes
    (read as token ids), an int ("'int' object is not iterable"), prefill_chunk_tokens=0 (accepted, then
    "range() arg 3 must not be zero" at the first prompt)."""
    for kwargs, error, match in ((dict(seed=1.5), TypeError, "seed must be an integer or None, got 1.5"),
                                 (dict(seed=True), TypeError, "seed must be an integer"),
                                 (dict(seed=2**70), ValueError, r"seed must be in -2\*\*63 .. 2\*\*64 - 1"),
                                 (dict(top_k=True), ValueError, "top_k must be an integer >= 0"),
                                 (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an integer, got True")):
        with pytest.raises(error, match=match):
            tiny_engine.generate(PROMPT, **{"max_new_tokens": 2, **kwargs})
    assert tiny_engine.generate(PROMPT, max_new_tokens=2, temperature=1.0, seed=2**64 - 1).token_ids
    for prompt, kind in ((b"hello", "bytes"), (5, "int")):
        with pytest.raises(TypeError, match=f"prompt must be text, a list of token ids, or a list of chat message dicts, got {kind}"):
            tiny_engine.generate(prompt, max_new_tokens=2)
    for chunk in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=f"prefill_chunk_tokens must be an integer >= 1, got {chunk}"):
            Engine.from_pretrained(tiny_checkpoint, progress=False, prefill_chunk_tokens=chunk)


def test_an_empty_stop_string_is_ignored_alone_or_in_a_list(tiny_engine):
    want = tiny_engine.generate(PROMPT, max_new_tokens=6)
    for stop in ("", [""], ["", None]):
        got = tiny_engine.generate(PROMPT, max_new_tokens=6, stop=stop)
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)


def test_a_device_torch_cannot_use_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        Engine.from_pretrained(tiny_checkpoint, device="gpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' asked, but .*use device='cpu'"):
            Engine.from_pretrained(tiny_checkpoint, device="cuda", progress=False)
    for device in ("mps", "meta", "xpu"):  # mps printed a 96-line traceback from the CLI
        with pytest.raises(ValueError, match=f"device '{device}': jamba-local runs on 'cpu' and 'cuda' only"):
            Engine.from_pretrained(tiny_checkpoint, device=device, progress=False)


def test_prompt_longer_than_the_context_says_tokens_and_memory(tmp_path):
    path = make_checkpoint(tmp_path / "short", preset="tiny", max_position_embeddings=32)
    engine = Engine.from_pretrained(path, progress=False)
    with pytest.raises(ValueError, match=r"exceeds the model's context window of 32 tokens.*need [0-9.]*[1-9] MiB of cache"):
        engine.generate(PROMPT * 3, max_new_tokens=4)  # a small cache in MiB: it read "0.00 GiB"


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def test_missing_config_names_the_file(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine.from_pretrained(broken, progress=False)


def test_missing_tokenizer_files_are_named(broken):
    """Without tokenizer.json transformers spoke of sentencepiece and tiktoken, naming no file; with no
    tokenizer file at all the folder is named."""
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"could not load the tokenizer in .*broken' \(it holds tokenizer_config.json\); "
                                         r"tokenizer.json is missing"):
        Engine.from_pretrained(broken, progress=False)
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files .* in folder .*broken"):
        Engine.from_pretrained(broken, progress=False)


def test_truncated_safetensors_names_the_file(broken):
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        Engine.from_pretrained(broken, progress=False)


def test_corrupt_safetensors_header_names_the_file(broken):
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="model.safetensors"):
        Engine.from_pretrained(broken, progress=False)


def test_non_jamba_config_is_refused(broken):
    raw = json.loads((broken / "config.json").read_text())
    raw["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="model_type='llama'"):
        Engine.from_pretrained(broken, progress=False)


@pytest.mark.parametrize("patch, message", [
    ([1, 2], "holds a JSON list, not an object"),
    ({"hidden_size": "192"}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_attention_heads": 5}, "not a multiple of num_attention_heads 5"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 exceeds num_experts"),
    ({"attn_layer_offset": -1}, r"attn_layer_offset must be an integer in 0\.\.\d+ .*got -1"),
    ({"expert_layer_offset": -2}, r"expert_layer_offset must be an integer in 0\.\.1 .*got -2"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
    ({"hidden_size": None, "mamba_d_state": None}, "lacks hidden_size, mamba_d_state: a Jamba config.json names every size"),
])
def test_a_config_with_impossible_fields_names_the_file_and_field(broken, patch, message):
    """Caught when the checkpoint loads (a router top-k above the experts used to load, then fail in
    torch.topk at the first MoE layer; zero heads divided by zero; an attention offset of -1 made every
    layer Mamba; a missing size took transformers' default, 4096, and failed as a shape mismatch). A None
    in the patch removes that field."""
    raw = patch if isinstance(patch, list) else {**json.loads((broken / "config.json").read_text()), **patch}
    if isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if value is not None}
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="config.json") as err:
        Engine.from_pretrained(broken, progress=False)
    assert re.search(message, str(err.value))


def test_wrong_tensor_shape_names_the_key(broken):
    raw = json.loads((broken / "config.json").read_text())
    raw["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"feed_forward.*has shape"):
        Engine.from_pretrained(broken, progress=False)


def test_an_integer_tensor_for_a_float_weight_names_the_key(broken):
    """It was cast to float silently (an int8 weight without its quantization_config loaded as values
    -128..127 and generated noise)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    key = next(k for k in tensors if k.endswith("in_proj.weight"))
    tensors[key] = tensors[key].round().to(torch.int8)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{re.escape(key)}' is stored as torch.int8, not a float"):
        Engine.from_pretrained(broken, progress=False)
    expert = next(k for k in tensors if ".experts." in k or "feed_forward.down_proj" in k)  # a weight int8 quantizes on load
    tensors[key] = tensors[key].float()
    tensors[expert] = tensors[expert].round().to(torch.int32)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(expert)}' is stored as torch.int32, not a float"):
        Engine.from_pretrained(broken, quantization="int8", progress=False)


def test_pickle_checkpoint_is_refused(broken):
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        Engine.from_pretrained(broken, progress=False)


def test_missing_shard_names_it(broken):
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        Engine.from_pretrained(broken, progress=False)


@pytest.mark.parametrize("index", ["[]", '{"weight_map": []}', '{"weight_map": {"lm_head.weight": 3}}', "{", "{}"])
def test_a_malformed_shard_index_is_named(broken, index):
    """A list, a weight_map that is no mapping of names to files: TypeError and AttributeError from inside."""
    (broken / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a valid safetensors index"):
        Engine.from_pretrained(broken, progress=False)


@pytest.mark.parametrize("content", ["{}", "[]", '{"model": 3}'])
def test_a_tokenizer_json_that_is_no_tokenizer_is_named(broken, content):
    """JSON, but not a tokenizer: transformers' KeyError ('added_tokens') reached the CLI as a traceback."""
    (broken / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=r"could not load the tokenizer in .*broken' \(it holds tokenizer.json"):
        Engine.from_pretrained(broken, progress=False)


def test_incremental_detokenization_equals_decoding_everything(tiny_engine):
    """The streaming text (decoded a few ids at a time) equals decoding all ids, at every step, across
    multi-byte characters split over tokens, and for a SentencePiece-style decoder (which drops the
    leading space of a decode: the reason for decoding with a few ids of context)."""
    import random

    from tokenizers import Tokenizer, decoders, models

    from jamba_core.engine import _Detokenizer

    spm = Tokenizer(models.WordLevel({"▁the": 0, "▁whale": 1, "▁": 2, "s": 3, "ea": 4}, unk_token="▁"))
    spm.decoder = decoders.Metaspace()
    for seed in range(50):
        rng = random.Random(seed)
        text = "".join(rng.choice(["héllo ", "wörld", "😀", "日本語", " the whale", "\n", "x"]) for _ in range(30))
        cases = [(tiny_engine.decode, tiny_engine.tokenizer.encode(text, add_special_tokens=False)),
                 (spm.decode, [rng.randrange(5) for _ in range(30)])]
        for decode, ids in cases:
            detok = _Detokenizer(decode)
            for k in range(1, len(ids) + 1):
                assert detok.text(ids[:k]) == decode(ids[:k])


def test_cli_chat_keeps_parsed_turns_and_survives_a_turn_that_does_not_fit(tiny_checkpoint, capsys, monkeypatch):
    """`jamba-local chat` kept the raw stream (markup, the template's space) as the assistant's turn, checked
    its sampling flags only after the first line, and ended the whole chat at a turn that failed."""
    import io

    from jamba_core import cli

    assert cli.main(["chat", "--model", str(tiny_checkpoint), "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    from jamba_core.chat import api
    from jamba_core.chat.api import chat

    sent, real_stream = [], api.chat_stream

    def spy(engine, messages, **kwargs):  # what each turn sends
        sent.append([dict(m) for m in messages])
        yield from real_stream(engine, messages, **kwargs)

    monkeypatch.setattr(api, "chat_stream", spy)
    window = Engine.from_pretrained(tiny_checkpoint, progress=False).context_window
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n" + "word " * (window + 5) + "\nagain\n\n"))
    assert cli.main(["chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "this turn is dropped" in err and "context window" in err
    assert len(sent) == 3 and [m["role"] for m in sent[2]] == ["user", "assistant", "user"]  # the long turn dropped
    first = Engine.from_pretrained(tiny_checkpoint, progress=False)
    assert sent[2][1]["content"] == chat(first, [{"role": "user", "content": "hello"}], max_new_tokens=4).content


def test_cli_reports_a_missing_checkpoint_as_an_error_message(capsys):
    from jamba_core.cli import main

    assert main(["info", "--model", "/no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "/no/such/folder" in err and "Traceback" not in err


def test_cli_bad_values_are_usage_errors_not_tracebacks(capsys, tiny_checkpoint):
    from jamba_core.cli import main

    mini = "ai21labs/AI21-Jamba-1.5-Mini"
    for argv, message in ((["info", "--model", mini, "--batch", "-2"], "--batch: must be at least 1, got -2"),
                          (["info", "--model", mini, "--context", "abc"], "'abc' is not a token count"),
                          (["eval", str(tiny_checkpoint), "--samples", "0"], "--samples: must be at least 1"),
                          (["eval", str(tiny_checkpoint), "--lengths", "0"], "a token count must be at least 1")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    for argv, message in ((["info", "--model", mini, "--fits", "nan"], "--fits must be a positive number of GiB"),
                          (["generate", "--model", str(tiny_checkpoint / "config.json"), "hi"], "is a file; pass the checkpoint folder"),
                          (["generate", "--model", str(tiny_checkpoint), "--device", "gpu", "hi"], "not a torch device"),
                          (["generate", "--model", str(tiny_checkpoint), "--top-k", "-2", "--temperature", "1", "hi"], "top_k must be"),
                          (["generate", "--model", str(tiny_checkpoint), "--seed", str(2**70), "hi"], "seed must be in"),
                          (["eval", str(tiny_checkpoint), "--haystack", "/nonexistent/text.txt", "--lengths", "256"],
                           "--haystack /nonexistent/text.txt: FileNotFoundError")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cli_info_takes_a_config_file_and_k_suffixed_contexts(capsys, tiny_checkpoint):
    from jamba_core.cli import main

    assert main(["info", "--model", str(tiny_checkpoint / "config.json"), "--context", "4k", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["estimate"]["context_tokens"] == 4096
    assert info["estimate"]["kv_cache"] == estimate_memory(load_config(tiny_checkpoint), 4096, 1, "bfloat16").kv_cache
    assert info["estimate"]["within_context_window"]
    assert main(["info", "--model", str(tiny_checkpoint), "--context", "300k"]) == 0
    assert "past the model's context window of 262,144 tokens" in capsys.readouterr().out


def test_cli_hands_every_argument_to_demo_and_bench(capsys, tmp_path, monkeypatch):
    """`jamba-local demo --help` / `bench --help` reach their own parsers (argparse's REMAINDER dropped a
    leading option), and `bench` finds the repository's benchmarks/ from any working directory."""
    from jamba_core.cli import main

    monkeypatch.chdir(tmp_path)
    for command, option in (("demo", "--max-document-chars"), ("bench", "--ref-max-context")):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and option in capsys.readouterr().out
    assert main(["demo", "--document", str(tmp_path / "absent.txt")]) == 2
    assert "absent.txt" in capsys.readouterr().err


def test_memory_estimate_rejects_impossible_sizes_and_takes_a_name():
    from jamba_core.config import known_config

    mini = "ai21labs/AI21-Jamba-1.5-Mini"
    assert estimate_memory(mini, 4096) == estimate_memory(known_config(mini), 4096)
    assert estimate_memory("Jamba-v0.1", 4096) == estimate_memory(mini, 4096)  # offline too: the same shapes
    for args, error, message in (((mini, 4096, -1), ValueError, "batch_size must be >= 1, got -1"),
                                 ((mini, -5), ValueError, "context_tokens must be >= 0, got -5"),
                                 ((mini, "4k"), TypeError, "context_tokens must be an integer, got '4k'")):
        with pytest.raises(error, match=message):
            estimate_memory(*args)


def test_memory_estimate_counts_the_runtime_once_and_can_leave_it_out():
    from jamba_core.memory import RUNTIME_BYTES
    from jamba_core.testing import make_config

    config = make_config("tiny")
    with_rt, without = estimate_memory(config, 4096, 1, "float32"), estimate_memory(config, 4096, 1, "float32", runtime_bytes=0)
    assert with_rt.runtime == RUNTIME_BYTES and without.runtime == 0
    assert with_rt.total - without.total == RUNTIME_BYTES


def test_make_checkpoint_never_overwrites_a_checkpoint_it_did_not_make(tmp_path):
    """`benchmarks.quant_accuracy --checkpoint checkpoints/jamba-tiny-chat` once replaced the trained
    checkpoint with random bench-small weights: a folder without make_checkpoint's stamp is refused."""
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="did not make"):
        make_checkpoint(folder, preset="tiny")
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    made = make_checkpoint(tmp_path / "made", preset="tiny")  # its own folders are reused and rewritten
    assert make_checkpoint(made, preset="tiny") == made
    assert make_checkpoint(made, preset="tiny", seed=1) == made


def test_bench_merge_never_mixes_machines(tmp_path):
    """`benchmarks.bench --merge` adds to saved runs of the same CPU model; runs of another CPU move to
    bench-<cpu>.* untouched, so no table's ratios come from two machines."""
    import json

    from benchmarks.bench import merge_base

    saved = {"runs": [{"machine": {"cpu": "AMD EPYC"}, "started": "x"}], "summary": {}}
    (tmp_path / "bench.json").write_text(json.dumps(saved))
    (tmp_path / "bench.md").write_text("amd table")
    assert merge_base(tmp_path, "AMD EPYC", log=lambda m: None) == saved
    messages = []
    assert merge_base(tmp_path, "Intel(R) Xeon(R) Processor", log=messages.append) == {"runs": []}
    assert json.loads((tmp_path / "bench-amd-epyc.json").read_text()) == saved
    assert (tmp_path / "bench-amd-epyc.md").read_text() == "amd table"
    assert not (tmp_path / "bench.json").exists() and "AMD EPYC" in messages[0]
    assert merge_base(tmp_path / "empty", "any", log=messages.append) == {"runs": []}
    # back on the first machine: the other's runs move aside and its own come back to bench.*
    xeon = {"runs": [{"machine": {"cpu": "Intel(R) Xeon(R) Processor"}, "started": "y"}], "summary": {}}
    (tmp_path / "bench.json").write_text(json.dumps(xeon))
    assert merge_base(tmp_path, "AMD EPYC", log=lambda m: None) == saved
    assert json.loads((tmp_path / "bench.json").read_text()) == saved and (tmp_path / "bench.md").read_text() == "amd table"
    assert json.loads((tmp_path / "bench-intel-xeon-processor.json").read_text()) == xeon
    assert not (tmp_path / "bench-amd-epyc.json").exists()


def test_bench_tells_cpus_of_one_model_name_apart_by_their_vector_instructions(tmp_path):
    """Two "AMD EPYC" VMs, one with AVX-512 BF16 and one with AVX2 alone, run the kernels at very different
    speeds: the table key carries the vector instructions, so their runs never merge."""
    import json

    from benchmarks.bench import merge_base, vector_isa

    assert vector_isa({"fpu", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}) == "AVX-512 BF16"
    assert vector_isa({"avx", "avx2", "avx512f"}) == "AVX-512"
    assert vector_isa({"sse2", "avx", "avx2", "fma"}) == "AVX2"
    assert vector_isa({"fp", "asimd"}) == ""
    (tmp_path / "bench.json").write_text(json.dumps({"runs": [{"machine": {"cpu": "AMD EPYC, AVX-512 BF16"}}]}))
    assert merge_base(tmp_path, "AMD EPYC, AVX2", log=lambda m: None) == {"runs": []}
    assert (tmp_path / "bench-amd-epyc-avx-512-bf16.json").is_file()


def test_bench_decode_percent_of_bound_beside_each_repetition():
    """`benchmarks.bench.summarize`: the run's bound (the better bandwidth of its start and end) gives
    pct_of_bound; each decode repetition over the bandwidth measured in its own process gives
    pct_of_bound_beside (their median), shown in the table beside the run's."""
    from benchmarks.bench import _bounds_for, markdown, summarize
    from jamba_core.testing import make_config

    config = make_config("tiny")
    bounds = {"bandwidth_gb_s": 40.0, "copy_gb_s": 40.0, "read_gb_s": 30.0, "matmul_gflop_s": {"float32": 100.0, "bfloat16": 200.0}}
    per_gb_s = _bounds_for(config, bounds, "float32")["decode_tok_s"] / 40.0  # tokens/s per GB/s
    entries = [{"phase": "decode", "tokens": 1024, "system": system, "dtype": "float32", "rep": rep, "decode_tok_s": tok_s,
                "token_ids": [1, 2], "step_s": [1 / tok_s], "phase_mem": {"peak_mib": 100.0}, "after_load": {"rss_mib": 90.0},
                **({"bandwidth_beside_gb_s": bw} if system == "ours" else {})}
               for system, rep, tok_s, bw in [("ours", 0, 0.9 * per_gb_s * 20, 20.0), ("ours", 1, 0.8 * per_gb_s * 40, 40.0),
                                              ("ours", 2, 0.7 * per_gb_s * 30, 30.0), ("reference", 0, 1.0, None)]]
    results = {"runs": [{"started": "t", "argv": [], "machine": {"cpu": "x", "cores": 2, "torch": "t", "python": "p", "memory_gib": 1.0},
                         "loadavg_start": None,
                         "loadavg_end": None, "bounds": bounds, "entries": entries}]}
    results["summary"] = summarize(results, config)
    row = next(r for r in results["summary"]["rows"] if r["system"] == "ours")
    assert row["pct_of_bound"] == pytest.approx(100 * row["tok_s"] / (per_gb_s * 40.0))
    assert row["pct_of_bound_beside"] == pytest.approx(80.0)
    assert "bandwidth measured beside each repetition (median) | 80% |" in markdown(results)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_an_engine_loaded_under_inference_mode_decodes_as_one_loaded_outside(tiny_checkpoint, quantization):
    """Weights made under ``torch.inference_mode`` are inference tensors, which keep no version counter:
    the decode plan's and the mixer's change checks must not ask them for one (they once raised)."""
    import torch

    prompt = [{"role": "user", "content": "Call me Ishmael."}]
    outside = Engine.from_pretrained(tiny_checkpoint, progress=False, quantization=quantization).generate(prompt, max_new_tokens=6)
    with torch.inference_mode():
        engine = Engine.from_pretrained(tiny_checkpoint, progress=False, quantization=quantization)
        inside = engine.generate(prompt, max_new_tokens=6)
    assert inside.token_ids == outside.token_ids


def test_logprobs_are_the_models_own_log_softmax(tiny_engine):
    """Each generated token's logprob and its top alternatives equal log_softmax of the logits a full
    forward pass gives at that position (fp32: within 1e-4), and the tokens' bytes join to the text."""
    ids = tiny_engine.encode(PROMPT)
    result = tiny_engine.generate(ids, max_new_tokens=8, logprobs=3)
    assert len(result.logprobs) == len(result.token_ids) == 8
    with torch.no_grad():
        logits = tiny_engine.model(torch.tensor([ids + result.token_ids]))[0].float()
    for i, entry in enumerate(result.logprobs):
        want = torch.log_softmax(logits[len(ids) - 1 + i], -1)
        assert entry.token_id == result.token_ids[i]
        assert abs(entry.logprob - float(want[entry.token_id])) <= 1e-4
        top = torch.topk(want, 3)
        assert [t.token_id for t in entry.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token_id == entry.token_id  # greedy: the chosen token ranks first
        assert all(t.top_logprobs == [] for t in entry.top_logprobs)
    shown = [e for e in result.logprobs if e.token_id not in tiny_engine._control_ids]  # the text drops <|user|> and such
    assert bytes(b for e in shown for b in e.bytes).decode() == result.text
    assert all(e.token == bytes(e.bytes).decode("utf-8", errors="replace") for e in result.logprobs)


def test_logprobs_come_before_the_constraint_and_with_each_streamed_token(tiny_engine):
    """A constraint that bans the model's favourite token: the chosen token's logprob is the model's own,
    below the banned favourite, which still heads top_logprobs. Chunks carry one entry per token id."""

    class BanFavourite:
        def __init__(self):
            self.banned = []

        def mask_logits(self, logits):
            self.banned.append(int(logits.argmax()))
            logits[self.banned[-1]] = float("-inf")

        def accept(self, token_id):
            pass

        def is_terminated(self):
            return False

    ban = BanFavourite()
    chunks = list(tiny_engine.stream(PROMPT, max_new_tokens=5, logprobs=2, constraint=ban))
    entries = [e for c in chunks for e in (c.logprobs or [])]
    assert all(len(c.logprobs or []) == len(c.token_ids) for c in chunks)
    assert [e.token_id for e in entries] == [t for c in chunks for t in c.token_ids]
    for entry, banned in zip(entries, ban.banned):
        assert entry.token_id != banned and entry.top_logprobs[0].token_id == banned
        assert entry.logprob < entry.top_logprobs[0].logprob


def test_logprobs_off_by_default_and_checked(tiny_engine):
    plain = tiny_engine.generate(PROMPT, max_new_tokens=3)
    assert plain.logprobs is None
    assert all(c.logprobs is None for c in tiny_engine.stream(PROMPT, max_new_tokens=3))
    only_chosen = tiny_engine.generate(PROMPT, max_new_tokens=3, logprobs=0)
    assert only_chosen.token_ids == plain.token_ids and [e.top_logprobs for e in only_chosen.logprobs] == [[], [], []]
    assert len(tiny_engine.generate(PROMPT, max_new_tokens=1, logprobs=np.int64(20)).logprobs[0].top_logprobs) == 20
    for bad in (-1, 21, True, 2.5, "3"):
        with pytest.raises(ValueError, match="logprobs must be None or an integer in 0..20"):
            tiny_engine.generate(PROMPT, max_new_tokens=3, logprobs=bad)


def test_an_unreachable_hub_id_is_one_line(monkeypatch, capsys):
    """huggingface_hub's offline message runs over two lines; the CLI promises one line, exit 2."""
    import huggingface_hub

    from jamba_core.cli import main

    def offline(*args, **kwargs):
        raise OSError("Cannot reach the Hub.\nPlease check your internet connection and try again.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["info", "--model", "ai21labs/Some-Unreleased-Jamba", "--context", "4k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Cannot reach the Hub. Please check your internet connection" in err
    assert "'ai21labs/Some-Unreleased-Jamba' is no local folder (nothing at " in err  # a mistyped folder reads so too


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_weights_in_huge_pages_load_the_same_and_each_keeps_its_own_storage(tmp_path, monkeypatch, quantization):
    """`loading.place_in_huge_pages`: the same logits as torch's allocation, the tied head still tied, each
    tensor its own storage inside one 2 MiB-aligned mapping (so safetensors saves them), nothing placed
    with JAMBA_LOCAL_HUGE_PAGES=0."""
    from jamba_core import loading
    from jamba_core.quant import save_quantized

    folder = make_checkpoint(tmp_path / "tied", preset="tiny", tie_word_embeddings=True)
    placed = []
    real = loading.place_in_huge_pages
    monkeypatch.setattr(loading, "place_in_huge_pages", lambda model: placed.append(real(model)) or placed[-1])
    monkeypatch.setenv("JAMBA_LOCAL_HUGE_PAGES", "0")
    plain = Engine.from_pretrained(folder, progress=False, quantization=quantization)
    monkeypatch.setenv("JAMBA_LOCAL_HUGE_PAGES", "1")
    huge = Engine.from_pretrained(folder, progress=False, quantization=quantization)
    if not hasattr(loading.mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform: nothing is placed")
    tensors = list(huge.model.parameters()) + list(huge.model.buffers())
    assert placed[0] == 0 and placed[1] >= sum(t.numel() * t.element_size() for t in tensors) > 0
    ptrs = sorted(t.data_ptr() for t in tensors)
    assert ptrs[-1] - ptrs[0] < placed[1] and all(p % 64 == 0 for p in ptrs)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    assert huge.model.lm_head.weight is huge.model.model.embed_tokens.weight
    ids = torch.tensor([plain.encode(PROMPT)])
    torch.testing.assert_close(huge.prefill(ids, huge.new_cache()), plain.prefill(ids, plain.new_cache()), rtol=0, atol=0)
    assert huge.generate(PROMPT, max_new_tokens=8).token_ids == plain.generate(PROMPT, max_new_tokens=8).token_ids
    if quantization:
        again = Engine.from_pretrained(save_quantized(huge, tmp_path / "saved"), progress=False)
        assert again.generate(PROMPT, max_new_tokens=8).token_ids == plain.generate(PROMPT, max_new_tokens=8).token_ids


@pytest.mark.parametrize("values", [[1.0, 3.0, 3.0, 2.0], [1.0, float("nan"), 5.0, float("nan")], [float("-inf")] * 3,
                                    [float("inf"), 1.0, float("inf")], [0.5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick_is_torchs_argmax_on_ties_nan_and_inf(values, dtype):
    """`engine.sample` at temperature 0 takes numpy's argmax for CPU fp32 logits: the same index as torch's."""
    from jamba_core.engine import sample

    logits = torch.tensor(values, dtype=dtype)
    assert sample(logits, 0.0, 1.0, 0, None) == int(torch.argmax(logits))
    big = torch.randn(65536, generator=torch.Generator().manual_seed(len(values))).to(dtype)
    assert sample(big, 0.0, 1.0, 0, None) == int(torch.argmax(big))
    assert sample(torch._neg_view(big), 0.0, 1.0, 0, None) == int(torch.argmax(-big))  # numpy refuses the neg bit


def test_a_freed_tensor_in_huge_pages_gives_its_memory_back():
    """`loading.huge_page_empty`: each tensor's whole pages go back to the system when its storage is freed
    (quantizing a loaded model in memory kept every float weight resident while one tensor of the mapping
    lived); the others keep their values."""
    import gc
    import os

    from jamba_core import loading

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    made = loading.huge_page_empty([torch.empty(16 << 20), torch.empty(3, 5), torch.empty(16 << 20)])
    if made is None:
        pytest.skip("no MADV_HUGEPAGE on this platform")
    big, small, other = made
    made.clear()
    big.fill_(1.0), small.fill_(2.0), other.fill_(3.0)
    before = rss_mib()
    del big
    gc.collect()
    assert before - rss_mib() > 60  # 64 MiB given back
    # the others' values, read without a full-size temporary: `other == 3.0` made a 16 MiB one that malloc
    # could keep resident after a suite's earlier large frees (its mmap threshold rises), which once hid 13
    # MiB of the drop below
    assert torch.equal(small, torch.full((3, 5), 2.0)) and other.min().item() == other.max().item() == 3.0
    before = rss_mib()
    del small, other
    gc.collect()
    assert before - rss_mib() > 60


def test_place_in_huge_pages_leaves_tensors_that_view_one_another():
    """Two tensors of one storage (a buffer viewing a parameter) would each get storage of their own and
    lose the link: they keep torch's; the rest are placed."""
    from jamba_core import loading

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(4, 4))
    module.register_buffer("row", module.weight.data[1])
    module.other = torch.nn.Parameter(torch.zeros(3))
    placed = loading.place_in_huge_pages(module)
    if not hasattr(loading.mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform")
    assert placed == 64  # `other` only (12 bytes, one 64-byte line)
    module.weight.data[1] = 7.0
    assert bool((module.row == 7.0).all())


def test_a_model_that_has_generated_deep_copies_and_saves(tiny_checkpoint):
    """The layers' decode plans (a module object, ctypes arrays, a weakref) made ``copy.deepcopy`` and
    ``torch.save`` of the model fail after the first generation ("cannot pickle 'module' object")."""
    import copy
    import io

    engine = Engine.from_pretrained(tiny_checkpoint, progress=False)
    want = engine.generate(PROMPT, max_new_tokens=8).token_ids
    copied = copy.deepcopy(engine.model)
    torch.save(engine.model, io.BytesIO())
    engine.model = copied
    assert engine.generate(PROMPT, max_new_tokens=8).token_ids == want
