"""The prefix cache: prompts that start like a recent one prefill only the rest, and decode
exactly as without it (HF generate on an untouched model is the oracle, or an engine with no
prefix cache for adapters and steering); lanes share prefixes only within their scope."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from peft import LoraConfig, get_peft_model

from steerserve.adapters.lora.files import load_lora_adapter
from steerserve.adapters.steering.spec import (
    ApplyTo,
    SteerEdit,
    SteeringSpec,
    SteerMode,
    SteerTarget,
)
from steerserve.decoding.engine.core import Engine
from steerserve.decoding.model.kv_cache import CacheShape, SlotKVCache
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.decoding.model.prefix_cache import MIN_REUSE, PrefixCache, Scope, common_prefix
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, hf_greedy, run_to_completion
from tests.support import make_engine
from tests.tiny_models import tiny_llama

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SHARED = [1] + list(range(40, 70))  # a 31-token "system prompt"
PROMPTS = [SHARED + [7, 8, 9], SHARED + [100, 101, 102, 103, 104], SHARED[:20] + [5, 6],
           [1, 2, 3, 4]]


def test_common_prefix():
    assert common_prefix((1, 2, 3, 4), (1, 2, 9)) == 2
    assert common_prefix((), (1,)) == 0 and common_prefix((5, 6), (5, 6)) == 2


@pytest.mark.parametrize("forward", ["fused", "hf"])
def test_prompts_sharing_a_prefix_decode_as_without_it(llama, llama_reference, forward):
    engine = make_engine(llama, forward=forward, prefix_cache_slots=2)
    collector = Collector()
    collector.submit(engine, "first", PROMPTS[0], GREEDY)
    run_to_completion(engine)  # its prompt is now cached
    for i, prompt in enumerate(PROMPTS[1:], start=1):  # one prefill, rows starting apart
        collector.submit(engine, str(i), prompt, GREEDY)
    run_to_completion(engine)
    assert collector.tokens("first") == hf_greedy(llama_reference, PROMPTS[0], 8)
    for i, prompt in enumerate(PROMPTS[1:], start=1):
        assert collector.tokens(str(i)) == hf_greedy(llama_reference, prompt, 8), i
    # 31 tokens for the second, 20 for the third; the last shares too little (< MIN_REUSE)
    assert engine.stats.cached_prompt_tokens == len(SHARED) + 20
    assert engine.stats.prompt_tokens == sum(map(len, PROMPTS)) - len(SHARED) - 20


def test_only_lanes_whose_keys_are_their_tokens_reuse(llama, llama_reference):
    engine = make_engine(llama, prefix_cache_slots=2)
    collector = Collector()
    collector.submit(engine, "warm", PROMPTS[0], GREEDY)
    run_to_completion(engine)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=0)
    collector.submit(engine, "scored", PROMPTS[1], scoring)  # needs every position's logits
    vector = torch.ones(64)
    steering = SteeringSpec((SteerEdit(0, SteerTarget.RESIDUAL, vector, 2.0, SteerMode.ADD,
                                       False, ApplyTo.BOTH),))
    collector.submit(engine, "steered", PROMPTS[1], GREEDY, steering=steering)
    run_to_completion(engine)
    assert engine.stats.cached_prompt_tokens == 0
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[1]], device=llama_reference.device)
        logprobs = llama_reference(ids).logits[0].float().log_softmax(-1)
    scored = collector.last("scored").prompt_logprobs
    for position in range(1, len(PROMPTS[1])):
        expected = float(logprobs[position - 1, PROMPTS[1][position]])
        assert scored[position].logprob == pytest.approx(expected, abs=1e-4)


def test_short_prefixes_are_not_worth_it(llama):
    engine = make_engine(llama, prefix_cache_slots=1)
    collector = Collector()
    short = list(range(1, MIN_REUSE))  # no longer than MIN_REUSE: not kept
    collector.submit(engine, "a", short + [3], GREEDY)
    run_to_completion(engine)
    collector.submit(engine, "b", short + [4], GREEDY)
    run_to_completion(engine)
    assert engine.stats.cached_prompt_tokens == 0


def _scoped_engines(tokenizer, tmp_path) -> tuple[Engine, Engine, list]:
    """Two engines on two copies of one tiny Llama (LoRA wraps a model, so neither is the
    shared fixture), the first with a prefix cache, the second without (the oracle: every
    prompt prefilled whole), and two random adapters on the attention projections."""
    engines = [make_engine(from_pretrained_objects(tiny_llama(len(tokenizer)), tokenizer,
                                                   "base"), max_loras=2, max_lora_rank=4,
                           prefix_cache_slots=slots) for slots in (3, 0)]
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                            init_lora_weights=False)
        get_peft_model(copy.deepcopy(tiny_llama(len(tokenizer))), config).save_pretrained(
            tmp_path / str(seed))
        adapters.append(load_lora_adapter(str(seed), tmp_path / str(seed),
                                          engines[0].primary.lora_slots.bank.linears, 4))
    return engines[0], engines[1], adapters


def _run_in_rounds(engine: Engine, rounds: list[list[tuple]]) -> Collector:
    """Each round's requests (id, prompt, adapter, steering) submitted together, run to the
    end before the next round."""
    collector = Collector()
    for requests in rounds:
        for request_id, prompt, adapter, steering in requests:
            collector.submit(engine, request_id, prompt, GREEDY, adapter, steering)
        run_to_completion(engine)
    return collector


def _steering(vector: torch.Tensor, apply_to: ApplyTo = ApplyTo.BOTH) -> SteeringSpec:
    return SteeringSpec((SteerEdit(0, SteerTarget.RESIDUAL, vector, 4.0, SteerMode.ADD, False,
                                   apply_to),))


def _assert_decoded_as_without_cache(cached: Engine, uncached: Engine, rounds) -> None:
    with_cache, without = _run_in_rounds(cached, rounds), _run_in_rounds(uncached, rounds)
    for requests in rounds:
        for request_id, *_ in requests:
            assert with_cache.tokens(request_id) == without.tokens(request_id), request_id


def test_lanes_share_prefixes_only_with_lanes_of_their_adapter(tokenizer, tmp_path):
    cached, uncached, (first, second) = _scoped_engines(tokenizer, tmp_path)
    rounds = [[("warm", PROMPTS[0], first, None)],
              [("same adapter", PROMPTS[1], first, None),
               ("other adapter", PROMPTS[1], second, None), ("plain", PROMPTS[1], None, None)]]
    _assert_decoded_as_without_cache(cached, uncached, rounds)
    assert cached.stats.cached_prompt_tokens == len(SHARED)  # the same adapter's lane only


def test_steered_lanes_share_prefixes_with_lanes_steered_alike(tokenizer, tmp_path):
    """Alike by content: each request resolves its own spec and tensors."""
    cached, uncached, _ = _scoped_engines(tokenizer, tmp_path)
    ones = torch.ones(64)
    rounds = [[("warm", PROMPTS[0], None, _steering(ones))],
              [("alike", PROMPTS[1], None, _steering(ones.clone())),
               ("other vector", PROMPTS[1], None, _steering(-ones)),
               ("plain", PROMPTS[1], None, None)]]
    _assert_decoded_as_without_cache(cached, uncached, rounds)
    assert cached.stats.cached_prompt_tokens == len(SHARED)


def test_steering_only_generated_tokens_shares_the_plain_prefixes(tokenizer, tmp_path):
    """Such a lane's prompt keys are a plain lane's, but for the last position: its edit acts
    there (that position yields the first token), so that one is never shared."""
    cached, uncached, _ = _scoped_engines(tokenizer, tmp_path)
    generation = _steering(torch.ones(64) * 4, ApplyTo.GENERATION)
    longer = PROMPTS[1] + [11, 12, 13]
    rounds = [[("warm", PROMPTS[0], None, None)],
              [("steered", PROMPTS[1], None, generation)],
              [("plain after it", longer, None, None)]]
    _assert_decoded_as_without_cache(cached, uncached, rounds)
    # the steered lane reused the system prompt; the plain one its prompt but the last token
    assert cached.stats.cached_prompt_tokens == len(SHARED) + len(PROMPTS[1]) - 1


def test_scopes_compare_adapters_by_identity_and_hold_them_weakly():
    class Adapter:  # a dataclass adapter loaded twice would compare equal by value
        pass

    adapter, again = Adapter(), Adapter()
    assert Scope(adapter) == Scope(adapter) and Scope() == Scope()
    assert Scope(adapter) != Scope(again) and Scope(adapter) != Scope()
    assert Scope(adapter, b"x") != Scope(adapter)
    unloaded = Scope(again)
    del again
    gc.collect()
    assert unloaded != Scope()  # a dead adapter's entries match nothing, plain lanes included


def _filled_cache(max_len: int = 64) -> SlotKVCache:
    """Slot 0 for a lane, 1 for the prefix cache; slot 0's keys and values at position p
    hold p + 1 (+ 1000 for values), so a copied span shows where it came from."""
    cache = SlotKVCache(CacheShape(2, 2, 1, 2, max_len), torch.float32, torch.device("cpu"))
    positions = torch.arange(1, max_len + 1, dtype=torch.float32).view(1, -1, 1).expand(1, -1, 2)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys[0] = positions
        values[0] = positions + 1000
    return cache


def _prompt(first: int, length: int) -> tuple[int, ...]:
    return tuple(range(first, first + length))


def test_one_slot_keeps_as_many_prompts_as_fit_and_evicts_the_least_recent():
    cache = _filled_cache(64)
    prefixes = PrefixCache(cache, range(1, 2))
    a, b, c = _prompt(100, 30), _prompt(200, 30), _prompt(300, 30)
    prefixes.remember(a, 0, Scope())
    prefixes.remember(b, 0, Scope())  # 60 of the slot's 64 positions in use
    assert [(e.slot, e.start) for e in prefixes.entries] == [(1, 0), (1, 30)]
    assert prefixes.reuse(a + (1,), 0, Scope()) == 30  # a is now the more recent
    prefixes.remember(c, 0, Scope())  # no room: b, the least recently used, goes
    assert [e.tokens for e in prefixes.entries] == [a, c]
    assert prefixes.entries[1].start == 30
    for keys, values in zip(cache.keys, cache.values, strict=True):  # c's span holds 1..30
        assert torch.equal(keys[1, 0, 30:60, 0], torch.arange(1.0, 31.0))
        assert torch.equal(values[1, 0, 30:60, 0], torch.arange(1001.0, 1031.0))


def test_a_prompt_extending_an_entry_replaces_it_and_one_it_extends_is_covered():
    prefixes = PrefixCache(_filled_cache(64), range(1, 2))
    turn = _prompt(100, 20)
    prefixes.remember(turn, 0, Scope())
    prefixes.remember(turn + _prompt(500, 10), 0, Scope())  # the conversation's next turn
    assert [e.tokens for e in prefixes.entries] == [turn + _prompt(500, 10)]
    prefixes.remember(turn, 0, Scope())  # covered by the longer one
    prefixes.remember(turn, 0, Scope(steering=b"steered"))  # another scope: its own entry
    assert len(prefixes.entries) == 2


def test_reuse_copies_the_entrys_own_span():
    cache = _filled_cache(64)
    prefixes = PrefixCache(cache, range(1, 2))
    prefixes.remember(_prompt(100, 30), 0, Scope())
    for keys in cache.keys:  # the lane's slot now holds another prompt's keys
        keys[0].fill_(-1.0)
    prefixes.remember(_prompt(200, 20), 0, Scope())  # at 30..49 of the prefix slot
    for keys in cache.keys:
        keys[0].fill_(5.0)
    assert prefixes.reuse(_prompt(200, 25), 0, Scope()) == 20
    assert torch.equal(cache.keys[0][0, 0, :21], torch.tensor([[-1.0] * 2] * 20 + [[5.0] * 2]))
    assert prefixes.reuse(_prompt(100, 40), 0, Scope()) == 30
    assert torch.equal(cache.keys[1][0, 0, :30, 0], torch.arange(1.0, 31.0))


def test_many_prompts_in_one_prefix_slot_decode_as_without_it(llama, llama_reference):
    engine = make_engine(llama, prefix_cache_slots=1)
    systems = [[1] + list(range(40 + 30 * i, 60 + 30 * i)) for i in range(4)]  # 21 tokens
    collector = Collector()
    for i, system in enumerate(systems):
        collector.submit(engine, f"first {i}", system + [7, 8], GREEDY)
    run_to_completion(engine)
    for i, system in enumerate(systems):
        collector.submit(engine, f"second {i}", system + [9, 10, 11], GREEDY)
    run_to_completion(engine)
    assert engine.stats.cached_prompt_tokens == 4 * 21  # each found its own system prompt
    for i, system in enumerate(systems):
        assert collector.tokens(f"second {i}") == hf_greedy(llama_reference,
                                                            system + [9, 10, 11], 8), i
