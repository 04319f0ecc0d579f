"""Chat messages -> prompt text, through the tokenizer's own chat template.

What LangChain, LlamaIndex and OpenAI-style clients send is put into the one shape the Jamba template reads
before it is rendered, so that the same conversation gives the same prompt whichever client sent it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping

from transformers.utils import get_json_schema

from jamba_core.chat.template import JAMBA_CHAT_TEMPLATE

ROLES = ("system", "user", "assistant", "tool")
_ROLE_ALIASES = {"developer": "system", "function": "tool"}  # OpenAI's newer and older names
_TEXT_BLOCKS = ("text", "input_text", "output_text")


def render_chat(tokenizer, messages, tools=None, documents=None, response_format=None, citations=False,
                add_generation_prompt=True, **template_kwargs) -> str:
    """Render a conversation to prompt text (BOS included, from the template) with the tokenizer's template.

    Args:
        tokenizer: a transformers tokenizer; its `chat_template`, or our Jamba template when it has none.
        messages: list of OpenAI-shaped dicts: `role` (system/user/assistant/tool; `developer` is read as
            system, `function` as tool), `content` (str, None, or a list of content blocks), optional
            `name`, `tool_calls` (`[{id, type: "function", function: {name, arguments}}]` or
            `[{name, arguments}]` or LangChain's `[{name, args, id}]`), `tool_call_id`, `citations`
            (document ids, as `parse_output` gives them, or `[{"document_id": i}]`).
        tools: OpenAI function tools (`{"type": "function", "function": {...}}`), bare function dicts
            (`{name, description, parameters}`) or Python functions (schema from their type hints).
        documents: list of dicts with `text`, optional `title`, and any other keys (shown as fields).
        response_format: None, `{"type": "text"}`, `{"type": "json_object"}` or
            `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`.
        citations: turn on the template's citation mode ("fast").
        add_generation_prompt: end with the assistant header so the model answers next.
        **template_kwargs: passed to the template (e.g. `generation_preamble`, `knobs`).

    Normalisation (the template only reads `messages[0]` as the system prompt, so):
    - all system messages, wherever they are, are merged into one leading system message, their texts
      joined by a blank line ("\\n\\n") in order; empty ones are skipped (all empty: no system message);
    - with a JSON schema response format, the schema is appended (after a blank line) to that system
      text, and the template's JSON mode is turned on; `json_object` turns on JSON mode only;
    - list content made only of text blocks (or strings) becomes their text, concatenated as LangChain's
      `.text` does; other list content is kept and the template writes it as JSON;
    - `content=None` becomes ""; consecutive messages of one role are kept as they are;
    - tool-call arguments given as a JSON string are parsed, so a dict from LangChain and a string from
      an OpenAI client render the same; a string that is not JSON is kept as it is.
    The `knobs` variable is always passed (with `is_set` False when no mode is on), because AI21's
    template fails on an assistant message with citations when it is missing.

    Returns:
        The prompt text; encode it with `add_special_tokens=False`.

    Raises:
        ValueError: no messages, a message that is not a dict, an unknown role, a system message whose
            content is not text, a malformed tool call, a tool that is not a function, a document without
            text, an unknown response format, or documents the template places nowhere (Jamba's puts
            them before the last user message: a conversation without one would drop them).
    """
    if not messages:
        raise ValueError("messages must hold at least one message")
    turns = [_message(m, i) for i, m in enumerate(messages)]
    system_texts = [m["content"] for m in turns if m["role"] == "system" and m["content"]]
    turns = [m for m in turns if m["role"] != "system"]
    json_mode, schema_text = _response_format(response_format)
    if schema_text:
        system_texts.append(schema_text)
    if system_texts:
        turns.insert(0, {"role": "system", "content": "\n\n".join(system_texts)})

    knobs = dict(template_kwargs.pop("knobs", None) or {})
    if citations:
        knobs["citation_mode"] = "fast"
    if json_mode:
        knobs["response_format"] = "json_object"
    knobs["is_set"] = bool(knobs.get("is_set") or citations or json_mode)
    knobs.setdefault("citation_mode", "off")
    knobs.setdefault("response_format", "text")

    if tokenizer.chat_template is None:
        template_kwargs.setdefault("chat_template", JAMBA_CHAT_TEMPLATE)

    def render(docs):
        return tokenizer.apply_chat_template(
            turns,
            tools=[_tool(t, i) for i, t in enumerate(tools)] if tools else None,
            documents=docs,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            knobs=knobs,
            **template_kwargs,
        )

    text = render([_document(d, i) for i, d in enumerate(documents)] if documents else None)
    if documents and text == render(None):
        raise ValueError("the chat template placed none of the documents in the prompt: Jamba's puts them just "
                         "before the last user message, and this conversation has none; add the question as a user message")
    return text


def count_chat_tokens(tokenizer, messages, tools=None, documents=None, **render_kwargs) -> int:
    """Exact prompt length in tokens: `render_chat(...)` encoded with `add_special_tokens=False`.

    Takes the same arguments as `render_chat` and raises what it raises.
    """
    text = render_chat(tokenizer, messages, tools=tools, documents=documents, **render_kwargs)
    return len(tokenizer.encode(text, add_special_tokens=False))


def _message(message, index: int) -> dict:
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = _ROLE_ALIASES.get(message.get("role"), message.get("role"))
    if role not in ROLES:
        raise ValueError(f"message {index} has unknown role {message.get('role')!r}; expected one of {ROLES}")
    content = _content(message.get("content"))
    if role == "system" and not isinstance(content, str):
        raise ValueError(f"system message {index} must have text content, got {content!r}")
    out = {"role": role, "content": content}
    if message.get("name") is not None:
        out["name"] = str(message["name"])
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = [_tool_call(c, index) for c in message["tool_calls"]]
    if message.get("tool_call_id") is not None:
        out["tool_call_id"] = message["tool_call_id"]
    if message.get("citations") is not None:  # document ids, as `parse_output` gives them, or the template's dicts
        out["citations"] = [c if isinstance(c, Mapping) else {"document_id": c} for c in message["citations"]]
    return out


def _content(content):
    """None -> ""; a list of text blocks -> their text; anything else unchanged."""
    if content is None:
        return ""
    if isinstance(content, (list, tuple)):
        texts = [_block_text(block) for block in content]
        if all(text is not None for text in texts):
            return "".join(texts)
        return list(content)
    return content


def _block_text(block) -> str | None:
    if isinstance(block, str):
        return block
    if isinstance(block, Mapping) and block.get("type") in _TEXT_BLOCKS and isinstance(block.get("text"), str):
        return block["text"]
    return None


def _tool_call(call, index: int) -> dict:
    if not isinstance(call, Mapping):
        raise ValueError(f"message {index}: a tool call must be a dict, got {call!r}")
    function = call.get("function") or call
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"message {index}: tool call without a function name: {call!r}")
    arguments = function.get("arguments", function.get("args"))
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    out = {"name": name, "arguments": arguments}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _tool(tool, index: int) -> dict:
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        tool = get_json_schema(tool)
    if not isinstance(tool, Mapping):
        raise ValueError(f"tool {index} must be a dict or a function, got {type(tool).__name__}")
    if "type" in tool:
        if tool["type"] != "function" or not isinstance(tool.get("function"), Mapping):
            raise ValueError(f"tool {index}: only function tools ({{'type': 'function', 'function': {{...}}}}) "
                             f"are supported, got type {tool['type']!r}")
        tool = tool["function"]
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise ValueError(f"tool {index} has no function name: {tool!r}")
    return dict(tool)


def _document(doc, index: int) -> dict:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("text"), str):
        raise ValueError(f"document {index} must be a dict with a 'text' string, got {doc!r}")
    doc = dict(doc)
    if doc.get("title") is not None:
        doc["title"] = str(doc["title"])
    return doc


def _response_format(response_format) -> tuple[bool, str | None]:
    """-> (JSON mode on, text to append to the system prompt or None)."""
    if response_format is None:
        return False, None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be a dict with a 'type', got {response_format!r}")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", response_format.get("schema"))
        if not isinstance(schema, Mapping):
            raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        schema_json = json.dumps(schema, indent=2, ensure_ascii=False)
        return True, "Respond with JSON that follows this JSON schema:\n" + schema_json
    raise ValueError(f"unknown response_format type {kind!r}; expected 'text', 'json_object' or 'json_schema'")
