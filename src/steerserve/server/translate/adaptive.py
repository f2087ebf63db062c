"""The request's `adaptive_temperature` (or llama.cpp's `dynatemp_*`) -> AdaptiveTemperature.

Defaults: edt t0 = the request's temperature (1.0 when absent), theta = 1.0, n = 0.8 (the
paper's); dynatemp centre = the request's temperature, range 0 (off), exponent 1.0
(llama.cpp's); learned: the head's own level, greedy choice.
"""

from __future__ import annotations

from steerserve.decoding.sampling.adaptive import AdaptiveTemperature
from steerserve.decoding.sampling.temperature_head import TemperatureHead
from steerserve.server.errors import APIError
from steerserve.server.schemas.requests import AdaptiveTemperatureRequest, SamplingFields

PARAM = "adaptive_temperature"
_FIELDS = {"edt": {"t0", "theta", "n"}, "dynatemp": {"t0", "range", "exponent"},
           "learned": {"head", "level", "choice"}}


def resolve_adaptive(req: SamplingFields, heads: dict[str, TemperatureHead],
                     hidden_size: int) -> AdaptiveTemperature | None:
    """`hidden_size`: the width of the final hidden state a learned head will read (the
    request's own model's)."""
    rule = req.adaptive_temperature
    if rule is None:
        return _llama_cpp_dynatemp(req)
    if req.dynatemp_range is not None or req.dynatemp_exponent is not None:
        raise APIError(400, "give either adaptive_temperature or dynatemp_range/"
                       "dynatemp_exponent, not both", "dynatemp_range")
    _check_fields(rule)
    base = 1.0 if req.temperature is None else req.temperature
    t0 = base if rule.t0 is None else rule.t0
    if rule.method == "edt":
        return AdaptiveTemperature("edt", t0=t0, theta=_or(rule.theta, 1.0), n=_or(rule.n, 0.8))
    if rule.method == "dynatemp":
        return AdaptiveTemperature("dynatemp", t0=t0, range=_or(rule.range, 0.0),
                                   exponent=_or(rule.exponent, 1.0))
    if req.temperature is not None:
        raise APIError(400, "a learned head picks every temperature: 'temperature' has no "
                       "effect with method 'learned'", "temperature")
    return _learned(rule, heads, hidden_size)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _check_fields(rule: AdaptiveTemperatureRequest) -> None:
    given = {name for name in rule.model_fields_set if name != "method"}
    for name in sorted(given - _FIELDS[rule.method]):
        raise APIError(400, f"'{name}' does not apply to method '{rule.method}' (it takes "
                       f"{', '.join(sorted(_FIELDS[rule.method]))})", f"{PARAM}.{name}")


def _learned(rule: AdaptiveTemperatureRequest, heads: dict[str, TemperatureHead],
             hidden_size: int) -> AdaptiveTemperature:
    if rule.head is None:
        raise APIError(400, "method 'learned' needs 'head', a temperature head's name",
                       f"{PARAM}.head")
    head = heads.get(rule.head)
    if head is None:
        served = ", ".join(sorted(heads)) or "none loaded; see --temperature-head"
        raise APIError(404, f"no temperature head named '{rule.head}' (served: {served})",
                       f"{PARAM}.head", "temperature_head_not_found")
    if head.config.hidden_size != hidden_size:
        raise APIError(400, f"temperature head '{rule.head}' reads hidden states of width "
                       f"{head.config.hidden_size}; this request's model has {hidden_size}",
                       f"{PARAM}.head")
    return AdaptiveTemperature("learned", head=head, level=rule.level or head.config.level,
                               choice=rule.choice or "greedy")


def _llama_cpp_dynatemp(req: SamplingFields) -> AdaptiveTemperature | None:
    """llama.cpp's top-level fields: dynamic temperature is on when the range is above 0."""
    if not req.dynatemp_range:
        return None
    centre = 1.0 if req.temperature is None else req.temperature
    return AdaptiveTemperature("dynatemp", t0=centre, range=req.dynatemp_range,
                               exponent=_or(req.dynatemp_exponent, 1.0))
