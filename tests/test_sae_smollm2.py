"""The shipped SAE on the embedded SmolLM2 (slow): a feature that fires on sea words is found
by program through the interpretation route, and steering by it makes generated text talk
about the sea measurably more than unsteered text, while staying text on the whole."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support import LiveServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SAE = REPO / "examples/sae/smollm2-l15"
SEA = {"sea", "ocean", "waves", "wave", "beach", "shore", "tide", "coral", "boat", "boats",
       "sailing", "sail", "harbor", "island", "fish", "sailor", "seas", "water", "marine"}
SEA_TEXTS = ["We sailed across the ocean to a quiet island.",
             "The waves broke on the sandy beach at high tide.",
             "A fishing boat left the harbor before dawn.",
             "Children played on the shore while the sea grew calm.",
             "Divers swam over the coral reef under the ocean waves."]
PROMPTS = ["Tell me about your weekend.", "What should I cook tonight?",
           "Give me a tip for a job interview.", "Describe your favourite room.",
           "How do I stay focused while studying?", "What makes a good friend?"]


@pytest.fixture(scope="module")
def server():
    live = LiveServer(["--dtype", "float32", "--sae", f"l15={SAE}"])
    yield live
    live.stop()


def sea_feature(server) -> tuple[int, float]:
    """The feature that is most often among the top features of sea-word tokens and least
    often among those of the other tokens of the same texts; and its largest activation."""
    on_sea, elsewhere, peak = Counter(), Counter(), Counter()
    for text in SEA_TEXTS:
        tokens = httpx.post(f"{server.base_url}/v1/saes/l15/top_features", timeout=60,
                            json={"input": text, "top_k": 8}).json()["tokens"]
        for token in tokens[1:]:  # the first position is an outlier
            word = token["token"].strip().lower()
            counter = on_sea if word in SEA else elsewhere
            for found in token["features"]:
                counter[found["feature"]] += 1
                peak[found["feature"]] = max(peak[found["feature"]], found["activation"])
    feature = max(on_sea, key=lambda f: on_sea[f] - elsewhere[f])
    return feature, peak[feature]


def sea_words(text: str) -> int:
    return sum(word in SEA for word in re.findall(r"[a-z]+", text.lower()))


def replies(server, steering) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        body = {"model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 40,
                "messages": [{"role": "user", "content": prompt}]}
        if steering:
            body["steering"] = steering
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["message"]["content"])
    return texts


def test_a_sea_feature_found_by_program_steers_text_toward_the_sea(server):
    feature, peak = sea_feature(server)
    where = httpx.post(f"{server.base_url}/v1/saes/l15/features/{feature}", timeout=60,
                       json={"input": SEA_TEXTS[0], "threshold": 0.0}).json()
    assert any(t["token"].strip().lower() in SEA for t in where["fires_at"])

    plain = replies(server, None)
    steered = replies(server, [{"sae": "l15", "feature": feature, "scale": 2 * peak}])
    before, after = sum(map(sea_words, plain)), sum(map(sea_words, steered))
    assert after >= before + 3, (feature, plain, steered)
    hits = [sum(sea_words(t) > 0 for t in texts) for texts in (plain, steered)]
    assert hits[1] >= 2 and hits[1] > hits[0], (hits, steered)
    # Still text on the whole (a reply may loop on a phrase at this strength).
    shares = [len(set(w)) / max(1, len(w)) for w in
              (re.findall(r"[a-z]+", t.lower()) for t in steered)]
    assert sum(shares) / len(shares) >= 0.5, (shares, steered)
