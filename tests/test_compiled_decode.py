"""The compiled decode graph (`--compile-decode`, decoding/model/compiled.py): the same tokens
as HF `generate` on an untouched copy, logits equal to the eager forward's to float rounding at
every batch size and key length without compiling again, added steering vectors inside the
graph, batches it does not cover left to the eager forward, and families it does not cover
refused with the reason."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch

from steerserve.adapters.lora.files import load_lora_adapter
from steerserve.adapters.steering.plan import decode_plan
from steerserve.adapters.steering.spec import (
    ApplyTo,
    SteerEdit,
    SteeringSpec,
    SteerMode,
    SteerTarget,
)
from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.methods.dola import DoLa
from steerserve.decoding.model.attention_split import split_attention
from steerserve.decoding.model.capture import EMBEDDINGS, Capture
from steerserve.decoding.model.compiled import keys_worth_leaving
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.decoding.model.runner import ModelRunner
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, hf_greedy, run_to_completion
from tests.test_lora import PROMPTS as LORA_PROMPTS
from tests.test_lora import peft_adapters, peft_greedy, submit_all
from tests.tiny_models import tiny_gemma, tiny_llama

# inductor builds the graph's kernels with g++ (`make test` installs it where it can)
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None,
                               reason="no g++: inductor cannot build the compiled graph")

PROMPTS = [[1, 5, 9, 13, 4, 22, 40], [1, 7, 3], [1, 30, 31, 32, 33], [1, 8, 8, 2, 19]]


@pytest.fixture(scope="module")
def engine(qwen2) -> Engine:
    """Qwen2: projections with biases. Compiles twice (about a minute on two cores)."""
    return Engine(qwen2, EngineConfig(max_num_seqs=16, compile_decode=True))


@needs_cxx
def test_greedy_tokens_equal_hf_generate(engine, qwen2_reference):
    compiled = engine.primary.runner.compiled
    assert compiled is not None
    collector = Collector()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(PROMPTS):
        collector.submit(engine, str(index), prompt, params)
    run_to_completion(engine)
    for index, prompt in enumerate(PROMPTS):
        assert collector.tokens(str(index)) == hf_greedy(qwen2_reference, prompt, 12)
    assert compiled.steps >= 11 and not compiled.eager_reasons


@needs_cxx
def test_logits_equal_the_eager_forward_at_every_batch_size(engine):
    runner = engine.primary.runner
    compiled = runner.compiled
    with torch.inference_mode():
        first = runner.prefill(0, PROMPTS, [False] * len(PROMPTS))
    tokens = [int(t) for t in first.last_logits.argmax(-1)]
    positions = [len(p) for p in PROMPTS]
    try:
        for rows in (4, 1, 3, 2, 4, 1):
            ours = runner.decode(0, tokens[:rows], positions[:rows])
            runner.compiled = None
            eager = runner.decode(0, tokens[:rows], positions[:rows])  # the same cache entries
            runner.compiled = compiled
            torch.testing.assert_close(ours.logits, eager.logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(ours.hidden, eager.hidden, atol=1e-4, rtol=0)
            tokens[:rows] = [int(t) for t in eager.logits.argmax(-1)]
            positions[:rows] = [p + 1 for p in positions[:rows]]
    finally:
        runner.compiled = compiled
        for slot in range(len(PROMPTS)):
            runner.cache.clear(slot, max(positions) + 1)
    assert not compiled.eager_reasons


@needs_cxx
@pytest.mark.parametrize("long_length, in_graph", [(60, True), (1000, False)],
                         ids=["in-the-graph", "alone-eager"])
def test_a_long_row_leaves_the_graph_only_where_attending_alone_saves_enough(
        engine, caplog, long_length, in_graph):
    """The graph reads one window over the batch's longest row; a batch whose long rows
    alone would save enough keys (`keys_worth_leaving`) runs eager, which attends them
    alone. Either way its logits are the eager forward's with one shared window, to float
    rounding."""
    caplog.set_level(logging.INFO, logger="steerserve.decoding.model.compiled")
    runner = engine.primary.runner
    compiled = runner.compiled
    prompts = [[1] + [(5 * i) % 300 + 3 for i in range(long_length - 1)]] + [PROMPTS[1]] * 15
    with torch.inference_mode():
        first = runner.prefill(0, prompts, [False] * len(prompts))
    tokens = [int(t) for t in first.last_logits.argmax(-1)]
    positions = [len(p) for p in prompts]
    steps = compiled.steps
    try:
        saved = split_attention([p + 1 for p in positions]).saved
        assert (saved < keys_worth_leaving(len(prompts))) == in_graph
        ours = runner.decode(0, tokens, positions)
        # eager, no row alone (the split the modules get): the same cache entries again
        runner.compiled, runner.forward_kind = None, "hf"
        shared = runner.decode(0, tokens, positions)
    finally:
        runner.compiled, runner.forward_kind = compiled, "fused"
        for slot in range(len(prompts)):
            runner.cache.clear(slot, max(positions) + 1)
    torch.testing.assert_close(ours.logits, shared.logits, atol=1e-4, rtol=0)
    assert compiled.steps == steps + in_graph
    assert ("rows much longer than the rest" in caplog.text) != in_graph


@needs_cxx
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(engine):
    """One row runs the same graph beside a dummy row, so batch size changes no bit."""
    runner = engine.primary.runner
    with torch.inference_mode():
        first = runner.prefill(0, PROMPTS, [False] * len(PROMPTS))
    tokens = [int(t) for t in first.last_logits.argmax(-1)]
    positions = [len(p) for p in PROMPTS]
    try:
        alone = runner.decode(0, tokens[:1], positions[:1]).logits
        for rows in (2, 4):
            batched = runner.decode(0, tokens[:rows], positions[:rows]).logits
            assert torch.equal(batched[0], alone[0])
    finally:
        for slot in range(len(PROMPTS)):
            runner.cache.clear(slot, max(positions) + 1)


def _steering(qwen2, mode: SteerMode, scale: float) -> SteeringSpec:
    vector = torch.randn(qwen2.model.config.hidden_size,
                         generator=torch.Generator().manual_seed(3))
    return SteeringSpec(tuple(SteerEdit(layer, SteerTarget.RESIDUAL, vector, scale, mode, False,
                                        ApplyTo.BOTH) for layer in (0, 1)))


@needs_cxx
@pytest.mark.parametrize("mode, in_graph", [(SteerMode.ADD, True), (SteerMode.ABLATE, False)],
                         ids=["added-in-the-graph", "ablated-eager"])
def test_a_steered_row_beside_a_plain_one_gets_its_tokens_alone(engine, qwen2, mode, in_graph,
                                                                caplog):
    """Added vectors ride the graph; any other edit sends its whole batch to the eager
    forward, which the log says once. Either way each request's tokens are what they are
    alone."""
    caplog.set_level(logging.INFO, logger="steerserve.decoding.model.compiled")
    steering = _steering(qwen2, mode, 4.0)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = {}
    for name, spec in (("plain", None), ("steered", steering)):
        collector = Collector()
        collector.submit(engine, name, PROMPTS[0], params, steering=spec)
        run_to_completion(engine)
        alone[name] = collector.tokens(name)
    assert alone["plain"] != alone["steered"]
    compiled = engine.primary.runner.compiled
    steps = compiled.steps
    together = Collector()
    together.submit(engine, "plain", PROMPTS[0], params)
    together.submit(engine, "steered", PROMPTS[0], params, steering=steering)
    run_to_completion(engine)
    assert {name: together.tokens(name) for name in alone} == alone
    assert (compiled.steps > steps) == in_graph
    reason = "steering edits other than added vectors"
    assert any(reason in left for left in compiled.eager_reasons) == (not in_graph)
    assert (reason in caplog.text) == (not in_graph)


@needs_cxx
def test_added_steering_in_the_graph_equals_the_eager_kernels(engine, qwen2):
    """Logits of an added-vector row against the eager forward's steering kernels; the plain
    row beside it exactly what it is in an unsteered batch."""
    runner = engine.primary.runner
    compiled = runner.compiled
    prompts = PROMPTS[:2]
    plan = decode_plan([_steering(qwen2, SteerMode.ADD, 2.0), None], runner.device)
    with torch.inference_mode():
        first = runner.prefill(0, prompts, [False, False])
    tokens = [int(t) for t in first.last_logits.argmax(-1)]
    positions = [len(p) for p in prompts]
    try:
        steps = compiled.steps
        steered = runner.decode(0, tokens, positions, steering=plan)
        unsteered = runner.decode(0, tokens, positions)
        assert compiled.steps == steps + 2
        runner.compiled = None
        eager = runner.decode(0, tokens, positions, steering=plan)
        torch.testing.assert_close(steered.logits, eager.logits, atol=1e-4, rtol=0)
        assert not torch.allclose(steered.logits[0], unsteered.logits[0], atol=1e-2)
        assert torch.equal(steered.logits[1], unsteered.logits[1])
    finally:
        runner.compiled = compiled
        for slot in range(len(prompts)):
            runner.cache.clear(slot, max(positions) + 1)


@needs_cxx
def test_block_outputs_from_the_graph_equal_the_eager_capture(engine):
    """DoLa's early exits: the graph returns every block output, and a capture reads the
    rows and layers it asks for (the embeddings too) as the eager hook points do."""
    runner = engine.primary.runner
    compiled = runner.compiled
    with torch.inference_mode():
        first = runner.prefill(0, PROMPTS[:3], [False] * 3)
    tokens = [int(t) for t in first.last_logits.argmax(-1)]
    positions = [len(p) for p in PROMPTS[:3]]
    found = {}
    try:
        for name, graph in (("graph", compiled), ("eager", None)):
            runner.compiled = graph
            steps = compiled.steps
            capture = Capture(frozenset({EMBEDDINGS, 0, 1}), SteerTarget.RESIDUAL,
                              torch.zeros(2, dtype=torch.long), torch.tensor([0, 2]))
            runner.decode(0, tokens, positions, capture=capture)
            assert (compiled.steps > steps) == (graph is not None)
            found[name] = capture.found
    finally:
        runner.compiled = compiled
        for slot in range(3):
            runner.cache.clear(slot, max(positions) + 1)
    assert sorted(found["graph"]) == [EMBEDDINGS, 0, 1]
    for layer, eager in found["eager"].items():
        assert found["graph"][layer].shape == eager.shape == (2, eager.shape[-1])
        torch.testing.assert_close(found["graph"][layer], eager, atol=1e-4, rtol=0)


@needs_cxx
def test_a_dola_request_rides_the_graph_and_keeps_its_tokens_beside_a_plain_one(engine):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    name = engine.primary.loaded.name

    def dola(request_id: str) -> EngineRequest:
        return EngineRequest(request_id, tuple(PROMPTS[0]), params, DoLa(
            (LaneSpec(name, tuple(PROMPTS[0])),), layers=(0, 1), relative_top=0.1))

    compiled = engine.primary.runner.compiled
    alone = Collector()
    alone.submit_request(engine, dola("dola"))
    run_to_completion(engine)
    steps = compiled.steps
    together = Collector()
    together.submit_request(engine, dola("dola"))
    together.submit(engine, "plain", PROMPTS[1], params)
    run_to_completion(engine)
    assert together.tokens("dola") == alone.tokens("dola")
    assert compiled.steps >= steps + 5


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tokenizer):
    return peft_adapters(tmp_path_factory, tokenizer)


@pytest.fixture(scope="module")
def lora_engine(adapters, tokenizer):
    """LoRA on: one graph takes every batch, its adapters as inputs (plain rows: zeros)."""
    base, made = adapters
    loaded = from_pretrained_objects(copy.deepcopy(base), tokenizer, "base")
    engine = Engine(loaded, EngineConfig(max_num_seqs=6, max_loras=3, max_lora_rank=8,
                                         compile_decode=True))
    linears = engine.primary.lora_slots.bank.linears
    return engine, {name: load_lora_adapter(name, path, linears, 8) for name, path, _ in made}


@needs_cxx
def test_adapter_rows_in_the_graph_match_peft_and_each_alone(lora_engine, adapters,
                                                           tokenizer):
    """Three adapters on different projections and ranks, and plain rows, in one batch;
    each adapter alone against peft's PeftModel."""
    engine, loras = lora_engine
    _, made = adapters
    compiled = engine.primary.runner.compiled
    assert compiled is not None and compiled.lora is not None
    plan = [("base0", LORA_PROMPTS[0], None), ("a0", LORA_PROMPTS[1], "a0"),
            ("a1", LORA_PROMPTS[2], "a1"), ("a2", LORA_PROMPTS[0], "a2"),
            ("base1", LORA_PROMPTS[1], None)]
    steps = compiled.steps
    together = submit_all(engine, tokenizer, loras, plan)
    assert compiled.steps >= steps + 7 and not compiled.eager_reasons
    for name, _, peft_model in made:
        prompt = next(prompt for _, prompt, adapter in plan if adapter == name)
        assert together.tokens(name) == peft_greedy(peft_model, tokenizer, prompt, 8), name
    for job in plan:
        alone = submit_all(engine, tokenizer, loras, [job])
        assert alone.tokens(job[0]) == together.tokens(job[0]), job[0]
    assert together.tokens("a0") != together.tokens("base1")


@needs_cxx
def test_adapter_logits_in_the_graph_equal_the_eager_forward(lora_engine, tokenizer):
    engine, loras = lora_engine
    runner, slots = engine.primary.runner, engine.primary.lora_slots
    compiled = runner.compiled
    held = [slots.acquire(loras[name]) for name in ("a0", "a1")]
    prompts = [tokenizer(prompt)["input_ids"] for prompt in LORA_PROMPTS]
    rows = [held[0], -1, held[1]]
    with torch.inference_mode():
        first = runner.prefill(0, prompts, [False] * 3, rows)
    tokens = [int(t) for t in first.last_logits.argmax(-1)]
    positions = [len(p) for p in prompts]
    try:
        for batch in (3, 1):
            steps = compiled.steps
            ours = runner.decode(0, tokens[:batch], positions[:batch], rows[:batch])
            assert compiled.steps == steps + 1
            runner.compiled = None
            eager = runner.decode(0, tokens[:batch], positions[:batch], rows[:batch])
            runner.compiled = compiled
            torch.testing.assert_close(ours.logits, eager.logits, atol=1e-4, rtol=0)
    finally:
        runner.compiled = compiled
        for slot in held:
            slots.release(slot)
        for slot in range(3):
            runner.cache.clear(slot, max(positions) + 1)


def test_families_outside_the_graph_stay_eager_and_say_why(tokenizer, caplog):
    loaded = from_pretrained_objects(tiny_gemma(len(tokenizer)), tokenizer, "g")
    with caplog.at_level("WARNING"):
        runner = ModelRunner(loaded, 2, None, "fused", compile_decode=True)
    assert runner.compiled is None
    assert "decode stays eager (gemma's norms" in caplog.text


def test_a_failed_compile_leaves_decode_eager_and_says_why(tokenizer, caplog):
    """No C++ compiler for inductor (a real case on a bare machine): the server still starts."""
    from torch._inductor import config as inductor_config

    loaded = from_pretrained_objects(tiny_llama(len(tokenizer), seed=5), tokenizer, "l")
    with caplog.at_level("WARNING"), inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        runner = ModelRunner(loaded, 2, None, "fused", compile_decode=True)
    assert runner.compiled is None
    assert "decode stays eager (compiling failed" in caplog.text
    with torch.inference_mode():
        first = runner.prefill(0, PROMPTS[:2], [False, False])
    assert runner.decode(0, [3, 4], [len(p) for p in PROMPTS[:2]]).logits.isfinite().all()
    assert first.last_logits.isfinite().all()
