"""OpenAI response pieces: logprobs in chat and legacy shapes, usage, ids."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from steerserve.decoding.request import TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# JSON has no -inf; a token a method rules out (a plausibility mask) is reported with vLLM's
# floor instead.
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float | None) -> float | None:
    """JSON has no NaN either: a row the model made NaN reports the floor, not a 500."""
    if logprob is None:
        return None
    return LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


def finite_temperatures(values: list[float] | tuple[float, ...]) -> list[float]:
    return [0.0 if not math.isfinite(t) else t for t in values]


def chat_logprobs(records: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict:
    return {"content": [
        {"token": r.token, "logprob": _finite(r.logprob), "bytes": _bytes(r.token),
         "top_logprobs": [{"token": t.token, "logprob": _finite(t.logprob),
                           "bytes": _bytes(t.token)}
                          for t in r.top]}
        for r in records
    ]}


def legacy_logprobs(records: list[TokenLogprob], text_offset: int = 0) -> dict:
    """The /v1/completions shape; the first prompt token has null logprob and top."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for record in records:
        tokens.append(record.token)
        token_logprobs.append(_finite(record.logprob))
        scored = record.logprob is not None
        top.append({t.token: _finite(t.logprob) for t in record.top} if scored else None)
        offsets.append(offset)
        offset += len(record.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class ResponseMeta:
    """What every response object and chunk of one request repeats."""

    id: str
    created: int
    model: str  # as the client named it: the base model or an adapter
    decoding: dict | None = None  # the multi-lane method used, reported back

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        body = {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices}
        if self.decoding is not None:
            body["decoding"] = self.decoding
        return body
