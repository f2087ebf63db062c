"""Multi-lane decoding methods in the engine against straightforward reference loops that run
each model separately, step by step, without a cache, with the reference code's formulas."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.methods.base import DecodingMethod
from steerserve.decoding.methods.contrastive import Contrastive
from steerserve.decoding.methods.dola import DoLa, jensen_shannon, premature
from steerserve.decoding.methods.logit_arithmetic import LogitArithmetic
from steerserve.decoding.methods.plain import Plain
from steerserve.decoding.methods.proxy_tuning import ProxyTuning
from steerserve.decoding.methods.sh2 import SH2
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, run_to_completion
from tests.method_references import reference_keys, reference_ponder
from tests.tiny_models import tiny_llama

PROMPTS = [[1, 5, 9, 13, 4, 22, 40, 41], [1, 7, 3, 60, 61], [1, 30, 31, 32, 33, 34, 35, 36, 12]]
STEPS = 6


def four_layer_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    """Three tiny models sharing the tokenizer, as hosted models (engine) and as plain
    copies (references)."""
    raw = {"base": tiny_llama(len(tokenizer), seed=11), "expert": tiny_llama(len(tokenizer),
                                                                            seed=12),
           "small": tiny_llama(len(tokenizer), seed=13),
           "deep": four_layer_llama(len(tokenizer), seed=14)}
    references = {name: copy.deepcopy(model) for name, model in raw.items()}
    loaded = {name: from_pretrained_objects(model, tokenizer, name)
              for name, model in raw.items()}
    return loaded, references


@pytest.fixture(scope="module", params=["fused", "hf"])
def engine(models, request):
    """Every method on both forwards: our own and the Hugging Face modules'."""
    loaded, _ = models
    return Engine(loaded["base"], EngineConfig(max_num_seqs=8, forward=request.param),
                  others=[loaded["expert"], loaded["small"], loaded["deep"]])


def lsm(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1)


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device)).logits[0, -1].float()


def reference_loop(prompt: list[int], score) -> tuple[list[int], list[float]]:
    """Greedy on score(generated so far) -> (V,) final logits; logprobs of the final
    distribution, as the engine reports them."""
    out, logprobs = [], []
    for _ in range(STEPS):
        final = score(out)
        token = int(final.argmax())
        out.append(token)
        logprobs.append(float(lsm(final)[token]))
    return out, logprobs


def run_engine(engine, jobs: list[tuple[list[int], DecodingMethod | None]]):
    collector = Collector()
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=0)
    for i, (prompt, method) in enumerate(jobs):
        method = method or Plain(lanes(("base", prompt)))
        collector.submit_request(engine, EngineRequest(str(i), tuple(prompt), params, method))
    run_to_completion(engine)
    return [(collector.tokens(str(i)),
             [r.logprob for o in collector.outputs[str(i)] for r in o.logprobs])
            for i in range(len(jobs))]


def lanes(*specs: tuple[str, list[int]], temperature: float = 1.0) -> tuple[LaneSpec, ...]:
    return tuple(LaneSpec(name, tuple(prompt),
                          temperature=temperature if i == 1 else 1.0)
                 for i, (name, prompt) in enumerate(specs))


def assert_matches(got, expected) -> None:
    tokens, logprobs = got
    assert tokens == expected[0]
    assert logprobs == pytest.approx(expected[1], abs=1e-4)


def test_proxy_tuning(engine, models):
    _, ref = models
    prompt = PROMPTS[0]
    method = ProxyTuning(lanes(("base", prompt), ("expert", prompt), ("small", prompt)),
                         alpha=0.7)

    def score(out):
        ids = prompt + out
        return last_logits(ref["base"], ids) + 0.7 * (last_logits(ref["expert"], ids)
                                                      - last_logits(ref["small"], ids))

    [got] = run_engine(engine, [(prompt, method)])
    assert_matches(got, reference_loop(prompt, score))


@pytest.mark.parametrize("variant", ["li2022", "obrien2023"])
def test_contrastive(engine, models, variant):
    _, ref = models
    prompt = PROMPTS[1]
    method = Contrastive(lanes(("expert", prompt), ("small", prompt), temperature=0.5),
                         variant=variant, alpha=0.1, beta=0.5)

    def score(out):
        ids = prompt + out
        expert, amateur = last_logits(ref["expert"], ids), last_logits(ref["small"], ids)
        keep = lsm(expert) >= lsm(expert).max() + torch.log(torch.tensor(0.1))
        if variant == "li2022":
            combined = lsm(expert) - 0.5 * lsm(amateur / 0.5)
        else:
            combined = 1.5 * expert - 0.5 * (amateur / 0.5)
        return torch.where(keep, combined, torch.tensor(float("-inf")))

    [got] = run_engine(engine, [(prompt, method)])
    assert_matches(got, reference_loop(prompt, score))


def test_sh2(engine, models, tokenizer):
    _, ref = models
    prompt = PROMPTS[2]
    method = SH2(lanes(("base", prompt)), tokenizer, 2048, alpha=2.0, key_num=40.0, seed=5)
    with torch.inference_mode():
        prompt_logits = ref["base"](torch.tensor([prompt])).logits[0, :-1]
    keys = reference_keys(prompt, prompt_logits, 40.0, set(tokenizer.all_special_ids), 5)
    assert keys
    ponder = reference_ponder(tokenizer, prompt, keys)

    def score(out):
        orig = lsm(last_logits(ref["base"], prompt + out))
        hesitated = lsm(last_logits(ref["base"], ponder + out))
        return hesitated + 2.0 * (hesitated - orig)

    [got] = run_engine(engine, [(prompt, method)])
    assert_matches(got, reference_loop(prompt, score))


def test_dola(engine, models):
    _, ref = models
    prompt = PROMPTS[0]
    candidates = (0, 1, 2)
    method = DoLa(lanes(("deep", prompt)), layers=candidates, relative_top=0.1)
    model = ref["deep"]

    def score(out):
        with torch.inference_mode():
            hidden = model(torch.tensor([prompt + out]), output_hidden_states=True)
            mature = hidden.logits[0, -1].float()
            early = [model.lm_head(model.model.norm(hidden.hidden_states[j + 1][0, -1])).float()
                     for j in candidates]
        p = mature.softmax(-1)
        divergences = []
        for logits in early:
            q = logits.softmax(-1)
            m = 0.5 * (p + q)
            divergences.append(0.5 * ((p * (p / m).log()).sum() + (q * (q / m).log()).sum()))
        premature = early[int(torch.stack(divergences).argmax())]
        keep = lsm(mature) >= lsm(mature).max() + torch.log(torch.tensor(0.1))
        return torch.where(keep, lsm(mature) - lsm(premature), torch.tensor(float("-inf")))

    [got] = run_engine(engine, [(prompt, method)])
    assert_matches(got, reference_loop(prompt, score))


def test_logit_arithmetic(engine, models):
    """EFT-style: base + 1.5 * (expert at T 0.7 - small), over log-softmaxes."""
    _, ref = models
    prompt = PROMPTS[2]
    method = LogitArithmetic((LaneSpec("base", tuple(prompt)),
                              LaneSpec("expert", tuple(prompt), temperature=0.7),
                              LaneSpec("small", tuple(prompt))), (1.0, 1.5, -1.5))

    def score(out):
        ids = prompt + out
        return (lsm(last_logits(ref["base"], ids))
                + 1.5 * (lsm(last_logits(ref["expert"], ids) / 0.7)
                         - lsm(last_logits(ref["small"], ids))))

    [got] = run_engine(engine, [(prompt, method)])
    assert_matches(got, reference_loop(prompt, score))


def test_mixed_methods_in_one_batch_equal_each_alone(engine, tokenizer):
    jobs = [
        (PROMPTS[0], ProxyTuning(lanes(("base", PROMPTS[0]), ("expert", PROMPTS[0]),
                                       ("base", PROMPTS[0])), alpha=1.5)),
        (PROMPTS[1], None),
        (PROMPTS[2], SH2(lanes(("base", PROMPTS[2])), tokenizer, 2048, alpha=1.0, seed=1)),
        (PROMPTS[1], Contrastive(lanes(("base", PROMPTS[1]), ("base", PROMPTS[1][-1:])),
                                 variant="li2022")),
        (PROMPTS[0], DoLa(lanes(("deep", PROMPTS[0])), layers=(0, 2), relative_top=0.1)),
        (PROMPTS[2], LogitArithmetic(lanes(("base", PROMPTS[2]), ("small", PROMPTS[2])),
                                     (0.5, 0.5))),
    ]
    alone = [run_engine(engine, [job])[0] for job in jobs]
    together = run_engine(engine, jobs)
    for got, expected in zip(together, alone, strict=True):
        assert_matches(got, expected)
    assert all(not hosted.slots.lanes and hosted.slots.reserved == 0
               for hosted in engine.models.values())


def test_dola_requests_batched_together_equal_each_alone(engine):
    """Early exits and divergences are computed for several requests at once, grouped by
    their number of candidate layers."""
    jobs = [(PROMPTS[0], DoLa(lanes(("deep", PROMPTS[0])), layers=(0, 2), relative_top=0.1)),
            (PROMPTS[1], DoLa(lanes(("deep", PROMPTS[1])), layers=(0, 1, 2), relative_top=0.1)),
            (PROMPTS[2], DoLa(lanes(("deep", PROMPTS[2])), layers=(1, 2), relative_top=0.2)),
            (PROMPTS[1], DoLa(lanes(("deep", PROMPTS[1])), layers=(1,), relative_top=0.1))]
    alone = [run_engine(engine, [job])[0] for job in jobs]
    together = run_engine(engine, jobs)
    for got, expected in zip(together, alone, strict=True):
        assert_matches(got, expected)


def test_proxy_with_base_as_anti_expert_shares_one_lane(engine, models):
    _, ref = models
    prompt = PROMPTS[1]
    for alpha in (0.0, 1.0):
        method = ProxyTuning(lanes(("base", prompt), ("expert", prompt), ("base", prompt)),
                             alpha=alpha)
        collector = Collector()
        collector.submit_request(engine, EngineRequest("p", tuple(prompt), SamplingParams(
            max_tokens=STEPS, temperature=0.0, ignore_eos=True), method))
        engine.step()
        assert len(engine.models["base"].slots.lanes) == 1  # base and anti-expert: one lane
        run_to_completion(engine)
        if alpha == 0.0:  # plain decoding of the base, exactly
            plain = run_engine(engine, [(prompt, None)])[0][0]
            assert collector.tokens("p") == plain
    # alpha = 1 with the base as anti-expert: z_base + (z_expert - z_base) = the expert's
    assert collector.tokens("p") == reference_loop(
        prompt, lambda out: last_logits(ref["expert"], prompt + out))[0]


def test_jensen_shannon_is_the_definitions_with_masked_tokens():
    """Against the two KL divergences in float64; tokens masked to -inf (0 log 0 = 0) in the
    mature row, in one candidate, and in both at once."""
    generator = torch.Generator().manual_seed(0)
    mature = torch.randn(3, 500, generator=generator) * 3
    candidates = torch.randn(3, 4, 500, generator=generator) * 3
    mature[0, :40] = float("-inf")
    candidates[1, 2, :60] = float("-inf")
    candidates[0, 1, :20] = float("-inf")  # masked in the mature row too
    p = mature.double().softmax(-1).unsqueeze(1).expand_as(candidates)
    q = candidates.double().softmax(-1)
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log(), 0.0).sum(-1)

    expected = 0.5 * (kl(p, m) + kl(q, m))
    got = jensen_shannon(mature, candidates)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_premature_picks_each_rows_farthest_candidate():
    """Each row's candidate of largest divergence, against float64 softmaxes as the oracle."""
    generator = torch.Generator().manual_seed(1)
    mature = torch.randn(6, 3000, generator=generator) * 4
    candidates = torch.randn(6, 5, 3000, generator=generator) * 4
    p = mature.double().softmax(-1).unsqueeze(1)
    q = candidates.double().softmax(-1)
    m = (p + q) / 2
    divergence = 0.5 * ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1))  # (6, 5)
    expected = candidates[torch.arange(6), divergence.argmax(-1)]
    assert torch.equal(premature(mature, candidates), expected)
