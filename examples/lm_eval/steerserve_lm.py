"""lm-evaluation-harness's `local-completions` plus steerserve's request extensions.

lm-eval builds its log-likelihood requests itself and forwards no extra fields, so scoring a
steering setting or a decoding method needs these few lines: the same model with an
`extra_body` (a JSON object) merged into every request it sends.

    import lm_eval, steerserve_lm  # registers "steerserve-completions"
    lm_eval.simple_evaluate(model="steerserve-completions", model_args={
        "model": "SmolLM2-135M-Instruct", "base_url": "http://127.0.0.1:8000/v1/completions",
        "extra_body": '{"decoding": {"method": "dola", "relative_top": 0}}'}, tasks=[...])
"""

from __future__ import annotations

import json

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI


@register_model("steerserve-completions")
class SteerserveCompletions(LocalCompletionsAPI):
    def __init__(self, extra_body: str | dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extra_body = json.loads(extra_body) if isinstance(extra_body, str) else \
            dict(extra_body or {})

    def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None,
                        **kwargs) -> dict:
        payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs,
                                          seed=seed, eos=eos, **kwargs)
        return {**payload, **self.extra_body}
