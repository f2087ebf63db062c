"""A body's output constraint -> one compiled `Grammar` (llguidance), or a 400 naming the field.

Sources, at most one per body: OpenAI's `response_format` (json_object, json_schema), vLLM's
`structured_outputs` (json, regex, choice, grammar as Lark or GBNF, json_object) and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. Compiling runs on the
request worker thread, never the engine's, bounded by llguidance's parser limits (grammar size,
lexer states, per-step fuel); compiled grammars are kept in a small LRU cache per model.
JSON is written without loose whitespace (", " and ": " between items): a small model given
free whitespace can fill its whole budget with newlines.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
from llguidance.gbnf_to_lark import any_to_lark

from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.sampling.grammar import Grammar
from steerserve.server.errors import APIError
from steerserve.server.schemas.requests import SamplingFields
from steerserve.server.schemas.structured import (
    MAX_CHOICE_CHARS,
    MAX_GRAMMAR_CHARS,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
)

MAX_REPEAT = 1000  # a regex's {n,m}: llguidance's mask costs grow with it, every step
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
COMPACT_LAYOUT = {"whitespace_flexible": False, "key_separator": ":", "item_separator": ","}
ANY_OBJECT: dict = {"type": "object"}


@dataclass(frozen=True)
class Constraint:
    """A body's constraint as llguidance grammar text, and the field it came from."""

    grammar: str
    param: str


def check_repeats(text: str, param: str) -> None:
    """A regex (or grammar) whose repetition counts exceed MAX_REPEAT is a 400: `a{20000}`
    costs llguidance about 5 ms of mask a step, for the whole of the request."""
    for match in _REPEAT.finditer(text):
        counts = [count for count in match.groups() if count]
        if any(len(count) > 6 or int(count) > MAX_REPEAT for count in counts):
            raise APIError(400, f"repetition counts above {MAX_REPEAT} are refused "
                           f"({match.group(0)[:40]}): they would cost every step", param)


def check_schema_patterns(schema: object, param: str) -> None:
    """check_repeats on every `pattern` and `patternProperties` key of a schema."""
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                check_repeats(node["pattern"], param)
            if isinstance(node.get("patternProperties"), dict):
                for key in node["patternProperties"]:
                    check_repeats(key, param)
            pending.extend(node.values())


def _json_schema(schema: dict | str, param: str, layout: dict) -> Constraint:
    if isinstance(schema, str):
        if len(schema) > MAX_GRAMMAR_CHARS:
            raise APIError(400, f"the schema is longer than {MAX_GRAMMAR_CHARS} characters",
                           param)
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as exc:
            raise APIError(400, f"the schema is not valid JSON (or nests too deep): "
                           f"{str(exc)[:200]}", param) from exc
    if not isinstance(schema, dict):
        raise APIError(400, "a JSON schema must be an object", param)
    if len(json.dumps(schema)) > MAX_GRAMMAR_CHARS:
        raise APIError(400, f"the schema is longer than {MAX_GRAMMAR_CHARS} characters", param)
    check_schema_patterns(schema, param)
    try:
        return Constraint(llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults=layout), param)
    except (ValueError, TypeError) as exc:
        raise APIError(400, f"invalid JSON schema: {exc}", param) from exc


def _choice(choices: list[str], param: str) -> Constraint:
    if any(not c or len(c) > MAX_CHOICE_CHARS for c in choices):
        raise APIError(400, f"each choice must have 1 to {MAX_CHOICE_CHARS} characters", param)
    literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return Constraint(llguidance.LLMatcher.grammar_from_lark(f"start: {literals}"), param)


def _grammar(text: str, param: str) -> Constraint:
    """A Lark grammar (llguidance's dialect), or llama.cpp's GBNF (converted to Lark)."""
    check_repeats(text, param)
    try:
        lark = any_to_lark(text)
    except Exception as exc:  # the converter's own parse errors, of several types
        raise APIError(400, f"the grammar does not parse: {exc}", param) from exc
    return Constraint(llguidance.LLMatcher.grammar_from_lark(lark), param)


def _regex(pattern: str, param: str) -> Constraint:
    check_repeats(pattern, param)
    return Constraint(llguidance.LLMatcher.grammar_from_regex(pattern), param)


def _response_format(body: SamplingFields) -> Constraint | None:
    fmt = body.response_format
    if isinstance(fmt, JsonObjectFormat):
        return _json_schema(ANY_OBJECT, "response_format", JSON_LAYOUT)
    if isinstance(fmt, JsonSchemaResponseFormat):
        schema = fmt.json_schema.schema_
        if schema is None:
            raise APIError(400, "response_format.json_schema needs a schema",
                           "response_format.json_schema.schema")
        return _json_schema(schema, "response_format.json_schema.schema", JSON_LAYOUT)
    return None


def _structured_outputs(body: SamplingFields) -> Constraint | None:
    given = body.structured_outputs
    if given is None:
        return None
    fields = given.set_fields()
    if len(fields) != 1:
        raise APIError(400, "structured_outputs must set exactly one of json, regex, choice, "
                       f"grammar, json_object (got {', '.join(fields) or 'none'})",
                       "structured_outputs")
    param = f"structured_outputs.{fields[0]}"
    layout = COMPACT_LAYOUT if given.disable_any_whitespace else JSON_LAYOUT
    if given.json_ is not None:
        schema = given.json_
        if given.disable_additional_properties and isinstance(schema, dict):
            schema = {"additionalProperties": False, **schema}
        return _json_schema(schema, param, layout)
    if given.regex is not None:
        return _regex(given.regex, param)
    if given.choice is not None:
        return _choice(given.choice, param)
    if given.grammar is not None:
        return _grammar(given.grammar, param)
    return _json_schema(ANY_OBJECT, param, layout)


def _guided(body: SamplingFields) -> list[Constraint]:
    found = []
    if body.guided_json is not None:
        found.append(_json_schema(body.guided_json, "guided_json", JSON_LAYOUT))
    if body.guided_regex is not None:
        found.append(_regex(body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        found.append(_choice(body.guided_choice, "guided_choice"))
    if body.guided_grammar is not None:
        found.append(_grammar(body.guided_grammar, "guided_grammar"))
    return found


def body_constraint(body: SamplingFields) -> Constraint | None:
    """The one constraint a body sets, if any; two at once is a 400 naming the second."""
    found = [c for c in (_response_format(body), _structured_outputs(body)) if c is not None]
    found += _guided(body)
    if len(found) > 1:
        raise APIError(400, f"{found[0].param} and {found[1].param} both constrain the output; "
                       "set one", found[1].param)
    return found[0] if found else None


class GrammarCache:
    """Compiled grammars per model, most recently used kept; one llguidance tokenizer per
    model, built on first use (about a second for a 50k vocabulary)."""

    def __init__(self, capacity: int = 128) -> None:
        self.capacity = capacity
        self._tokenizers: dict[str, llguidance.LLTokenizer] = {}
        self._compiled: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.limits = llguidance.LLParserLimits(max_grammar_size=200_000,
                                                max_lexer_states=100_000)

    def compile(self, info: ModelInfo, constraint: Constraint) -> Grammar:
        key = (info.name, constraint.grammar)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            grammar = self._build(info, constraint)
            self._compiled[key] = grammar
            if len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
            return grammar

    def _build(self, info: ModelInfo, constraint: Constraint) -> Grammar:
        tokenizer = self._tokenizers.get(info.name)
        if tokenizer is None:
            tokenizer = llguidance.hf.from_tokenizer(info.tokenizer, n_vocab=info.vocab_size,
                                                     eos_token=sorted(info.eos_ids))
            self._tokenizers[info.name] = tokenizer
        matcher = llguidance.LLMatcher(tokenizer, constraint.grammar, log_level=0,
                                       limits=self.limits)
        matcher.compute_bitmask()  # the lexer is built lazily: its first step fails here
        if matcher.is_error():
            raise APIError(400, f"the constraint cannot be used: {matcher.get_error()[:500]}",
                           constraint.param)
        return Grammar(matcher, info.vocab_size)
