"""Chat: the Jamba chat template and rendering conversations (tools, documents, JSON mode) to prompt text."""

from jamba_core.chat.render import count_chat_tokens, render_chat
from jamba_core.chat.template import JAMBA_CHAT_TEMPLATE

__all__ = ["JAMBA_CHAT_TEMPLATE", "count_chat_tokens", "render_chat"]
