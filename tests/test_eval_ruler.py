"""RULER-style long-context evaluation: sample construction, scoring, report and CLI."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult  # noqa: E402

from jamba_core.eval import TASKS, Haystack, evaluate, make_sample, score, write_report  # noqa: E402
from jamba_core.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(4096)


@pytest.fixture(scope="module")
def haystack(tokenizer, shared_dir):
    return Haystack(tokenizer)


def _oracle_answers(prompt: str) -> list[str]:
    """The answers read off the prompt itself, the way a perfect reader would find them."""
    question = prompt.rsplit("\n", 1)[1]
    if m := re.search(r"assigned the value (\d+)", question):
        names = [re.search(rf"VAR (\w+) = {m[1]}\.", prompt)[1]]
        while nxt := re.search(rf"VAR (\w+) = VAR {names[-1]}\.", prompt):
            names.append(nxt[1])
        return names
    key = re.search(r"numbers? for (\S+) mentioned", question)[1]
    return re.findall(rf"numbers for {re.escape(key)} is: (\d+)\.", prompt)


class _ScriptedChat(BaseChatModel):
    """Replies with `reply(prompt)`; stands in for any LangChain chat model."""

    reply: object

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self.reply(messages[-1].content)))])


def _context(prompt: str) -> str:
    return prompt.split("\n", 1)[1].rsplit("\n", 1)[0]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [256, 1024, 16384])
def test_prompt_fills_90_to_100_percent_of_length(task, length, haystack, tokenizer):
    sample = make_sample(task, length, 50, seed=3, haystack=haystack)
    assert 0.9 * length <= len(tokenizer.encode(sample.prompt)) <= length


def test_128k_prompt_fits_and_is_fast(haystack, tokenizer):
    import time

    start = time.perf_counter()
    sample = make_sample("niah_multikey", 131072, 50, seed=1, haystack=haystack)
    # a bound against a builder gone quadratic, not a speed figure: 1.4 s here alone; 2 s failed with two
    # test runs sharing the 2 cores
    assert time.perf_counter() - start < 20.0
    assert 0.9 * 131072 <= len(tokenizer.encode(sample.prompt)) <= 131072


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0, 25, 50, 75, 100])
def test_queried_needle_sits_at_requested_depth(task, depth, haystack):
    sample = make_sample(task, 4096, depth, seed=7, haystack=haystack)
    context = _context(sample.prompt)
    first = f"VAR {sample.answers[0]} = " if task == "variable_tracking" else f"is: {sample.answers[0]}."
    assert abs(context.index(first) / len(context) * 100 - depth) <= 10
    assert all(answer in context for answer in sample.answers)
    assert score(sample.target, sample.answers) == 1.0 and sample.target.startswith("The ")


def test_prompt_is_instruction_context_question(haystack):
    sample = make_sample("niah_multivalue", 1024, 30, seed=0, haystack=haystack)
    lines = sample.prompt.split("\n")
    assert lines[0].startswith("Some special magic numbers are hidden")
    assert lines[-1].startswith("What are all the special magic numbers for ")
    assert len(sample.answers) == 4 and all(re.fullmatch(r"[1-9]\d{6}", a) for a in sample.answers)


def test_train_and_test_keys_share_no_word(haystack):
    def words(split):
        found = set()
        for seed in range(40):
            prompt = make_sample("niah_multikey", 512, 50, seed, haystack, split=split).prompt
            found |= {w for key in re.findall(r"numbers for ([a-z]+-[a-z]+) is", prompt) for w in key.split("-")}
        return found

    train, test = words("train"), words("test")
    assert train and test and not train & test
    assert all(4 <= len(w) <= 9 for w in train | test)


def test_same_arguments_give_the_same_sample_and_seeds_differ(haystack):
    a = make_sample("niah_multikey", 2048, 40, seed=5, haystack=haystack)
    assert a == make_sample("niah_multikey", 2048, 40, seed=5, haystack=haystack)
    b = make_sample("niah_multikey", 2048, 40, seed=6, haystack=haystack)
    assert a.answers != b.answers
    assert _context(a.prompt)[:200] != _context(b.prompt)[:200]  # another book offset


def test_oracle_scores_one_and_dont_know_scores_zero(haystack, tokenizer):
    grid = dict(tasks=TASKS, lengths=[256, 1024], depths=[0, 50, 100], samples_per_cell=2, tokenizer=tokenizer,
                haystack=haystack)
    oracle = evaluate(_ScriptedChat(reply=lambda p: ", ".join(_oracle_answers(p))), **grid)
    assert [c["accuracy"] for c in oracle["cells"]] == [1.0] * len(oracle["cells"])
    assert all(m["accuracy"] == 1.0 for m in oracle["means"])
    blank = evaluate(_ScriptedChat(reply=lambda p: "I don't know"), **grid)
    assert all(c["accuracy"] == 0.0 for c in blank["cells"])
    assert all(0.9 * c["length"] <= c["prompt_tokens"] <= c["length"] for c in blank["cells"])


def test_a_reply_in_content_blocks_is_scored_on_its_text_blocks_only(haystack, tokenizer):
    """A reply as content blocks was scored as str(list): a model that listed every number in a reasoning
    block and answered "not found" scored 1.0, and an exact answer in a text block lost its score."""
    grid = dict(tasks=["niah_single"], lengths=[256], depths=[50], samples_per_cell=2, tokenizer=tokenizer, haystack=haystack)
    thinks = _ScriptedChat(reply=lambda p: [{"type": "reasoning", "reasoning": ", ".join(re.findall(r"\b\d{7}\b", p))},
                                            {"type": "text", "text": "I could not find it."}])
    assert [c["accuracy"] for c in evaluate(thinks, **grid)["cells"]] == [0.0]
    in_blocks = _ScriptedChat(reply=lambda p: ["The number is ", {"type": "text", "text": ", ".join(_oracle_answers(p))}])
    result = evaluate(in_blocks, **grid)
    assert [c["accuracy"] for c in result["cells"]] == [1.0] and result["cells"][0]["samples"][0]["reply"].startswith("The number is ")


def test_a_depth_draws_the_same_sample_as_int_or_float(haystack, tokenizer):
    """The command line passes depths as floats (50.0), the API's callers as ints (50): the sample seeds
    hashed the depth's text, so the two drew different needles for the same cell."""
    blank = _ScriptedChat(reply=lambda p: "no idea")
    grid = dict(tasks=["niah_single"], lengths=[256], samples_per_cell=2, tokenizer=tokenizer, haystack=haystack)
    as_int, as_float = evaluate(blank, depths=[50], **grid), evaluate(blank, depths=[50.0], **grid)
    assert [s["seed"] for s in as_int["cells"][0]["samples"]] == [s["seed"] for s in as_float["cells"][0]["samples"]]
    assert [s["answers"] for s in as_int["cells"][0]["samples"]] == [s["answers"] for s in as_float["cells"][0]["samples"]]


def test_report_files_agree_with_results(haystack, tokenizer, tmp_path):
    first_only = _ScriptedChat(reply=lambda p: _oracle_answers(p)[0])  # half marks on multi-answer tasks
    results = evaluate(first_only, ["niah_single", "niah_multivalue"], [256, 512], [0, 100], 1, tokenizer,
                       haystack=haystack)
    paths = write_report(results, tmp_path)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
    rows = [line.split("|")[1:-1] for line in paths["markdown"].read_text().splitlines() if line.startswith("| niah")]
    table = {(r[0].strip(), int(r[1])): [float(x) for x in r[2:]] for r in rows}
    assert table[("niah_single", 256)] == [1.0, 1.0, 1.0]
    assert table[("niah_multivalue", 512)] == [0.25, 0.25, 0.25]
    import matplotlib.image

    assert matplotlib.image.imread(paths["heatmap"]).ndim == 3


def test_cli_eval_runs_on_tiny_checkpoint(tiny_checkpoint, shared_dir, tmp_path, capsys):
    from jamba_core.cli import main

    assert main(["eval", str(tiny_checkpoint), "--tasks", "niah_single", "--lengths", "256", "--depths", "50",
                 "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"]["model"] == str(tiny_checkpoint) and len(results["cells"]) == 1
    assert (tmp_path / "heatmap.png").stat().st_size > 0 and "| niah_single | 256 |" in capsys.readouterr().out


def test_cli_eval_refuses_lengths_past_the_context_window_before_running(tmp_path, capsys):
    """It scored the lengths that fit, then failed at the first that did not, writing nothing."""
    from jamba_core.cli import main
    from jamba_core.testing import make_checkpoint

    small = make_checkpoint(tmp_path / "window-2k", preset="tiny", max_position_embeddings=2048)
    assert main(["eval", str(small), "--tasks", "niah_single", "--lengths", "256,2048,4k", "--depths", "50",
                 "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--lengths 2048, 4096 with --max-new-tokens 4 do not fit the model's context window of 2048 tokens" in err
    assert "niah_single" not in err and not (tmp_path / "out").exists()


def test_cli_eval_writes_the_finished_cells_when_a_sample_fails(tiny_checkpoint, shared_dir, tmp_path, monkeypatch, capsys):
    """An error on one sample (a timeout, a rate limit) lost every cell already scored."""
    from langchain_jamba import ChatJamba

    from jamba_core.cli import main

    calls = {"n": 0}
    generate = ChatJamba._generate

    def fails_on_the_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise TimeoutError("read timed out")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(ChatJamba, "_generate", fails_on_the_third)
    assert main(["eval", str(tiny_checkpoint), "--tasks", "niah_single", "--lengths", "256", "--depths", "0,50,100",
                 "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path)]) == 2  # (TimeoutError is an OSError)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["partial"] is True and results["error"] == "TimeoutError: read timed out"
    assert [c["depth"] for c in results["cells"]] == [0.0, 50.0] and len(results["means"]) == 1
    markdown = (tmp_path / "results.md").read_text()
    assert "| niah_single | 256 |" in markdown and (tmp_path / "heatmap.png").stat().st_size
    assert "**Partial results**: the run stopped after 2 cells (TimeoutError: read timed out)" in markdown
    err = capsys.readouterr().err
    assert "stopped after 2 cells (TimeoutError: read timed out)" in err and "error: read timed out" in err


def test_report_of_a_long_stage_run_for_some_tasks_only(tmp_path):
    """A long-context stage adds lengths for a few tasks (`benchmarks.trained_eval --long`): the other
    tasks get no row there, and the heat map leaves those cells blank."""
    cells = [{"task": t, "length": n, "depth": d, "accuracy": 1.0, "latency_s": 0.1, "prompt_tokens": n, "samples": []}
             for t in ("niah_single", "niah_multikey") for n in (1024,) for d in (0.0, 50.0)]
    cells += [{"task": "niah_single", "length": 65536, "depth": 50.0, "accuracy": 0.0, "latency_s": 30.0,
               "prompt_tokens": 65000, "samples": []}]
    means = [{"task": "niah_single", "length": 1024, "accuracy": 1.0}, {"task": "niah_multikey", "length": 1024, "accuracy": 1.0},
             {"task": "niah_single", "length": 65536, "accuracy": 0.0}]
    results = {"model": {"class": "X"}, "split": "test", "seed": 0, "max_new_tokens": 32, "tasks": ["niah_single", "niah_multikey"],
               "lengths": [1024, 65536], "depths": [0.0, 50.0], "samples_per_cell": 1, "cells": cells, "means": means}
    paths = write_report(results, tmp_path)
    rows = [line for line in paths["markdown"].read_text().splitlines() if line.startswith("| niah")]
    assert rows == ["| niah_single | 1024 | 1.00 | 1.00 | 1.00 |", "| niah_single | 65536 |  | 0.00 | 0.00 |",
                    "| niah_multikey | 1024 | 1.00 | 1.00 | 1.00 |"]
    assert paths["heatmap"].stat().st_size > 0


def test_copying_scores_an_echo_one_a_shifted_copy_partly_and_a_refusal_zero(shared_dir):
    """`evaluate_copying`: the sequence is the prompt's tail after its instruction; an echo of it is exact,
    the same items one place late score no item, the right items with the last one dropped score the
    rest, and the scores come from held-out (test-split) words."""
    from jamba_core.eval.tools import evaluate_copying
    from jamba_core.train import data

    def sequence(prompt: str) -> str:
        for ask in ("Repeat this exactly: ", "Copy the following text: ", "Say it back: "):
            if prompt.startswith(ask):
                return prompt[len(ask):]
        return prompt

    echo = evaluate_copying(_ScriptedChat(reply=sequence), samples=12)
    assert echo["exact"] == 1.0 and echo["word_accuracy"] == 1.0 and echo["failures"] == []
    late = evaluate_copying(_ScriptedChat(reply=lambda p: "well " + sequence(p)), samples=12)
    assert late["exact"] == 0.0 and late["word_accuracy"] < 0.2
    short = evaluate_copying(_ScriptedChat(reply=lambda p: sequence(p).rsplit(" ", 1)[0]), samples=12)
    assert short["exact"] == 0.0 and 0.7 <= short["word_accuracy"] < 1.0
    assert evaluate_copying(_ScriptedChat(reply=lambda p: "I don't know"), samples=12)["word_accuracy"] == 0.0
    test_words = set(data.words("test"))
    assert any(w in test_words for f in short["failures"] for w in f["expected"].replace(",", " ").split())


class _ToolScriptedChat:
    """`bind_tools` then ``invoke``: calls `call(request, tool names)` -> (name, args) or None (plain text)."""

    def __init__(self, call, tools=None):
        self.call, self.tools = call, tools

    def bind_tools(self, tools):
        return _ToolScriptedChat(self.call, [t["function"]["name"] for t in tools])

    def invoke(self, messages, max_tokens=None):
        got = self.call(messages[-1].content, self.tools)
        return AIMessage("I cannot.") if got is None else AIMessage("", tool_calls=[{"name": got[0], "args": got[1], "id": "call_0"}])


def test_place_calls_score_the_exact_place_and_the_tool_the_request_needs():
    """`evaluate_place_calls`: both tools bound to every request; a caller that picks the tool by the
    request's topic and copies the place scores 1, one that lowercases the place parses but scores 0, text
    scores neither, and a caller that always calls the first tool misses the population requests only."""
    from jamba_core.eval.tools import PLACE_REQUESTS, PLACES, evaluate_place_calls

    def place(request):
        return re.search(r"(?:in|for) ([A-Z][a-z]+)", request).group(1)

    def right(request, tools):
        assert tools == ["get_weather", "get_population"]
        return ("get_population" if "people" in request else "get_weather", {"city": place(request)})

    perfect = evaluate_place_calls(_ToolScriptedChat(right))
    assert perfect["samples"] == len(PLACES) * len(PLACE_REQUESTS) and perfect["parsed"] == perfect["correct"] == 1.0
    assert perfect["failures"] == []
    lower = evaluate_place_calls(_ToolScriptedChat(lambda r, t: (right(r, t)[0], {"city": place(r).lower()})))
    assert lower["parsed"] == 1.0 and lower["correct"] == 0.0 and len(lower["failures"]) == 10
    assert evaluate_place_calls(_ToolScriptedChat(lambda r, t: None))["parsed"] == 0.0
    first = evaluate_place_calls(_ToolScriptedChat(lambda r, t: (t[0], {"city": place(r)})))
    assert first["correct"] == 0.75 and first["by_request"]["How many people live in {}?"] == 0.0


class _ReaderChat(BaseChatModel):
    """Reads every message for RULER needles and answers the value of the key the last message asks
    about (a perfect reader), or a fixed ``answer``."""

    answer: str | None = None

    @property
    def _llm_type(self) -> str:
        return "reader"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        import re

        found = dict(re.findall(r"special magic numbers for (\S+) is: (\d+)", "\n".join(m.content for m in messages)))
        key = re.search(r"special magic number for (\S+) mentioned", messages[-1].content).group(1)
        reply = self.answer if self.answer is not None else f"The special magic number for {key} is: {found.get(key)}."
        return ChatResult(generations=[ChatGeneration(message=AIMessage(reply))])


def test_needle_forms_score_a_reader_one_and_a_refusal_zero_with_held_out_keys(shared_dir):
    """`evaluate_needle_forms`: the needle sits in the document each form carries (user message, system
    message, LlamaIndex's text-QA prompt), so a model that reads the messages finds it in every form; a
    refusal scores 0 with its failures reported; keys come from held-out words; "documents" is asked only
    of ChatJamba (other chat models take no ``documents``)."""
    from jamba_core.eval.tools import evaluate_needle_forms
    from jamba_core.train import data

    doc = "\n\n".join(f"Paragraph {i} of a plain document." for i in range(40))
    good = evaluate_needle_forms(_ReaderChat(), samples=5, document=doc)
    assert good["forms"] == {"ruler": 1.0, "system": 1.0, "llamaindex": 1.0} and good["failures"] == []
    bad = evaluate_needle_forms(_ReaderChat(answer="I cannot say."), samples=5, document=doc)
    assert set(bad["forms"].values()) == {0.0} and len(bad["failures"]) == 10
    depths = sorted({f["depth"] for f in bad["failures"]})
    assert depths[0] == 0.1 and depths[-1] >= 0.5
    key = bad["failures"][0]["needle"].split(" for ", 1)[1].split(" is:", 1)[0]
    assert set(key.split("-")) <= set(data.words("test"))


def test_needle_forms_ask_chatjamba_through_its_documents_too(tiny_checkpoint, shared_dir):
    from jamba_core.eval.tools import evaluate_needle_forms
    from langchain_jamba import ChatJamba

    result = evaluate_needle_forms(ChatJamba(model=str(tiny_checkpoint), max_tokens=4), samples=1, max_chars=2000)
    assert set(result["forms"]) == {"ruler", "system", "llamaindex", "documents"} and result["chars"] == 2000


def test_cli_eval_takes_a_haystack_file_and_names_the_missing_default(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """In a checkout without ../shared, `eval` said only "[Errno 2] ... moby-dick.txt"; --haystack gives it a text."""
    import random

    from jamba_core.cli import main

    monkeypatch.setenv("JAMBA_LOCAL_SHARED", str(tmp_path / "absent"))
    args = ["eval", str(tiny_checkpoint), "--tasks", "niah_single", "--lengths", "512", "--depths", "50", "--samples", "1",
            "--max-new-tokens", "4", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "set JAMBA_LOCAL_SHARED to the folder holding data/moby-dick.txt, or give a text (jamba-local eval --haystack FILE)" \
        in capsys.readouterr().err
    rng = random.Random(0)
    words = ["harbour", "lantern", "voyage", "anchor", "timber", "compass", "harpoon", "weather", "captain", "rigging"]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(60)).capitalize() + "." for _ in range(120))
    (tmp_path / "prose.txt").write_text(text, encoding="utf-8")
    assert main([*args, "--haystack", str(tmp_path / "prose.txt")]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["cells"][0]["prompt_tokens"] > 400
