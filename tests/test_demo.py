"""`make demo` runs `jamba_core.demo.main`; these run the same function on a random tiny checkpoint and on
the trained one that ships in checkpoints/ (on a shortened document)."""

import pytest

from jamba_core.demo import hide_needle, main
from jamba_core.testing import trained_checkpoint

TRAINED_CHECKPOINT = trained_checkpoint(missing_ok=True)  # $JAMBA_LOCAL_TRAINED, else the repository's


def test_demo_answers_through_llamaindex_and_langchain(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo makes its checkpoint under ./.checkpoints
    assert main(["--random", "--preset", "tiny", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "LlamaIndex SummaryIndex, compact (1 LLM call)" in out
    assert "LangChain prompt | ChatJamba | StrOutputParser" in out
    assert out.count("prompt tokens:") == 2 and out.count("time to first token:") == 2
    assert "random weights" in out and "hidden" not in out and "tool_calls" not in out


@pytest.mark.skipif(TRAINED_CHECKPOINT is None, reason="no trained checkpoint in this tree")
def test_demo_defaults_to_the_trained_checkpoint_with_a_hidden_fact_and_a_tool_call(capsys):
    assert main(["--max-document-chars", "12000", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {TRAINED_CHECKPOINT} (the small Jamba trained" in out
    assert "hidden in it at 60% of its paragraphs: 'One of the special magic numbers for" in out
    assert out.count("(holds the hidden ") == 2  # both answers checked for it (what they hold is the model's)
    assert "ChatJamba.bind_tools([get_weather])" in out and "tool_calls: [" in out


def test_hide_needle_puts_the_fact_at_the_depth_and_asks_for_it():
    text = "\n\n".join(f"paragraph {i}" for i in range(10))
    hidden, needle, question, value = hide_needle(text, seed=3, depth=0.6)
    paragraphs = hidden.split("\n\n")
    assert paragraphs[6] == needle and len(paragraphs) == 11 and value in needle and len(value) == 7
    key = needle.split(" for ", 1)[1].split(" is:", 1)[0]
    assert question == f"What is the special magic number for {key} mentioned in the provided text?"
    assert hide_needle(text, seed=3) == (hidden, needle, question, value)  # seeded


def test_trained_checkpoint_follows_its_variable_and_says_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("JAMBA_LOCAL_TRAINED", str(tmp_path))
    assert trained_checkpoint(missing_ok=True) is None
    with pytest.raises(FileNotFoundError, match="model.safetensors missing"):
        trained_checkpoint()
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert trained_checkpoint() == trained_checkpoint(missing_ok=True) == tmp_path
