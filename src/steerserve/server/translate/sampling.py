"""Body checks shared by chat and completions, prompts as token ids, and SamplingParams."""

from __future__ import annotations

from dataclasses import dataclass

from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.sampling.adaptive import AdaptiveTemperature
from steerserve.decoding.sampling.grammar import Grammar
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.server.errors import APIError
from steerserve.server.schemas.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from steerserve.server.settings import ServerSettings
from steerserve.server.tools.formats import ToolFormat
from steerserve.server.tools.prompt import conversation
from steerserve.server.translate.alignment import alignment_template


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_n: int
    max_stop: int

    @classmethod
    def of(cls, info: ModelInfo, settings: ServerSettings) -> Limits:
        return cls(info.max_model_len, info.vocab_size, settings.max_n, settings.max_stop)


def check_common(req: SamplingFields, limits: Limits) -> None:
    if req.n > limits.max_n:
        raise APIError(400, f"n must be at most {limits.max_n}", "n")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       "stream_options")
    if len(req.stop_list()) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop strings are allowed", "stop")
    for key in req.logit_bias or {}:
        if not 0 <= int(key) < limits.vocab_size:
            raise APIError(400, f"logit_bias token id {key} is outside the vocabulary "
                           f"(0..{limits.vocab_size - 1})", "logit_bias")
    for token_id in req.stop_token_ids or []:
        if not 0 <= token_id < limits.vocab_size:
            raise APIError(400, f"stop token id {token_id} is outside the vocabulary",
                           "stop_token_ids")


def check_chat_extras(req: ChatCompletionRequest, allow_template: bool) -> None:
    if req.chat_template is not None and not allow_template:
        raise APIError(400, "request-supplied chat templates are disabled on this server",
                       "chat_template")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")


def check_completion_extras(req: CompletionRequest) -> None:
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens 0 is only allowed with echo", "max_tokens")
    if req.echo and req.stream and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is only available without streaming", "echo")


def completion_budget(requested: int | None, prompt_len: int, limits: Limits,
                      prompt_param: str) -> int:
    """max_tokens, defaulting to the rest of the context; 400 when it does not fit."""
    if prompt_len >= limits.max_model_len:
        raise APIError(400, f"This model's maximum context length is {limits.max_model_len} "
                       f"tokens, but the prompt has {prompt_len} tokens.", prompt_param)
    if requested is None:
        return limits.max_model_len - prompt_len
    if prompt_len + requested > limits.max_model_len:
        raise APIError(400, f"This model's maximum context length is {limits.max_model_len} "
                       f"tokens. However, you requested {prompt_len + requested} tokens "
                       f"({prompt_len} in the prompt, {requested} for the completion).",
                       "max_tokens")
    return requested


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, vocab_size: int,
                    prompt_logprobs: int | None = None, choice: int = 0,
                    adaptive: AdaptiveTemperature | None = None,
                    grammar: Grammar | None = None,
                    extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    # n > 1 with a seed: each choice gets its own stream (seed + index), all reproducible.
    seed = None if req.seed is None else req.seed + choice
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=min(req.top_k, vocab_size),  # beyond the vocabulary: every token
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=tuple((int(k), v) for k, v in (req.logit_bias or {}).items()),
        seed=seed,
        stop=tuple(req.stop_list()) + extra_stop,
        stop_token_ids=frozenset(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        adaptive=adaptive,
        report_temperatures=req.return_temperatures,
        grammar=grammar,
    )


def chat_alignment(req: ChatCompletionRequest, default: str) -> str:
    """The request's in-context alignment; a request's own template overrides the default."""
    asked = req.in_context_alignment
    if asked is None:
        return "none" if req.chat_template is not None else default
    if asked != "none" and req.chat_template is not None:
        raise APIError(400, "chat_template and in_context_alignment both say how the "
                       "conversation is rendered; set one", "in_context_alignment")
    return asked


def chat_template(tokenizer, req: ChatCompletionRequest, alignment: str) -> str:
    template = (req.chat_template or alignment_template(alignment)
                or getattr(tokenizer, "chat_template", None))
    if template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    return template


def chat_prompt(tokenizer, req: ChatCompletionRequest, tool_format: ToolFormat,
                alignment: str) -> list[int]:
    """Render with the model's own template, the alignment's (server/translate/alignment.py),
    or the request's where the server allows it (transformers renders in a Jinja sandbox),
    tools as server/tools/prompt.py says. A template that fails is the request's problem: a
    400, never a 500."""
    template = chat_template(tokenizer, req, alignment)
    messages, tools = conversation(req, template, tool_format)
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
    except Exception as exc:  # Jinja errors, raise_exception(), odd message orders
        param = "chat_template" if req.chat_template else "messages"
        raise APIError(400, f"the chat template failed on these messages: "
                       f"{type(exc).__name__}: {str(exc)[:200]}", param) from exc
    if req.chat_template is None and alignment_template(alignment) is not None:
        return with_bos(tokenizer, list(ids))
    return list(ids)


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """The BOS token first where the tokenizer puts one before plain text (Llama's, Mistral's):
    a template of ours stands in for the model's, which would have written it."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos) or tokenizer("x")["input_ids"][:1] != [bos]:
        return ids
    return [bos, *ids]


def completion_prompts(tokenizer, req: CompletionRequest, vocab_size: int) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer(prompt)["input_ids"]]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer(p)["input_ids"] for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt must not be empty", "prompt")
    for ids in prompts:
        if any(not 0 <= t < vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must lie in 0..{vocab_size - 1}", "prompt")
    return prompts
