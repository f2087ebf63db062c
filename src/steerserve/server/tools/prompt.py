"""A chat body's conversation as `apply_chat_template` takes it, with its tools.

A template that renders tools (its source names `tools`, as Qwen's and Llama 3's do) gets them
and the conversation's calls natively. Any other template, such as the embedded SmolLM2's,
gets the documented default: the tool format's instructions in the system message, past calls
written in the format inside the assistant's turn, and tool results as user turns wrapped in
<tool_response> tags.
"""

from __future__ import annotations

import json
import re

from steerserve.server.schemas.requests import ChatCompletionRequest, ChatMessage
from steerserve.server.tools.formats import ParsedCall, ToolFormat


def renders_tools(template: str) -> bool:
    return re.search(r"\btools\b", template) is not None


def offered_tools(req: ChatCompletionRequest) -> list[dict]:
    """The tools the model is told about: none when tool_choice is "none"."""
    if not req.tools or req.tool_choice == "none":
        return []
    return [tool.model_dump(exclude_none=True) for tool in req.tools]


def conversation(req: ChatCompletionRequest, template: str,
                 fmt: ToolFormat) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the template."""
    tools = offered_tools(req)
    if renders_tools(template):
        return [_native(m) for m in req.messages], tools or None
    messages = [_written_out(m, fmt) for m in req.messages]
    if tools:
        messages = _with_instructions(messages, fmt.instructions(tools))
    return messages, None


def _base(m: ChatMessage) -> dict:
    return {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}


def _arguments(text: str) -> dict | str:
    """Templates expect a mapping (transformers' convention); text that is not one stays."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _native(m: ChatMessage) -> dict:
    message = _base(m)
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in m.tool_calls]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message


def _written_out(m: ChatMessage, fmt: ToolFormat) -> dict:
    message = _base(m)
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
    if m.tool_calls:
        calls = fmt.call_text([ParsedCall(c.function.name, c.function.arguments)
                               for c in m.tool_calls])
        message["content"] = f"{message['content']}\n{calls}" if message["content"] else calls
    return message


def _with_instructions(messages: list[dict], instructions: str) -> list[dict]:
    first = messages[0]
    if first["role"] in ("system", "developer"):
        return [{**first, "content": f"{first['content']}\n\n{instructions}"}, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]
