"""Train routed LoRA experts for SmolLM2-135M-Instruct (ELREA) and the router that picks them
(CPU, peft, about ten minutes), then measure routing against the single full-data adapter and
the unrouted average of the experts on a held-out mix.

ELREA (Li et al., "Ensembles of Low-Rank Expert Adapters"), as this script does it:
1. One LoRA adapter trained on all the data (the full-data baseline; its top layer's LoRA is
   also the feature adapter).
2. Each training instruction's gradient feature: the gradient of the instruction's own
   next-token loss (the prompt alone: at inference there is no answer) with respect to the
   feature adapter's LoRA B matrices in the top layer, normalised to unit length.
3. k-means on those features (cosine, k-means++ start) gives the clusters; one expert per
   cluster continues the full-data adapter's training on its cluster alone.
4. The router: the clusters' centroids (and, for the cheaper hidden-state routing, the mean
   final hidden state of each cluster's prompts), the experts' adapter names and a softmax
   temperature. At inference the prompt's gradient feature is compared with the centroids by
   cosine similarity; the top experts' weights are a softmax of their similarities over the
   temperature, and their logits are summed with those weights.
The data are built here, with no download: the same questions asked with three instructions
whose answers differ in form ("Answer in capital letters", "Answer as a bulleted list",
"Answer in one short sentence"); the answers are the base model's own, reformatted, so the
adapters learn form, not facts.

Measured on held-out questions of all three forms: per-token negative log-likelihood of the
reference answers for the full-data adapter, the unrouted average of all experts, the routed
ensemble (top 1 and top 2) by gradient and by hidden-state features, and how often routing
picks the expert of the prompt's own form.

    .venv/bin/python examples/train_routed_experts.py
    steerserve serve --lora form-0=examples/routers/smollm2-forms/expert-0 ... \\
        --router forms=examples/routers/smollm2-forms

Writes --out: router.safetensors, feature-adapter/ and expert-<i>/ (peft LoRA directories),
and report.json with the settings and the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from steerserve.adapters.routing import RouterConfig, save_router
from steerserve.decoding.model.loader import EMBEDDED_MODEL_NAME, load_model

OUT = Path(__file__).resolve().parent / "routers" / "smollm2-forms"
END_OF_TURN = "<|im_end|>"
FORMS = {
    "capitals": "Answer in capital letters: ",
    "bullets": "Answer as a bulleted list: ",
    "short": "Answer in one short sentence: ",
}
QUESTIONS = [
    "What is the capital of France?", "How do plants make food?", "What is a prime number?",
    "Explain what a black hole is.", "How many legs does a spider have?",
    "What does a computer's CPU do?", "Why is the sky blue?", "What is photosynthesis?",
    "Who wrote Romeo and Juliet?", "What is the difference between weather and climate?",
    "How can I stay focused while studying?", "What is an algorithm?",
    "Why do we have seasons?", "What is the largest planet in our solar system?",
    "How does a bicycle work?", "What is gravity?", "What language is spoken in Brazil?",
    "What is the Pythagorean theorem?", "Why do leaves change color in autumn?",
    "What is the main job of the heart?", "How can I save money each month?",
    "What do bees make?", "How far is the Moon from Earth?", "What is a volcano?",
    "What is machine learning?", "What causes rain?", "What is DNA?",
    "What is the tallest mountain in the world?", "What are the benefits of drinking water?",
    "What is the speed of light?", "Why should I exercise?", "What is democracy?",
    "How does a refrigerator keep food cold?", "What is the internet?",
    "Who painted the Mona Lisa?", "How do birds fly?", "What is inflation in economics?",
    "What is the function of the lungs?", "What is recycling and why does it matter?",
    "How do airplanes stay in the air?", "What is an atom?", "Why do we need sleep?",
    "How do vaccines work?", "What is a mammal?", "How do magnets work?",
    "What is an ecosystem?", "Who was Albert Einstein?", "How do fish breathe underwater?",
]
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


@dataclass(frozen=True)
class Example:
    form: str
    prompt: list[int]  # the chat-rendered instruction
    answer: list[int]  # the reference answer and the end of turn


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


@torch.no_grad()
def base_answers(model, tokenizer, questions: list[str], max_new_tokens: int) -> list[str]:
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    answers = []
    for question in questions:
        ids = torch.tensor([chat_ids(tokenizer, question)])
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eot, pad_token_id=eot, temperature=None,
                             top_p=None, top_k=None)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def reformat(form: str, answer: str) -> str:
    sentences = [s.strip() for s in answer.replace("\n", " ").split(". ") if s.strip()]
    if form == "capitals":
        return answer.upper()
    if form == "bullets":
        return "\n".join(f"- {s.rstrip('.')}." for s in sentences[:4])
    return sentences[0].rstrip(".") + "."


def build(tokenizer, questions: list[str], answers: list[str]) -> list[Example]:
    rows = []
    for form, instruction in FORMS.items():
        for question, answer in zip(questions, answers, strict=True):
            target = tokenizer(reformat(form, answer) + END_OF_TURN,
                               add_special_tokens=False)["input_ids"]
            rows.append(Example(form, chat_ids(tokenizer, instruction + question), target))
    return rows


def answer_loss(model, batch: list[Example]) -> torch.Tensor:
    width = max(len(e.prompt) + len(e.answer) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, e in enumerate(batch):
        row = e.prompt + e.answer
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(e.prompt):len(row)] = torch.tensor(e.answer)
        mask[i, :len(row)] = 1
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def train(model, rows: list[Example], epochs: int, lr: float, seed: int, label: str) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    model.train()
    for epoch in range(epochs):
        order = rows[:]
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), 8):
            optimizer.zero_grad()
            loss = answer_loss(model, order[start:start + 8])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(f"{label}: epoch {epoch}: loss {sum(losses) / len(losses):.3f}", flush=True)
    model.eval()


def feature_parameters(model, top_layer: int) -> list[torch.Tensor]:
    """The feature adapter's LoRA B matrices in the top layer, in module order (the
    server's order: adapters/routing/features.py)."""
    names = sorted(n for n, _ in model.named_parameters()
                   if f"layers.{top_layer}." in n and "lora_B.feature." in n)
    found = dict(model.named_parameters())
    return [found[n] for n in names]


def gradient_feature(model, params: list[torch.Tensor], prompt: list[int]) -> torch.Tensor:
    """The unit gradient of the prompt's own next-token loss w.r.t. `params`."""
    ids = torch.tensor([prompt])
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    flat = torch.cat([g.flatten() for g in grads])
    return flat / flat.norm().clamp_min(1e-12)


@torch.no_grad()
def hidden_feature(model, prompt: list[int]) -> torch.Tensor:
    """The mean final hidden state of the prompt under the base model, unit length."""
    with model.disable_adapter():
        state = model(input_ids=torch.tensor([prompt]), output_hidden_states=True
                      ).hidden_states[-1][0].mean(0)
    return state / state.norm()


def kmeans(features: torch.Tensor, k: int, seed: int, rounds: int = 50) -> torch.Tensor:
    """Cosine k-means with a k-means++ start: (N,) cluster of each row."""
    generator = torch.Generator().manual_seed(seed)
    centroids = [features[torch.randint(len(features), (1,), generator=generator)][0]]
    while len(centroids) < k:
        distance = 1 - (features @ torch.stack(centroids).T).max(dim=1).values
        centroids.append(features[torch.multinomial(distance.clamp_min(0) ** 2, 1,
                                                    generator=generator)][0])
    centre = torch.stack(centroids)
    for _ in range(rounds):
        assigned = (features @ centre.T).argmax(dim=1)
        centre = torch.stack([features[assigned == c].mean(0) if (assigned == c).any()
                              else centre[c] for c in range(k)])
        centre = centre / centre.norm(dim=1, keepdim=True)
    return (features @ centre.T).argmax(dim=1)


def unit_means(features: torch.Tensor, clusters: torch.Tensor, k: int) -> torch.Tensor:
    means = torch.stack([features[clusters == c].mean(0) for c in range(k)])
    return means / means.norm(dim=1, keepdim=True)


@torch.no_grad()
def answer_logprobs(model, adapter: str, example: Example) -> torch.Tensor:
    """(A, V) log-softmaxed logits of the answer positions under one adapter (raw logits
    would do for the sums; log-softmax keeps the weighted sums comparable)."""
    model.set_adapter(adapter)
    ids = torch.tensor([example.prompt + example.answer])
    logits = model(input_ids=ids).logits[0, len(example.prompt) - 1:-1]
    return logits.float()


def nll(logits: torch.Tensor, example: Example) -> float:
    targets = torch.tensor(example.answer)
    return -logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()


def routing(similarity: torch.Tensor, top_k: int, temperature: float) -> dict[int, float]:
    values, index = similarity.topk(top_k)
    weights = (values / temperature).softmax(-1)
    return dict(zip(index.tolist(), weights.tolist(), strict=True))


def evaluate(model, rows: list[Example], experts: list[str], centroids: torch.Tensor,
             hidden_centroids: torch.Tensor, params, temperature: float) -> dict:
    totals: dict[str, float] = {}
    picked: dict[str, int] = {}
    tokens = sum(len(e.answer) for e in rows)
    form_expert = {}
    for e in rows:
        model.set_adapter("feature")
        with torch.enable_grad():
            grad = gradient_feature(model, params, e.prompt)
        hidden = hidden_feature(model, e.prompt)
        logits = {name: answer_logprobs(model, name, e) for name in ["full", *experts]}
        cases = {"full-data adapter": {"full": 1.0},
                 "unrouted average of the experts": {x: 1 / len(experts) for x in experts}}
        for label, feature, centre in (("gradient", grad, centroids),
                                       ("hidden state", hidden, hidden_centroids)):
            for k in (1, 2):
                chosen = routing(feature @ centre.T, k, temperature)
                cases[f"routed by {label}, top {k}"] = {experts[i]: w for i, w in
                                                        chosen.items()}
                if k == 1:
                    key = f"{label}:{e.form}"
                    form_expert.setdefault(key, []).append(next(iter(chosen)))
        for label, weights in cases.items():
            mixed = sum(w * logits[name] for name, w in weights.items())
            totals[label] = totals.get(label, 0.0) + nll(mixed, e)
    for key, picks in form_expert.items():
        picked[key] = max(picks.count(i) for i in set(picks)) / len(picks)
    return {"nll_per_token": {k: v / tokens for k, v in totals.items()},
            "top1_purity_by_form": picked, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train-questions", type=int, default=36)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--expert-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    loaded = load_model(EMBEDDED_MODEL_NAME, dtype="float32")
    tokenizer, base = loaded.tokenizer, loaded.model.eval()
    answers = base_answers(base, tokenizer, QUESTIONS, args.max_new_tokens)
    print(f"{len(answers)} base answers", flush=True)
    cut = args.train_questions
    training = build(tokenizer, QUESTIONS[:cut], answers[:cut])
    held_out = build(tokenizer, QUESTIONS[cut:], answers[cut:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA), adapter_name="full")
    train(model, training, args.epochs, args.lr, args.seed, "full-data adapter")
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out / "full")  # peft writes adapter "full" to out/full/full
    top = base.config.num_hidden_layers - 1
    model.load_adapter(str(out / "full" / "full"), adapter_name="feature")
    model.set_adapter("feature")
    params = feature_parameters(model, top)
    for p in params:
        p.requires_grad_(True)
    features = torch.stack([gradient_feature(model, params, e.prompt) for e in training])
    hidden = torch.stack([hidden_feature(model, e.prompt) for e in training])
    k = len(FORMS)
    clusters = kmeans(features, k, args.seed)
    for c in range(k):
        forms = [e.form for e, cl in zip(training, clusters.tolist(), strict=True) if cl == c]
        print(f"cluster {c}: {len(forms)} examples, forms {sorted(set(forms))}", flush=True)
    experts = [f"expert-{c}" for c in range(k)]
    for c, name in enumerate(experts):
        model.load_adapter(str(out / "full" / "full"), adapter_name=name, is_trainable=True)
        model.set_adapter(name)
        members = [e for e, cl in zip(training, clusters.tolist(), strict=True) if cl == c]
        train(model, members, args.expert_epochs, args.lr, args.seed, name)
        model.save_pretrained(out, selected_adapters=[name])  # peft: out/<name>
    centroids = unit_means(features, clusters, k)
    hidden_centroids = unit_means(hidden, clusters, k)
    report = evaluate(model, held_out, experts, centroids, hidden_centroids, params,
                      args.temperature)
    report["clusters"] = [sorted({e.form for e, cl in zip(training, clusters.tolist(),
                                                           strict=True) if cl == c})
                          for c in range(k)]
    print(json.dumps(report, indent=1), flush=True)
    shutil.move(str(out / "full" / "full"), str(out / "feature-adapter"))
    shutil.rmtree(out / "full")
    (out / "README.md").unlink(missing_ok=True)  # peft's model card
    save_router(out / "router.safetensors", centroids, hidden_centroids, RouterConfig(
        experts=tuple(experts), feature_layer=top, temperature=args.temperature,
        model=EMBEDDED_MODEL_NAME))
    (out / "report.json").write_text(json.dumps(
        {"settings": vars(args) | {"out": str(args.out.name)}, "lora": LORA,
         "training_examples": len(training), "held_out_examples": len(held_out),
         **report}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
