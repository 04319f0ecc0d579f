"""`make demo` runs `jamba_core.demo.main`; this runs the same function on the tiny preset."""

from jamba_core.demo import main


def test_demo_answers_through_llamaindex_and_langchain(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo makes its checkpoint under ./.checkpoints
    assert main(["--preset", "tiny", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "LlamaIndex SummaryIndex, compact (1 LLM call)" in out
    assert "LangChain prompt | ChatJamba | StrOutputParser" in out
    assert out.count("prompt tokens:") == 2 and out.count("time to first token:") == 2
    assert "random weights" in out
