"""Prefix-state reuse: snapshots of the hybrid cache (Mamba conv + SSM state, shared K/V) reused
across requests that share a prompt prefix."""

import random

import pytest
import torch

from jamba_core import Engine
from jamba_core.cache import KVStore

REL_BOUND = 1e-4
WORDS = "whale sea ship captain harpoon white boat deck storm ocean sail crew".split()


@pytest.fixture
def engines(tiny_checkpoint):
    reuse = Engine.from_pretrained(tiny_checkpoint, progress=False)
    fresh = Engine.from_pretrained(tiny_checkpoint, progress=False, prefix_cache_bytes=0)
    return reuse, fresh


def random_text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_turn_chat_with_reuse_equals_full_prefill(engines, seed):
    reuse, fresh = engines
    rng = random.Random(seed)
    messages = [{"role": "system", "content": random_text(rng, 40)}]
    for turn in range(4):
        messages.append({"role": "user", "content": random_text(rng, rng.randint(3, 30))})
        a = reuse.generate(messages, max_new_tokens=8)
        b = fresh.generate(messages, max_new_tokens=8)
        assert a.token_ids == b.token_ids
        assert b.usage.cached_tokens == 0
        if turn > 0:  # the previous prompt (ending "<|bom|><|assistant|>") is a prefix of this one
            assert a.usage.cached_tokens == len(reuse.encode(messages[:-2]))
        messages.append({"role": "assistant", "content": a.text})


def test_resumed_logits_match_full_prefill(engines):
    reuse, fresh = engines
    rng = random.Random(5)
    messages = [{"role": "system", "content": random_text(rng, 60)}, {"role": "user", "content": "first"}]
    reuse.generate(messages, max_new_tokens=2)
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": random_text(rng, 20)}]
    ids = reuse.encode(messages)
    _, reused, got = reuse.start(ids)
    _, none, expected = fresh.start(ids)
    assert reused > 0 and none == 0
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= REL_BOUND


def test_restoring_a_snapshot_is_bit_identical_after_forks(tiny_engine):
    engine = tiny_engine
    prefix = engine.encode("Call me Ishmael. Some years ago, never mind how long precisely")
    cache, _, logits = engine.start(prefix)
    snapshot = cache.snapshot()

    def continue_from(snap, tokens):
        c = snap.restore(engine.config, len(prefix) + len(tokens))
        return torch.stack([engine.decode_one_token(torch.tensor([[t]]), c)[0] for t in tokens])

    first = continue_from(snapshot, [10, 20, 30, 40])
    for fork in ([11, 12, 13], [50] * 9, [7]):  # other requests continue the same snapshot differently
        continue_from(snapshot, fork)
        cache.snapshot()  # and snapshots beyond it pin the shared K/V
        engine.generate(prefix + [fork[0]], max_new_tokens=3)
    again = continue_from(snapshot, [10, 20, 30, 40])
    assert torch.equal(first, again)


def test_snapshot_bytes_are_about_one_mamba_state(tiny_engine):
    cache, _, _ = tiny_engine.start(tiny_engine.encode("The whale " * 200))
    snapshot = cache.snapshot()
    mamba = sum(layer.nbytes for layer in cache.layers if not hasattr(layer, "store"))
    assert mamba <= snapshot.nbytes <= 1.1 * mamba
    shared = [entry[0] for entry in snapshot.layers if isinstance(entry[0], KVStore)]
    assert shared and all(store is layer.store for store, layer in zip(shared, [l for l in cache.layers if hasattr(l, "store")]))


def test_lru_eviction_respects_the_budget_and_keeps_pinned(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint, progress=False)
    preface = "Pinned preface about whales and the sea.\n" * 20  # ends at a token boundary
    handle = engine.pin(preface)
    engine.prefix_cache.budget_bytes = engine.prefix_cache.nbytes + 200_000
    for i in range(30):
        engine.generate(f"request {i} " + "filler words " * 30, max_new_tokens=2)
        assert engine.prefix_cache.nbytes <= engine.prefix_cache.budget_bytes
    assert handle in engine.prefix_cache.entries
    result = engine.generate(preface + "Question?", max_new_tokens=2)
    assert result.usage.cached_tokens == len(handle)
    engine.release(handle)
    engine.prefix_cache.budget_bytes = 0
    engine.prefix_cache.evict()
    assert handle not in engine.prefix_cache.entries


def test_pinned_documents_make_each_question_cost_only_its_tokens(tiny_engine):
    docs = [{"title": "Moby-Dick", "text": "Call me Ishmael. " * 100}, {"title": "Notes", "text": "Whales are mammals. " * 50}]
    system = [{"role": "system", "content": "Answer from the documents."}]
    handle = tiny_engine.pin(system, documents=docs)
    for question in ("Who is Ishmael?", "What are whales?"):
        messages = [*system, {"role": "user", "content": question}]
        result = tiny_engine.generate(messages, documents=docs, max_new_tokens=2)
        assert result.usage.cached_tokens == len(handle)
        assert result.usage.prompt_tokens - result.usage.cached_tokens < 20
    tiny_engine.release(handle)


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if documents %}<|im_start|>documents\n{% for d in documents %}{{ d.text }}\n{% endfor %}<|im_end|>\n{% endif %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_pinning_reads_the_question_start_from_any_chat_template(tiny_checkpoint):
    """`pin` looked for Jamba 1.5's <|bom|><|user|> markers, so on a ChatML checkpoint (Jamba Reasoning
    3B) pinning documents raised. It now pins what two renderings with different questions share."""
    engine = Engine.from_pretrained(tiny_checkpoint, progress=False)
    engine.tokenizer.chat_template = CHATML  # markers as plain text: the tiny vocabulary has no room for more
    system = [{"role": "system", "content": "Answer from the documents. " * 10}]
    handle = engine.pin(system)
    for question in ("Who is Ishmael?", "What are whales?"):
        result = engine.generate([*system, {"role": "user", "content": question}], max_new_tokens=2)
        assert result.usage.cached_tokens == len(handle) > 60
        assert result.usage.prompt_tokens - result.usage.cached_tokens < 40  # the question, its markers as text
    engine.release(handle)


def test_streams_read_in_turn_in_one_thread_do_not_write_over_each_other(engines):
    """The engine's lock is re-entrant, so a second stream opened in the same thread runs while the first
    is paused. Both resumed in place from one snapshot and wrote their K/V into the same positions: the
    outputs changed with no error. A store a live cache appends to is now forked instead."""
    reuse, fresh = engines
    prompt = reuse.encode("Call me Ishmael. Some years ago, never mind how long")
    longer = prompt + reuse.encode(" The whale, the sea and the harpooneer")[1:]
    want = [fresh.generate(ids, max_new_tokens=20).token_ids for ids in (prompt, longer)]
    reuse.generate(prompt, max_new_tokens=1)  # leaves a snapshot of the prompt to resume from
    streams = [reuse.stream(ids, max_new_tokens=20) for ids in (prompt, longer)]
    got: list[list[int]] = [[], []]
    for a, b in zip(*streams):
        got[0] += a.token_ids
        got[1] += b.token_ids
    for i, stream in enumerate(streams):
        for chunk in stream:
            got[i] += chunk.token_ids
    assert got == want



def test_pin_refuses_what_it_could_never_reuse(engines):
    """With the prefix cache off a pin held its state forever and nothing ever read it; ``pin("")``
    pinned the start token; releasing a handle that was not pinned passed unnoticed."""
    reuse, fresh = engines
    with pytest.raises(ValueError, match="prefix cache.*off"):
        fresh.pin("Call me Ishmael.\n")
    with pytest.raises(ValueError, match="nothing to pin"):
        reuse.pin("")
    handle = reuse.pin("Call me Ishmael.\n")
    reuse.release(handle)
    for bogus in (handle, ("not", "a", "handle"), None):
        with pytest.raises(ValueError, match="not a pinned prefix"):
            reuse.release(bogus)
