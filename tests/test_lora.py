"""LoRA adapters in the engine: equal to peft's PeftModel, batched with mixed adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from steerserve.adapters.lora.files import load_lora_adapter
from steerserve.adapters.lora.mix import mix_adapters
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, run_to_completion
from tests.support import make_engine
from tests.tiny_models import tiny_llama

PROMPTS = ["The capital of France is", "Once upon a time there was", "One, two, three,"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
ADAPTER_SPECS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["o_proj", "gate_proj", "down_proj"]),
    dict(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"], use_rslora=True),
]


def make_peft_adapter(base, spec: dict, seed: int, path):
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **spec))
    peft_model.save_pretrained(path)
    return peft_model.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tokenizer):
    return peft_adapters(tmp_path_factory, tokenizer)


def peft_adapters(tmp_path_factory, tokenizer):
    """The tiny Llama and ADAPTER_SPECS saved by peft: (base, [(name, path, peft model)])."""
    base = tiny_llama(len(tokenizer))
    made = []
    for i, spec in enumerate(ADAPTER_SPECS):
        path = tmp_path_factory.mktemp(f"adapter{i}")
        made.append((f"a{i}", path, make_peft_adapter(base, spec, 100 + i, path)))
    return base, made


def lora_engine(base, tokenizer, adapters, max_loras=4, lora_triton=False, forward="auto",
                max_rank=8):
    loaded = from_pretrained_objects(copy.deepcopy(base), tokenizer, "base")
    engine = make_engine(loaded, max_loras=max_loras, max_lora_rank=max_rank,
                         lora_triton=lora_triton, forward=forward)
    linears = engine.primary.lora_slots.bank.linears
    loras = {name: load_lora_adapter(name, path, linears, 8) for name, path, _ in adapters}
    return engine, loras


def submit_all(engine, tokenizer, loras, plan, params=GREEDY) -> Collector:
    collector = Collector()
    for request_id, prompt, adapter in plan:
        collector.submit(engine, request_id, tokenizer(prompt)["input_ids"], params,
                         adapter=loras.get(adapter))
    run_to_completion(engine)
    return collector


def peft_greedy(peft_model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("forward", ["fused", "hf"])
@pytest.mark.parametrize("lora_triton", [False, True], ids=["dense-cpu", "triton-kernels"])
def test_each_adapter_matches_peft(adapters, tokenizer, lora_triton, forward):
    base, made = adapters
    engine, loras = lora_engine(base, tokenizer, made, lora_triton=lora_triton, forward=forward)
    plan = [(name, PROMPTS[0], name) for name, _, _ in made]
    collector = submit_all(engine, tokenizer, loras, plan)
    for name, _, peft_model in made:
        assert collector.tokens(name) == peft_greedy(peft_model, tokenizer, PROMPTS[0], 8)


def test_prompt_logprobs_match_peft_forward(adapters, tokenizer):
    base, made = adapters
    engine, loras = lora_engine(base, tokenizer, made)
    name, _, peft_model = made[1]
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    collector = Collector()
    collector.submit(engine, "s", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0),
                     adapter=loras[name])
    run_to_completion(engine)
    scored = collector.last("s").prompt_logprobs
    with torch.no_grad():
        logprobs = peft_model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for position in range(1, len(prompt)):
        assert scored[position].logprob == pytest.approx(
            float(logprobs[position - 1, prompt[position]]), abs=1e-4)


def test_mixed_batch_equals_each_alone(adapters, tokenizer):
    base, made = adapters
    plan = [("base0", PROMPTS[0], None), ("a0", PROMPTS[1], "a0"), ("a1", PROMPTS[2], "a1"),
            ("base1", PROMPTS[1], None), ("a2", PROMPTS[0], "a2"), ("a0bis", PROMPTS[2], "a0")]
    engine, loras = lora_engine(base, tokenizer, made)
    together = submit_all(engine, tokenizer, loras, plan)
    for request_id, prompt, adapter in plan:
        alone_engine, alone_loras = lora_engine(base, tokenizer, made)
        alone = submit_all(alone_engine, tokenizer, alone_loras, [(request_id, prompt, adapter)])
        assert together.tokens(request_id) == alone.tokens(request_id), request_id
    assert together.tokens("a0") != together.tokens("base1"), "adapter had no effect"


def test_lru_eviction_and_waiting_for_a_slot(adapters, tokenizer):
    """One slot, three adapters: lanes wait for the slot, the idle adapter is evicted."""
    base, made = adapters
    reference_engine, reference_loras = lora_engine(base, tokenizer, made)
    plan = [(name, PROMPTS[i], name) for i, (name, _, _) in enumerate(made)]
    reference = submit_all(reference_engine, tokenizer, reference_loras, plan)
    engine, loras = lora_engine(base, tokenizer, made, max_loras=1)
    collector = Collector()
    for request_id, prompt, adapter in plan:
        collector.submit(engine, request_id, tokenizer(prompt)["input_ids"], GREEDY,
                         adapter=loras[adapter])
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 2
    run_to_completion(engine)
    for request_id, _, _ in plan:
        assert collector.tokens(request_id) == reference.tokens(request_id)
    assert engine.primary.lora_slots.resident_names() == ["a2"]


@pytest.mark.parametrize("lora_triton", [False, True], ids=["dense-cpu", "triton-kernels"])
def test_a_weighted_mix_matches_peft_weighted_merge(adapters, tokenizer, lora_triton):
    """Two adapters of different ranks and targets, mixed with weights as one virtual
    adapter (adapters/lora/mix.py), on the CPU path and in the Triton kernels."""
    base, made = adapters
    (name_a, path_a, _), (name_b, path_b, _) = made[0], made[1]
    engine, loras = lora_engine(base, tokenizer, made[:2], lora_triton=lora_triton,
                                max_rank=16)
    mixed = mix_adapters([(loras[name_a], 0.6), (loras[name_b], -0.8)], max_rank=16)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path_a, adapter_name=name_a)
    peft_model.load_adapter(path_b, adapter_name=name_b)
    peft_model.add_weighted_adapter([name_a, name_b], [0.6, -0.8], "merged",
                                    combination_type="cat")
    peft_model.set_adapter("merged")
    prompt = "The quick brown fox"
    collector = Collector()
    collector.submit(engine, "mix", tokenizer(prompt)["input_ids"], GREEDY, adapter=mixed)
    run_to_completion(engine)
    assert collector.tokens("mix") == peft_greedy(peft_model, tokenizer, prompt,
                                                  GREEDY.max_tokens)
