"""Chat: the Jamba chat template, rendering (tools, documents, JSON mode), tool-call and citation
parsing (whole and streamed), grammar constraints, and the chat requests the adapters make."""

from jamba_core.chat.render import count_chat_tokens, render_chat
from jamba_core.chat.template import JAMBA_CHAT_TEMPLATE
from jamba_core.chat.tool_calls import (
    Citations,
    ContentDelta,
    InvalidToolCall,
    ParsedOutput,
    StreamingToolCallParser,
    ToolCallChunk,
    ToolCallParser,
    detect_call_format,
    parse_output,
)
from jamba_core.chat.grammar import (
    BannedTokensConstraint,
    GrammarConstraint,
    normalize_tools,
    response_format_constraint,
    tool_choice_constraint,
)
from jamba_core.chat.api import ChatDone, ChatResult, chat, chat_stream

__all__ = [
    "JAMBA_CHAT_TEMPLATE", "count_chat_tokens", "render_chat",
    "Citations", "ContentDelta", "InvalidToolCall", "ParsedOutput", "StreamingToolCallParser", "ToolCallChunk",
    "ToolCallParser", "detect_call_format", "parse_output",
    "BannedTokensConstraint", "GrammarConstraint", "normalize_tools", "response_format_constraint", "tool_choice_constraint",
    "ChatDone", "ChatResult", "chat", "chat_stream",
]
