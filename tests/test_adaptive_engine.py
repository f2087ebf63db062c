"""Adaptive temperature in the engine: formulas on the model's real distributions, learned
heads with fixed weights, and mixed batches equal to each request run alone."""

from __future__ import annotations

import math

import pytest
import torch

from steerserve.decoding.sampling.adaptive import AdaptiveTemperature
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.decoding.sampling.temperature_head import TemperatureHead, TemperatureHeadConfig
from tests.engine_helpers import Collector, run_to_completion
from tests.support import make_engine

PROMPTS = [[1, 5, 9, 13, 4, 22], [1, 7, 3], [1, 30, 31, 32, 33, 34, 35, 36, 12], [1, 18, 2, 6]]
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def fixed_head(hidden_size: int, favourite: int) -> TemperatureHead:
    """Zero weights and a bias that makes `favourite` the argmax whatever the input."""
    head = TemperatureHead(TemperatureHeadConfig(hidden_size, TEMPERATURES))
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.fill_(-5.0)
        head.net.bias[favourite] = 5.0
    return head


def params(rule: AdaptiveTemperature | None, seed: int = 7, temperature: float = 1.0,
           **extra) -> SamplingParams:
    return SamplingParams(max_tokens=6, temperature=temperature, seed=seed, ignore_eos=True,
                          adaptive=rule, report_temperatures=True, **extra)


def run(engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[list, list]]:
    collector = Collector()
    for i, (prompt, p) in enumerate(jobs):
        collector.submit(engine, str(i), prompt, p)
    run_to_completion(engine)
    return [(collector.tokens(str(i)),
             [t for o in collector.outputs[str(i)] for t in o.temperatures])
            for i in range(len(jobs))]


def entropy(logits: torch.Tensor) -> float:
    logp = logits.float().log_softmax(-1)
    return float(-(logp.exp() * logp).sum())


def first_logits(loaded, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(torch.tensor([prompt], device=loaded.device)).logits[0, -1]


def test_edt_first_temperature_follows_the_formula(llama):
    engine = make_engine(llama)
    rule = AdaptiveTemperature("edt", t0=0.9, theta=0.7, n=0.8)
    [(_, temps)] = run(engine, [(PROMPTS[0], params(rule))])
    h = entropy(first_logits(llama, PROMPTS[0]))
    assert temps[0] == pytest.approx(0.9 * 0.8 ** (0.7 / h), rel=1e-4)
    assert len(temps) == 6 and len(set(temps)) > 1  # one per token, following the entropy


def test_dynatemp_counts_candidates_after_top_k(llama):
    engine = make_engine(llama)
    rule = AdaptiveTemperature("dynatemp", t0=0.8, range=0.5, exponent=1.5)
    [(_, temps)] = run(engine, [(PROMPTS[1], params(rule, top_k=5))])
    top = first_logits(llama, PROMPTS[1]).topk(5).values
    expected = 0.3 + 1.0 * (entropy(top) / math.log(5)) ** 1.5
    assert temps[0] == pytest.approx(expected, rel=1e-4)


def test_dynatemp_with_zero_range_is_plain_temperature(llama):
    engine = make_engine(llama)
    rule = AdaptiveTemperature("dynatemp", t0=0.8, range=0.0)
    [(adaptive, temps), (plain, _)] = run(engine, [
        (PROMPTS[2], params(rule, temperature=0.8)), (PROMPTS[2], params(None, temperature=0.8))])
    assert adaptive == plain and temps == [pytest.approx(0.8)] * 6


def test_learned_head_with_fixed_weights(llama):
    engine = make_engine(llama)
    hidden = llama.model.config.hidden_size
    greedy_head = AdaptiveTemperature("learned", head=fixed_head(hidden, 0))
    warm_head = AdaptiveTemperature("learned", head=fixed_head(hidden, 4))
    [(greedy_tokens, zeros), (warm_tokens, warm), (plain_greedy, _), (plain_warm, _)] = run(
        engine, [(PROMPTS[0], params(greedy_head)), (PROMPTS[0], params(warm_head)),
                 (PROMPTS[0], params(None, temperature=0.0)),
                 (PROMPTS[0], params(None, temperature=0.8))])
    assert zeros == [0.0] * 6 and greedy_tokens == plain_greedy
    assert warm == [pytest.approx(0.8)] * 6 and warm_tokens == plain_warm
    # a sampled choice draws from the request's own generator: reproducible under a seed
    sampled = AdaptiveTemperature("learned", head=fixed_head(hidden, 4), choice="sample")
    first, second = run(engine, [(PROMPTS[0], params(sampled))] * 2)
    assert first == second and first[1] == [pytest.approx(0.8)] * 6


def test_sequence_level_keeps_one_temperature(llama):
    engine = make_engine(llama)
    head = TemperatureHead(TemperatureHeadConfig(llama.model.config.hidden_size, TEMPERATURES))
    torch.nn.init.normal_(head.net.weight, std=2.0, generator=torch.Generator().manual_seed(3))
    rule = AdaptiveTemperature("learned", head=head, level="sequence")
    token_rule = AdaptiveTemperature("learned", head=head, level="token")
    [(_, once), (_, each)] = run(engine, [(PROMPTS[3], params(rule)),
                                          (PROMPTS[3], params(token_rule))])
    assert len(set(once)) == 1 and once[0] == each[0]
    assert len(set(each)) > 1  # the random head changes its mind along the way


def test_mixed_methods_in_one_batch_equal_each_alone(llama):
    engine = make_engine(llama)
    hidden = llama.model.config.hidden_size
    jobs = [
        (PROMPTS[0], params(AdaptiveTemperature("edt", t0=1.0, theta=0.5, n=0.8), seed=1)),
        (PROMPTS[1], params(None, seed=2, temperature=0.7, top_p=0.9)),
        (PROMPTS[2], params(AdaptiveTemperature("dynatemp", t0=0.7, range=0.6), seed=3,
                            min_p=0.05)),
        (PROMPTS[3], params(AdaptiveTemperature("learned", head=fixed_head(hidden, 3),
                                                choice="sample"), seed=4)),
        (PROMPTS[0], params(None, temperature=0.0)),
    ]
    alone = [run(engine, [job])[0] for job in jobs]
    together = run(engine, jobs)
    assert [tokens for tokens, _ in together] == [tokens for tokens, _ in alone]
    for (_, temps), (_, expected) in zip(together, alone, strict=True):  # batched matmuls
        assert temps == pytest.approx(expected, rel=1e-5)  # round a little differently
