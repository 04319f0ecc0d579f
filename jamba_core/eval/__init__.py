"""Long-context evaluation: RULER-style tasks over a Moby-Dick haystack (`ruler`) and their report (`report`)."""

from jamba_core.eval.report import write_report
from jamba_core.eval.ruler import TASKS, Haystack, Sample, evaluate, make_sample, score, summarize

__all__ = ["TASKS", "Haystack", "Sample", "evaluate", "make_sample", "score", "summarize", "write_report"]
