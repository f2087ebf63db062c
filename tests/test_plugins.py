"""Decoding methods are plug-ins: a method written here, registered in a server's registry, gets
its HTTP fields, validation and a place in every batch without a line changed elsewhere; and
outside decoding/methods/ nothing names a method."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from steerserve.decoding.methods.base import (
    DecodingMethod,
    LanePlanner,
    Mix,
    ParamError,
    lane,
    param,
)
from steerserve.decoding.methods.registry import BUILTIN, MethodRegistry
from steerserve.decoding.request import LaneSpec
from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from tests.inprocess import InProcessServer

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BlendParams:
    blend: float = param(doc="weight of the hot distribution", ge=0.0, le=1.0)
    hot: float | None = param(None, doc="the hot temperature (default 2)", gt=0.0, le=10.0)


@dataclass(frozen=True, eq=False)
class TemperatureBlend(DecodingMethod):
    """(1 - w) log p(z) + w log p(z / T_hot): one lane read at two temperatures."""

    name: ClassVar[str] = "temperature_blend"
    Params: ClassVar[type] = BlendParams
    lanes: tuple[LaneSpec, ...]
    blend: float = 0.5

    @classmethod
    def build(cls, params: BlendParams, planner: LanePlanner) -> TemperatureBlend:
        if params.hot == 1.0:
            raise ParamError("hot", "a hot temperature of 1 blends a distribution with itself")
        base = planner.base
        hot = LaneSpec(base.model, base.prompt_ids, base.adapter, base.steering,
                       params.hot or 2.0)
        return cls((base, hot), params.blend)

    def mix(self) -> Mix:
        return Mix((lane(0, 1.0 - self.blend), lane(1, self.blend)), log_softmax=True)


@pytest.fixture(scope="module")
def server(llama):
    ctx = build_context(ServerSettings(vectors_dir=None), llama,
                        methods=MethodRegistry((*BUILTIN, TemperatureBlend)))
    live = InProcessServer(ctx)
    yield live
    live.stop()


def body(decoding: dict | None, **fields) -> dict:
    return {"model": "tiny-llama", "prompt": [1, 5, 9, 13], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "logprobs": 0, **({"decoding": decoding} if decoding else {}),
            **fields}


def test_a_new_method_decodes_as_its_reference(server, llama_reference):
    out = server.post("/v1/completions", body({"method": "temperature_blend", "blend": 0.3,
                                                 "hot": 3.0}))
    assert out.status_code == 200, out.text
    choice = out.json()["choices"][0]
    ids, logprobs = [1, 5, 9, 13], []
    for _ in range(5):
        with torch.inference_mode():
            z = llama_reference(torch.tensor([ids])).logits[0, -1].float()
        row = 0.7 * z.log_softmax(-1) + 0.3 * (z / 3.0).log_softmax(-1)
        token = int(row.argmax())
        logprobs.append(float(row.log_softmax(-1)[token]))
        ids.append(token)
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(logprobs, abs=1e-4)
    assert out.json()["decoding"] == {"method": "temperature_blend", "blend": 0.3, "hot": 3.0}


@pytest.mark.parametrize(("decoding", "param", "words"), [
    ({"method": "temperature_blend"}, "decoding.blend", "required"),
    ({"method": "temperature_blend", "blend": 2}, "decoding.blend", "less than or equal"),
    ({"method": "temperature_blend", "blend": 0.5, "hot": 1.0}, "decoding.hot", "itself"),
    ({"method": "temperature_blend", "blend": 0.5, "alpha": 1}, "decoding.alpha",
     "(it takes blend, hot)"),
    ({"method": "nothing"}, "decoding.method", "temperature_blend"),
])
def test_its_fields_are_validated_by_name(server, decoding, param, words):
    response = server.post("/v1/completions", body(decoding))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_it_shares_a_batch_with_the_built_in_methods(server):
    import concurrent.futures

    decodings = [None, {"method": "temperature_blend", "blend": 0.5},
                 {"method": "dola", "layers": [0]}, {"method": "sh2", "alpha": 1.0}]
    alone = [server.post("/v1/completions", body(d)).json()["choices"][0]["text"]
             for d in decodings]
    with concurrent.futures.ThreadPoolExecutor(len(decodings)) as pool:
        together = list(pool.map(lambda d: server.post("/v1/completions", body(
            d, max_tokens=5)).json()["choices"][0]["text"], decodings))
    assert together == alone


def test_a_name_is_registered_once():
    registry = MethodRegistry()
    with pytest.raises(ValueError, match="already registered"):
        registry.register(BUILTIN[0])


METHOD_NAMES = {cls.name for cls in BUILTIN}
# Where methods live and are registered; everywhere else they are plug-ins, unnamed.
ALLOWED = {REPO / "decoding" / "methods" / f.name for f in (REPO / "decoding" / "methods").glob(
    "*.py") if f.stem not in ("base", "combination")}


def test_nothing_outside_the_methods_names_a_method():
    found = []
    for folder in ("server", "decoding", "kernels", "adapters"):
        for path in (REPO / folder).rglob("*.py"):
            if path in ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in METHOD_NAMES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not found, found
