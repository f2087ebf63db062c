"""The `decoding` field's schema, built from the registered methods' `Params` dataclasses.

Each method declares its HTTP fields next to itself (decoding/methods/*.py, `param()`); here
they become one strict pydantic model per method, tagged by `method`, and a validated body
goes back to the method's own dataclass. No method is named in this module.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from steerserve.decoding.methods.base import DecodingMethod
from steerserve.decoding.methods.registry import MethodRegistry
from steerserve.server.errors import APIError, validation_error

PARAM = "decoding"


class _ParamsModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params_class: ClassVar[type]  # the dataclass a validated body becomes


def _annotation(hint: Any) -> Any:
    """The field's type with every nested dataclass replaced by its pydantic model."""
    if dataclasses.is_dataclass(hint):
        return model_for(hint)
    origin = get_origin(hint)
    if origin is None or origin is Literal:
        return hint
    args = tuple(_annotation(arg) for arg in get_args(hint))
    if origin in (Union, types.UnionType):
        return Union[args]  # noqa: UP007 (built at run time)
    return origin[args]


def _has_float(hint: Any) -> bool:
    return hint is float or any(_has_float(arg) for arg in get_args(hint))


def model_for(params: type, method: str | None = None) -> type[_ParamsModel]:
    """A strict model of a `Params` dataclass (plus `method: Literal[name]` at the top)."""
    hints = typing.get_type_hints(params)
    fields: dict[str, Any] = {}
    if method is not None:
        fields["method"] = (Literal[method], Field(description="the decoding method"))
    for item in dataclasses.fields(params):
        bounds = dict(item.metadata)
        doc = bounds.pop("doc", None)
        if _has_float(hints[item.name]):
            bounds["allow_inf_nan"] = False
        default = ... if item.default is dataclasses.MISSING else item.default
        fields[item.name] = (_annotation(hints[item.name]),
                             Field(default, description=doc, **bounds))
    model = create_model(f"{params.__name__}Body", __base__=_ParamsModel, **fields)
    model.params_class = params
    return model


def _to_params(value: Any) -> Any:
    if isinstance(value, _ParamsModel):
        names = [f.name for f in dataclasses.fields(value.params_class)]
        return value.params_class(**{n: _to_params(getattr(value, n)) for n in names})
    if isinstance(value, list):
        return [_to_params(v) for v in value]
    return value


class DecodingSchemas:
    """One model per registered method; parses a request's `decoding` object."""

    def __init__(self, registry: MethodRegistry) -> None:
        self.registry = registry
        self.models = {name: model_for(cls.Params, name) for name, cls in registry.items()}

    def parse(self, raw: Any) -> tuple[type[DecodingMethod], Any, dict]:
        """(method class, its Params instance, the fields the client set)."""
        if not isinstance(raw, dict):
            raise APIError(400, "decoding must be an object with a 'method'", PARAM)
        name = raw.get("method")
        model = self.models.get(name) if isinstance(name, str) else None
        if model is None:
            raise APIError(400, f"decoding.method must be one of {', '.join(self.models)}",
                           f"{PARAM}.method", "invalid_value")
        try:
            body = model.model_validate(raw)
        except ValidationError as exc:
            raise self._error(exc, name) from exc
        return self.registry.get(name), _to_params(body), body.model_dump(exclude_unset=True)

    def _error(self, exc: ValidationError, method: str) -> APIError:
        err = validation_error(exc)
        if err.param is None:
            return APIError(400, f"{PARAM}: {err.message}", PARAM, err.code)
        param = f"{PARAM}.{err.param}"
        if err.code == "unknown_field" and "." not in err.param:
            takes = ", ".join(n for n in self.models[method].model_fields if n != "method")
            return APIError(400, f"'{err.param}' does not apply to method '{method}' (it "
                            f"takes {takes})", param, err.code)
        return APIError(400, err.message.replace(err.param, param, 1), param, err.code)
