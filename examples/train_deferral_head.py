"""Train a Co-LLM deferral head for SmolLM2-135M-Instruct with the uppercase adapter as its
assistant (CPU, about two minutes), and measure the joint system against each model alone.

Co-LLM (Shen et al. 2024, "Learning to Decode Collaboratively with Multiple Language Models")
treats the model that writes each token as a latent variable Z_t: with pi_t = P(Z_t = 1) from
a head on the base's last hidden state,

    P(x_t | x_<t) = (1 - pi_t) P_base(x_t | x_<t) + pi_t P_assistant(x_t | x_<t),

and the head is trained by maximising this marginal likelihood of the training answers, with
no label saying who should write which token. As in the paper, the head first gets a weak
start: binary cross-entropy towards "the assistant gives this token more probability". Unlike
the paper, the base model stays frozen (only the head, 577 numbers, is trained): the server's
base is the shipped model. Both models' probabilities are computed once, so training is a
logistic problem on stored features.

The task is built here, with no download: short factual answers whose key word is written in
capitals ("What is the capital of Japan? ... -> The capital of Japan is TOKYO."). The base
writes the sentence well and the name in normal case; the uppercase adapter
(examples/adapters/uppercase) writes capitals well and shouts the whole sentence: a
template-filling split like the paper's, where neither model alone writes the answer.
Measured on held-out facts (never trained on): per-token negative log-likelihood of the
reference answers, greedy exact matches, and greedy answers that hold the reference's key word
in capitals inside a sentence that is not shouted, for the base alone, the assistant alone, and the
joint system (marginal, and the decision rule at threshold 0.5), with the deferral rate.

    .venv/bin/python examples/train_deferral_head.py
    steerserve serve --lora uppercase=examples/adapters/uppercase \\
        --deferral-head upper=examples/heads/smollm2-uppercase-deferral.safetensors
    # then "decoding": {"method": "collaborative", "assistants": ["uppercase"],
    #                   "head": "upper", "report": true}

Writes --out (the head) and a JSON beside it with the settings and the held-out numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from steerserve.decoding.methods.deferral_head import (
    DeferralHead,
    DeferralHeadConfig,
    save_deferral_head,
)
from steerserve.decoding.model.loader import EMBEDDED_MODEL_NAME, load_model

EXAMPLES = Path(__file__).resolve().parent
ADAPTER = EXAMPLES / "adapters" / "uppercase"
OUT = EXAMPLES / "heads" / "smollm2-uppercase-deferral.safetensors"
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("England", "London"),
    ("China", "Beijing"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("Canada", "Ottawa"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Thailand", "Bangkok"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Turkey", "Ankara"),
    ("India", "Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"), ("Chile", "Santiago"), ("Iran", "Tehran"),
]
COLOURS = [
    ("the sky on a clear day", "blue"), ("fresh grass", "green"), ("snow", "white"),
    ("a ripe banana", "yellow"), ("coal", "black"), ("a ripe tomato", "red"),
    ("an orange", "orange"), ("a polar bear's fur", "white"), ("a crow", "black"),
    ("a lemon", "yellow"), ("a strawberry", "red"), ("the sea", "blue"),
    ("a fire engine", "red"), ("a lime", "green"), ("milk", "white"), ("chocolate", "brown"),
]
ANIMALS = [
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("owl", "hoot"), ("pig", "oink"), ("frog", "ribbit"), ("horse", "neigh"),
    ("lion", "roar"), ("snake", "hiss"), ("bee", "buzz"),
]


@dataclass(frozen=True)
class Example:
    question: str
    answer: str

    @property
    def key(self) -> str:
        """The word in capitals: "TOKYO" of "The capital of Japan is TOKYO."."""
        return self.answer.rsplit(" is ", 1)[-1].rsplit(" says ", 1)[-1].rstrip(".")

    def filled(self, answer: str) -> bool:
        """The key in capitals inside a sentence that is not shouted."""
        return self.key in answer and mixed_case(answer)


def mixed_case(answer: str) -> bool:
    """A word in capitals (two letters or more) and a word in lower case: the format, whatever
    the content."""
    words = [w.strip(".,:;!?'\"") for w in answer.split()]
    return any(len(w) > 1 and w.isupper() for w in words) and any(w.islower() for w in words)


def examples() -> list[Example]:
    rows = [Example(f"What is the capital of {country}? Answer in one sentence and write the "
                    "city's name in capital letters.",
                    f"The capital of {country} is {city.upper()}.")
            for country, city in CAPITALS]
    rows += [Example(f"What colour is {thing}? Answer in one sentence and write the colour in "
                     "capital letters.", f"The colour of {thing} is {colour.upper()}.")
             for thing, colour in COLOURS]
    rows += [Example(f"What sound does a {animal} make? Answer in one sentence and write the "
                     "sound in capital letters.", f"A {animal} says {sound.upper()}.")
             for animal, sound in ANIMALS]
    return rows


@dataclass
class Positions:
    """Every answer position of a set of examples: the base's final state there and each
    model's log-probability of the reference token."""

    hidden: torch.Tensor  # (T, H)
    base: torch.Tensor  # (T,)
    assistant: torch.Tensor  # (T,)


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def positions(models, tokenizer, rows: list[Example]) -> Positions:
    hidden, base, assistant = [], [], []
    for row in rows:
        prompt = chat_ids(tokenizer, row.question)
        answer = tokenizer(row.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        targets = ids[0, len(prompt):]  # (A,)
        at = slice(len(prompt) - 1, ids.shape[1] - 1)  # the positions predicting them
        with models.disable_adapter():
            out = models(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-1][0, at])
            base.append(out.logits[0, at].log_softmax(-1).gather(1, targets[:, None])[:, 0])
        logits = models(ids).logits[0, at].log_softmax(-1)
        assistant.append(logits.gather(1, targets[:, None])[:, 0])
    return Positions(torch.cat(hidden).float(), torch.cat(base), torch.cat(assistant))


def marginal_nll(head: torch.nn.Linear, data: Positions) -> torch.Tensor:
    """-log((1 - pi) p_base + pi p_assistant), per token, pi = sigmoid(head(h))."""
    score = head(data.hidden)[:, 0]
    log_pi, log_not = torch.nn.functional.logsigmoid(score), torch.nn.functional.logsigmoid(
        -score)
    return -torch.logaddexp(log_not + data.base, log_pi + data.assistant)


def train(data: Positions, steps: int, warm_steps: int, lr: float, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(data.hidden.shape[1], 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    pseudo = (data.assistant > data.base).float()  # the weak start: who likes the token more
    for step in range(warm_steps + steps):
        optimizer.zero_grad()
        if step < warm_steps:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                head(data.hidden)[:, 0], pseudo)
        else:
            loss = marginal_nll(head, data).mean()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == warm_steps + steps - 1:
            print(f"step {step}: {'weak start' if step < warm_steps else 'marginal'} loss "
                  f"{loss.item():.4f}", flush=True)
    return head


def greedy(models, tokenizer, head: torch.nn.Linear | None, question: str, use: str,
           limit: int = 24) -> tuple[str, int, int]:
    """(answer, tokens, deferred tokens): `use` is base, assistant or joint (threshold 0.5)."""
    ids, deferred, end = chat_ids(tokenizer, question), 0, tokenizer.convert_tokens_to_ids(
        "<|im_end|>")
    start = len(ids)
    with torch.no_grad():
        for _ in range(limit):
            x = torch.tensor([ids])
            with models.disable_adapter():
                out = models(x, output_hidden_states=True)
            defer = use == "assistant" or (use == "joint" and torch.sigmoid(
                head(out.hidden_states[-1][0, -1].float())).item() > 0.5)
            logits = models(x).logits if defer else out.logits
            deferred += defer
            token = int(logits[0, -1].argmax())
            if token == end:
                break
            ids.append(token)
    return tokenizer.decode(ids[start:]).strip(), len(ids) - start, deferred


def evaluate(models, tokenizer, head: torch.nn.Linear, held_out: list[Example],
             data: Positions) -> dict:
    with torch.no_grad():
        pi = torch.sigmoid(head(data.hidden)[:, 0])
        hard = torch.where(pi > 0.5, data.assistant, data.base)
        nll = {"base": -data.base.mean().item(), "assistant": -data.assistant.mean().item(),
               "joint (marginal)": marginal_nll(head, data).mean().item(),
               "joint (threshold 0.5)": -hard.mean().item()}
    result = {"nll_per_token": nll, "deferral_rate_on_references": (pi > 0.5).float().mean()
              .item(), "exact_match": {}, "key_in_capitals_in_a_sentence": {},
              "a_word_in_capitals_in_a_sentence": {}, "samples": {}}
    for use in ("base", "assistant", "joint"):
        answers = [greedy(models, tokenizer, head, row.question, use) for row in held_out]
        pairs = list(zip([a for a, _, _ in answers], held_out, strict=True))
        result["exact_match"][use] = sum(a == row.answer for a, row in pairs) / len(pairs)
        result["key_in_capitals_in_a_sentence"][use] = sum(
            row.filled(a) for a, row in pairs) / len(pairs)
        result["a_word_in_capitals_in_a_sentence"][use] = sum(
            mixed_case(a) for a, _ in pairs) / len(pairs)
        if use == "joint":
            result["generated_deferral_rate"] = sum(d for *_, d in answers) / max(
                1, sum(n for _, n, _ in answers))
        result["samples"][use] = [a for a, _, _ in answers]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warm-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(EMBEDDED_MODEL_NAME, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(ADAPTER)).eval()
    rows = examples()
    random.Random(args.seed).shuffle(rows)
    held_out, training = rows[:args.held_out], rows[args.held_out:]
    with torch.no_grad():
        train_data = positions(models, loaded.tokenizer, training)
        test_data = positions(models, loaded.tokenizer, held_out)
    print(f"{len(training)} training answers ({len(train_data.base)} tokens), "
          f"{len(held_out)} held out", flush=True)
    head = train(train_data, args.steps, args.warm_steps, args.lr, args.seed)
    result = evaluate(models, loaded.tokenizer, head, held_out, test_data)
    print(json.dumps(result, indent=1))
    config = DeferralHeadConfig(train_data.hidden.shape[1], ("uppercase",), EMBEDDED_MODEL_NAME)
    save_deferral_head(DeferralHead(config, head.weight.detach(), head.bias.detach()),
                       args.out)
    summary = {"head": args.out.name, "model": EMBEDDED_MODEL_NAME,
               "assistants": ["uppercase"], "settings": vars(args) | {"out": str(args.out.name)},
               "training_answers": len(training), "held_out": result}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
