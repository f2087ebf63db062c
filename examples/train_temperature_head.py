"""Train a token-level temperature head for SmolLM2-135M-Instruct with LPO (CPU, minutes).

ADAPTIVEDECODER (Dhuliawala et al. 2024): a small head on the decoder's final hidden state
(after the final norm, the vector the LM head reads) picks each token's temperature from a set
(default 0.0, 0.2, ..., 1.0; 0.0 = greedy). It is trained with Latent Preference Optimization:
DPO on the head's log-probabilities of the temperature choices that produced a preferred vs a
dispreferred response, relative to a frozen reference head.

Task mix (rewards computed by program, each in 0..1; the combined reward is the mean over all
prompts, half of each task):

* factual: "What is 7 + 5? Reply with only the number." (single-digit operands) reward 1 if
  the first integer of the reply, after dropping an echo of the expression ("7 + 5 ="), is
  the sum, else 0. The 135M model answers "The answer is 12." and gets about 80% right
  greedily, about 50% at T=0.6 and about 20% at T=1.0 (two-digit sums: under 40% greedily,
  and it often repeats an operand first).
* open: "Write one sentence about <topic>." and similar. Per sample, the reward is its novelty
  within the group of samples for the same prompt (the share of its distinct words of 3+
  letters that no other sample uses) times a validity factor (enough words, no degenerate
  repetition, words the tokenizer knows as whole English words). Greedy samples are identical
  (novelty 0); diverse but sensible samples score high.

Training (every step seeded; the same command gives the same head):

1. Round 0 bootstraps from the model's own samples at FIXED temperatures of the set: each
   train prompt gets one sample per temperature, and every token's latent choice is that
   temperature's index. The head starts uniform (zero weights), so it is also the reference.
2. Rounds 1..R are on-policy: the head samples a temperature for every token, K samples per
   prompt; the reference is a frozen copy of the head at the start of the round.
3. Pairs: per prompt, chosen = a best-reward sample, rejected = a worst-reward sample (random
   among ties; prompts whose samples all tie are skipped). The loss is `decoding.lpo.lpo_loss`
   on the per-response sums of log pi(choice) over its tokens (`choice_log_probs`), Adam, a
   few epochs per round. Pairs of earlier rounds are kept (with the reference log-probs they
   were made with) so that later rounds do not forget the bootstrap signal.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python examples/train_temperature_head.py
    .venv/bin/python examples/eval_temperature_head.py  # held-out table, see docs

Writes a safetensors head (`decoding.temperature_head`) for `--temperature-head NAME=PATH`.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# `decoding` is importable because the project is installed editable in .venv (make install).
from lpo import choice_log_probs, lpo_loss
from transformers import DynamicCache

from steerserve.decoding.model.loader import EMBEDDED_MODEL_NAME, load_model
from steerserve.decoding.sampling.temperature_head import (
    TemperatureHead,
    TemperatureHeadConfig,
    save_temperature_head,
)

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
DEFAULT_OUT = Path(__file__).parent / "heads" / "smollm2-temperature.safetensors"
HEAD_SAMPLED = -1  # job mode: the head samples each token's temperature
HEAD_GREEDY = -2  # job mode: the head's most likely temperature for each token

# ---------------------------------------------------------------------------------------------
# Tasks and rewards
# ---------------------------------------------------------------------------------------------

FACTUAL = "factual"
OPEN = "open"

TOPICS_TRAIN = [
    "the ocean", "a rainy morning", "friendship", "the moon", "a busy city", "autumn leaves",
    "a lost key", "coffee", "mountains", "a small robot", "music", "winter", "a library",
    "bicycles", "the desert", "a birthday party", "gardening", "trains",
]
TOPICS_HELDOUT = [
    "the forest", "a snowy night", "kindness", "the stars", "a quiet village", "spring flowers",
    "an old map", "tea", "rivers", "a curious cat", "painting", "summer",
]
OPEN_TEMPLATES = [
    "Write one sentence about {topic}.",
    "Write the first line of a short story about {topic}.",
]
# Single-digit addition: greedy SmolLM2-135M-Instruct gets ~80% right, T=1.0 ~20% (measured on
# 24 prompts x 2 samples); with two-digit operands greedy accuracy falls under 40%.
ADD_RANGE = (1, 9)


@dataclass(frozen=True)
class Prompt:
    task: str  # FACTUAL | OPEN
    text: str
    answer: int | None = None


def factual_prompts(count: int, rng: random.Random, exclude: set[tuple[int, int]]) -> list:
    size = ADD_RANGE[1] - ADD_RANGE[0] + 1
    if count + len(exclude) > size * size:
        raise ValueError(f"only {size * size} operand pairs for {count + len(exclude)} prompts")
    prompts, used = [], set(exclude)
    while len(prompts) < count:
        a, b = rng.randint(*ADD_RANGE), rng.randint(*ADD_RANGE)
        if (a, b) in used:
            continue
        used.add((a, b))
        prompts.append(Prompt(FACTUAL, f"What is {a} + {b}? Reply with only the number.", a + b))
    return prompts


def open_prompts(topics: Sequence[str]) -> list[Prompt]:
    return [Prompt(OPEN, t.format(topic=topic)) for topic in topics for t in OPEN_TEMPLATES]


def task_split(seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): disjoint operand pairs and disjoint topics, same size per task."""
    rng = random.Random(seed)
    train_open, held_open = open_prompts(TOPICS_TRAIN), open_prompts(TOPICS_HELDOUT)
    train_fact = factual_prompts(len(train_open), rng, set())
    pairs = {_operands(p) for p in train_fact}
    held_fact = factual_prompts(len(held_open), rng, pairs)
    return train_fact + train_open, held_fact + held_open


def _operands(prompt: Prompt) -> tuple[int, int]:
    a, b = re.findall(r"\d+", prompt.text)[:2]
    return int(a), int(b)


def factual_reward(text: str, a: int, b: int) -> float:
    """1 if the first integer after an optional echo of "a + b =" is a + b, else 0."""
    text = re.sub(rf"^\W*{a}\s*\+\s*{b}\s*=?", "", text.strip())
    match = re.search(r"-?\d+", text)
    return float(match is not None and int(match.group()) == a + b)


WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


class OpenReward:
    """Group-relative novelty x validity, per sample, in 0..1."""

    def __init__(self, tokenizer) -> None:
        # Whole-word tokens of the byte-level BPE vocabulary ("Ġword"): a cheap English lexicon.
        self.lexicon = {
            tok[1:].lower() for tok in tokenizer.get_vocab()
            if tok.startswith("\u0120") and tok[1:].isalpha()
        }

    def validity(self, text: str) -> float:
        words = WORD.findall(text.lower())
        if len(words) < 4:
            return 0.0
        if len(set(words)) / len(words) < 0.5:  # degenerate repetition
            return 0.0
        known = sum(w in self.lexicon for w in words) / len(words)
        ascii_share = sum(c.isascii() for c in text) / max(len(text), 1)
        # Full credit from 90% known words; nonsense (made-up words, other scripts) loses it.
        return min(1.0, max(0.0, (known - 0.6) / 0.3)) * (ascii_share >= 0.95)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        bags = [{w for w in WORD.findall(t.lower()) if len(w) >= 3} for t in texts]
        rewards = []
        for i, (text, bag) in enumerate(zip(texts, bags, strict=True)):
            others = set().union(*(b for j, b in enumerate(bags) if j != i))
            novelty = len(bag - others) / len(bag) if bag else 0.0
            rewards.append(novelty * self.validity(text))
        return rewards


def group_rewards(prompt: Prompt, texts: Sequence[str], open_reward: OpenReward) -> list[float]:
    """Rewards of the samples of one prompt (open-ended rewards depend on the whole group)."""
    if prompt.task == FACTUAL:
        a, b = _operands(prompt)
        return [factual_reward(t, a, b) for t in texts]
    return open_reward(texts)


# ---------------------------------------------------------------------------------------------
# Sampling with per-token temperatures
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    prompt: int  # index into the prompt list
    mode: int  # fixed temperature index, HEAD_SAMPLED or HEAD_GREEDY
    tokens: list[int] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)  # per token (H,)
    choices: list[int] = field(default_factory=list)  # per token temperature index
    text: str = ""

    def hidden_tensor(self) -> torch.Tensor:
        return torch.stack(self.hidden)  # (L, H)


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    return [
        list(tokenizer.apply_chat_template(
            [{"role": "user", "content": p.text}], add_generation_prompt=True,
            tokenize=True, return_dict=False,
        ))
        for p in prompts
    ]


def _prefill(model, prompt_ids: Sequence[list[int]], pad_id: int):
    """Left-padded prefill of distinct prompts: (cache, last hidden (P, H), mask, next pos)."""
    width = max(len(ids) for ids in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(prompt_ids):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True)
    return cache, out.last_hidden_state[:, -1].float(), mask, positions[:, -1] + 1


def _pick_tokens(
    logits: torch.Tensor, temps: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """logits (B, V), temps (B,) -> tokens (B,); temperature 0 is argmax."""
    scaled = logits.float() / temps.clamp_min(1e-4)[:, None]
    sampled = torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator).squeeze(-1)
    return torch.where(temps > 0, sampled, logits.argmax(-1))


def _pick_temperatures(
    hidden: torch.Tensor, modes: torch.Tensor, head: TemperatureHead | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """hidden (B, H), modes (B,) -> temperature indices (B,)."""
    indices = modes.clone()
    for mode, greedy in ((HEAD_SAMPLED, False), (HEAD_GREEDY, True)):
        rows = (modes == mode).nonzero().squeeze(-1)
        if rows.numel():
            if head is None:
                raise ValueError("head modes need a head")
            indices[rows] = head.choose(hidden[rows], greedy=greedy, generator=generator)[0]
    return indices


@torch.no_grad()
def generate_chunk(
    model, tokenizer, prompt_ids: Sequence[list[int]], samples: list[Sample],
    head: TemperatureHead | None, temperatures: torch.Tensor, max_new_tokens: int,
    generator: torch.Generator, record: bool,
) -> None:
    """Fill `samples` (whose .prompt index `prompt_ids`) in place; one batch with a KV cache."""
    eos = tokenizer.eos_token_id
    cache, hidden, mask, pos = _prefill(model, prompt_ids, tokenizer.pad_token_id or eos)
    rows = torch.tensor([s.prompt for s in samples])
    cache.batch_select_indices(rows)  # one cache row per sample, prompts prefilled once
    hidden, mask, pos = hidden[rows], mask[rows], pos[rows]
    modes = torch.tensor([s.mode for s in samples])
    alive = list(range(len(samples)))  # sample index of each cache row
    for _ in range(max_new_tokens):
        choice = _pick_temperatures(hidden, modes, head, generator)  # (B,)
        tokens = _pick_tokens(model.lm_head(hidden), temperatures[choice], generator)
        for row, index in enumerate(alive):
            sample = samples[index]
            sample.tokens.append(int(tokens[row]))
            sample.choices.append(int(choice[row]))
            if record:
                sample.hidden.append(hidden[row].clone())
        keep = (tokens != eos).nonzero().squeeze(-1)
        if keep.numel() == 0:
            break
        if keep.numel() < len(alive):  # drop finished rows from the batch and the cache
            cache.batch_select_indices(keep)
            alive = [alive[i] for i in keep.tolist()]
            tokens, mask, pos, modes = tokens[keep], mask[keep], pos[keep], modes[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model.model(input_ids=tokens[:, None], attention_mask=mask,
                          position_ids=pos[:, None], past_key_values=cache, use_cache=True)
        hidden, pos = out.last_hidden_state[:, -1].float(), pos + 1
    for sample in samples:
        sample.text = tokenizer.decode(sample.tokens, skip_special_tokens=True).strip()


def generate(
    model, tokenizer, prompt_ids: Sequence[list[int]], modes_per_prompt: Sequence[list[int]],
    head: TemperatureHead | None, temperatures: Sequence[float], max_new_tokens: int,
    generator: torch.Generator, record: bool = False, batch_rows: int = 96,
) -> list[list[Sample]]:
    """Samples per prompt, one per entry of modes_per_prompt[p]; batches of ~batch_rows rows."""
    temps = torch.tensor(temperatures, dtype=torch.float32)
    groups = [[Sample(p, m) for m in modes] for p, modes in enumerate(modes_per_prompt)]
    start = 0
    while start < len(groups):
        stop, rows = start, 0
        while stop < len(groups) and (rows == 0 or rows + len(groups[stop]) <= batch_rows):
            rows += len(groups[stop])
            stop += 1
        chunk = [s for g in groups[start:stop] for s in g]
        local = [Sample(s.prompt - start, s.mode) for s in chunk]
        generate_chunk(model, tokenizer, prompt_ids[start:stop], local, head, temps,
                       max_new_tokens, generator, record)
        for target, done in zip(chunk, local, strict=True):
            target.tokens, target.hidden, target.choices = done.tokens, done.hidden, done.choices
            target.text = done.text
        start = stop
    return groups


# ---------------------------------------------------------------------------------------------
# LPO
# ---------------------------------------------------------------------------------------------


@dataclass
class Pair:
    chosen_hidden: torch.Tensor  # (Lc, H)
    chosen_choices: torch.Tensor  # (Lc,)
    rejected_hidden: torch.Tensor  # (Lr, H)
    rejected_choices: torch.Tensor  # (Lr,)
    ref_chosen: float = 0.0  # sum log pi_ref(choices), fixed when the pair is made
    ref_rejected: float = 0.0


def make_pairs(
    groups: list[list[Sample]], rewards: list[list[float]], rng: random.Random
) -> list[Pair]:
    pairs = []
    for samples, scores in zip(groups, rewards, strict=True):
        best, worst = max(scores), min(scores)
        if best - worst < 1e-6:
            continue  # all tie: no preference
        chosen = rng.choice([s for s, r in zip(samples, scores, strict=True) if r == best])
        rejected = rng.choice([s for s, r in zip(samples, scores, strict=True) if r == worst])
        pairs.append(Pair(chosen.hidden_tensor(), torch.tensor(chosen.choices),
                          rejected.hidden_tensor(), torch.tensor(rejected.choices)))
    return pairs


def _stack(pairs: Sequence[Pair], side: str) -> tuple[torch.Tensor, ...]:
    hidden = [getattr(p, f"{side}_hidden") for p in pairs]
    choices = torch.cat([getattr(p, f"{side}_choices") for p in pairs])
    segments = torch.cat([torch.full((len(h),), i) for i, h in enumerate(hidden)])
    return torch.cat(hidden), choices, segments


def pair_log_probs(head: TemperatureHead, pairs: Sequence[Pair]) -> tuple[torch.Tensor, ...]:
    """(chosen (P,), rejected (P,)) sums of log pi(choice) over each response's tokens."""
    chosen = choice_log_probs(head, *_stack(pairs, "chosen"), len(pairs))
    rejected = choice_log_probs(head, *_stack(pairs, "rejected"), len(pairs))
    return chosen, rejected


def set_reference(ref: TemperatureHead, pairs: Sequence[Pair]) -> None:
    with torch.no_grad():
        chosen, rejected = pair_log_probs(ref, pairs)
    for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist(), strict=True):
        pair.ref_chosen, pair.ref_rejected = c, r


def train_lpo(
    head: TemperatureHead, pairs: list[Pair], epochs: int, lr: float, beta: float,
    batch_pairs: int, rng: random.Random,
) -> float:
    """A few epochs of Adam on the LPO loss; returns the last epoch's mean loss."""
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    last = 0.0
    for _ in range(epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), batch_pairs):
            batch = [pairs[i] for i in order[start:start + batch_pairs]]
            chosen, rejected = pair_log_probs(head, batch)
            ref_c = torch.tensor([p.ref_chosen for p in batch])
            ref_r = torch.tensor([p.ref_rejected for p in batch])
            loss = lpo_loss(chosen, rejected, ref_c, ref_r, beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        last = sum(losses) / len(losses)
    head.eval()
    return last


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def summarize(
    prompts: Sequence[Prompt], groups: list[list[Sample]], rewards: list[list[float]],
    temperatures: Sequence[float],
) -> dict[str, dict[str, float]]:
    """Per task: mean reward and mean temperature of the tokens' choices."""
    out: dict[str, dict[str, float]] = {}
    for task in (FACTUAL, OPEN):
        idx = [i for i, p in enumerate(prompts) if p.task == task]
        scores = [r for i in idx for r in rewards[i]]
        temps = [temperatures[c] for i in idx for s in groups[i] for c in s.choices]
        out[task] = {
            "reward": sum(scores) / max(len(scores), 1),
            "mean_temperature": sum(temps) / max(len(temps), 1),
        }
    out["combined"] = {"reward": (out[FACTUAL]["reward"] + out[OPEN]["reward"]) / 2}
    return out


def uniform_head(config: TemperatureHeadConfig) -> TemperatureHead:
    """A head whose output layer is zero: every temperature equally likely, for any input."""
    head = TemperatureHead(config)
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return head


def score_groups(prompts, groups, open_reward) -> list[list[float]]:
    return [group_rewards(p, [s.text for s in g], open_reward)
            for p, g in zip(prompts, groups, strict=True)]


def load_lm(spec: str):
    loaded = load_model(spec, dtype="float32", device="cpu", max_model_len=1024)
    return loaded.model, loaded.tokenizer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL_NAME,
                        help="model to train on: the embedded name, an HF directory or a .gguf")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where to write the head (.safetensors)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=DEFAULT_TEMPERATURES,
                        help="the ascending temperature set (0 = greedy)")
    parser.add_argument("--inner-size", type=int, default=0,
                        help="hidden width of the head (0 = a single linear layer)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="on-policy rounds after the fixed-temperature bootstrap round")
    parser.add_argument("--samples", type=int, default=6,
                        help="samples per prompt in the on-policy rounds")
    parser.add_argument("--epochs", type=int, default=30, help="LPO epochs per round")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--beta", type=float, default=0.5, help="LPO (DPO) beta")
    parser.add_argument("--batch-pairs", type=int, default=16, help="pairs per Adam step")
    parser.add_argument("--max-new-tokens", type=int, default=24,
                        help="tokens generated per sample at most")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts, sampling, Adam")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def run_round(
    label: str, model, tokenizer, head, prompts, prompt_ids, modes, args, generator,
    open_reward, rng,
) -> list[Pair]:
    started = time.perf_counter()
    groups = generate(model, tokenizer, prompt_ids, modes, head, args.temperatures,
                      args.max_new_tokens, generator, record=True)
    rewards = score_groups(prompts, groups, open_reward)
    stats = summarize(prompts, groups, rewards, args.temperatures)
    pairs = make_pairs(groups, rewards, rng)
    print(f"[{label}] sampled {sum(map(len, groups))} in {time.perf_counter() - started:.0f} s;"
          f" reward factual {stats[FACTUAL]['reward']:.3f} open {stats[OPEN]['reward']:.3f}"
          f" combined {stats['combined']['reward']:.3f}; mean temperature factual"
          f" {stats[FACTUAL]['mean_temperature']:.2f} open {stats[OPEN]['mean_temperature']:.2f};"
          f" {len(pairs)} pairs", flush=True)
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_lm(args.model)
    print(f"model loaded in {time.perf_counter() - started:.0f} s", flush=True)
    train, _ = task_split(args.seed)
    prompt_ids = encode_prompts(tokenizer, train)
    open_reward = OpenReward(tokenizer)
    config = TemperatureHeadConfig(
        hidden_size=model.config.hidden_size, temperatures=tuple(args.temperatures),
        inner_size=args.inner_size, level="token", model=EMBEDDED_MODEL_NAME,
    )
    head = uniform_head(config)
    pairs: list[Pair] = []
    fixed = [list(range(len(args.temperatures)))] * len(train)
    for round_index in range(args.rounds + 1):
        on_policy = round_index > 0
        modes = [[HEAD_SAMPLED] * args.samples] * len(train) if on_policy else fixed
        label = f"round {round_index}" + (" on-policy" if on_policy else " fixed temperatures")
        new = run_round(label, model, tokenizer, head, train, prompt_ids, modes, args,
                        generator, open_reward, rng)
        set_reference(head, new)  # the head at the start of this round is the reference
        pairs += new
        loss = train_lpo(head, pairs, args.epochs, args.lr, args.beta, args.batch_pairs, rng)
        print(f"[round {round_index}] LPO on {len(pairs)} pairs: loss {loss:.4f}", flush=True)
    save_temperature_head(head, args.out)
    print(f"saved {args.out} ({time.perf_counter() - started:.0f} s total)")


if __name__ == "__main__":
    main()
