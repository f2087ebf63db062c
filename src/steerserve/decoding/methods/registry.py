"""The decoding methods a server offers, by name: the built-in ones, plus any registered."""

from __future__ import annotations

from steerserve.decoding.methods.base import DecodingMethod
from steerserve.decoding.methods.collaborative import Collaborative
from steerserve.decoding.methods.contrastive import Contrastive
from steerserve.decoding.methods.dola import DoLa
from steerserve.decoding.methods.logit_arithmetic import LogitArithmetic
from steerserve.decoding.methods.proxy_tuning import ProxyTuning
from steerserve.decoding.methods.routed_experts import RoutedExperts
from steerserve.decoding.methods.sh2 import SH2

BUILTIN: tuple[type[DecodingMethod], ...] = (ProxyTuning, Contrastive, SH2, DoLa,
                                             LogitArithmetic, Collaborative, RoutedExperts)


class MethodRegistry:
    def __init__(self, methods: tuple[type[DecodingMethod], ...] = BUILTIN) -> None:
        self._methods: dict[str, type[DecodingMethod]] = {}
        for method in methods:
            self.register(method)

    def register(self, method: type[DecodingMethod]) -> None:
        if method.name in self._methods:
            raise ValueError(f"a decoding method named '{method.name}' is already registered")
        self._methods[method.name] = method

    def get(self, name: str) -> type[DecodingMethod] | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return list(self._methods)

    def items(self) -> list[tuple[str, type[DecodingMethod]]]:
        return list(self._methods.items())
