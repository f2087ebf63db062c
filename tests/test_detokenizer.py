"""Incremental detokenization: multi-byte characters and stop strings in streams."""

from __future__ import annotations

from steerserve.decoding.engine.detokenizer import IncrementalDetokenizer


def stream(tokenizer, ids, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer.for_prompt(tokenizer, [], **kwargs)
    pieces = []
    for i, token in enumerate(ids):
        detok.add_token(token)
        pieces.append(detok.release(final=i == len(ids) - 1 or detok.stopped))
        if detok.stopped:
            break
    return pieces, detok


def test_multibyte_characters_split_across_tokens(tokenizer):
    text = "日本語 🙂🚀 crème"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split()), "the tiny tokenizer must split characters"
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


def test_partial_stop_string_is_held_back(tokenizer):
    text = "Hello world! How are you today?"
    ids = tokenizer(text)["input_ids"]
    pieces, detok = stream(tokenizer, ids, stop=("How are",))
    assert detok.stopped
    assert "".join(pieces) == "Hello world! "
    assert not any("How" in piece for piece in pieces)


def test_stop_string_included_on_request(tokenizer):
    ids = tokenizer("One, two, three, four")["input_ids"]
    pieces, _ = stream(tokenizer, ids, stop=("three",), include_stop=True)
    assert "".join(pieces) == "One, two, three"


def test_held_back_text_released_when_it_is_not_a_stop(tokenizer):
    ids = tokenizer("Hello world")["input_ids"]
    pieces, detok = stream(tokenizer, ids, stop=("world peace",))
    assert not detok.stopped and "".join(pieces) == "Hello world"
