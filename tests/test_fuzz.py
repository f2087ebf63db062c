"""Fuzz: schemathesis generates requests for every route from the server's own /openapi.json
(valid and invalid bodies, parameters and headers) against a live server: no 5xx, ever, and
the server is healthy afterwards.

Short here (a fixed seed, STEERSERVE_FUZZ_EXAMPLES per route, 25 by default); the full run
is the same test with a larger count and a random seed:

    STEERSERVE_FUZZ_EXAMPLES=1000 STEERSERVE_FUZZ_RANDOM=1 .venv/bin/python -P -m pytest \\
        tests/test_fuzz.py -q
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from tests.inprocess import InProcessServer
from tests.tiny_models import tiny_llama

EXAMPLES = int(os.environ.get("STEERSERVE_FUZZ_EXAMPLES", "25"))
RANDOM = os.environ.get("STEERSERVE_FUZZ_RANDOM") == "1"


@pytest.fixture(scope="module")
def fuzz_server(tokenizer, tmp_path_factory):
    """Every route switched on; a short context so generated max_tokens stay cheap."""
    model = from_pretrained_objects(tiny_llama(len(tokenizer)), tokenizer, "tiny")
    settings = ServerSettings(
        vectors_dir=None, max_model_len=64, max_n=4, allow_runtime_vectors=True,
        allow_runtime_lora=True, adapter_dir=str(tmp_path_factory.mktemp("adapters")),
        max_loras=2, max_lora_rank=4)
    live = InProcessServer(build_context(settings, model))
    yield live
    live.stop()


def fuzz(operation, base_url: str) -> None:
    """Hypothesis over one operation's generated cases (schemathesis's pytest plugin needs
    pytest < 9, so its strategies are driven directly)."""

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=60)

    run()


def test_no_route_answers_5xx(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # every route, bodies included
    for operation in operations:
        fuzz(operation, fuzz_server.base_url)


def served(server, route: str, status: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    prefix = f'steerserve_http_requests_total{{route="{route}",status="{status}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines()
               if line.startswith(prefix))


def test_the_server_is_healthy_after_the_fuzz(fuzz_server):
    assert httpx.get(f"{fuzz_server.base_url}/health", timeout=10).status_code == 200
    for route in ("/v1/chat/completions", "/v1/completions"):  # both kinds of case got in
        assert served(fuzz_server, route, "200") > 0 and served(fuzz_server, route, "400") > 0
    assert fuzz_server.engine.num_running == 0
    assert fuzz_server.engine.stats.finished.get("error", 0) == 0
