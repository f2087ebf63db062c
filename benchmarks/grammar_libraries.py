#!/usr/bin/env python
"""The three grammar libraries vLLM ships (xgrammar, llguidance, outlines-core), compared on
this CPU with the embedded model's tokenizer: JSON-schema compile time, the per-step cost of
filling the token mask at batch 1 and 64, and which JSON-Schema features each gets right.

    .venv/bin/pip install xgrammar llguidance outlines-core   # the two not chosen are not deps
    .venv/bin/python benchmarks/grammar_libraries.py [--rounds 3]

A library that is not installed is skipped. Correctness: for every feature, a document that
satisfies the schema must be accepted token by token and end in an accepting state, and one
that breaks it must be refused somewhere (or not accepted at its end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoTokenizer

from steerserve.decoding.model.loader import resolve_source

ORDER = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 1, "maximum": 99999},
    "customer": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}},
        "required": ["name", "email"], "additionalProperties": False},
    "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
        "type": "object", "properties": {"sku": {"type": "string"},
                                         "qty": {"type": "integer"},
                                         "price": {"type": "number"}},
        "required": ["sku", "qty", "price"], "additionalProperties": False}},
    "status": {"enum": ["open", "paid", "shipped"]},
    "gift": {"type": "boolean"}},
    "required": ["id", "customer", "items", "status", "gift"], "additionalProperties": False}
ORDER_DOC = {"id": 42, "customer": {"name": "Ada", "email": "ada@example.com"},
             "items": [{"sku": "A-1", "qty": 2, "price": 9.5},
                       {"sku": "B-7", "qty": 1, "price": 120.0}],
             "status": "paid", "gift": False}


def _object(props: dict, required: list[str] | None = None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props),
            "additionalProperties": False, **extra}


# (feature, schema, a document it accepts, a document it refuses)
FEATURES: list[tuple[str, dict, object, object]] = [
    ("types", _object({"s": {"type": "string"}, "i": {"type": "integer"},
                       "n": {"type": "number"}, "b": {"type": "boolean"},
                       "z": {"type": "null"}}),
     {"s": "x", "i": 3, "n": 1.5, "b": True, "z": None},
     {"s": "x", "i": 3.5, "n": 1.5, "b": True, "z": None}),
    ("required", _object({"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a"]),
     {"a": 1}, {"b": 1}),
    ("enum", _object({"c": {"enum": ["red", "green"]}}), {"c": "red"}, {"c": "blue"}),
    ("const", _object({"v": {"const": "v1"}}), {"v": "v1"}, {"v": "v2"}),
    ("pattern", _object({"p": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}}),
     {"p": "555-1234"}, {"p": "5551234"}),
    ("string length", _object({"s": {"type": "string", "minLength": 2, "maxLength": 4}}),
     {"s": "abc"}, {"s": "abcdef"}),
    ("integer bounds", _object({"i": {"type": "integer", "minimum": 1, "maximum": 10}}),
     {"i": 7}, {"i": 11}),
    ("array bounds", _object({"a": {"type": "array", "items": {"type": "integer"},
                                    "minItems": 1, "maxItems": 2}}),
     {"a": [1, 2]}, {"a": [1, 2, 3]}),
    ("nested objects", ORDER, ORDER_DOC, {**ORDER_DOC, "customer": {"name": "Ada"}}),
    ("anyOf", _object({"x": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}),
     {"x": "a"}, {"x": True}),
    ("$ref / $defs", {**_object({"p": {"$ref": "#/$defs/point"}}), "$defs": {
        "point": _object({"x": {"type": "integer"}, "y": {"type": "integer"}})}},
     {"p": {"x": 1, "y": 2}}, {"p": {"x": 1}}),
    ("additionalProperties false", _object({"a": {"type": "integer"}}),
     {"a": 1}, {"a": 1, "b": 2}),
    ("format date", _object({"d": {"type": "string", "format": "date"}}),
     {"d": "2026-12-04"}, {"d": "yesterday"}),
]


class Library:
    """One library behind the three operations the comparison needs."""

    name: str

    def compile(self, schema: dict): ...
    def matcher(self, compiled): ...
    def fill(self, matcher, mask: torch.Tensor, row: int) -> None: ...
    def accept(self, matcher, token: int) -> bool: ...
    def accepting(self, matcher) -> bool: ...
    def allocate(self, batch: int) -> torch.Tensor: ...


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar
        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1,
                                                 cache_enabled=False)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                  separators=(",", ":"))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, mask, row):
        matcher.fill_next_token_bitmask(mask, row)

    def accept(self, matcher, token):
        return matcher.accept_token(token)

    def accepting(self, matcher):
        return matcher.is_terminated() or matcher.accept_token(self.info.stop_token_ids[0])

    def allocate(self, batch):
        return self.xgr.allocate_token_bitmask(batch, self.info.vocab_size)


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)  # compiles lazily: build one
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def fill(self, matcher, mask, row):
        self.llg.torch.fill_next_token_bitmask(matcher, mask, row)

    def accept(self, matcher, token):
        return matcher.consume_token(token) and not matcher.is_error()

    def accepting(self, matcher):
        return matcher.is_accepting()

    def allocate(self, batch):
        return self.llg.torch.allocate_token_bitmask(batch, self.tokenizer.vocab_size)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable stand-in of each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import outlines_core
        import outlines_core.json_schema
        import outlines_core.kernels.torch
        self.oc = outlines_core
        decoder = _byte_decoder()
        tokens: dict[bytes, list[int]] = {}
        for text, token_id in tokenizer.get_vocab().items():
            if token_id == tokenizer.eos_token_id or token_id in tokenizer.all_special_ids:
                continue
            try:
                tokens.setdefault(bytes(decoder[c] for c in text), []).append(token_id)
            except KeyError:
                continue
        self.eos = tokenizer.eos_token_id
        self.vocab = outlines_core.Vocabulary(self.eos, tokens)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, mask, row):
        self.oc.kernels.torch.fill_next_token_bitmask(matcher, mask[row:row + 1])

    def accept(self, matcher, token):
        try:
            matcher.advance(token)
        except Exception:
            return False
        return True

    def accepting(self, matcher):
        return matcher.is_finished() or self.eos in matcher.get_tokens()

    def allocate(self, batch):
        return self.oc.kernels.torch.allocate_token_bitmask(self.vocab_size).repeat(batch, 1)


def follows(library: Library, compiled, token_ids: list[int]) -> bool:
    matcher = library.matcher(compiled)
    return all(library.accept(matcher, t) for t in token_ids) and library.accepting(matcher)


def timed(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def mask_step_ms(library: Library, compiled, token_ids: list[int], batch: int) -> float:
    """Median time to fill one step's mask for `batch` matchers, each walking the document."""
    matchers = [library.matcher(compiled) for _ in range(batch)]
    mask = library.allocate(batch)
    times = []
    for token in token_ids:
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            library.fill(matcher, mask, row)
        times.append(time.perf_counter() - start)
        for matcher in matchers:
            library.accept(matcher, token)
    return statistics.median(times) * 1000


def report(library: Library, tokenizer, rounds: int) -> None:
    compile_ms = timed(lambda: library.compile(ORDER), rounds)
    compiled = library.compile(ORDER)
    doc_ids = tokenizer(json.dumps(ORDER_DOC, separators=(",", ":")))["input_ids"]
    right, wrong = [], []
    for feature, schema, good, bad in FEATURES:
        try:
            feature_compiled = library.compile(schema)
        except Exception as exc:  # an unsupported keyword
            wrong.append(f"{feature} (compile: {type(exc).__name__})")
            continue
        ids = [tokenizer(json.dumps(doc, separators=(",", ":")))["input_ids"]
               for doc in (good, bad)]
        ok = follows(library, feature_compiled, ids[0]) and not follows(
            library, feature_compiled, ids[1])
        (right if ok else wrong).append(feature)
    one, many = (mask_step_ms(library, compiled, doc_ids, b) for b in (1, 64))
    print(f"| {library.name} | {compile_ms:.1f} | {one:.3f} | {many:.2f} | "
          f"{len(right)}/{len(FEATURES)} | {', '.join(wrong) or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = resolve_source(args.model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
    vocab_size = len(tokenizer)
    torch.set_num_threads(1)
    print(f"tokenizer: {args.model}, {vocab_size} tokens; the order schema's document is "
          f"{len(tokenizer(json.dumps(ORDER_DOC))['input_ids'])} tokens\n")
    print("| library | compile order schema ms | mask fill ms, batch 1 | batch 64 | "
          "features right | wrong |")
    print("|---|---|---|---|---|---|")
    for make in (XGrammar, LLGuidance, OutlinesCore):
        try:
            library = make(tokenizer, vocab_size)
        except ImportError as exc:
            print(f"| {make.name} | not installed ({exc.name}) | | | | |")
            continue
        report(library, tokenizer, args.rounds)


if __name__ == "__main__":
    main()
