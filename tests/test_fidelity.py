"""Each method's reference evaluation protocol through the API: multiple-choice scoring is
`/v1/completions` with `echo`, `logprobs` and `max_tokens: 0` (what evaluation harnesses send),
and the scores equal a reference loop written here from the reference code's formulas, run on
untouched copies of the models (docs/fidelity.md lists each method's settings)."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.method_references import lsm, reference_keys, reference_ponder
from tests.support import API_KEY, LiveServer
from tests.tiny_models import tiny_llama

FLOOR = -9999.0  # what a masked token reports (JSON has no -inf)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer, tiny_model_dir):
    root = tmp_path_factory.mktemp("fidelity")
    tiny_llama(len(tokenizer), seed=31).save_pretrained(root / "expert")
    torch.manual_seed(32)
    deep = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        tie_word_embeddings=False))
    deep.save_pretrained(root / "deep")
    for name in ("expert", "deep"):
        tokenizer.save_pretrained(root / name)
    return {"tiny": tiny_model_dir, "expert": root / "expert", "deep": root / "deep"}


@pytest.fixture(scope="module")
def server(model_dirs):
    live = LiveServer([arg for name, path in model_dirs.items()
                       for arg in ("--model", f"{name}={path}")] + ["--dtype", "float32"],
                      api_key=API_KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def references(model_dirs):
    return {name: AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
            for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    text = "Q: What is the capital of France? A: The capital of France is Paris."
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)


def served_scores(server, model: str, prompt: list[int], decoding: dict | None,
                  seed: int = 0) -> list[float]:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True,
                                    logprobs=0, seed=seed,
                                    extra_body={"decoding": decoding} if decoding else {})
    return out.choices[0].logprobs.token_logprobs[1:]


def logits(model, ids: list[int]) -> torch.Tensor:
    """(P - 1, V): position t predicts token t + 1."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, :-1].float()


def token_scores(final: torch.Tensor, prompt: list[int]) -> list[float]:
    """The reported log-probability of each prompt token under a (P - 1, V) final score:
    normalised as the references do (post-softmax), masked tokens at the floor."""
    chosen = final.log_softmax(-1).gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    return [FLOOR if value == float("-inf") else float(value) for value in chosen]


def assert_scores(got: list[float], expected: list[float]) -> None:
    assert got == pytest.approx(expected, abs=2e-4)


def test_plain_scores_are_the_models(server, references, prompt):
    assert_scores(served_scores(server, "tiny", prompt, None),
                  token_scores(logits(references["tiny"], prompt), prompt))


def test_proxy_tuning(server, references, prompt):
    """z_base + alpha (z_expert - z_anti) on raw logits (dexperts.py)."""
    z = {name: logits(references[name], prompt) for name in ("tiny", "expert", "deep")}
    decoding = {"method": "proxy_tuning", "expert": "expert", "anti_expert": "deep",
                "alpha": 0.7}
    assert_scores(served_scores(server, "tiny", prompt, decoding),
                  token_scores(z["tiny"] + 0.7 * (z["expert"] - z["deep"]), prompt))


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_contrastive_li2022(server, references, prompt, alpha):
    """lsm(expert) - beta lsm(amateur / T) on the expert-plausible set; alpha 0: no mask."""
    expert, amateur = logits(references["tiny"], prompt), logits(references["deep"], prompt)
    final = lsm(expert) - 0.5 * lsm(amateur / 0.5)
    if alpha:
        probs = expert.softmax(-1)
        final = final.masked_fill(probs < alpha * probs.max(-1, keepdim=True).values,
                                  float("-inf"))
    decoding = {"method": "contrastive", "amateur": "deep", "alpha": alpha, "beta": 0.5,
                "amateur_temperature": 0.5}
    assert_scores(served_scores(server, "tiny", prompt, decoding), token_scores(final, prompt))


def test_contrastive_obrien2023(server, references, prompt):
    """(1 + beta) z_expert - beta z_amateur; tokens with z_expert < log(alpha) + max masked."""
    expert, amateur = logits(references["tiny"], prompt), logits(references["deep"], prompt)
    final = 1.5 * expert - 0.5 * amateur
    implausible = expert < torch.log(torch.tensor(0.1)) + expert.max(-1, keepdim=True).values
    decoding = {"method": "contrastive", "amateur": "deep", "variant": "obrien2023",
                "alpha": 0.1, "beta": 0.5}
    assert_scores(served_scores(server, "tiny", prompt, decoding),
                  token_scores(final.masked_fill(implausible, float("-inf")), prompt))


def dola_reference(model, prompt: list[int], candidates: list[int]) -> torch.Tensor:
    """DoLa's multiple-choice scoring (relative_top 0): per position, the candidate hidden
    state (0 = embeddings) with the largest JS divergence from the mature distribution."""
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), output_hidden_states=True)
        mature = out.logits[0, :-1].float()
        early = torch.stack([model.lm_head(model.model.norm(out.hidden_states[h][0, :-1]))
                             for h in candidates], dim=1).float()  # (P - 1, K, V)
    p, q = mature.softmax(-1).unsqueeze(1), early.softmax(-1)
    m = 0.5 * (p + q)
    divergence = 0.5 * ((p * (p.log() - m.log())).sum(-1) + (q * (q.log() - m.log())).sum(-1))
    premature = early[torch.arange(len(mature)), divergence.argmax(-1)]
    return lsm(mature) - lsm(premature)


@pytest.mark.parametrize("layers", [[0, 1, 3], "low"])
def test_dola_multiple_choice_protocol(server, references, prompt, layers):
    """relative_top 0 and the reference's layer numbering: 'low' on 4 blocks is hidden
    states 0 (the embedding output) only; [0, 1, 3] mixes it with blocks 0 and 2."""
    candidates = [0] if layers == "low" else layers
    decoding = {"method": "dola", "layers": layers, "relative_top": 0.0}
    got = served_scores(server, "deep", prompt, decoding)
    assert_scores(got, token_scores(dola_reference(references["deep"], prompt, candidates),
                                    prompt))
    assert FLOOR not in got


def test_dola_block_indexing_is_the_hidden_state_one_shifted(server, prompt):
    shifted = {"method": "dola", "layers": [0, 2], "layer_indexing": "blocks",
               "relative_top": 0.0}
    reference = {"method": "dola", "layers": [1, 3], "relative_top": 0.0}
    assert served_scores(server, "deep", prompt, shifted) == pytest.approx(
        served_scores(server, "deep", prompt, reference), abs=1e-6)


def test_sh2(server, references, tokenizer, prompt):
    """lsm(ponder) + alpha (lsm(ponder) - lsm(orig)), the hesitation lane aligned on the
    prompt; keys from the original lane's own scores, seeded by the request's seed."""
    base = references["tiny"]
    original = logits(base, prompt)
    keys = reference_keys(prompt, original, 30.0, set(tokenizer.all_special_ids), 7)
    ponder = reference_ponder(tokenizer, prompt, keys)
    hesitated = logits(base, ponder)[-(len(prompt) - 1):]
    final = lsm(hesitated) + 2.0 * (lsm(hesitated) - lsm(original))
    decoding = {"method": "sh2", "alpha": 2.0, "key_num": 30}
    assert_scores(served_scores(server, "tiny", prompt, decoding, seed=7),
                  token_scores(final, prompt))


def test_logit_arithmetic(server, references, prompt):
    """sum_i w_i lsm(z_i / T_i) (EFT's up-scaling: base + beta (expert - anti-expert))."""
    z = {name: logits(references[name], prompt) for name in ("tiny", "expert", "deep")}
    final = lsm(z["tiny"]) + 1.5 * (lsm(z["expert"]) - lsm(z["deep"] / 0.8))
    decoding = {"method": "logit_arithmetic", "terms": [
        {"model": "tiny", "weight": 1.0}, {"model": "expert", "weight": 1.5},
        {"model": "deep", "weight": -1.5, "temperature": 0.8}]}
    assert_scores(served_scores(server, "tiny", prompt, decoding), token_scores(final, prompt))
