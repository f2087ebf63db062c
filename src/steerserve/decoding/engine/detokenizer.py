"""Incremental detokenization with stop strings.

Text is released only when it is final: a token that ends inside a multi-byte character
decodes to U+FFFD and waits for the next one, and a tail that could be the start of a stop
string is held back until it is known not to be one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Prompt tokens decoded as left context, so tokenizers that add a leading space on the first
# token (SentencePiece) produce the same text as a whole-sequence decode.
_CONTEXT_TOKENS = 4


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # output text so far (final, stop strings cut)
    sent: int = 0  # characters of `text` already released
    stopped: bool = False
    _prefix_offset: int = 0
    _read_offset: int = 0

    @classmethod
    def for_prompt(cls, tokenizer, prompt_ids: list[int], **kwargs) -> IncrementalDetokenizer:
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        return cls(tokenizer, tokens=context, _read_offset=len(context), **kwargs)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> None:
        """Append a token; updates `text` and `stopped` (a stop string appeared)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        full = self._decode(self.tokens[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character: wait for more bytes
        previous = len(self.text)
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        self._check_stop(previous)

    def _check_stop(self, previous: int) -> None:
        for stop in self.stop:
            at = self.text.find(stop, max(0, previous - len(stop) + 1))
            if at >= 0:
                self.text = self.text[: at + len(stop) if self.include_stop else at]
                self.stopped = True
                return

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> None:
        """At the end of a sequence, decode a trailing incomplete character as it stands."""
        if not self.stopped and self._read_offset < len(self.tokens):
            prefix = self._decode(self.tokens[self._prefix_offset:self._read_offset])
            self.text += self._decode(self.tokens[self._prefix_offset:])[len(prefix):]
            self._read_offset = len(self.tokens)

    def release(self, final: bool) -> str:
        """Text that can be sent now; everything left when the sequence is final."""
        if final:
            self.flush()
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta
