"""Which base-model modules a LoRA config selects (peft's target_modules rules)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from re import _constants as sre_constants
from re import _parser as sre_parser
from typing import Any

from torch import nn

from steerserve.adapters.errors import AdapterError

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_MAX_REGEX_LENGTH = 256
_MAX_REGEX_REPEATS = 4
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}


@dataclass(frozen=True)
class _BaseLayers:
    linears: dict[str, nn.Linear]
    others: frozenset[str]  # non-Linear module paths, only to explain a bad target
    output: str | None  # the output layer, left out of "all-linear"


def _module_selector(config: dict[str, Any], base: _BaseLayers) -> Callable[[str], bool]:
    """peft's target matching: target_modules, minus exclude_modules, within the layers."""
    targets = config.get("target_modules")
    if not targets:
        raise AdapterError("target_modules is missing or empty")
    target = _target_matcher(targets, "target_modules", base)
    _check_targets_exist(targets, target, base)
    excluded = config.get("exclude_modules")
    exclude = _target_matcher(excluded, "exclude_modules", base) if excluded else None
    in_layers = _layer_filter(config, targets)
    return lambda path: target(path) and in_layers(path) and not (exclude and exclude(path))


def _target_matcher(spec: object, key: str, base: _BaseLayers) -> Callable[[str], bool]:
    if isinstance(spec, str) and spec.lower() == "all-linear":
        return lambda path: path in base.linears and path != base.output
    if isinstance(spec, str) and _PLAIN_NAME.fullmatch(spec):
        spec = [spec]
    if isinstance(spec, str):
        pattern = _screened_regex(spec, key)
        return lambda path: pattern.fullmatch(path) is not None
    if not isinstance(spec, list) or not all(isinstance(n, str) and n for n in spec):
        raise AdapterError(f"{key} must be a list of module names or a string")
    names = frozenset(spec)
    return lambda path: path in names or any(path.endswith("." + n) for n in names)


def _check_targets_exist(spec: object, target: Callable[[str], bool], base: _BaseLayers) -> None:
    """Each target must name Linear layers of the base model, and only Linear layers."""
    entries = spec if isinstance(spec, list) else [spec]
    for entry in entries:
        matcher = target if isinstance(spec, str) else _target_matcher([entry], "", base)
        non_linear = sorted(p for p in base.others if p and matcher(p))
        if non_linear:
            raise AdapterError(f"target_modules entry {entry!r} selects '{non_linear[0]}', "
                               "which is not a Linear layer (only Linear layers are supported)")
        if not any(matcher(p) for p in base.linears):
            raise AdapterError(f"target module {entry!r} is not found among the base model's "
                               "Linear layers")


def _screened_regex(pattern: str, key: str) -> re.Pattern[str]:
    """Compile a target regex, refusing shapes that can backtrack exponentially."""
    if len(pattern) > _MAX_REGEX_LENGTH:
        raise AdapterError(f"{key} regex is longer than {_MAX_REGEX_LENGTH} characters")
    try:
        risks = list(_repetition_risks(sre_parser.parse(pattern), inside=False))
    except re.error as err:
        raise AdapterError(f"{key} is not a valid regular expression: {err}") from err
    if any(risks) or len(risks) > _MAX_REGEX_REPEATS:
        raise AdapterError(f"{key} regex {pattern!r} is too complex (nested repetition, a "
                           f"repeated alternation or more than {_MAX_REGEX_REPEATS} repetitions)")
    return re.compile(pattern)


def _repetition_risks(items: Any, inside: bool) -> Iterator[bool]:
    """One item per repetition in a parsed regex: True when it sits inside another repetition;
    also True for an alternation inside a repetition."""
    for op, arg in items:
        repeat = op in _REPEATS and arg[1] > 1
        if repeat or (inside and op is sre_constants.BRANCH):
            yield inside
        for child in _subpatterns(arg):
            yield from _repetition_risks(child, inside or repeat)


def _subpatterns(arg: Any) -> Iterator[Any]:
    if isinstance(arg, sre_parser.SubPattern):
        yield arg
    elif isinstance(arg, list | tuple):
        for item in arg:
            yield from _subpatterns(item)


def _layer_filter(config: dict[str, Any], targets: object) -> Callable[[str], bool]:
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return lambda _: True
    if isinstance(targets, str):  # peft refuses this combination too
        raise AdapterError("layers_to_transform cannot be combined with a string target_modules")
    indexes = [layers] if isinstance(layers, int) else layers
    if not isinstance(indexes, list) or not all(_is_int(i) for i in indexes):
        raise AdapterError(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
    regexes = _layer_index_regexes(config.get("layers_pattern"))
    return lambda path: _layer_index(path, regexes) in indexes


def _layer_index_regexes(patterns: object) -> list[re.Pattern[str]]:
    if not patterns:  # peft: the first number that follows a dotted name
        return [re.compile(r".*?\.[^.]*\.(\d+)\.")]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterError(f"layers_pattern must be a string or a list, got {patterns!r}")
    return [re.compile(rf"(?:^|.*?\.){re.escape(p)}\.(\d+)\.") for p in patterns]


def _layer_index(path: str, regexes: list[re.Pattern[str]]) -> int | None:
    for regex in regexes:
        match = regex.match(path)
        if match:
            return int(match.group(1))
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
