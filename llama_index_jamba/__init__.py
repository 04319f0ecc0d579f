"""LlamaIndex integration: `JambaLLM` (a FunctionCallingLLM over the local Jamba engine) and
long-context RAG helpers (budgeting with the checkpoint's tokenizer, whole documents in Jamba's
documents channel)."""

from .base import JambaLLM
from .rag import (
    JambaDocumentsQueryEngine,
    jamba_prompt_helper,
    jamba_tokenizer,
    local_embed_model,
    template_overhead,
    use_jamba_tokenizer,
)

__all__ = [
    "JambaLLM",
    "JambaDocumentsQueryEngine",
    "jamba_prompt_helper",
    "jamba_tokenizer",
    "local_embed_model",
    "template_overhead",
    "use_jamba_tokenizer",
]
