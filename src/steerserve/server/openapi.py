"""/openapi.json describes the real request bodies, extensions and every registered decoding
method included, so clients, docs and the fuzz suite (tests/test_fuzz.py) see what the routes
accept. (The routes read their bodies themselves, for the size bound and OpenAI errors, so
FastAPI cannot infer them.)"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from steerserve.server.schemas.decoding import DecodingSchemas
from steerserve.server.schemas.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from steerserve.server.schemas.responses import ResponsesRequest
from steerserve.server.schemas.steering import ExtractVectorRequest
from steerserve.server.schemas.tokenizer import DetokenizeRequest, TokenizeRequest

BODIES = {
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/load_lora_adapter", "post"): LoadLoraRequest,
    ("/v1/unload_lora_adapter", "post"): UnloadLoraRequest,
    ("/v1/steering/vectors", "post"): ExtractVectorRequest,
    ("/v1/responses", "post"): ResponsesRequest,
    ("/tokenize", "post"): TokenizeRequest,
    ("/v1/tokenize", "post"): TokenizeRequest,
    ("/detokenize", "post"): DetokenizeRequest,
    ("/v1/detokenize", "post"): DetokenizeRequest,
}
WITH_DECODING = (ChatCompletionRequest, CompletionRequest)
REF = "#/components/schemas/{model}"


def document(app: FastAPI, decoding: DecodingSchemas, served: list[str]) -> dict:
    """`served`: the model names a request may use now (hosted models and adapters)."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    methods = list(decoding.models.values())
    refs, defs = models_json_schema([(m, "validation") for m in [*BODIES.values(), *methods]],
                                    ref_template=REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    for (path, verb), model in BODIES.items():
        operation = schema["paths"].get(path, {}).get(verb)
        if operation is not None:
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(model, "validation")]}}}
    for model in (*WITH_DECODING, ExtractVectorRequest):
        components[model.__name__]["properties"]["model"] = {
            "type": "string", "enum": served, "description": "a model served here"}
    one_of = {"oneOf": [refs[(m, "validation")] for m in methods]}
    for model in WITH_DECODING:
        components[model.__name__]["properties"]["decoding"] = {
            "anyOf": [one_of, {"type": "null"}], "description": "a decoding method and its "
            "parameters (docs/methods.md)"}
    return schema


def install(app: FastAPI, decoding: DecodingSchemas, served: Callable[[], list[str]]) -> None:
    """Built per request: adapters loaded at run time are served models too."""
    app.openapi = lambda: document(app, decoding, served())
