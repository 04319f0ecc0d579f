"""LangChain integration for Jamba models run in this process: `ChatJamba`."""

from langchain_jamba.chat_models import ChatJamba

__all__ = ["ChatJamba"]
