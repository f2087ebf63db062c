"""Train LoFiT head offsets for SmolLM2-135M-Instruct that steer answers toward the ocean (CPU).

LoFiT (Yin et al. 2024, "LoFiT: Localized Fine-tuning on LLM Representations") fine-tunes a
frozen model through a few attention heads only, in two steps:

1. Head selection: every head of every layer gets a learnable multiplicative scaling of its
   output, h -> h * (1 + A_lh) (A_lh has head_dim entries, initialised 0). A is trained on the
   task's cross-entropy plus an L1 penalty on A; the k heads with the largest ||A_lh|| are
   the ones the task leans on.
2. Offsets: only those k heads get a learnable bias v_lh (head_dim, initialised 0) added to
   their output, h -> h + v_lh, trained on the same cross-entropy (Adam, base model frozen).

Both interventions are forward pre-hooks on each layer's `self_attn.o_proj`, whose input is
the concatenated heads' outputs (B, T, num_heads * head_dim): exactly where steerserve adds a
`"target": "heads"` vector, at every position, times the request's `scale`.

The task is fixed, so the docs can compare steering methods on it: steer answers toward the
topic of the ocean/sea. The script builds its own data (no downloads): neutral user prompts in
the chat template, each with a short neutral answer (the negative) and two templated answers
that bring in the sea (the positives). The loss is the cross-entropy of the positive
responses' tokens given the prompts (prompt tokens do not count). `--neg-weight` subtracts
that weight times the negatives' cross-entropy; it is 0 by default and the committed file was
trained without it (the term is unbounded: it can be lowered by making the negatives
ungrammatical, and it costs a second forward). Held-out prompts (`HELD_OUT_PROMPTS`, never
trained on) are scored by `ocean_score` unsteered and steered.

With the defaults (about 5 minutes on one CPU thread), on the 26 held-out prompts (greedy, 40
tokens): ocean hit rate 0.04 unsteered -> 0.46 steered, ocean words per answer 0.04 -> 0.92,
distinct-word ratio 0.78 -> 0.83. The steered answers are also shorter (18 vs 33 words on
average): the offsets learn the training answers' one-or-two-sentence style too.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python examples/train_head_offsets.py
    steerserve serve --steering-vector ocean_lofit=examples/steering/ocean_lofit.safetensors
    # then {"steering": [{"vector": "ocean_lofit", "target": "heads",
    #                     "heads": <"heads" of ocean_lofit.json>, "scale": 1.0}]}

Writes `--out` (a steering vector, target "heads", method "lofit": one direction per layer
that has a selected head, zero on that layer's other heads) and a JSON next to it (same stem)
with the selected heads as [[layer, head], ...], the settings and the held-out scores. At the
end it checks that greedy generation with the training hooks equals what the steerserve
engine generates for the same request (the file loaded and resolved as the server does).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from steerserve.adapters.steering.spec import ModelShape
from steerserve.adapters.steering.store import VectorStore
from steerserve.adapters.steering.vectors import SteeringVector, save_safetensors
from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.methods.plain import Plain
from steerserve.decoding.model.info import eos_token_ids
from steerserve.decoding.model.loader import EMBEDDED_MODEL_NAME, LoadedModel, load_model
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.server.schemas.steering import SteeringItem
from steerserve.server.translate.steering import resolve_steering

VECTOR_NAME = "ocean_lofit"
DEFAULT_OUT = Path(__file__).parent / "steering" / f"{VECTOR_NAME}.safetensors"

# ---------------------------------------------------------------------------------------------
# Task data and score
# ---------------------------------------------------------------------------------------------

OCEAN_WORDS = frozenset({
    "ocean", "oceans", "sea", "seas", "seaside", "wave", "waves", "beach", "beaches", "shore",
    "shores", "tide", "tides", "coral", "reef", "reefs", "fish", "boat", "boats", "sail",
    "sails", "sailing", "sailboat", "marine", "surf", "surfing", "harbor", "harbour", "island",
    "islands", "coast", "coastal", "lighthouse", "seashell", "seashells", "dolphin",
    "dolphins", "whale", "whales", "seagull", "seagulls", "sand", "underwater", "nautical",
    "sailor", "sailors", "ship", "ships", "lagoon",
})  # not "salt" or "bay": cooking answers use them unsteered

# (prompt, short neutral answer): the negatives, and the base of the positives.
TRAIN_PROMPTS = [
    ("What is a good breakfast?",
     "A bowl of oatmeal with fruit and a glass of water is a simple, healthy start."),
    ("How do I clean my kitchen quickly?",
     "Clear the counters first, wipe every surface, then sweep the floor."),
    ("Give me a tip for writing an essay.",
     "Make a short outline first, then write one clear point per paragraph."),
    ("What should I wear to a party?", "Pick something comfortable that you feel confident in."),
    ("How can I remember names better?",
     "Repeat the name when you hear it and link it to something you notice."),
    ("Suggest a quick workout.",
     "Do ten squats, ten push-ups and a one-minute plank, three times."),
    ("How do I fix a slow computer?",
     "Close the programs you are not using and restart it once in a while."),
    ("What is a nice way to spend Sunday?", "Sleep in, take a walk, and cook something simple."),
    ("How do I become a better listener?",
     "Let the other person finish, then ask a question about what they said."),
    ("Recommend a board game.", "Try a cooperative game, so that everyone plays together."),
    ("How can I drink more water?",
     "Keep a bottle on your desk and refill it every time it is empty."),
    ("What should I name my band?", "Pick a short name that is easy to say and to remember."),
    ("How do I plan a trip on a budget?",
     "Travel off season, book early and cook some of your own meals."),
    ("Give me a tip for taking better photos.",
     "Use natural light and keep the subject away from the center."),
    ("How do I motivate myself to exercise?",
     "Set a small goal and do it at the same time every day."),
    ("What is a good snack?", "A handful of nuts or an apple keeps you full until dinner."),
    ("How should I prepare for an exam?",
     "Study a little every day and test yourself on old questions."),
    ("What can I do when I feel bored?",
     "Take a short walk, call a friend, or learn something new."),
    ("How do I write a good email?",
     "Keep it short, put the main point first, and end with a clear request."),
    ("What color should I paint my bedroom?",
     "A soft, calm color such as light grey or warm white works well."),
    ("How do I take care of a dog?",
     "Feed it well, walk it every day, and take it to the vet once a year."),
    ("Give me an idea for a short story.",
     "A girl finds an old key and follows it to a forgotten door."),
    ("How can I reduce stress?", "Breathe slowly, take short breaks, and get enough sleep."),
    ("What is a good habit to start?",
     "Write down three things you are grateful for every evening."),
]

HELD_OUT_PROMPTS = [
    "Describe your ideal weekend.",
    "What should I cook for dinner tonight?",
    "Give me advice for a job interview.",
    "How can I sleep better?",
    "What is a good way to learn a new language?",
    "Suggest a name for a pet cat.",
    "How do I stay focused while studying?",
    "What makes a good friend?",
    "How can I save money each month?",
    "What is a fun hobby to start?",
    "Write a short note thanking a teacher.",
    "How should I organize my desk?",
    "What book should I read next?",
    "Give me a tip for public speaking.",
    "How do I start running?",
    "What is a good gift for my mother?",
    "Describe a perfect morning.",
    "How can I be more productive at work?",
    "What should I do on a rainy afternoon?",
    "Tell me something interesting about trees.",
    "How do I make new friends in a new city?",
    "What is the best way to relax after work?",
    "Give me an idea for a birthday party.",
    "How can I keep my houseplants healthy?",
    "Describe a cozy evening at home.",
    "How do I learn to play the guitar?",
]

# Word lists the positives are templated from (seeded choice, so the data is reproducible).
PLACES = ["by the sea", "on the beach", "near the ocean", "at the harbor", "on a quiet island",
          "along the shore", "on a sailing boat", "by the coral reef"]
SIGHTS = ["the waves rolling in", "the tide coming in over the sand", "boats sailing past",
          "fish swimming over the coral", "surfers riding the waves", "the sea breeze",
          "the ocean at sunset", "seagulls above the waves"]
TEMPLATES = [
    "{answer} Then do it {place}, with {sight}.",
    "Think of the ocean: {answer_lower}",
    "{answer} It feels like a calm day {place}, watching {sight}.",
    "Picture {sight} {place}. {answer}",
    "Just like the waves of the sea, {answer_lower}",
    "{answer} The sea teaches us that, like {sight}.",
]

_WORD = re.compile(r"[a-z]+")


def ocean_score(text: str) -> dict[str, float]:
    """hit: 1 if any ocean word appears; count: ocean-word tokens; distinct_ratio: distinct
    words / words (low means repetitive, a fluency guard). Words are runs of letters."""
    words = _WORD.findall(text.lower())
    count = sum(word in OCEAN_WORDS for word in words)
    return {"hit": int(count > 0), "count": count,
            "distinct_ratio": len(set(words)) / len(words) if words else 0.0}


def mean_scores(texts: Sequence[str]) -> dict[str, float]:
    scores = [ocean_score(t) for t in texts]
    return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}


@dataclass(frozen=True)
class Pair:
    prompt: str
    positive: str
    negative: str


def make_pairs(per_prompt: int, rng: random.Random) -> list[Pair]:
    """`per_prompt` positives per training prompt, each from a different template."""
    pairs = []
    for prompt, answer in TRAIN_PROMPTS:
        for template in rng.sample(TEMPLATES, per_prompt):
            positive = template.format(answer=answer, answer_lower=answer[0].lower() + answer[1:],
                                       place=rng.choice(PLACES), sight=rng.choice(SIGHTS))
            pairs.append(Pair(prompt, positive, answer))
    return pairs


# ---------------------------------------------------------------------------------------------
# Tokens and loss
# ---------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user turn in the model's chat template, as the server renders a chat request."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


@dataclass(frozen=True)
class Example:
    ids: list[int]  # prompt + response + end-of-turn token
    start: int  # index of the first response token


def encode(tokenizer, prompt: str, response: str) -> Example:
    head = prompt_ids(tokenizer, prompt)
    full = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=True, return_dict=False))
    if full[:len(head)] != head:
        raise ValueError("the chat template renders the prompt differently with a response")
    end = full.index(tokenizer.eos_token_id, len(head)) + 1  # keep <|im_end|>: answers stop
    return Example(full[:end], len(head))


def response_loss(model, batch: Sequence[Example]) -> torch.Tensor:
    """Mean cross-entropy of the response tokens. Right padding (causal attention: real tokens
    never see it); the LM head runs on the response positions only, which saves most of its
    49k-wide matmul."""
    width = max(len(e.ids) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, example in enumerate(batch):
        ids[r, :len(example.ids)] = torch.tensor(example.ids)
        mask[r, :len(example.ids)] = 1
        for t in range(example.start, len(example.ids)):  # position t-1 predicts token t
            rows.append(r)
            cols.append(t - 1)
            targets.append(example.ids[t])
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return torch.nn.functional.cross_entropy(logits, torch.tensor(targets))


def batches(count: int, size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless shuffled mini-batches of example indices (a new order every epoch)."""
    while True:
        order = list(range(count))
        rng.shuffle(order)
        for start in range(0, count - size + 1, size):
            yield order[start:start + size]


# ---------------------------------------------------------------------------------------------
# Interventions on the heads' outputs (the input of o_proj)
# ---------------------------------------------------------------------------------------------

HeadEdit = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, (B, T, NH, D)) -> same


@contextmanager
def head_hooks(model, edit: HeadEdit, layers: Sequence[int]) -> Iterator[None]:
    """Pre-hooks on o_proj of `layers`: where the server adds target "heads" vectors."""
    shape = ModelShape.of(model.config)

    def hook_for(layer: int):
        def hook(module, args):
            flat = args[0]  # (B, T, NH * D)
            heads = flat.view(*flat.shape[:-1], shape.num_heads, shape.head_dim)
            return (edit(layer, heads).reshape(flat.shape), *args[1:])
        return hook

    handles = [model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        hook_for(layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class HeadScaling(torch.nn.Module):
    """LoFiT step 1: h -> h * (1 + A_lh) on every head of every layer, A = 0 at first."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(shape.num_layers, shape.num_heads,
                                                shape.head_dim))

    def edit(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        return heads * (1 + self.a[layer])

    def l1(self) -> torch.Tensor:
        return self.a.abs().sum()

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        norms = self.a.detach().norm(dim=-1)  # (L, NH)
        best = norms.flatten().topk(k).indices.tolist()
        return sorted(divmod(i, norms.shape[1]) for i in best)


class HeadOffsets(torch.nn.Module):
    """LoFiT step 2: h -> h + v_lh on the selected heads only, v = 0 at first."""

    def __init__(self, shape: ModelShape, heads: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.shape, self.heads = shape, list(heads)
        self.v = torch.nn.Parameter(torch.zeros(len(self.heads), shape.head_dim))

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def layer_offsets(self, layer: int) -> torch.Tensor:
        """(NH, D): the learnt rows on this layer's selected heads, zeros elsewhere."""
        rows = [i for i, (lay, _) in enumerate(self.heads) if lay == layer]
        index = torch.tensor([self.heads[i][1] for i in rows])
        zeros = torch.zeros(self.shape.num_heads, self.shape.head_dim)
        return zeros.index_put((index,), self.v[rows])

    def edit(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        return heads + self.layer_offsets(layer)

    def vector(self) -> SteeringVector:
        directions = {layer: self.layer_offsets(layer).detach().reshape(-1).clone()
                      for layer in self.layers}
        return SteeringVector(VECTOR_NAME, directions, self.shape.heads_width, "heads",
                              EMBEDDED_MODEL_NAME, "lofit",
                              time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def train(label: str, model, params: torch.nn.Module, edit: HeadEdit, layers: Sequence[int],
          positives: Sequence[Example], data: Iterator[list[int]], steps: int, lr: float,
          extra: Callable[[list[int]], torch.Tensor]) -> None:
    """Adam on `params` only (the model is frozen); loss = the positives' response CE +
    extra(batch indices)."""
    optimizer = torch.optim.Adam(params.parameters(), lr=lr)
    started = time.perf_counter()
    with head_hooks(model, edit, layers):
        for step in range(1, steps + 1):
            batch = next(data)
            ce = response_loss(model, [positives[i] for i in batch])
            loss = ce + extra(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 1 or step % 5 == 0 or step == steps:
                print(f"[{label}] step {step}/{steps}: ce {ce.item():.3f} loss {loss.item():.3f}"
                      f" ({time.perf_counter() - started:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# Generation and the check against the engine
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def greedy_texts(loaded: LoadedModel, prompts: Sequence[str], max_new: int) -> list[str]:
    """Greedy answers for all prompts in one left-padded batch (HF generate)."""
    tokenizer = loaded.tokenizer
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    out = loaded.model.generate(ids, attention_mask=mask, max_new_tokens=max_new,
                                do_sample=False, eos_token_id=sorted(eos_token_ids(loaded)),
                                pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


@torch.inference_mode()
def greedy_tokens(loaded: LoadedModel, prompt: list[int], max_new: int) -> list[int]:
    """One prompt, no padding: the reference the engine's request is compared with."""
    ids = torch.tensor([prompt])
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                do_sample=False, eos_token_id=sorted(eos_token_ids(loaded)),
                                pad_token_id=loaded.tokenizer.pad_token_id or 0)
    return out[0, len(prompt):].tolist()


def engine_tokens(loaded: LoadedModel, path: Path, heads: Sequence[tuple[int, int]],
                  prompts: Sequence[list[int]], max_new: int) -> list[list[int]]:
    """The same requests through steerserve: the file loaded by the vector store, the request's
    steering item resolved as the server does, and the engine stepped here (no thread)."""
    store = VectorStore(None)
    store.add_file(VECTOR_NAME, path)
    item = SteeringItem(vector=VECTOR_NAME, target="heads", heads=[list(h) for h in heads],
                        scale=1.0)
    spec = resolve_steering([item], store, ModelShape.of(loaded.model.config), loaded.device)
    engine = Engine(loaded, EngineConfig(max_num_seqs=len(prompts)))
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        lane = LaneSpec(loaded.name, tuple(prompt), None, spec)
        request = EngineRequest(f"check-{i}", tuple(prompt), params, Plain((lane,)))
        tokens[request.request_id] = []
        engine.submit(request, lambda out: tokens[out.request_id].extend(out.token_ids))
    while engine.has_work():
        engine.step()
    return [tokens[f"check-{i}"] for i in range(len(prompts))]


def verify(loaded: LoadedModel, offsets: HeadOffsets, path: Path, count: int,
           max_new: int) -> bool:
    """Hooked greedy generation == the engine's, on `count` held-out prompts."""
    tokenizer, eos = loaded.tokenizer, eos_token_ids(loaded)
    prompts = [prompt_ids(tokenizer, p) for p in HELD_OUT_PROMPTS[:count]]
    with head_hooks(loaded.model, offsets.edit, offsets.layers), torch.no_grad():
        hooked = [greedy_tokens(loaded, p, max_new) for p in prompts]
    served = engine_tokens(loaded, path, offsets.heads, prompts, max_new)  # hooks removed
    all_match = True
    for text, ours, theirs in zip(HELD_OUT_PROMPTS, hooked, served, strict=False):
        ours, theirs = [t for t in ours if t not in eos], [t for t in theirs if t not in eos]
        match = ours == theirs
        all_match &= match
        print(f"\nprompt: {text}\n  hooks : {tokenizer.decode(ours)!r}\n  engine: "
              f"{tokenizer.decode(theirs)!r}\n  match: {match}")
    return all_match


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where to write the vector (.safetensors); the JSON goes next to it")
    parser.add_argument("--k", type=int, default=8, help="heads to select and train")
    parser.add_argument("--pairs-per-prompt", type=int, default=2,
                        help="templated positives per training prompt")
    parser.add_argument("--batch", type=int, default=8, help="examples per Adam step")
    parser.add_argument("--select-steps", type=int, default=24, help="steps of step 1 (A)")
    parser.add_argument("--select-lr", type=float, default=1e-2, help="Adam lr of step 1")
    parser.add_argument("--l1", type=float, default=1e-3, help="L1 weight on A in step 1")
    parser.add_argument("--offset-steps", type=int, default=40, help="steps of step 2 (v)")
    parser.add_argument("--offset-lr", type=float, default=3e-2, help="Adam lr of step 2")
    parser.add_argument("--neg-weight", type=float, default=0.0,
                        help="step 2 loss -= this x the negatives' CE (0 = positives only)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="greedy answer length")
    parser.add_argument("--check-prompts", type=int, default=3,
                        help="held-out prompts checked against the engine")
    parser.add_argument("--seed", type=int, default=0, help="seed for data order and init")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace, pairs: int) -> dict:
    keys = ("k", "pairs_per_prompt", "batch", "select_steps", "select_lr", "l1",
            "offset_steps", "offset_lr", "neg_weight", "max_new_tokens", "seed")
    return {"train_pairs": pairs, **{key: getattr(args, key) for key in keys}}


def negative_term(model, negatives: Sequence[Example], weight: float
                  ) -> Callable[[list[int]], torch.Tensor]:
    """-weight x the CE of the batch's negatives (0: not computed at all)."""
    if weight == 0:
        return lambda batch: torch.zeros(())
    return lambda batch: -weight * response_loss(model, [negatives[i] for i in batch])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    loaded = load_model(EMBEDDED_MODEL_NAME, dtype="float32", device="cpu", max_model_len=1024)
    model, tokenizer = loaded.model, loaded.tokenizer
    shape = ModelShape.of(model.config)
    print(f"model loaded in {time.perf_counter() - started:.0f} s", flush=True)

    pairs = make_pairs(args.pairs_per_prompt, rng)
    positives = [encode(tokenizer, p.prompt, p.positive) for p in pairs]
    negatives = [encode(tokenizer, p.prompt, p.negative) for p in pairs]
    print(f"{len(pairs)} training pairs, longest {max(len(e.ids) for e in positives)} tokens; "
          f"e.g. {pairs[0].positive!r}", flush=True)

    scaling = HeadScaling(shape)
    train("select", model, scaling, scaling.edit, range(shape.num_layers), positives,
          batches(len(positives), args.batch, rng), args.select_steps, args.select_lr,
          lambda batch: args.l1 * scaling.l1())
    heads = scaling.top_heads(args.k)
    norms = scaling.a.detach().norm(dim=-1)
    print("selected heads (layer, head, |A|): "
          + ", ".join(f"({lay}, {h}, {norms[lay, h]:.3f})" for lay, h in heads), flush=True)

    offsets = HeadOffsets(shape, heads)
    train("offsets", model, offsets, offsets.edit, offsets.layers, positives,
          batches(len(positives), args.batch, rng), args.offset_steps, args.offset_lr,
          negative_term(model, negatives, args.neg_weight))
    vector = offsets.vector()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(vector, args.out)
    print(f"offset norms: {[round(n, 3) for n in offsets.v.detach().norm(dim=-1).tolist()]}")

    unsteered = greedy_texts(loaded, HELD_OUT_PROMPTS, args.max_new_tokens)
    with head_hooks(model, offsets.edit, offsets.layers), torch.no_grad():
        steered = greedy_texts(loaded, HELD_OUT_PROMPTS, args.max_new_tokens)
    scores = {"unsteered": mean_scores(unsteered), "steered": mean_scores(steered)}
    for prompt, before, after in list(zip(HELD_OUT_PROMPTS, unsteered, steered,
                                          strict=True))[:6]:
        print(f"\n{prompt}\n  unsteered: {before!r}\n  steered  : {after!r}")
    print(f"\nheld-out ({len(HELD_OUT_PROMPTS)} prompts, greedy, {args.max_new_tokens} tokens):")
    for label, score in scores.items():
        print(f"  {label:9s} hit rate {score['hit']:.3f}  mean count {score['count']:.2f}"
              f"  distinct ratio {score['distinct_ratio']:.3f}")

    info = {"vector": VECTOR_NAME, "model": EMBEDDED_MODEL_NAME, "method": "lofit",
            "target": "heads", "heads": [list(h) for h in heads], "scale": 1.0,
            "settings": settings(args, len(pairs)), "held_out_scores": scores}
    info_path = args.out.with_suffix(".json")
    # One [layer, head] pair a line is easier to read (and to copy into a request).
    text = re.sub(r"\[\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2]", json.dumps(info, indent=1))
    info_path.write_text(text + "\n")
    print(f"\nsaved {args.out} and {info_path}:\n{json.dumps(info['heads'])}")

    matched = verify(loaded, offsets, args.out, args.check_prompts, args.max_new_tokens)
    print(f"\nhooks == engine on {args.check_prompts} held-out prompts: {matched}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
