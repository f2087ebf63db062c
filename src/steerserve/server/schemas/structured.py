"""Structured-output request fields: OpenAI's `response_format` and vLLM's
`structured_outputs` (and its older `guided_*` names), as pydantic models. What each means
as a grammar is server/translate/structured.py's business."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from steerserve.server.schemas.base import Strict

MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or grammar's text; compiled within limits
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024


class JsonSchemaFormat(Strict):
    """`response_format.json_schema`: OpenAI's named schema."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


def _format_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"[{kind}]"  # bracketed: error locations drop it, as they drop union members' names


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("[text]")] | Annotated[JsonObjectFormat, Tag("[json_object]")]
    | Annotated[JsonSchemaResponseFormat, Tag("[json_schema]")], Discriminator(_format_kind)]


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # accepted: the JSON written here is never loose
    disable_fallback: bool = False  # accepted: there is one backend and no fallback
    disable_additional_properties: bool = False

    def set_fields(self) -> list[str]:
        given = {"json": self.json_, "regex": self.regex, "choice": self.choice,
                 "grammar": self.grammar, "json_object": self.json_object or None}
        return [name for name, value in given.items() if value is not None]


class GuidedFields(Strict):
    """The constraint fields a chat or completion body may carry (vLLM's names)."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    guided_grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
