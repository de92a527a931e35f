"""Data formatting: rendering, masking, truncation (loading the files: test_sources.py)."""

from __future__ import annotations

import pytest

from fastchat_plora.data import (
    IGNORE_INDEX,
    ChatRenderer,
    build_examples,
    mask_labels,
    tokenize,
)

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven is prime."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two is the only even prime."},
]


def unmasked_text(tokenizer, renderer, messages) -> tuple[str, str]:
    rendered = renderer.render(messages)
    enc = tokenize(rendered, tokenizer)
    labels = mask_labels(enc["input_ids"], enc["offsets"], rendered.assistant_spans)
    decoded = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    spans = "".join(rendered.text[s:e] for s, e in rendered.assistant_spans)
    return decoded, spans


def test_labels_decode_to_exactly_the_assistant_turns(tokenizer):
    decoded, spans = unmasked_text(tokenizer, ChatRenderer(tokenizer), CONVERSATION)
    # SmolLM2's template: each reply ends in <|im_end|> and a newline, which the model must learn.
    assert decoded == spans == "Seven is prime.<|im_end|>\nTwo is the only even prime.<|im_end|>\n"


def test_labels_with_a_fastchat_template(tokenizer):
    decoded, spans = unmasked_text(tokenizer, ChatRenderer(tokenizer, "vicuna_v1.1"), CONVERSATION)
    assert decoded == spans == " Seven is prime.</s> Two is the only even prime.</s>"


def test_system_prompt_and_user_text_never_trained(tokenizer):
    renderer = ChatRenderer(tokenizer)
    rendered = renderer.render(CONVERSATION)
    enc = tokenize(rendered, tokenizer)
    labels = mask_labels(enc["input_ids"], enc["offsets"], rendered.assistant_spans)
    masked = tokenizer.decode([t for t, lab in zip(enc["input_ids"], labels) if lab == IGNORE_INDEX])
    assert "You answer in one line." in masked and "Name a prime." in masked
    assert "Seven" not in masked


def test_unknown_fastchat_template_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no_such_template"):
        ChatRenderer(tokenizer, "no_such_template")


def test_truncation_counts_and_drops(tokenizer):
    long_reply = [{"role": "user", "content": "Tell me. " * 50}, {"role": "assistant", "content": "Fine."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]
    examples, counts = build_examples([long_reply, short], ChatRenderer(tokenizer), max_length=40, progress=False)
    # "truncated" counts every over-long conversation, kept or not; kept + dropped = all.
    assert counts == {"kept": 1, "truncated": 1, "dropped: no assistant token left after truncation": 1}
    assert len(examples) == 1 and len(examples[0]["input_ids"]) <= 40
    full = len(tokenizer.apply_chat_template(short, tokenize=True, return_dict=True)["input_ids"])
    examples, counts = build_examples([short], ChatRenderer(tokenizer), max_length=full - 2, progress=False)
    assert counts == {"truncated": 1, "kept": 1} and len(examples[0]["input_ids"]) == full - 2
