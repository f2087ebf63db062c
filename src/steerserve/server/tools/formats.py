"""Tool-call formats: how a family's model writes a call, as instructions for a template that
cannot render tools, a grammar that forces calls whose arguments follow each tool's schema,
and a reader that takes calls out of the text as it streams.

Hermes (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block a call) is what
Qwen's templates ask for and the default here; Llama 3's is bare JSON
(`{"name": ..., "parameters": {...}}`, calls separated by "; "). Reading the whole text and
reading it in pieces is the same code, so a stream assembles to the whole answer.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from steerserve.server.translate.structured import JSON_LAYOUT

ANY_ARGUMENTS = {"type": "object"}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass
class Delta:
    """What a piece of text adds to the answer: plain content and finished calls."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)

    def merge(self, other: Delta) -> Delta:
        return Delta(self.content + other.content, self.calls + other.calls)


def tool_function(tool: dict) -> dict:
    """The `function` part of an OpenAI tool, with its parameters' schema filled in."""
    function = tool["function"]
    return {**function, "parameters": function.get("parameters") or ANY_ARGUMENTS}


def _call_schema(tool: dict, arguments_key: str) -> dict:
    function = tool_function(tool)
    return {"type": "object", "properties": {
        "name": {"const": function["name"]}, arguments_key: function["parameters"]},
        "required": ["name", arguments_key], "additionalProperties": False,
        "x-guidance": JSON_LAYOUT}


def _read_call(text: str) -> ParsedCall | None:
    """A call's JSON object, with its arguments under `arguments` or `parameters`."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


class Content:
    """Content as the answer reports it: surrounding whitespace dropped, so that pieces of a
    stream and the whole text agree (whitespace is held until more text follows)."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        kept = text.rstrip()
        self.held = text[len(kept):]
        return kept


class CallReader(ABC):
    """Reads one choice's text, piece by piece, into content and calls."""

    @abstractmethod
    def feed(self, text: str) -> Delta: ...

    @abstractmethod
    def finish(self) -> Delta: ...

    def read_all(self, text: str) -> Delta:
        return self.feed(text).merge(self.finish())


class LimitedReader(CallReader):
    """Another reader's content, and its first `limit` calls only (`parallel_tool_calls:
    false`; the Responses API's `max_tool_calls`)."""

    def __init__(self, reader: CallReader, limit: int) -> None:
        self.reader = reader
        self.left = limit

    def feed(self, text: str) -> Delta:
        return self._kept(self.reader.feed(text))

    def finish(self) -> Delta:
        return self._kept(self.reader.finish())

    def _kept(self, delta: Delta) -> Delta:
        calls = delta.calls[:self.left]
        self.left -= len(calls)
        return Delta(delta.content, calls)


class ToolFormat(ABC):
    name: str

    def open_reader(self, max_calls: int | None) -> CallReader:
        reader = self.reader()
        return reader if max_calls is None else LimitedReader(reader, max_calls)

    @abstractmethod
    def instructions(self, tools: list[dict]) -> str:
        """The system-message text that teaches a template without tools the format."""

    @abstractmethod
    def call_text(self, calls: list[ParsedCall]) -> str:
        """A past assistant turn's calls, as the model would have written them."""

    @abstractmethod
    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """Lark (llguidance): one call, or several, each of a listed tool."""

    @abstractmethod
    def reader(self) -> CallReader: ...


def _alternatives(tools: list[dict], arguments_key: str) -> str:
    rules = [f"call_{i}: %json {json.dumps(_call_schema(tool, arguments_key))}"
             for i, tool in enumerate(tools)]
    return "body: " + " | ".join(f"call_{i}" for i in range(len(tools))) + "\n" + "\n".join(
        rules)


class Hermes(ToolFormat):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def instructions(self, tools: list[dict]) -> str:
        listed = "\n".join(json.dumps({"type": "function", "function": tool_function(t)},
                                      ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to answer the user. The "
                f"functions are listed inside <tools></tools>:\n<tools>\n{listed}\n</tools>\n\n"
                "To call a function, write a JSON object with its name and arguments inside "
                "<tool_call></tool_call> tags, one block per call:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')

    def call_text(self, calls: list[ParsedCall]) -> str:
        return "\n".join(f'{self.START}\n{{"name": {json.dumps(c.name)}, "arguments": '
                         f"{c.arguments}}}\n{self.END}" for c in calls)

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                f'call: "{self.START}\\n" body "\\n{self.END}"\n' + _alternatives(tools,
                                                                               "arguments"))

    def reader(self) -> CallReader:
        return HermesReader()


class HermesReader(CallReader):
    def __init__(self) -> None:
        self.pending = ""
        self.inside = False
        self.content = Content()

    def feed(self, text: str) -> Delta:
        self.pending += text
        delta = Delta()
        while True:
            if self.inside:
                end = self.pending.find(Hermes.END)
                if end < 0:
                    return delta
                block, self.pending = self.pending[:end], self.pending[end + len(Hermes.END):]
                self.inside = False
                call = _read_call(block.strip())
                if call is not None:
                    delta.calls.append(call)
                else:  # not a call after all: it stays text
                    delta.content += self.content.add(Hermes.START + block + Hermes.END)
                continue
            start = self.pending.find(Hermes.START)
            if start < 0:
                keep = _partial_suffix(self.pending, Hermes.START)
                cut = len(self.pending) - keep
                delta.content += self.content.add(self.pending[:cut])
                self.pending = self.pending[cut:]
                return delta
            delta.content += self.content.add(self.pending[:start])
            self.pending = self.pending[start + len(Hermes.START):]
            self.inside = True

    def finish(self) -> Delta:
        rest = (Hermes.START if self.inside else "") + self.pending
        self.pending, self.inside = "", False
        return Delta(self.content.add(rest))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could begin `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class Llama3Json(ToolFormat):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def instructions(self, tools: list[dict]) -> str:
        listed = "\n\n".join(json.dumps({"type": "function", "function": tool_function(t)},
                                        ensure_ascii=False) for t in tools)
        return ("Given the following functions, respond with a JSON for a function call with "
                "its proper arguments that best answers the given prompt.\n\nRespond in the "
                'format {"name": function name, "parameters": dictionary of argument name '
                "and its value}. Do not use variables.\n\n" + listed)

    def call_text(self, calls: list[ParsedCall]) -> str:
        return "; ".join(f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}'
                         for c in calls)

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        repeat = ' ("; " body)*' if parallel else ""
        return f"start: body{repeat}\n" + _alternatives(tools, "parameters")

    def reader(self) -> CallReader:
        return Llama3Reader()


class Llama3Reader(CallReader):
    """A reply that opens with `{` (or the python tag) is read whole at the end, as calls if
    every part is one; any other reply is content as it comes."""

    def __init__(self) -> None:
        self.text = ""
        self.decided: bool | None = None  # True: a call candidate, held to the end
        self.content = Content()

    def feed(self, text: str) -> Delta:
        if self.decided is None:
            self.text += text
            head = self.text.lstrip()
            if not head or (Llama3Json.TAG.startswith(head) and head != Llama3Json.TAG):
                return Delta()
            self.decided = head.startswith(("{", Llama3Json.TAG))
            if self.decided:
                return Delta()
            text, self.text = self.text, ""
        elif self.decided:
            self.text += text
            return Delta()
        return Delta(self.content.add(text))

    def finish(self) -> Delta:
        text, self.text = self.text, ""
        if self.decided is not False:
            calls = _read_calls(text.strip().removeprefix(Llama3Json.TAG))
            if calls:
                return Delta(calls=calls)
        return Delta(self.content.add(text))


def _read_calls(text: str) -> list[ParsedCall]:
    """Calls separated by ';' (and whitespace); nothing unless every part is a call."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            _, end = decoder.raw_decode(text, at)
        except ValueError:
            return []
        call = _read_call(text[at:end])
        if call is None:
            return []
        calls.append(call)
        at = end
        while at < len(text) and text[at] in "; \n\t":
            at += 1
    return calls


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Hermes(), Llama3Json())}


def format_for(option: str, template: str | None) -> ToolFormat:
    """The server's --tool-call-parser, or (auto) the format a chat template asks for."""
    if option != "auto":
        return FORMATS[option]
    if template and Llama3Json.TAG in template:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]
