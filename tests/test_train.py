"""The training path: its scan (forward and gradients) against the plain recurrence, and its data."""

import copy
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jamba_core.train import data, scan


def _recurrence(x, delta, A, B, C, D, z):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t from zero, y = (C.h + D x) silu(z): step by step."""
    h = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    ys = []
    for t in range(x.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, t] * x[:, :, t, None]
        ys.append((h * C[:, None, t]).sum(-1))
    return (torch.stack(ys, -1) + x * D[:, None]) * F.silu(z)


@pytest.mark.parametrize("L,N", [(1, 16), (3, 16), (37, 16), (130, 16), (37, 20), (37, 33), (37, 64)])
def test_training_scan_and_its_gradients_match_the_recurrence(L, N):
    """N 20 and 33: a partial vector after full ones (4, 8 or 16 lanes a vector); 64: the most the kernels hold."""
    g = torch.Generator().manual_seed(L + N)
    b, d = 2, 24
    inputs = [torch.randn(b, d, L, generator=g), torch.rand(b, d, L, generator=g) * 0.8,
              -torch.exp(torch.randn(d, N, generator=g)), torch.randn(b, L, N, generator=g), torch.randn(b, L, N, generator=g),
              torch.randn(d, generator=g), torch.randn(b, d, L, generator=g)]
    inputs = [t.requires_grad_() for t in inputs]
    want = _recurrence(*inputs)
    got = scan.selective_scan(*inputs, torch.zeros(b, d, N))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    weight = torch.randn(want.shape, generator=g)
    for gw, gg in zip(torch.autograd.grad((want * weight).sum(), inputs), torch.autograd.grad((got * weight).sum(), inputs)):
        assert (gw - gg).abs().max() <= 1e-5 * gw.abs().max()  # fp32, both ways; measured ~3e-7


def test_training_scan_leaves_the_callers_denormals_alone():
    """The kernels flush denormals to zero while they run (a stalled backward, once) and restore the mode:
    left set on Python's thread, it made every later float operation of the process read subnormals as 0."""
    tiny = 5e-324  # the smallest subnormal double: 0 when the thread flushes denormals
    assert tiny * 1.0 != 0.0
    inputs = [torch.randn(1, 16, 9), torch.rand(1, 16, 9), -torch.ones(16, 4), torch.randn(1, 9, 4), torch.randn(1, 9, 4),
              torch.ones(16), torch.randn(1, 16, 9)]
    inputs[0].requires_grad_()
    scan.selective_scan(*inputs, torch.zeros(1, 16, 4)).sum().backward()
    assert tiny * 1.0 != 0.0


def test_training_scan_refuses_a_nonzero_state():
    with pytest.raises(ValueError, match="zero SSM state"):
        scan.selective_scan(torch.randn(1, 2, 3), torch.rand(1, 2, 3), -torch.ones(2, 4), torch.randn(1, 3, 4),
                            torch.randn(1, 3, 4), torch.ones(2), torch.randn(1, 2, 3), torch.ones(1, 2, 4))


def test_train_and_test_splits_share_no_tool_or_value_words(shared_dir):
    assert not set(data.words("train")) & set(data.words("test"))
    tool = data.tool_call(random.Random(1), "test")
    names = {t["function"]["name"] for t in tool.tools}
    train_words = set(data.words("train"))
    assert all(part not in train_words for name in names for part in name.split("_") if part not in data.VERBS)


def test_common_tools_never_take_the_demo_and_suite_names_and_keep_book_samples_fixed(shared_dir):
    names, values = set(), []
    for seed in range(400):
        conv = data.tool_call(random.Random(seed), "train", rounds=2, style="common")
        names |= {t["function"]["name"] for t in conv.tools}
        for m in conv.messages:
            if m.get("tool_calls"):
                call = m["tool_calls"][0]["function"]
                tool = next(t["function"] for t in conv.tools if t["function"]["name"] == call["name"])
                assert set(call["arguments"]) == set(tool["parameters"]["required"])
                values += list(call["arguments"].values())
    assert not names & data.HELD_OUT_TOOL_NAMES and len(names) > 300
    assert any(isinstance(v, int) and not isinstance(v, bool) and v < 10 for v in values)  # single digits
    assert any(isinstance(v, str) and any(ord(c) > 0x3000 for c in v) for v in values)  # other scripts
    # the evaluation's book-style samples draw from the rng as before: style is a keyword, not a draw
    assert data.tool_call(random.Random(7), "test").messages == data.tool_call(random.Random(7), "test", style="book").messages
    with pytest.raises(ValueError, match="style"):
        data.tool_call(random.Random(0), style="fancy")


def test_arithmetic_calls_say_the_operation_and_call_its_tool_with_both_numbers_in_order():
    for seed in range(50):
        conv = data.arithmetic_call(random.Random(seed), rounds=2)
        tools = {t["function"]["name"]: t["function"] for t in conv.tools}
        assert not set(tools) & data.HELD_OUT_TOOL_NAMES and 2 <= len(tools) <= 4
        for ask, call, result in zip(conv.messages[0::4], conv.messages[1::4], conv.messages[2::4]):
            fn = call["tool_calls"][0]["function"]
            op = next(op for op, (names, _) in data.ARITHMETIC.items() if fn["name"] in names)
            a, b = fn["arguments"].values()
            assert list(fn["arguments"]) == tools[fn["name"]]["parameters"]["required"]
            assert any(f"{a} {phrase} {b}" in ask["content"] for phrase in data.ARITHMETIC[op][1])
            if op == "multiply":
                assert result["content"] == str(a * b)


def test_schema_less_json_mode_names_every_key_in_the_request(shared_dir):
    for seed in range(30):
        conv = data.json_extraction(random.Random(seed), mode="object")
        record = json.loads(conv.messages[1]["content"])
        assert conv.response_format == {"type": "json_object"}
        assert all(f"'{k}'" in conv.messages[0]["content"] for k in record)
    with pytest.raises(ValueError, match="mode"):
        data.json_extraction(random.Random(0), mode="xml")


def test_only_assistant_turns_are_training_targets(tiny_engine, shared_dir):
    tok = tiny_engine.tokenizer
    conv = data.tool_call(random.Random(3))
    ids, mask = data.encode(tok, conv)
    assert len(ids) == len(mask)
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    call = conv.messages[-3]["tool_calls"][0]["function"]["name"]
    assert call in target and conv.messages[-1]["content"] in target
    assert target.count("<|eom|>") == 2  # the two assistant turns, each closed
    assert conv.messages[1 if conv.messages[0]["role"] == "system" else 0]["content"] not in target


@pytest.mark.parametrize("context", [0, 64, 512])
def test_recall_restates_each_asked_needle_in_order(tiny_engine, shared_dir, context):
    from jamba_core.eval.ruler import Haystack

    for seed in range(5):
        conv = data.recall(random.Random(seed), Haystack(tiny_engine.tokenizer), context=context)
        prompt, answer = conv.messages[0]["content"], conv.messages[1]["content"]
        question = prompt.rsplit("\n", 1)[1]
        pairs = re.findall(r"The special magic number for (\S+) is: (\d+)\.", answer)
        assert " ".join(f"The special magic number for {k} is: {v}." for k, v in pairs) == answer
        asked = re.findall(r"[a-z]+-[a-z]+", question)
        assert [k for k, _ in pairs] == asked and len(asked) >= 1
        for key, value in pairs:  # every answer is worded as its needle
            assert f"One of the special magic numbers for {key} is: {value}" in prompt


def test_repeat_answers_with_the_prompts_sequence_verbatim(shared_dir):
    for seed in range(20):
        conv = data.repeat(random.Random(seed))
        prompt, answer = conv.messages[0]["content"], conv.messages[1]["content"]
        assert prompt.endswith(answer) and 4 <= len(re.split(r",? ", answer)) <= 40
        assert data.repeat(random.Random(seed)).messages == conv.messages  # seeded


def test_spell_answers_with_the_listed_words_as_a_json_list(shared_dir):
    import json

    for seed in range(20):
        conv = data.spell(random.Random(seed))
        prompt, answer = conv.messages[0]["content"], conv.messages[1]["content"]
        items = json.loads(answer)
        assert isinstance(items, list) and 1 <= len(items) <= 10 and all(isinstance(w, str) and w for w in items)
        assert re.sub(r", |; | and ", "|", prompt).endswith("|".join(items))  # the same words, in order
        assert data.spell(random.Random(seed)).messages == conv.messages  # seeded


def test_curriculum_phases_cover_training_and_every_family_makes_batches(tiny_engine, shared_dir):
    from jamba_core.eval.ruler import Haystack
    from jamba_core.train import trainer

    ends = [p["until"] for p in trainer.CURRICULUM]
    assert ends == sorted(ends) and ends[-1] == 1.0
    FAMILIES = {f for p in trainer.CURRICULUM for f in p["mix"]}
    assert FAMILIES == {"repeat", "spell", "recall", "needle", "tool_call", "json"} == trainer.FAMILIES
    haystack, seen = Haystack(tiny_engine.tokenizer), set()
    for p in trainer.CURRICULUM:
        assert abs(sum(p["mix"].values()) - 1.0) < 1e-9
        assert ("needle" in p["mix"]) == bool(p["needle_lengths"])
    assert max(trainer.CURRICULUM[-1]["needle_lengths"]) == 2048  # the training lengths, up to 2K
    for step in range(200):
        progress = (step % 4) / 4 + 0.1
        ids, mask, real, family = trainer.batch(step, progress, 0, tiny_engine.tokenizer, haystack)
        assert family in trainer.phase(progress)["mix"]
        assert ids.shape == mask.shape == real.shape and mask.any() and not (mask & ~real).any()
        assert ids.numel() <= 3 * trainer.phase(progress)["tokens"] + 4096  # about the phase's batch size
        seen.add(family)
        if seen == FAMILIES:
            break
    assert seen == FAMILIES


def check_the_trainer_passes_on(option: str, value: float, bad: float, tokenizer, monkeypatch):
    """`trainer.batch` hands ``option=value`` to every `data.tool_call`; `trainer.train` refuses ``bad``."""
    from jamba_core.eval.ruler import Haystack
    from jamba_core.train import trainer

    seen, tool_call = [], data.tool_call
    monkeypatch.setattr(data, "tool_call", lambda *a, **kw: seen.append(kw[option]) or tool_call(*a, **kw))
    haystack = Haystack(tokenizer)
    for step in range(6):
        trainer.batch(step, 0.9, 1, tokenizer, haystack, {"tool_call": 1.0}, **{option: value})
    assert seen and set(seen) == {value}
    with pytest.raises(ValueError, match=option):
        trainer.train(Path("unused"), steps=1, **{option: bad})


def test_common_keys_sets_how_many_book_tool_parameters_have_frequent_names(shared_dir, tiny_engine, monkeypatch):
    """``common_keys`` (``--common-keys``): the share of book-word tools' parameters named by
    `data.PARAM_NAMES`, the rest by book words the call must copy; the default leaves the evaluation's
    samples as they were drawn; the trainer passes it to its batches and refuses one outside [0, 1]."""

    def share(p, seeds=range(300)):
        keys = [k for s in seeds for t in data.tool_call(random.Random(s), "test", common_keys=p).tools
                for k in t["function"]["parameters"]["properties"]]
        return sum(k in data.PARAM_NAMES for k in keys) / len(keys)

    assert share(1.0) == 1.0 and share(0.0) < 0.05  # a book word may happen to be a frequent key
    assert 0.5 < share(0.6) < 0.7 and 0.2 < share(0.3) < 0.4
    assert data.tool_call(random.Random(11), "test").tools == data.tool_call(random.Random(11), "test", common_keys=0.6).tools
    check_the_trainer_passes_on("common_keys", 0.25, 1.5, tiny_engine.tokenizer, monkeypatch)


def test_keyless_sets_how_many_one_argument_requests_leave_the_key_to_the_schema(shared_dir, tiny_engine, monkeypatch):
    """``keyless`` (``--keyless``): the share of one-argument requests that name no key ("Use the X tool on
    V."); the default leaves the evaluation's samples as they were drawn; the trainer passes it on and
    refuses one outside [0, 1]."""

    def share(p, seeds=range(400)):
        named = []
        for s in seeds:
            conv = data.tool_call(random.Random(s), "test", keyless=p)
            call, request = conv.messages[-3]["tool_calls"][0]["function"], conv.messages[-4]["content"]
            if len(call["arguments"]) == 1:
                named.append(next(iter(call["arguments"])) in request.replace(call["name"], ""))
        return 1 - sum(named) / len(named)

    assert share(0.0) < 0.05 and share(1.0) > 0.95  # a key may happen to be a word of the value
    assert 0.2 < share(0.3) < 0.4 and 0.6 < share(0.7) < 0.8
    assert data.tool_call(random.Random(11), "test").messages == data.tool_call(random.Random(11), "test", keyless=0.3).messages
    check_the_trainer_passes_on("keyless", 0.8, -0.1, tiny_engine.tokenizer, monkeypatch)


def test_shuffled_keys_lets_the_request_set_the_order_of_the_calls_keys(shared_dir, tiny_engine, monkeypatch):
    """``shuffled_keys`` (``--shuffled-keys``): the share of requests with two or more arguments that name
    them in a shuffled order, which the call keeps; the arguments stay the schema's; 0 (the default) draws
    nothing, so the evaluation's samples stay as drawn; the trainer passes it on and refuses one outside [0, 1]."""

    def calls(p, seeds=range(300)):
        for s in seeds:
            conv = data.tool_call(random.Random(s), "test", shuffled_keys=p)
            call, request = conv.messages[-3]["tool_calls"][0]["function"], conv.messages[-4]["content"]
            schema = next(t["function"] for t in conv.tools if t["function"]["name"] == call["name"])["parameters"]["properties"]
            if len(call["arguments"]) > 1:
                yield list(call["arguments"]), list(schema), request, call["arguments"]

    def named_in_order(request, args):  # one of `data._request`'s listings, in the call's order
        pairs = [(k, data._say(v)) for k, v in args.items()]
        return any(listing in request for listing in (", ".join(f"{k}={v}" for k, v in pairs), " and ".join(f"{k} {v}" for k, v in pairs),
                                                      ", ".join(f"{k} is {v}" for k, v in pairs), ", ".join(f"{k}: {v}" for k, v in pairs)))

    shuffled = list(calls(1.0))
    assert len(shuffled) > 100 and all(sorted(keys) == sorted(schema) and named_in_order(request, args) for keys, schema, request, args in shuffled)
    assert 0.4 < sum(keys != schema for keys, schema, _, _ in shuffled) / len(shuffled) < 0.85  # 2 keys: 1/2, 3 keys: 5/6
    assert all(keys == schema and named_in_order(request, args) for keys, schema, request, args in calls(0.0))
    assert data.tool_call(random.Random(11), "test").messages == data.tool_call(random.Random(11), "test", shuffled_keys=0.0).messages
    check_the_trainer_passes_on("shuffled_keys", 0.5, 1.5, tiny_engine.tokenizer, monkeypatch)


def test_integers_sets_how_many_book_tool_parameters_are_integers(shared_dir, tiny_engine, monkeypatch):
    """``integers`` (``--integers``): the share of book-word tools' parameters made integers before the usual
    draw of a type (a sixth of which is integer); 0 (the default) draws nothing, so the evaluation's samples
    stay as drawn; the trainer passes it on and refuses one outside [0, 1]."""

    def share(p, seeds=range(300)):
        kinds = [spec["type"] for s in seeds for t in data.tool_call(random.Random(s), "test", integers=p).tools
                 for spec in t["function"]["parameters"]["properties"].values()]
        return sum(kind == "integer" for kind in kinds) / len(kinds)

    assert share(1.0) == 1.0 and 0.1 < share(0.0) < 0.23 and 0.25 < share(0.2) < 0.42
    for s in range(20):  # integer arguments are whole numbers the request states
        conv = data.tool_call(random.Random(s), "test", integers=1.0)
        for call in conv.messages[-3]["tool_calls"]:
            assert all(isinstance(v, int) and not isinstance(v, bool) and str(v) in conv.messages[-4]["content"]
                       for v in call["function"]["arguments"].values())
    assert data.tool_call(random.Random(11), "test").messages == data.tool_call(random.Random(11), "test", integers=0.0).messages
    assert data.tool_call(random.Random(11), "test").tools == data.tool_call(random.Random(11), "test", integers=0.0).tools
    check_the_trainer_passes_on("integers", 0.2, -0.5, tiny_engine.tokenizer, monkeypatch)


def test_lookup_drills_read_every_key_from_the_schema_of_the_tool_named(shared_dir, tiny_engine, monkeypatch):
    """`data.lookup_call`: 2-4 one-parameter book-word tools; every request names a bound tool and its value
    but no key, and the call's one key is that tool's property. ``lookup`` (``--lookup``): the share of
    tool-call conversations `trainer.batch` draws as such drills; 0 (the default) draws nothing, so batches
    are as before; `train` refuses one outside [0, 1]."""
    from jamba_core.eval.ruler import Haystack
    from jamba_core.train import trainer

    for s in range(40):
        conv = data.lookup_call(random.Random(s), "test", rounds=3)
        tools = {t["function"]["name"]: t["function"]["parameters"] for t in conv.tools}
        assert 2 <= len(conv.tools) <= 4 and all(len(p["properties"]) == 1 == len(p["required"]) for p in tools.values())
        users = [m["content"] for m in conv.messages if m["role"] == "user"]
        calls = [m["tool_calls"][0]["function"] for m in conv.messages if m.get("tool_calls")]
        assert len(users) == len(calls) == 3
        for user, call in zip(users, calls):
            (key, value), = call["arguments"].items()
            assert key == next(iter(tools[call["name"]]["properties"]))
            assert call["name"] in user and data._say(value) in user
            assert user.startswith(("What is the value of", "Use the ")) and " with " not in user
    haystack = Haystack(tiny_engine.tokenizer)
    for step in range(4):  # 0 draws nothing: the batches are the default's
        same = trainer.batch(step, 0.9, 1, tiny_engine.tokenizer, haystack, {"tool_call": 1.0})
        assert all(torch.equal(a, b) for a, b in zip(same[:3], trainer.batch(step, 0.9, 1, tiny_engine.tokenizer, haystack,
                                                                               {"tool_call": 1.0}, lookup=0.0)[:3]))
    drills, lookup_call = [], data.lookup_call
    monkeypatch.setattr(data, "lookup_call", lambda *a, **kw: drills.append(1) or lookup_call(*a, **kw))
    monkeypatch.setattr(data, "tool_call", lambda *a, **kw: pytest.fail("lookup=1 draws only drills"))
    trainer.batch(0, 0.9, 1, tiny_engine.tokenizer, haystack, {"tool_call": 1.0}, lookup=1.0)
    assert drills
    with pytest.raises(ValueError, match="lookup"):
        trainer.train(Path("unused"), steps=1, lookup=1.5)


def test_needle_lengths_replace_the_curriculums_and_are_checked(tiny_engine, shared_dir):
    """``needle_lengths`` (``--needle-lengths 2048,4096,8192``): needle batches take one of them in every
    phase; none under 256 tokens (RULER's fixed text would not fit)."""
    from jamba_core.eval.ruler import Haystack
    from jamba_core.train import trainer

    haystack = Haystack(tiny_engine.tokenizer)
    for lengths in ((384,), (768,)):
        ids, _, real, family = trainer.batch(4, 0.9, 2, tiny_engine.tokenizer, haystack, {"needle": 1.0}, needle_lengths=lengths)
        assert family == "needle" and lengths[0] - 64 <= int(real.sum(1).max()) <= lengths[0] + 64
        assert ids.shape[0] == 2048 // lengths[0]  # the phase's tokens per batch, as many needles as fit
    for bad in ((), (128, 4096)):
        with pytest.raises(ValueError, match="needle_lengths"):
            trainer.train(Path("unused"), steps=1, needle_lengths=bad)


def test_a_mix_replaces_the_phases_and_is_checked(tiny_engine, shared_dir):
    """``mix`` (``--mix tool_call=0.5,spell=0.5``): every batch draws from it, whatever the phase; an
    unknown family, a negative or an all-zero mix is refused before any training."""
    import argparse

    from jamba_core.eval.ruler import Haystack
    from jamba_core.train import trainer

    haystack = Haystack(tiny_engine.tokenizer)
    families = {trainer.batch(step, 0.1, 3, tiny_engine.tokenizer, haystack, {"spell": 1.0, "json": 1.0})[3] for step in range(12)}
    assert families == {"spell", "json"}  # the first phase has no spell task
    assert trainer._parse_mix("tool_call=0.45, spell=0.3") == {"tool_call": 0.45, "spell": 0.3}
    for bad in ("tool_call=0.5,poetry=0.5", "tool_call", "tool_call=x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="famil"):
            trainer._parse_mix(bad)
    for bad in ({"poetry": 1.0}, {"spell": -1.0, "json": 2.0}, {"spell": 0.0}, {}):
        with pytest.raises(ValueError, match="mix"):
            trainer.train(Path("unused"), steps=1, mix=bad)


def test_a_continued_run_can_start_later_in_the_curriculum(tmp_path, shared_dir):
    from jamba_core.testing import trained_checkpoint
    from jamba_core.train import trainer

    TRAINED_CHECKPOINT = trained_checkpoint(missing_ok=True)
    if TRAINED_CHECKPOINT is None:
        pytest.skip("no trained checkpoint in this tree")
    with pytest.raises(ValueError, match="curriculum_from"):
        trainer.train(tmp_path / "x", steps=1, init=TRAINED_CHECKPOINT, curriculum_from=1.0)
    from jamba_core import ops

    before = ops.active()
    info = trainer.train(tmp_path / "out", steps=3, seed=5, init=TRAINED_CHECKPOINT, curriculum_from=0.8, log_every=100)
    assert ops.active() == before  # the training scan's backend is the loop's only (it left it set once)
    last = trainer.CURRICULUM[-1]["mix"]
    assert info["curriculum_from"] == 0.8 and len(info["history"]) == 3
    assert all(h["family"] in last for h in info["history"])
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "loss.png").is_file()
    # the runs that made the checkpoint come along, oldest first, with their per-step losses (the plot shows them)
    prior = json.loads((TRAINED_CHECKPOINT / "training.json").read_text())
    assert info["earlier_runs"] == prior.pop("earlier_runs", []) + [prior]
    assert all(run["history"] for run in info["earlier_runs"])


def test_a_run_can_stay_within_one_phase_of_the_curriculum(tmp_path, shared_dir, monkeypatch):
    """curriculum_until: the data end where asked (here within the copying phase), so a run can repeat a
    phase its checkpoint has not learned; an empty or reversed range is refused."""
    from jamba_core.testing import trained_checkpoint
    from jamba_core.train import trainer

    TRAINED_CHECKPOINT = trained_checkpoint(missing_ok=True)
    if TRAINED_CHECKPOINT is None:
        pytest.skip("no trained checkpoint in this tree")
    for until in (0.3, 1.5):
        with pytest.raises(ValueError, match="curriculum_until"):
            trainer.train(tmp_path / "x", steps=1, init=TRAINED_CHECKPOINT, curriculum_from=0.3, curriculum_until=until)
    positions = []  # the curriculum progress each step's batch is drawn at
    batch = trainer.batch
    monkeypatch.setattr(trainer, "batch", lambda step, progress, *rest: positions.append(progress) or batch(step, progress, *rest))
    first = trainer.CURRICULUM[0]["until"]  # the copying phase alone
    info = trainer.train(tmp_path / "out", steps=4, seed=3, init=TRAINED_CHECKPOINT, curriculum_until=first, log_every=100)
    assert info["curriculum_until"] == first and positions == pytest.approx([0.0, first / 4, first / 2, 3 * first / 4])
    assert all(h["family"] in trainer.CURRICULUM[0]["mix"] for h in info["history"])


def test_needles_fall_back_to_a_single_needle_where_a_task_cannot_fit(shared_dir):
    """With spaces isolated, variable tracking's fixed text does not fit 256 tokens: the curriculum's
    shortest needles then use the single needle instead of failing the run (a 35-minute run once died so)."""
    from jamba_core.eval import ruler
    from jamba_core.tokenizer import train_tokenizer

    haystack = ruler.Haystack(train_tokenizer(4096, spaces="isolated"))
    with pytest.raises(ValueError, match="could not fit"):
        ruler.make_sample("variable_tracking", 256, 50.0, 1, haystack, split="train")
    kinds = {data.needle(random.Random(i), haystack, 256).task for i in range(60)}
    assert "niah_single" in kinds and "variable_tracking" not in kinds


def test_needles_come_in_the_forms_applications_send_with_the_same_text_question_and_answer(tiny_engine, shared_dir):
    """Every `data.NEEDLE_STYLES` form holds RULER's text and question and answers RULER's target: the
    user message (ruler), the system message (a LangChain prompt), the template's documents, LlamaIndex's
    chat text-QA prompt; the rendered prompt holds the text once; an unknown style is refused. The
    documentation haystack leaves out the demo's modules and keeps the book's key words."""
    from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT

    from jamba_core.demo import STDLIB_MODULES
    from jamba_core.eval import ruler

    haystack = ruler.Haystack(tiny_engine.tokenizer)
    ref = data.needle(random.Random(4), haystack, 512, style="ruler")
    instruction, rest = ref.messages[0]["content"].split("\n", 1)
    text, question = rest.rsplit("\n", 1)
    for style in data.NEEDLE_STYLES:
        conv = data.needle(random.Random(4), haystack, 512, style=style)
        assert conv.task == ref.task and conv.messages[-1] == ref.messages[-1]  # the same sample and answer
        rendered = data.render_chat(tiny_engine.tokenizer, conv.messages[:-1], documents=conv.documents)
        assert rendered.count(text) == 1 and question in rendered
        assert (conv.documents is not None) == (style == "documents")
        if style == "system":
            assert conv.messages[0]["role"] == "system" and conv.messages[0]["content"].endswith(text)
        if style == "llamaindex":
            assert conv.messages[0]["content"] == CHAT_TEXT_QA_PROMPT.message_templates[0].content
        ids, mask = data.encode(tiny_engine.tokenizer, conv)
        assert tiny_engine.tokenizer.decode([t for t, m in zip(ids, mask) if m]).strip() == ref.messages[-1]["content"] + "<|eom|>"
    with pytest.raises(ValueError, match="style"):
        data.needle(random.Random(4), haystack, 512, style="poem")
    docs = data.docs_haystack(tiny_engine.tokenizer, haystack)
    assert not set(data.DOCS_MODULES) & set(STDLIB_MODULES) and docs.words == haystack.words and len(docs.ids) > 50_000


@pytest.mark.parametrize("stop", [RuntimeError("a broken batch"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_or_interrupted_run_saves_what_was_trained(tmp_path, monkeypatch, shared_dir, stop):
    """A failed step: the weights so far are saved, then the error propagates; Ctrl-C: saved, and the run
    returns as a time budget's end would."""
    from jamba_core.tokenizer import train_tokenizer
    from jamba_core.train import trainer

    real_batch = trainer.batch

    def batch(step, *args):
        if step == 2:
            raise stop
        return real_batch(step, *args)

    monkeypatch.setattr(trainer, "batch", batch)
    monkeypatch.setattr(trainer, "make_tokenizer", lambda seed, spaces: train_tokenizer(trainer.CONFIG["vocab_size"], spaces=spaces))
    monkeypatch.setattr(trainer, "CONFIG", dict(trainer.CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                 num_key_value_heads=1, num_hidden_layers=3))
    if isinstance(stop, KeyboardInterrupt):
        assert trainer.train(tmp_path / "out", steps=5, seed=1, log_every=100)["interrupted"]
    else:
        with pytest.raises(RuntimeError, match="a broken batch"):
            trainer.train(tmp_path / "out", steps=5, seed=1, log_every=100)
    info = json.loads((tmp_path / "out" / "training.json").read_text())
    assert info["steps_run"] == 2
    assert info["error"] == (None if isinstance(stop, KeyboardInterrupt) else "RuntimeError: a broken batch")
    assert info["interrupted"] == isinstance(stop, KeyboardInterrupt)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_the_cli_saves_on_sigterm_and_sigint_even_in_the_background(tmp_path, shared_dir, signame):
    """`python -m jamba_core.train` started as a shell starts a background job (SIGINT ignored): kill -TERM
    or kill -INT stops it with the weights saved and training.json marked interrupted."""
    import signal
    import subprocess
    import sys

    script = (
        "import sys; from jamba_core.train import trainer\n"
        "from jamba_core.tokenizer import train_tokenizer\n"
        "trainer.make_tokenizer = lambda seed, spaces: train_tokenizer(trainer.CONFIG['vocab_size'], spaces=spaces)\n"
        "trainer.CONFIG = dict(trainer.CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=2,"
        " num_key_value_heads=1, num_hidden_layers=3)\n"
        f"sys.exit(trainer.main(['--out', {str(tmp_path / 'out')!r}, '--steps', '100000']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in proc.stdout:  # the first logged step: training has started
            if line.startswith("step 0/"):
                break
        proc.send_signal(getattr(signal, signame))
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:]
    info = json.loads((tmp_path / "out" / "training.json").read_text())
    assert info["interrupted"] and info["error"] is None and 1 <= info["steps_run"] < 100000
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_vocabulary_transfer_moves_each_token_to_its_spelling_in_the_old_vocabulary(shared_dir):
    """A model moved from an attached-space tokenizer to an isolated-space one: a word's new token takes
    the old token of that word after a space (its prose form), a text the old vocabulary lacks takes the
    mean of the old tokens spelling it, special tokens keep their rows, the lone space takes the old space's
    embedding and the mean output row of the old space-led tokens; no other weight changes."""
    from jamba_core.model import JambaForCausalLM
    from jamba_core.testing import make_config, random_weights
    from jamba_core.tokenizer import train_tokenizer
    from jamba_core.train import trainer

    old, new = train_tokenizer(2000), train_tokenizer(2000, spaces="isolated")
    assert (trainer.tokenizer_spaces(old), trainer.tokenizer_spaces(new)) == ("attached", "isolated")
    model = JambaForCausalLM(make_config("tiny", vocab_size=2048))
    model.load_state_dict(random_weights(model.config, seed=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.transfer_vocabulary(model, old, new)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in ("model.embed_tokens.weight", "lm_head.weight"))
    E, W = before["model.embed_tokens.weight"], before["lm_head.weight"]
    E2, W2 = after["model.embed_tokens.weight"], after["lm_head.weight"]
    ov, nv = old.get_vocab(), new.get_vocab()
    word = next(t for t in ("whale", "ship", "the") if t in nv and "\u0120" + t in ov)
    assert torch.equal(E2[nv[word]], E[ov["\u0120" + word]]) and torch.equal(W2[nv[word]], W[ov["\u0120" + word]])
    for special in ("<|startoftext|>", "<|endoftext|>", "<|eom|>"):
        assert nv[special] == ov[special] and torch.equal(E2[nv[special]], E[ov[special]])
    spaced = [i for t, i in ov.items() if t.startswith("\u0120")]
    assert torch.equal(E2[nv["\u0120"]], E[ov["\u0120"]]) and torch.allclose(W2[nv["\u0120"]], W[spaced].mean(0))
    absent = next(t for t in nv if t not in ov and "\u0120" + t not in ov and t not in new.all_special_tokens)
    pieces = old(new.convert_tokens_to_string([absent]), add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1 and torch.allclose(E2[nv[absent]], E[pieces].mean(0))
    small = JambaForCausalLM(make_config("tiny", vocab_size=1024))
    with pytest.raises(ValueError, match="tokenizers of"):
        trainer.transfer_vocabulary(small, old, new)


def test_a_continued_run_can_move_to_the_other_word_split(tmp_path, shared_dir):
    """--init with the other --spaces: the run trains on a new tokenizer of that split and saves it."""
    from jamba_core.testing import trained_checkpoint
    from jamba_core.tokenizer import load_tokenizer
    from jamba_core.train import trainer

    TRAINED_CHECKPOINT = trained_checkpoint(missing_ok=True)
    if TRAINED_CHECKPOINT is None:
        pytest.skip("no trained checkpoint in this tree")
    own = trainer.tokenizer_spaces(load_tokenizer(TRAINED_CHECKPOINT))
    other = {"attached": "isolated", "isolated": "attached"}[own]
    info = trainer.train(tmp_path / "out", steps=2, seed=4, init=TRAINED_CHECKPOINT, spaces=other, curriculum_from=0.8,
                         log_every=100)
    assert info["spaces"] == other == trainer.tokenizer_spaces(load_tokenizer(tmp_path / "out"))
    assert len(info["history"]) == 2 and all(math.isfinite(h["loss"]) for h in info["history"])


def test_bad_run_settings_are_refused_before_anything_is_written(tmp_path, capsys):
    """--minutes 0 raised ZeroDivisionError in the loop, --steps 0 saved random weights at exit status 0,
    NaN or negative --mix weights failed at step 0: each wrote a checkpoint first."""
    from jamba_core.train import trainer

    out = tmp_path / "out"
    for args in (["--minutes", "0"], ["--minutes", "-1"], ["--steps", "0"], ["--steps", "-2"], ["--lr", "nan"],
                 ["--save-every", "-1"], ["--mix", "tool_call=nan"], ["--mix", "tool_call=-1,json=1"], ["--mix", "json=inf"]):
        with pytest.raises(SystemExit) as stop:
            trainer.main(["--out", str(out), *args])
        assert stop.value.code == 2 and f"argument {args[0]}" in capsys.readouterr().err
    for kwargs in (dict(steps=0), dict(steps=3, minutes=0.0), dict(steps=3, lr=float("inf")), dict(steps=3, save_every=-5),
                   dict(steps=3, mix={"json": float("nan")})):
        with pytest.raises(ValueError, match="steps|minutes|lr|save_every|mix"):
            trainer.train(out, **kwargs)
    for value in ("0", "1", "1.5", "nan", "half"):
        with pytest.raises(SystemExit) as stop:
            trainer.main(["--out", str(out), "--isolate-at", value])
        assert stop.value.code == 2 and "argument --isolate-at" in capsys.readouterr().err
    for kwargs in (dict(isolate_at=0.0), dict(isolate_at=1.0), dict(isolate_at=0.5, spaces="isolated")):
        with pytest.raises(ValueError, match="isolate_at"):
            trainer.train(out, steps=3, **kwargs)
    assert not out.exists()


def test_a_run_moves_onto_isolated_spaces_at_isolate_at(tmp_path, monkeypatch, shared_dir, capsys):
    """From scratch on spaces attached; at ``isolate_at`` the weights move to the isolated tokenizer
    (`transfer_vocabulary`), the later batches are encoded with it and it is what the checkpoint saves."""
    from jamba_core.tokenizer import load_tokenizer, train_tokenizer
    from jamba_core.train import trainer

    seen = []
    real_batch = trainer.batch

    def batch(step, progress, seed, tokenizer, *args):
        seen.append(trainer.tokenizer_spaces(tokenizer))
        return real_batch(step, progress, seed, tokenizer, *args)

    monkeypatch.setattr(trainer, "batch", batch)
    monkeypatch.setattr(trainer, "make_tokenizer", lambda seed, spaces: train_tokenizer(trainer.CONFIG["vocab_size"], spaces=spaces))
    monkeypatch.setattr(trainer, "CONFIG", dict(trainer.CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                 num_key_value_heads=1, num_hidden_layers=3))
    info = trainer.train(tmp_path / "out", steps=4, seed=1, log_every=100, isolate_at=0.5, save_every=0)
    assert seen == ["attached", "attached", "isolated", "isolated"]
    assert "step 2: moved onto isolated spaces" in capsys.readouterr().out
    assert info["spaces"] == "isolated" == trainer.tokenizer_spaces(load_tokenizer(tmp_path / "out"))
    assert info["isolate_at"] == 0.5 and all(math.isfinite(h["loss"]) for h in info["history"])


def test_a_mix_with_needles_works_in_the_phases_that_have_none(tiny_engine, shared_dir):
    """`--mix needle=1` on a run from scratch failed at its first batch (the copying phases list no needle
    lengths): those phases take the first lengths the curriculum gives."""
    from jamba_core.eval.ruler import Haystack
    from jamba_core.train import trainer

    first = next(p["needle_lengths"] for p in trainer.CURRICULUM if p["needle_lengths"])
    ids, mask, real, family = trainer.batch(0, 0.05, 1, tiny_engine.tokenizer, Haystack(tiny_engine.tokenizer), {"needle": 1.0})
    assert family == "needle" and ids.shape[1] <= max(first) + 64


def test_an_out_folder_holding_a_checkpoint_is_kept_unless_asked(tmp_path, monkeypatch, shared_dir, capsys):
    """`--out` (default: the committed checkpoint) was overwritten without a word, also by a run that
    failed at step 0; now only --init itself (continued in place) or --overwrite replaces it. A quantized
    --init is refused (its int8 layers would not train), and training.json records the model's own sizes."""
    from jamba_core import Engine
    from jamba_core.quant import save_quantized
    from jamba_core.testing import make_checkpoint
    from jamba_core.train import trainer

    held = make_checkpoint(tmp_path / "held", preset="tiny")
    before = (held / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        trainer.train(held, steps=1)
    with pytest.raises(SystemExit):
        trainer.main(["--out", str(held), "--steps", "1"])
    assert "--overwrite" in capsys.readouterr().err and (held / "model.safetensors").read_bytes() == before
    quantized = save_quantized(Engine.from_pretrained(held, quantization="int8", progress=False), tmp_path / "int8")
    with pytest.raises(ValueError, match="saved quantized"):
        trainer.train(tmp_path / "new", steps=1, init=quantized)
    info = trainer.train(held, steps=1, init=held, log_every=100)  # continued in place
    assert info["config"]["hidden_size"] == 64 != trainer.CONFIG["hidden_size"]  # make_checkpoint's tiny, not CONFIG
    assert (held / "model.safetensors").read_bytes() != before


def test_the_documentation_haystack_is_the_same_in_every_process(shared_dir):
    """pydoc renders default values with their memory address (`<function copy2 at 0x7f...>`): the
    documentation needles, and with them a seeded run's weights, differed from process to process."""
    import subprocess
    import sys

    code = ("import hashlib; from jamba_core.eval.ruler import Haystack; from jamba_core.tokenizer import train_tokenizer; "
            "from jamba_core.train import data; t = train_tokenizer(4096); h = data.docs_haystack(t, Haystack(t)); "
            "print(hashlib.sha256(str(h.ids).encode()).hexdigest(), ' at 0x' in t.decode(h.ids))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(runs) == 1 and runs.pop().split()[1] == "False"


def test_the_learning_rate_holds_its_peak_through_the_copying_phase_then_decays_to_a_tenth():
    from jamba_core.train import trainer

    assert trainer.LR_HOLD >= trainer.CURRICULUM[0]["until"]  # the copying circuit forms at the peak rate
    for p in (0.0, 0.1, trainer.LR_HOLD):
        assert trainer.lr_scale(p) == pytest.approx(1.0)
    points = [trainer.LR_HOLD + (1 - trainer.LR_HOLD) * i / 20 for i in range(21)]
    values = [trainer.lr_scale(p) for p in points]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.1)
    assert trainer.lr_scale((1 + trainer.LR_HOLD) / 2) == pytest.approx(0.55)


def test_a_run_with_tied_embeddings_saves_and_serves_them_as_the_hub_does(tmp_path, monkeypatch, shared_dir):
    """``tie_embeddings``: the output layer is the input embedding through training (and the move onto
    isolated spaces); the checkpoint says ``tie_word_embeddings``, saves no ``lm_head.weight``, and both our
    loader and transformers' serve it with the embedding as the output layer, with the same logits."""
    from safetensors import safe_open
    from transformers import JambaForCausalLM as Reference

    from jamba_core import Engine
    from jamba_core.tokenizer import train_tokenizer
    from jamba_core.train import trainer

    monkeypatch.setattr(trainer, "make_tokenizer", lambda seed, spaces: train_tokenizer(trainer.CONFIG["vocab_size"], spaces=spaces))
    monkeypatch.setattr(trainer, "CONFIG", dict(trainer.CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                 num_key_value_heads=1, num_hidden_layers=3))
    out = tmp_path / "out"
    info = trainer.train(out, steps=4, seed=2, log_every=100, isolate_at=0.5, save_every=0, tie_embeddings=True)
    assert info["tie_word_embeddings"] and all(math.isfinite(h["loss"]) for h in info["history"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    engine = Engine.from_pretrained(out, progress=False)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    assert torch.equal(engine.model.lm_head.weight, embedding)
    ids = torch.tensor([[1, 40, 41, 300, 7, 9]])
    reference = Reference.from_pretrained(out).eval()
    with torch.no_grad():
        ours, theirs = engine.model(ids).float(), reference(ids).logits.float()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), (ours - theirs).abs().max()
    with pytest.raises(ValueError, match="tie_embeddings"):
        trainer.train(tmp_path / "x", steps=1, init=out, tie_embeddings=True)


def test_init_seed_sets_the_initial_weights_alone_and_seed_the_tokenizer_and_data(tmp_path, monkeypatch, shared_dir):
    """``init_seed``: the initial weights are `random_weights`' for that seed; the tokenizer and every
    batch still follow ``seed`` (so one run's data can be tried from another run's start). A continued run
    has no initial weights to draw and refuses it."""
    from jamba_core.testing import random_weights
    from jamba_core.tokenizer import train_tokenizer
    from jamba_core.train import trainer

    tokenizer_seeds, batch_seeds, initial = [], [], {}
    monkeypatch.setattr(trainer, "make_tokenizer", lambda seed, spaces: tokenizer_seeds.append(seed)
                        or train_tokenizer(trainer.CONFIG["vocab_size"], spaces=spaces))
    monkeypatch.setattr(trainer, "CONFIG", dict(trainer.CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                 num_key_value_heads=1, num_hidden_layers=3))
    batch = trainer.batch
    monkeypatch.setattr(trainer, "batch", lambda step, progress, seed, *rest, **kw: batch_seeds.append(seed) or batch(step, progress, seed, *rest, **kw))
    monkeypatch.setattr(trainer, "random_weights", lambda config, seed: initial.setdefault(seed, random_weights(config, seed)))
    info = trainer.train(tmp_path / "out", steps=2, seed=3, init_seed=5, log_every=100, save_every=0)
    assert info["seed"] == 3 and info["init_seed"] == 5 and list(initial) == [5]
    assert set(tokenizer_seeds) == {3} and batch_seeds == [3, 3]
    assert not torch.equal(random_weights(trainer.make_config("tiny", **trainer.CONFIG), 3)["model.embed_tokens.weight"],
                           initial[5]["model.embed_tokens.weight"])
    assert trainer.train(tmp_path / "plain", steps=1, seed=3, log_every=100, save_every=0)["init_seed"] == 3
    with pytest.raises(ValueError, match="init_seed"):
        trainer.train(tmp_path / "x", steps=1, init=tmp_path / "out", init_seed=5)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original"])
def test_batched_muon_makes_torchs_muon_updates(nesterov, adjust_lr_fn):
    """`trainer.BatchedMuon` (Newton-Schulz batched over matrices of one shape, transposes grouped with
    them) moves every matrix as `torch.optim.Muon` does, over several steps on fresh random gradients, with
    momentum and a weight decay as large as the update; a matrix without a gradient stays put and has no
    state. Bound: each step's change within 6e-2 relative (Frobenius) of torch's. The NS iterations run in
    bf16 in both, where rounding alone moves torch's own result 1.2-1.8% (3.3% for a 4 x 192 matrix) when
    its gradient is perturbed by 2^-9 relative; batched products may round otherwise on another CPU (on the
    Intel Xeon with AMX the two were bitwise equal)."""
    from jamba_core.train import trainer

    gen = torch.Generator().manual_seed(7)
    shapes = [(384, 192), (192, 384), (768, 192), (44, 384), (384, 12), (4, 192), (192, 192), (384, 192), (5, 3)]
    ours = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
    theirs = [p.clone() for p in ours]
    idle = torch.randn(8, 8, generator=gen)
    kwargs = dict(lr=3e-3, weight_decay=5.0, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    batched, plain = trainer.BatchedMuon(ours + [idle], **kwargs), torch.optim.Muon(theirs, **kwargs)
    idle_before = idle.clone()
    for _ in range(3):
        before = [p.clone() for p in theirs]
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        assert batched.step(closure=lambda: 1.5) == 1.5
        plain.step()
        for a, b, p0 in zip(ours, theirs, before):
            assert torch.linalg.norm((a - p0) - (b - p0)) <= 6e-2 * torch.linalg.norm(b - p0)
        for a, b in zip(ours, theirs):  # the next step starts from the same weights and momentum
            a.data.copy_(b)
            batched.state[a]["momentum_buffer"].copy_(plain.state[b]["momentum_buffer"])
    assert torch.equal(idle, idle_before) and idle not in batched.state
    with pytest.raises(ValueError, match="2D"):
        trainer.BatchedMuon([torch.zeros(3)], lr=1e-3)


@pytest.mark.parametrize("tied", [False, True])
def test_muon_takes_the_decoder_layers_projection_matrices_and_adamw_the_rest(tied):
    """`optimizers`: every parameter in exactly one optimizer; "muon" holds the decoder layers' linear
    weights (2-D), AdamW the embedding, the output layer, norms, ``A_log``, ``D``, the convolutions and
    biases. One Muon step from a zero momentum moves a matrix by a near-orthogonal update whose RMS is
    about 0.2 x the learning rate (AdamW's scale: the same learning rate carries over)."""
    from jamba_core.model import JambaForCausalLM
    from jamba_core.train import trainer

    torch.manual_seed(0)
    model = JambaForCausalLM(trainer.make_config("tiny", **trainer.CONFIG, tie_word_embeddings=tied))
    params = dict(model.named_parameters())
    adamw_only = trainer.optimizers(model, 1e-3, "adamw")
    assert len(adamw_only) == 1 and isinstance(adamw_only[0], torch.optim.AdamW)
    assert sorted(id(p) for g in adamw_only[0].param_groups for p in g["params"]) == sorted(id(p) for p in params.values())
    adamw, muon = trainer.optimizers(model, 1e-3, "muon")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    held = {id(p): type(o).__name__ for o in (adamw, muon) for g in o.param_groups for p in g["params"]}
    assert len(held) == len(params) == sum(len(g["params"]) for o in (adamw, muon) for g in o.param_groups)
    for name, p in params.items():
        in_layers = name.startswith("model.layers.") and name.endswith(".weight") and p.dim() == 2 and "A_log" not in name
        assert held[id(p)] == ("BatchedMuon" if in_layers else "AdamW"), name
    assert held[id(model.lm_head.weight)] == held[id(model.model.embed_tokens.weight)] == "AdamW"
    assert sum(h == "BatchedMuon" for h in held.values()) == 72  # per layer: Mamba 4 or attention 4, MLP 3 or router + 4 x 3 experts
    w = model.model.layers[1].feed_forward.experts[0].gate_proj.weight  # (384, 192)
    before = w.detach().clone()
    for p in params.values():
        p.grad = torch.randn_like(p)
    lr = 1e-3
    for group in muon.param_groups:
        group["weight_decay"] = 0.0
    muon.step()
    step = (w.detach() - before) / lr
    assert 0.12 < float(step.pow(2).mean().sqrt()) < 0.3
    # torch's 5 quintic Newton-Schulz steps leave the singular values in about (0.5, 1.5), not at 1
    singular = torch.linalg.svdvals(step / (0.2 * math.sqrt(max(w.shape))))
    assert 0.3 < float(singular.min()) and float(singular.max()) < 1.6
    with pytest.raises(ValueError, match="optimizer"):
        trainer.optimizers(model, 1e-3, "sgd")
    # ns_steps reaches every Muon group; one step leaves the update far from orthogonal (its singular values
    # spread as the gradient's), five bring them into the band above
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="ns_steps"):
            trainer.optimizers(model, 1e-3, "muon", ns_steps=bad)
    spreads = {}
    for ns in (1, 5):
        _, muon = trainer.optimizers(model, 1e-3, "muon", ns_steps=ns)
        assert all(g["ns_steps"] == ns for g in muon.param_groups)
        for group in muon.param_groups:
            group["weight_decay"] = 0.0
        w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * torch.logspace(0, -2, w.shape[1])
        before = w.detach().clone()
        muon.step()
        singular = torch.linalg.svdvals(w.detach() - before)
        spreads[ns] = float(singular.max() / singular.min())
    assert spreads[5] < 3 < 10 < spreads[1]


def test_a_run_trains_with_muon_and_shuffled_keys_by_default_and_says_so(tmp_path, monkeypatch, shared_dir):
    """The defaults of `train` and of the command line are the hour's recipe: Muon and half the multi-argument
    requests in a shuffled key order (README, "Muon"); training.json records both."""
    from jamba_core.tokenizer import train_tokenizer
    from jamba_core.train import trainer

    monkeypatch.setattr(trainer, "make_tokenizer", lambda seed, spaces: train_tokenizer(trainer.CONFIG["vocab_size"], spaces=spaces))
    monkeypatch.setattr(trainer, "CONFIG", dict(trainer.CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                 num_key_value_heads=1, num_hidden_layers=3))
    info = trainer.train(tmp_path / "out", steps=3, seed=1, log_every=100, save_every=0, isolate_at=0.5, tie_embeddings=True)
    assert info["optimizer"] == "muon" and info["shuffled_keys"] == trainer.SHUFFLED_KEYS == 0.5 and len(info["history"]) == 3
    assert all(math.isfinite(h["loss"]) for h in info["history"])
    saved = json.loads((tmp_path / "out" / "training.json").read_text())
    assert saved["optimizer"] == "muon" and saved["shuffled_keys"] == 0.5 and saved["lookup"] == trainer.LOOKUP
    assert saved["ns_steps"] == trainer.NS_STEPS == 5
    with pytest.raises(ValueError, match="optimizer"):
        trainer.train(tmp_path / "x", steps=1, optimizer="sgd")
    with pytest.raises(ValueError, match="ns_steps"):
        trainer.train(tmp_path / "x", steps=1, ns_steps=0)
    assert not (tmp_path / "x").exists()
    passed = {}
    monkeypatch.setattr(trainer, "_stop_on_signals", lambda: None)
    monkeypatch.setattr(trainer, "train", lambda *a, **kw: passed.update(kw) or {"parameters": 1, "steps_run": 1, "train_seconds": 1.0})
    assert trainer.main(["--out", str(tmp_path / "cli"), "--steps", "1"]) == 0
    assert passed["optimizer"] == "muon" and passed["shuffled_keys"] == 0.5
    assert trainer.main(["--out", str(tmp_path / "cli"), "--steps", "1", "--optimizer", "adamw", "--shuffled-keys", "0"]) == 0
    assert passed["optimizer"] == "adamw" and passed["shuffled_keys"] == 0.0
    assert passed["integers"] == trainer.INTEGERS == 0.0
    assert trainer.main(["--out", str(tmp_path / "cli"), "--steps", "1", "--integers", "0.2"]) == 0 and passed["integers"] == 0.2
    assert passed["lookup"] == trainer.LOOKUP == 0.0
    assert trainer.main(["--out", str(tmp_path / "cli"), "--steps", "1", "--lookup", "0.3"]) == 0 and passed["lookup"] == 0.3
    assert passed["ns_steps"] == trainer.NS_STEPS
    assert trainer.main(["--out", str(tmp_path / "cli"), "--steps", "1", "--ns-steps", "3"]) == 0 and passed["ns_steps"] == 3


def test_row_groups_pick_the_cheapest_split_of_the_rows_sorted_by_length():
    """Against every split of the sorted rows into at most ``max_groups`` contiguous groups."""
    import itertools

    from jamba_core.train import trainer

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 600) for _ in range(rng.randint(1, 9))]
        max_groups, pass_cost = rng.randint(1, 4), rng.choice((0, 64, 256))
        groups = trainer.row_groups(lengths, max_groups, pass_cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths))) and 1 <= len(groups) <= max_groups
        cost = sum(len(g) * max(lengths[i] for i in g) + pass_cost for g in groups)
        ordered = sorted(lengths, reverse=True)
        best = min(sum((b - a) * ordered[a] + pass_cost for a, b in zip((0, *cuts), (*cuts, len(lengths))))
                   for k in range(max_groups) for cuts in itertools.combinations(range(1, len(lengths)), k))
        assert cost == best


def test_the_batch_in_groups_of_rows_gives_one_passs_loss_and_gradients(tiny_engine, shared_dir):
    """`trainer.backward` (passes cut to their longest row, the LM head on real targets only) against the
    whole padded batch in one pass: weighted loss, assistant loss and every gradient, fp32 (relative
    error of each gradient's norm < 1e-4)."""
    from jamba_core import ops
    from jamba_core.eval.ruler import Haystack
    from jamba_core.train import trainer

    model, tok = copy.deepcopy(tiny_engine.model).float().requires_grad_(True), tiny_engine.tokenizer
    haystack, previous = Haystack(tok), ops.active()
    ops.use("train")
    try:
        for step, progress in ((1, 0.7), (3, 0.1), (4, 0.9)):
            ids, mask, real, _ = trainer.batch(step, progress, 0, tok, haystack)
            ids, mask, real = ids.clone(), mask.clone(), real.clone()
            real[0, -1] = False  # the rows of unequal lengths, however the batch came out
            assert len(set(real.sum(1).tolist())) > 1
            model.zero_grad(set_to_none=True)
            logits = model(ids[:, :-1])
            r, a = real[:, 1:], mask[:, 1:] & real[:, 1:]
            nll = F.cross_entropy(logits[r].float(), ids[:, 1:][r], reduction="none")
            w = torch.where(a[r], 1.0, trainer.PROMPT_LOSS_WEIGHT)
            objective = (nll * w).sum() / w.sum()
            objective.backward()
            expected = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            got, answer = trainer.backward(model, ids, mask, real)
            assert got == pytest.approx(objective.item(), rel=1e-5)
            assert answer == pytest.approx(nll[a[r]].mean().item(), rel=1e-5)
            for (name, p), e in zip(model.named_parameters(), expected):
                assert p.grad is not None, name
                assert float((p.grad - e).norm()) <= 1e-4 * float(e.norm()) + 1e-12, name
    finally:
        ops.use(previous)


def _check_fan_in(weights, drawn, config, mixers_only):
    residual = 1 / math.sqrt(2 * config.num_hidden_layers)
    seen = set()
    for name, t in weights.items():
        kind = name.rsplit(".", 2)[-2]
        if mixers_only and ".self_attn." not in name and ".mamba." not in name:  # the MLPs and experts as drawn
            assert torch.equal(t, drawn[name]), name
        elif kind == "dt_proj" and name.endswith("weight"):
            bound = config.mamba_dt_rank ** -0.5
            assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound and abs(t.std() / (bound / math.sqrt(3)) - 1) < 0.05
        elif t.dim() == 2 and name.endswith(".weight") and kind not in ("embed_tokens", "router", "lm_head"):
            want = t.shape[1] ** -0.5 * (residual if kind in ("o_proj", "out_proj", "down_proj") else 1.0)
            assert abs(float(t.std()) / want - 1) < 0.05, name
            assert torch.allclose(t / want, drawn[name] / float(drawn[name].std()), atol=0.2), name  # rescaled, not redrawn
        else:  # A_log among them: scaled, the SSM state would forget at once
            assert torch.equal(t, drawn[name]), name
        seen.add(name.rsplit(".", 1)[-1] if kind == "mamba" else kind)
    assert {"q_proj", "k_proj", "in_proj", "x_proj", "out_proj", "o_proj", "down_proj", "router", "dt_proj", "embed_tokens", "A_log"} <= seen


def test_fan_in_init_scales_each_linear_by_its_fan_in_and_keeps_the_rest(tmp_path, monkeypatch, shared_dir):
    """`fan_in_init` on the training model's `random_weights`: linear weights at std in^-0.5, the residual
    outputs at in^-0.5 / sqrt(2 layers), dt_proj uniform within dt_rank^-0.5, everything else as drawn
    (sample stds within 5%: >= 4,096 draws each); with ``mixers_only`` the MLPs' and experts' weights as
    drawn too. ``init_scale`` "fan-in" and "fan-in-mixers" train from them; with ``init`` it is refused."""
    from jamba_core.testing import random_weights
    from jamba_core.tokenizer import train_tokenizer
    from jamba_core.train import trainer

    config = trainer.make_config("tiny", **trainer.CONFIG)
    drawn = random_weights(config, 7)
    for mixers_only in (False, True):
        weights = dict(drawn)
        trainer.fan_in_init(weights, config, 7, mixers_only=mixers_only)
        _check_fan_in(weights, drawn, config, mixers_only)

    monkeypatch.setattr(trainer, "CONFIG", dict(trainer.CONFIG, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                 num_key_value_heads=1, num_hidden_layers=3))
    monkeypatch.setattr(trainer, "make_tokenizer", lambda seed, spaces: train_tokenizer(trainer.CONFIG["vocab_size"], spaces=spaces))
    for scale in ("fan-in", "fan-in-mixers"):
        info = trainer.train(tmp_path / scale, steps=1, seed=3, init_scale=scale, log_every=100, save_every=0)
        assert info["init_scale"] == scale and math.isfinite(info["history"][0]["loss"])
    with pytest.raises(ValueError, match="init_scale"):
        trainer.train(tmp_path / "x", steps=1, init=tmp_path / "fan-in", init_scale="fan-in")
    with pytest.raises(ValueError, match="init_scale"):
        trainer.train(tmp_path / "y", steps=1, init_scale="xavier")


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """``n`` tokens after ``ids`` by argmax, each from a whole forward pass over everything before it (no cache)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]), logits_to_keep=1)[0, -1].argmax()))
    return out[len(ids):]


def test_validation_counts_a_call_exact_when_greedy_decoding_writes_it():
    """`validate`'s exact share is what greedy decoding writes, token for token: on the trained checkpoint,
    each held-out call scores exact alone exactly when decoding its prompt greedily gives its tokens; a
    random-weight model of the same shape gets none."""
    from jamba_core.config import load_config
    from jamba_core.loading import load_model
    from jamba_core.model import JambaForCausalLM
    from jamba_core.testing import trained_checkpoint
    from jamba_core.tokenizer import load_tokenizer
    from jamba_core.train import trainer

    path = trained_checkpoint(missing_ok=True)
    if path is None:
        pytest.skip("no trained checkpoint in this tree")
    tokenizer, config = load_tokenizer(path), load_config(path)
    model = load_model(path, config, progress=False).eval()
    convs = trainer.validation_calls(8)
    assert len({json.dumps(c.messages) for c in convs}) == 8 and all(c.messages[-1]["tool_calls"] for c in convs)
    per_call = []
    for conv in convs:
        ids, mask = data.encode(tokenizer, conv)
        start = mask.index(1)
        assert all(mask[start:]) and not any(mask[:start])  # the call is the last turn
        alone = trainer.validate(model, tokenizer, [conv])
        per_call.append(alone["tool_call_exact"])
        assert alone["tool_call_exact"] == float(_greedy(model, ids[:start], len(ids) - start) == ids[start:])
        assert math.isfinite(alone["tool_call_nll"]) and alone["tool_call_nll"] >= 0
    assert 0 < sum(per_call)  # the trained checkpoint writes some of them (91% of 200 held-out calls)
    assert trainer.validate(model, tokenizer, convs)["tool_call_exact"] == sum(per_call) / 8
    model.train()
    trainer.validate(model, tokenizer, convs[:1])
    assert model.training  # the mode is restored
    random_model = JambaForCausalLM(config).eval()
    assert trainer.validate(random_model, tokenizer, convs)["tool_call_exact"] == 0.0


def test_a_run_scores_held_out_tool_calls_as_it_trains(tmp_path, shared_dir, monkeypatch):
    """validate_every: a check every that many steps and one on the weights the run ends with, in
    training.json and the log; 0 or a run shorter than one interval: none."""
    from jamba_core.testing import trained_checkpoint
    from jamba_core.train import trainer

    path = trained_checkpoint(missing_ok=True)
    if path is None:
        pytest.skip("no trained checkpoint in this tree")
    monkeypatch.setattr(trainer, "VALIDATION_SAMPLES", 3)
    info = trainer.train(tmp_path / "a", steps=5, seed=6, init=path, curriculum_from=0.8, log_every=100, validate_every=2)
    assert [v["step"] for v in info["validation"]] == [2, 4, 5]
    assert all(0.0 <= v["tool_call_exact"] <= 1.0 and v["tool_call_exact"] * 3 == round(v["tool_call_exact"] * 3)
               for v in info["validation"])
    assert json.loads((tmp_path / "a" / "training.json").read_text())["validation"] == info["validation"]
    assert trainer.train(tmp_path / "b", steps=2, seed=6, init=path, curriculum_from=0.8, log_every=100,
                         validate_every=0)["validation"] == []
    assert trainer.train(tmp_path / "c", steps=2, seed=6, init=path, curriculum_from=0.8, log_every=100,
                         validate_every=3)["validation"] == []
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="validate_every"):
            trainer.train(tmp_path / "d", steps=1, validate_every=bad)
