"""The engine against HF generate and against itself across batch compositions."""

from __future__ import annotations

import threading
import time

import pytest

from steerserve.decoding.engine.admission import Inadmissible
from steerserve.decoding.request import FinishReason
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, generate_alone, hf_greedy, run_to_completion
from tests.support import make_engine

PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a small town by the sea. One, two,",
    "Hello",
    "A café in München serves",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize(("model_name", "forward", "chosen"), [
    ("llama", "fused", "fused"), ("llama", "hf", "hf"), ("qwen2", "fused", "fused"),
    ("qwen2", "hf", "hf"), ("gemma", "auto", "fused"), ("gemma", "hf", "hf"),
    ("gemma2", "auto", "fused"), ("gemma2", "hf", "hf"), ("gemma3", "auto", "fused"),
    ("gemma3", "hf", "hf"), ("phi3", "auto", "hf")])
def test_batched_greedy_equals_hf_generate(request, model_name, forward, chosen):
    """Gemma 2 and 3 slide a 6-token window over prompts and answers longer than it."""
    loaded = request.getfixturevalue(model_name)
    reference = request.getfixturevalue(f"{model_name}_reference")
    engine = make_engine(loaded, forward=forward)
    assert engine.primary.runner.forward_kind == chosen
    collector = Collector()
    prompts = [encode(loaded.tokenizer, p) for p in PROMPTS]
    for i, prompt in enumerate(prompts):
        collector.submit(engine, str(i), prompt, GREEDY)
    run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert collector.tokens(str(i)) == hf_greedy(reference, prompt, 12)
        assert collector.last(str(i)).finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize("forward", ["fused", "hf"])
def test_requests_joining_mid_flight_match_hf(llama, llama_reference, forward):
    engine = make_engine(llama, forward=forward)
    collector = Collector()
    prompts = [encode(llama.tokenizer, p) for p in PROMPTS]
    for i, prompt in enumerate(prompts):
        collector.submit(engine, str(i), prompt, GREEDY)
        for _ in range(i + 2):  # each request joins a batch already decoding others
            engine.step()
    run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert collector.tokens(str(i)) == hf_greedy(llama_reference, prompt, 12)


def test_more_requests_than_slots_queue_and_complete(llama, llama_reference):
    engine = make_engine(llama, max_num_seqs=2)
    collector = Collector()
    prompts = [encode(llama.tokenizer, p) for p in PROMPTS]
    for i, prompt in enumerate(prompts):
        collector.submit(engine, str(i), prompt, GREEDY)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 2
    run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert collector.tokens(str(i)) == hf_greedy(llama_reference, prompt, 12)
    assert engine.num_running == 0


def test_abort_frees_slot_and_keeps_others_correct(llama, llama_reference):
    """Aborting a lane in the middle of the slots moves the last lane into its place."""
    engine = make_engine(llama)
    collector = Collector()
    prompts = [encode(llama.tokenizer, p) for p in PROMPTS]
    for i, prompt in enumerate(prompts):
        collector.submit(engine, str(i), prompt, GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.num_running == 4
    engine.abort("1")
    engine.step()
    assert engine.num_running == 3
    assert collector.last("1").finish_reason == FinishReason.ABORT
    run_to_completion(engine)
    assert engine.num_running == 0 and engine.num_waiting == 0
    for i in (0, 2, 3):
        assert collector.tokens(str(i)) == hf_greedy(llama_reference, prompts[i], 12)


def test_abort_of_waiting_request(llama, llama_reference):
    engine = make_engine(llama, max_num_seqs=1)
    collector = Collector()
    prompts = [encode(llama.tokenizer, p) for p in PROMPTS[:2]]
    collector.submit(engine, "a", prompts[0], GREEDY)
    collector.submit(engine, "b", prompts[1], GREEDY)
    engine.step()
    engine.abort("b")
    run_to_completion(engine)
    assert collector.last("b").finish_reason == FinishReason.ABORT
    assert collector.tokens("b") == []
    assert collector.tokens("a") == hf_greedy(llama_reference, prompts[0], 12)


def test_seeded_sampling_independent_of_batch(llama):
    prompt = encode(llama.tokenizer, PROMPTS[0])
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                            ignore_eos=True)
    alone = generate_alone(make_engine(llama), prompt, seeded)

    engine = make_engine(llama)
    collector = Collector()
    others = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.7, min_p=0.1, seed=7, ignore_eos=True)]
    for i, params in enumerate(others):
        collector.submit(engine, f"other{i}", encode(llama.tokenizer, PROMPTS[i + 1]), params)
    engine.step()
    engine.step()
    collector.submit(engine, "seeded", prompt, seeded)
    run_to_completion(engine)
    assert collector.tokens("seeded") == alone
    different_seed = SamplingParams(**{**seeded.__dict__, "seed": 99})
    assert generate_alone(make_engine(llama), prompt, different_seed) != alone


def test_stop_string_cuts_text_and_finishes(llama):
    prompt = encode(llama.tokenizer, PROMPTS[1])
    engine = make_engine(llama)
    collector = Collector()
    collector.submit(engine, "full", prompt, SamplingParams(max_tokens=24, temperature=0.0,
                                                             ignore_eos=True))
    run_to_completion(engine)
    full = collector.text("full")
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), "greedy text too short to pick a stop string"
    collector.submit(engine, "stopped", prompt, SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,)))
    run_to_completion(engine)
    assert collector.text("stopped") == full[: full.index(stop)]
    assert collector.last("stopped").finish_reason == FinishReason.STOP


def test_stop_token_id_and_eos(llama):
    prompt = encode(llama.tokenizer, PROMPTS[0])
    greedy = generate_alone(make_engine(llama), prompt, GREEDY)
    engine = make_engine(llama)
    collector = Collector()
    collector.submit(engine, "s", prompt, SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(greedy[3],)))
    run_to_completion(engine)
    assert collector.tokens("s") == greedy[: greedy.index(greedy[3]) + 1]
    assert collector.last("s").finish_reason == FinishReason.STOP


def test_logprobs_describe_the_sampled_distribution(llama):
    import torch

    prompt = encode(llama.tokenizer, PROMPTS[0])
    engine = make_engine(llama)
    collector = Collector()
    collector.submit(engine, "lp", prompt, SamplingParams(max_tokens=3, temperature=0.0,
                                                           logprobs=5, ignore_eos=True))
    run_to_completion(engine)
    records = [r for o in collector.outputs["lp"] for r in o.logprobs]
    assert len(records) == 3
    with torch.no_grad():
        logits = llama.model(torch.tensor([prompt], device=llama.device)).logits[0, -1].float()
    expected = logits.log_softmax(-1)
    first = records[0]
    assert first.token_id == int(expected.argmax())
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert [t.token_id for t in first.top] == expected.topk(5).indices.tolist()
    assert all(r.logprob <= 0 for r in records)


def test_prompt_logprobs_match_a_plain_forward(llama):
    import torch

    prompt = encode(llama.tokenizer, PROMPTS[1])
    engine = make_engine(llama)
    collector = Collector()
    collector.submit(engine, "echo", prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
    run_to_completion(engine)
    scored = collector.last("echo").prompt_logprobs
    assert collector.tokens("echo") == []
    assert scored[0].logprob is None and len(scored) == len(prompt)
    with torch.no_grad():
        ids = torch.tensor([prompt], device=llama.device)
        logprobs = llama.model(ids).logits[0].float().log_softmax(-1)
    for position in range(1, len(prompt)):
        expected = float(logprobs[position - 1, prompt[position]])
        assert scored[position].logprob == pytest.approx(expected, abs=1e-4)
        assert len(scored[position].top) == 2


def test_context_limit_finishes_with_length(tokenizer):
    from steerserve.decoding.model.loader import from_pretrained_objects
    from tests.tiny_models import tiny_llama

    short = from_pretrained_objects(tiny_llama(len(tokenizer)), tokenizer, "short",
                                    max_model_len=16)
    engine = make_engine(short)
    collector = Collector()
    prompt = encode(tokenizer, PROMPTS[0])
    collector.submit(engine, "c", prompt, SamplingParams(max_tokens=100, temperature=0.0,
                                                          ignore_eos=True))
    run_to_completion(engine)
    assert len(prompt) + len(collector.tokens("c")) == 16
    assert collector.last("c").finish_reason == FinishReason.LENGTH


def test_engine_thread_survives_a_failing_step(llama, llama_reference, monkeypatch):
    """A step that raises fails the lanes in it with an error output; the engine goes on."""
    engine = make_engine(llama)
    runner = engine.primary.runner
    bad, real_prefill = encode(llama.tokenizer, PROMPTS[2]), runner.prefill

    def failing_prefill(first_slot, prompts, *args, **kwargs):
        if bad in prompts:  # a fault inside the forward, the same on every device
            raise RuntimeError("injected fault in the forward")
        return real_prefill(first_slot, prompts, *args, **kwargs)

    monkeypatch.setattr(runner, "prefill", failing_prefill)
    done = threading.Event()
    collector = Collector()
    engine.start()
    try:
        collector.submit(engine, "bad", bad, GREEDY)
        deadline = time.monotonic() + 30
        while not collector.outputs["bad"] and time.monotonic() < deadline:
            done.wait(0.05)
        assert collector.last("bad").finish_reason == FinishReason.ERROR
        assert "injected fault" in collector.last("bad").error
        prompt = encode(llama.tokenizer, PROMPTS[0])
        collector.submit(engine, "good", prompt, GREEDY)
        while not (collector.outputs["good"] and collector.last("good").finished):
            done.wait(0.05)
            assert time.monotonic() < deadline + 30
        assert collector.tokens("good") == hf_greedy(llama_reference, prompt, 12)
        assert engine.num_running == 0
    finally:
        engine.stop()


def test_prompt_ids_outside_the_vocabulary_are_refused_before_any_step(llama):
    """Past the embedding table a forward fails: on a GPU with a device-side assert that ends
    the process's CUDA context, so such ids never reach a step."""
    engine = make_engine(llama)
    vocab = llama.model.config.vocab_size
    for bad in ([5, vocab], [-1, 5]):
        with pytest.raises(Inadmissible, match="outside the vocabulary") as refused:
            Collector().submit(engine, "bad", bad, GREEDY)
        assert refused.value.field == "prompt"
    assert engine.num_waiting == 0 and not engine.has_work()
