"""HTTP body -> engine requests: the one place a request takes its engine shape.

Per choice one frozen EngineRequest: the prompt, SamplingParams, and the decoding method
(Plain without `decoding`), which owns the lanes and so carries the request's model or
adapter and steering. Every check a step could trip over happens here or in the engine's
admission check, before anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from steerserve.adapters.steering.spec import SteeringSpec
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.adaptive import AdaptiveTemperature
from steerserve.decoding.sampling.grammar import Grammar
from steerserve.server.context import Served, ServingContext, resolve_reference
from steerserve.server.errors import APIError
from steerserve.server.schemas.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from steerserve.server.tools.formats import CallReader, ToolFormat, format_for
from steerserve.server.translate.adaptive import resolve_adaptive
from steerserve.server.translate.alignment import alignment_stop
from steerserve.server.translate.decoding import PromptFor, RequestPlanner, resolve_method
from steerserve.server.translate.lora import resolve_lora
from steerserve.server.translate.sampling import (
    Limits,
    chat_alignment,
    chat_prompt,
    chat_template,
    check_chat_extras,
    check_common,
    check_completion_extras,
    completion_budget,
    completion_prompts,
    sampling_params,
)
from steerserve.server.translate.steering import resolve_steering
from steerserve.server.translate.structured import Constraint, body_constraint
from steerserve.server.translate.tools import check_tools, reads_calls, tool_constraint


@dataclass(frozen=True)
class Translated:
    served: Served
    requests: list[EngineRequest]  # one per choice, in choice order
    decoding: dict | None  # the method's fields as the client set them (reported back)
    tool_format: ToolFormat | None = None  # set when the answer is read for tool calls
    max_calls: int | None = None  # calls kept from an answer (None: all)

    def call_reader(self, max_calls: int | None = None) -> CallReader | None:
        """A reader for one choice's answer; `max_calls` lowers the body's own limit."""
        if self.tool_format is None:
            return None
        limits = [n for n in (self.max_calls, max_calls) if n is not None]
        return self.tool_format.open_reader(min(limits) if limits else None)


@dataclass(frozen=True)
class _Shared:
    """What every choice of the body shares."""

    served: Served
    limits: Limits
    steering: SteeringSpec | None
    adaptive: AdaptiveTemperature | None
    grammar: Grammar | None  # the output constraint, compiled


def _shared(ctx: ServingContext, body: SamplingFields, served: Served,
            constraint: Constraint | None) -> _Shared:
    limits = Limits.of(served.info, ctx.settings)
    check_common(body, limits)
    steering = resolve_steering(body.steering, ctx.vectors, served.info.shape,
                                served.info.device, ctx.saes)
    adaptive = resolve_adaptive(body, ctx.temperature_heads, served.info.shape.hidden_size)
    grammar = ctx.grammars.compile(served.info, constraint) if constraint else None
    return _Shared(served, limits, steering, adaptive, grammar)


def _planner(ctx: ServingContext, shared: _Shared, prompt: list[int], prompt_for: PromptFor,
             scoring: bool, chat: bool, seed: int | None) -> RequestPlanner:
    base = LaneSpec(shared.served.name, tuple(prompt), shared.served.adapter, shared.steering)
    return RequestPlanner(ctx, base, prompt_for, scoring, chat, seed)


def _served(ctx: ServingContext, body: SamplingFields) -> Served:
    return resolve_lora(ctx, resolve_reference(ctx, body.model), body.lora)


def _one_constraint(body: SamplingFields, tools: Constraint | None) -> Constraint | None:
    asked = body_constraint(body)
    if asked is not None and tools is not None:
        raise APIError(400, f"tool_choice and {asked.param} both constrain the output; "
                       "set one", "tool_choice")
    return asked or tools


def chat_requests(ctx: ServingContext, body: ChatCompletionRequest,
                  request_id: str) -> Translated:
    served = _served(ctx, body)
    check_chat_extras(body, ctx.settings.allow_request_chat_template)
    check_tools(body)
    alignment = chat_alignment(body, ctx.settings.in_context_alignment)
    tool_format = format_for(ctx.settings.tool_call_parser,
                             chat_template(served.info.tokenizer, body, alignment))
    constraint = _one_constraint(body, tool_constraint(body, tool_format))
    shared = _shared(ctx, body, served, constraint)
    prompt = chat_prompt(shared.served.info.tokenizer, body, tool_format, alignment)
    requested = body.max_completion_tokens or body.max_tokens
    max_tokens = completion_budget(requested, len(prompt), shared.limits, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    planner = _planner(ctx, shared, prompt, lambda model, _: chat_prompt(
        ctx.engine.models[model].tokenizer, body, tool_format, alignment), scoring=False,
        chat=True, seed=body.seed)
    method, given = resolve_method(ctx, body.decoding, planner)
    requests = [EngineRequest(f"{request_id}-{i}", tuple(prompt), sampling_params(
        body, max_tokens, top, shared.limits.vocab_size, choice=i, adaptive=shared.adaptive,
        grammar=shared.grammar, extra_stop=alignment_stop(alignment)),
        method) for i in range(body.n)]
    return Translated(shared.served, requests, given,
                      tool_format if reads_calls(body) else None,
                      None if body.parallel_tool_calls else 1)


def _lane_prompts(ctx: ServingContext, served: Served, prompt: list[int]) -> PromptFor:
    """Each lane's tokens for one prompt: the same text through that model's tokenizer,
    or through its chat template (proxy-tuning's expert_chat_template)."""
    text = served.info.tokenizer.decode(prompt)

    def prompt_for(model: str, chat_template: bool) -> list[int]:
        tokenizer = ctx.engine.models[model].tokenizer
        if chat_template:
            return list(tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True,
                tokenize=True, return_dict=False))
        return prompt if tokenizer is served.info.tokenizer else tokenizer(text)["input_ids"]

    return prompt_for


def completion_requests(ctx: ServingContext, body: CompletionRequest,
                        request_id: str) -> Translated:
    shared = _shared(ctx, body, _served(ctx, body), body_constraint(body))
    check_completion_extras(body)
    prompts = completion_prompts(shared.served.info.tokenizer, body, shared.limits.vocab_size)
    scoring = body.logprobs if body.echo and body.logprobs is not None else None
    requests, given = [], None
    for p, prompt in enumerate(prompts):
        max_tokens = completion_budget(body.max_tokens, len(prompt), shared.limits, "prompt")
        planner = _planner(ctx, shared, prompt, _lane_prompts(ctx, shared.served, prompt),
                           scoring=scoring is not None, chat=False, seed=body.seed)
        method, given = resolve_method(ctx, body.decoding, planner)
        if len(prompts) > 1 and method.described():
            raise APIError(400, "this decoding method decides per prompt (the response's "
                           "decoding object reports it); send one prompt per request",
                           "prompt")
        for i in range(body.n):
            params = sampling_params(body, max_tokens, body.logprobs, shared.limits.vocab_size,
                                     scoring, choice=i, adaptive=shared.adaptive,
                                     grammar=shared.grammar)
            requests.append(EngineRequest(f"{request_id}-{p * body.n + i}", tuple(prompt),
                                          params, method))
    return Translated(shared.served, requests, given)
