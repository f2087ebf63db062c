"""Train a small LoRA for SmolLM2-135M-Instruct that makes it answer IN UPPER CASE (CPU, peft).

The targets are the base model's own greedy answers, upper-cased: the adapter only has to learn
the casing, not new content, so 100 prompts and about five minutes of training on two CPU cores
suffice. Upper-case text splits into many more, rarer tokens ("TOKYO" -> TO K YO), so a 135M
model's answers drift in content under the adapter even though the casing is reliable.
Without the adapter the model answers exactly as before (LoRA never touches base weights).

    cd /work/main && .venv/bin/python examples/train_uppercase_lora.py
    .venv/bin/python examples/train_uppercase_lora.py --eval-only examples/adapters/uppercase

The result is a plain peft LoRA directory (adapter_config.json + adapter_model.safetensors,
fp32) for hot-loading into steerserve; peft's PeftModel.from_pretrained reads it too.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

# `decoding` is importable because the project is installed editable in .venv (make install).
from steerserve.decoding.model.loader import load_model

MODEL = "SmolLM2-135M-Instruct"
END_OF_TURN = "<|im_end|>"
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEEP_FILES = {"adapter_config.json", "adapter_model.safetensors"}

# Varied topics and forms (questions, imperatives, one-word asks) so the adapter learns
# "upper-case whatever you say", not "upper-case answers about one subject".
TRAIN_PROMPTS = [
    "What is the capital of France?",
    "How do plants make food?",
    "Give me three tips for better sleep.",
    "What is a prime number?",
    "Explain what a black hole is.",
    "Write a short poem about the sea.",
    "How many legs does a spider have?",
    "What does a computer's CPU do?",
    "Suggest a name for a pet cat.",
    "Why is the sky blue?",
    "What is the boiling point of water?",
    "Tell me a fun fact about octopuses.",
    "How do I make a cup of tea?",
    "What is photosynthesis?",
    "Who wrote Romeo and Juliet?",
    "Describe a rainy day in two sentences.",
    "What is the difference between weather and climate?",
    "How can I stay focused while studying?",
    "What is an algorithm?",
    "Name three primary colors.",
    "Why do we have seasons?",
    "What is the largest planet in our solar system?",
    "Give me a healthy breakfast idea.",
    "How does a bicycle work?",
    "What is gravity?",
    "Write one sentence about friendship.",
    "What language is spoken in Brazil?",
    "How do I reverse a string in Python?",
    "What is the Pythagorean theorem?",
    "Why do leaves change color in autumn?",
    "Tell me a joke about computers.",
    "What is the main job of the heart?",
    "How can I save money each month?",
    "What is an adjective? Give an example.",
    "Summarize the story of Cinderella in one sentence.",
    "What do bees make?",
    "How far is the Moon from Earth?",
    "What is a volcano?",
    "Give me a motivational quote.",
    "What is machine learning?",
    "How do you say hello in Spanish?",
    "What causes rain?",
    "Recommend a good hobby for a rainy weekend.",
    "What is the freezing point of water in Fahrenheit?",
    "Explain what DNA is to a child.",
    "What is the tallest mountain in the world?",
    "How do I write a polite email to my teacher?",
    "What are the benefits of drinking water?",
    "Describe the taste of a lemon.",
    "What is the speed of light?",
    "Why should I exercise?",
    "What is a noun?",
    "Hi! How are you today?",
    "List three animals that live in the ocean.",
    "What is democracy?",
    "How does a refrigerator keep food cold?",
    "What is the square root of 81?",
    "Write a haiku about the moon.",
    "What is the internet?",
    "Who painted the Mona Lisa?",
    "How do birds fly?",
    "What is inflation in economics?",
    "Give me an idea for a birthday present.",
    "What is the function of the lungs?",
    "Translate 'thank you' into French.",
    "What is recycling and why does it matter?",
    "How many continents are there?",
    "Explain the rules of tic-tac-toe.",
    "Describe a cat in three words.",
    "What is a good way to learn a new language?",
    "What is the capital of Italy?",
    "How do airplanes stay in the air?",
    "Give me a simple recipe for pancakes.",
    "What is an atom?",
    "Write two sentences about a dog in the park.",
    "Why do we need sleep?",
    "What is a spreadsheet used for?",
    "How do I plant a tree?",
    "What is the biggest ocean on Earth?",
    "Explain what a rainbow is.",
    "What is the difference between a lake and a river?",
    "Tell me about the Great Wall of China.",
    "How do vaccines work?",
    "What is a synonym for happy?",
    "Give me three ideas for a school project.",
    "What does a teacher do?",
    "How many days are in a leap year?",
    "What is the role of the sun in our solar system?",
    "Why is reading important?",
    "What is a mammal?",
    "How do I clean a laptop keyboard?",
    "What is a verb? Give an example.",
    "Describe the color green to someone.",
    "What is the population of the world, roughly?",
    "How do magnets work?",
    "Tell me a short story about a brave mouse.",
    "What is an ecosystem?",
    "What should I pack for a beach trip?",
    "Who was Albert Einstein?",
    "What is a website?",
]

# Kept out of training: the evaluation measures whether the casing generalises.
HELDOUT_PROMPTS = [
    "What is the capital of Japan?",
    "How do fish breathe underwater?",
    "Give me two tips for public speaking.",
    "What is a fraction?",
    "Write a short poem about autumn.",
    "Why do cats purr?",
    "What does a compiler do?",
    "How can I be more productive in the morning?",
    "What is the water cycle?",
    "Tell me something interesting about the Roman Empire.",
    "How do I boil an egg?",
    "What is electricity?",
    "Suggest a fun activity for a family weekend.",
    "What is the difference between a virus and a bacterium?",
    "Describe a sunset in one sentence.",
]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt: loss only on the answer (+ end-of-turn)


# ---- prompts and generation -------------------------------------------------------------------
def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The same rendering the server uses for /v1/chat/completions."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids)


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int,
                   batch_size: int = 8) -> list[tuple[list[int], bool]]:
    """Greedy answer tokens per prompt and whether the model ended its turn by itself."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    results: list[tuple[list[int], bool]] = []
    for chunk in batches(prompts, batch_size):
        rows = [chat_ids(tokenizer, p) for p in chunk]
        width = max(len(r) for r in rows)
        # Left padding keeps every prompt's last token at the same position for generation.
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
        for row in out[:, width:].tolist():
            finished = eot in row
            results.append((row[:row.index(eot)] if finished else row, finished))
    return results


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---- data ---------------------------------------------------------------------------------------
def build_examples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[Example]:
    """Targets = the base model's own greedy answers, upper-cased and re-tokenized."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    examples = []
    for prompt, (answer, finished) in zip(
        prompts, greedy_answers(model, tokenizer, prompts, max_new_tokens), strict=True
    ):
        target = tokenizer(decode(tokenizer, answer).upper(), add_special_tokens=False)
        target_ids = list(target["input_ids"])
        # Only answers the model ended itself teach "stop here"; a length-truncated one would
        # teach stopping mid-sentence, so it gets no end-of-turn token.
        if finished:
            target_ids.append(eot)
        prompt_ids = chat_ids(tokenizer, prompt)
        examples.append(Example(prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
    return examples


def collate(chunk: list[Example], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch; padded positions are masked and carry no loss."""
    width = max(len(e.input_ids) for e in chunk)
    ids, labels, mask = [], [], []
    for e in chunk:
        extra = width - len(e.input_ids)
        ids.append(e.input_ids + [pad] * extra)
        labels.append(e.labels + [-100] * extra)
        mask.append([1] * len(e.input_ids) + [0] * extra)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask)}


# ---- training -----------------------------------------------------------------------------------
def lora_config(rank: int, targets: list[str]) -> LoraConfig:
    # alpha = 2 * rank keeps the scaling at 2 whatever the rank; plain LoRA (no DoRA, no
    # modules_to_save, no bias) so any LoRA loader, steerserve's included, can apply it.
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def train(peft_model, examples: list[Example], pad: int, args: argparse.Namespace) -> float:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(examples) // args.batch_size)
    total = steps_per_epoch * args.epochs
    # Linear decay to 10 %: a high start learns the casing fast, the tail settles the loss.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / total)
    rng = random.Random(args.seed)
    peft_model.train()
    started, step, loss_value = time.perf_counter(), 0, float("nan")
    for epoch in range(1, args.epochs + 1):
        order = examples[:]
        rng.shuffle(order)
        epoch_losses = []
        for chunk in batches(order, args.batch_size):
            loss = peft_model(**collate(chunk, pad)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss.item()
            epoch_losses.append(loss_value)
            elapsed = time.perf_counter() - started
            print(f"  epoch {epoch}/{args.epochs} step {step}/{total} loss {loss_value:.4f} "
                  f"lr {schedule.get_last_lr()[0]:.2e} elapsed {elapsed:.0f}s", flush=True)
        print(f"epoch {epoch} mean loss {sum(epoch_losses) / len(epoch_losses):.4f}", flush=True)
    peft_model.eval()
    return loss_value


# ---- evaluation ---------------------------------------------------------------------------------
def upper_ratio(text: str) -> float:
    """Upper-case letters / all letters (0 when the answer has no letters)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def word_overlap(answer: str, reference: str) -> float:
    """Share of the answer's distinct words that the reference also uses, case-blind: a rough
    check that the adapter changes the casing, not the content."""
    words, known = (set(re.findall(r"[A-Z']+", text.upper())) for text in (answer, reference))
    return len(words & known) / len(words) if words else 0.0


def evaluate(peft_model, tokenizer, new_tokens: int = 40) -> dict[str, float]:
    """Greedy answers to the held-out prompts with the adapter disabled and enabled."""
    with peft_model.disable_adapter():
        base = [decode(tokenizer, a) for a, _ in
                greedy_answers(peft_model, tokenizer, HELDOUT_PROMPTS, new_tokens)]
    tuned = [decode(tokenizer, a) for a, _ in
             greedy_answers(peft_model, tokenizer, HELDOUT_PROMPTS, new_tokens)]
    print(f"\n{'held-out prompt':<56} {'upper(base)':>11} {'upper(lora)':>11} {'overlap':>7}")
    for prompt, b, t in zip(HELDOUT_PROMPTS, base, tuned, strict=True):
        print(f"{prompt[:56]:<56} {upper_ratio(b):11.3f} {upper_ratio(t):11.3f} "
              f"{word_overlap(t, b):7.2f}")
    means = {"base": sum(map(upper_ratio, base)) / len(base),
             "adapter": sum(map(upper_ratio, tuned)) / len(tuned),
             "overlap": sum(map(word_overlap, tuned, base)) / len(base)}
    print(f"{'MEAN':<56} {means['base']:11.3f} {means['adapter']:11.3f} {means['overlap']:7.2f}")
    for i in range(2):
        print(f"\n[{HELDOUT_PROMPTS[i]}]\n  base:    {base[i]!r}\n  adapter: {tuned[i]!r}")
    return means


# ---- saving -------------------------------------------------------------------------------------
def check_out_dir(out_dir: Path) -> None:
    """Refuse, before training, a directory holding anything but a previous adapter."""
    if out_dir.exists():
        strangers = {p.name for p in out_dir.iterdir()} - KEEP_FILES - {"README.md"}
        if strangers:
            raise SystemExit(f"{out_dir} holds other files {sorted(strangers)}; pick another --out")


def save_adapter(peft_model, out_dir: Path) -> None:
    with warnings.catch_warnings():
        # peft looks for the base's config.json next to the GGUF to spot a resized vocabulary;
        # there is none and the vocabulary is unchanged, so its warning is noise.
        warnings.filterwarnings("ignore", message="Could not find a config file")
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's generic model card
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # peft records the local GGUF directory; the embedded model's name is portable.
    config["base_model_name_or_path"] = MODEL
    config["target_modules"] = sorted(config["target_modules"])  # peft dumps a set: any order
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    check_adapter_dir(out_dir)


def check_adapter_dir(out_dir: Path) -> None:
    """The folder must be a plain LoRA any loader accepts: two files, no DoRA/extra modules."""
    names = {p.name for p in out_dir.iterdir()}
    assert names == KEEP_FILES, f"unexpected files in {out_dir}: {sorted(names)}"
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA", config["peft_type"]
    assert config.get("use_dora") is False, config.get("use_dora")
    assert config["bias"] == "none", config["bias"]
    assert not config.get("modules_to_save"), config.get("modules_to_save")
    size = (out_dir / "adapter_model.safetensors").stat().st_size
    targets = sorted(config["target_modules"])
    print(f"adapter {out_dir}: adapter_model.safetensors {size / 1e6:.2f} MB, "
          f"r={config['r']} alpha={config['lora_alpha']} targets={targets}")


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("examples/adapters/uppercase"),
                        help="adapter output directory (created or overwritten)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training prompts")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    # r=4 on all seven projections: in our runs it reached a lower loss than attention-only r=8
    # for about the same time per step, and the fp32 file stays under 5 MB.
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r (alpha = 2r)")
    parser.add_argument("--targets", nargs="+", default=ALL_TARGETS,
                        choices=ALL_TARGETS, metavar="MODULE",
                        help=f"linear layers to adapt, among {' '.join(ALL_TARGETS)}")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    parser.add_argument("--target-tokens", type=int, default=48,
                        help="max new tokens of the base answers used as targets")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data order")
    parser.add_argument("--eval-only", type=Path, metavar="PATH",
                        help="only evaluate an existing adapter directory; no training")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    loaded = load_model(MODEL, dtype="float32", max_model_len=1024)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"loaded {MODEL} in {time.perf_counter() - started:.0f}s", flush=True)

    if args.eval_only is not None:
        check_adapter_dir(args.eval_only)
        evaluate(PeftModel.from_pretrained(model, str(args.eval_only)).eval(), tokenizer)
        return

    check_out_dir(args.out)
    # Targets come from the untouched base, before any LoRA layer is injected.
    t0 = time.perf_counter()
    examples = build_examples(model, tokenizer, TRAIN_PROMPTS, args.target_tokens)
    ended = sum(e.labels[-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN) for e in examples)
    sample = decode(tokenizer, [t for t in examples[0].labels if t >= 0])
    print(f"built {len(examples)} targets ({ended} end their turn) in "
          f"{time.perf_counter() - t0:.0f}s; e.g. {sample!r}", flush=True)

    peft_model = get_peft_model(model, lora_config(args.rank, args.targets))
    peft_model.print_trainable_parameters()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    final_loss = train(peft_model, examples, pad, args)
    print(f"trained in {time.perf_counter() - t0:.0f}s, final loss {final_loss:.4f}", flush=True)

    save_adapter(peft_model, args.out)
    means = evaluate(peft_model, tokenizer)
    ok = means["adapter"] >= 0.9 and means["base"] <= 0.2
    print(f"\n{'TARGET MET' if ok else 'TARGET MISSED'} (adapter >= 0.9, base <= 0.2); "
          f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
