"""lm-evaluation-harness against a live server with nothing but its URL: the tokenizer comes
from the server's /tokenizer_info, /tokenize and /detokenize (auto-detected), the task is the
local multiple-choice task in examples/lm_eval, and its accuracy equals the one computed from
log-likelihoods with transformers on an untouched copy of the model. A decoding method in the
request body (examples/lm_eval/steerserve_lm.py) changes the scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.support import LiveServer, load_script

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "lm_eval"
load_script("examples/lm_eval/steerserve_lm.py")  # registers steerserve-completions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--dtype", "float32"])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The shipped task, its data file made absolute (lm-eval resolves it from the cwd)."""
    folder = tmp_path_factory.mktemp("lm-eval-task")
    text = (EXAMPLES / "steerserve_mc.yaml").read_text()
    text = text.replace("examples/lm_eval/steerserve_mc.jsonl",
                        str(EXAMPLES / "steerserve_mc.jsonl"))
    (folder / "steerserve_mc.yaml").write_text(text)
    return folder


def evaluate(server, task_dir, model="local-completions", **extra) -> dict:
    args = {"model": "tiny", "base_url": f"{server.base_url}/v1/completions",
            "num_concurrent": 1, "max_retries": 1, **extra}
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=["steerserve_mc"],
                                   task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True)


def reference_accuracy(model, tokenizer) -> float:
    """lm-eval's protocol by hand: context 'Question: q\\nAnswer:', continuation ' choice'
    (the continuation's tokens are those of the whole string past the context's), no BOS,
    the choice with the largest summed log-likelihood."""
    rows = [json.loads(line) for line in (EXAMPLES / "steerserve_mc.jsonl").open()]
    correct = 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        context_ids = tokenizer.encode(context, add_special_tokens=False)
        scores = []
        for choice in row["choices"]:
            whole = tokenizer.encode(context + " " + choice, add_special_tokens=False)
            with torch.inference_mode():
                logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logprobs[t - 1, whole[t]])
                              for t in range(len(context_ids), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return correct / len(rows)


def test_lm_eval_with_only_a_url_scores_as_transformers(server, task_dir, tiny_model_dir,
                                                        tokenizer):
    results = evaluate(server, task_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    accuracy = results["results"]["steerserve_mc"]["acc,none"]
    assert accuracy == pytest.approx(reference_accuracy(reference.eval(), tokenizer))
    assert results["config"]["model"] == "local-completions"


def test_a_decoding_method_in_the_body_changes_the_scores(server, task_dir):
    def loglikelihoods(results) -> list[float]:
        return [float(r[0][0]) for s in results["samples"]["steerserve_mc"]
                for r in s["resps"]]

    plain = loglikelihoods(evaluate(server, task_dir, model="steerserve-completions"))
    dola = loglikelihoods(evaluate(server, task_dir, model="steerserve-completions",
                                   extra_body=json.dumps({"decoding": {
                                       "method": "dola", "layers": [0], "relative_top": 0}})))
    assert len(plain) == len(dola) == 48
    assert plain != pytest.approx(dola, abs=1e-3)
