"""Conversations in, training examples out: load, render, tokenise, mask.

The input format is FastChat/ShareGPT, as JSON (a list) or JSONL (one object a line):

    {"id": "...", "conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}

Rendering goes through the tokenizer's chat template by default, or a FastChat template by name
(`--conv_template vicuna_v1.1`). Rendering returns the text and the character spans of the
assistant turns; tokenising keeps the character offsets of each token; masking sets the label of
every token outside an assistant span to -100. Keeping the three apart lets each be tested alone.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# ShareGPT role names, with the OpenAI-style aliases that converted data often carries.
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the file (and line)."""


Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


def parse_conversation(record: object, where: str) -> list[Message]:
    """Check one ShareGPT record and return its turns as role/content messages."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError(f"{where}: expected an object with a 'conversations' list")
    messages = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: each turn needs 'from' and a string 'value', got {turn!r:.80}")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(f"{where}: unknown role {turn.get('from')!r}; expected one of {sorted(ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation {record.get('id', '?')!r} has no assistant ('gpt') turn")
    return messages


def load_conversations(path: str | Path) -> list[list[Message]]:
    """Read a JSON or JSONL file of ShareGPT conversations, failing on the first bad record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data file is empty: {path}")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        located = [(record, f"{path}: record {i}") for i, record in enumerate(records)]
    else:
        located = []
        # split on "\n" only: str.splitlines() also breaks at U+2028 and friends inside strings
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                located.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not located:
        raise DataError(f"data file holds no conversations: {path}")
    return [parse_conversation(record, where) for record, where in located]


@dataclass
class Rendered:
    text: str
    assistant_spans: list[tuple[int, int]]  # [start, end) character offsets into text


class TemplateMismatch(ValueError):
    """A template whose shorter conversations do not render as prefixes of longer ones."""


def check_conv_template(name: str) -> None:
    from fastchat.conversation import conv_templates

    if name not in conv_templates:
        raise DataError(f"conv_template={name!r}: FastChat has no such template")


class ChatRenderer:
    """Render with the tokenizer's chat template, or with a FastChat template when one is named.

    An assistant turn's span runs from the end of the conversation rendered up to the generation
    prompt before it, to the end of the conversation rendered through it: so it holds the reply
    and the template's end-of-turn marker, which the model must learn to emit.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, conv_template: str | None = None):
        self.tokenizer = tokenizer
        self.conv_template = conv_template
        if conv_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass --conv_template (e.g. vicuna_v1.1)")
        if conv_template is not None:
            check_conv_template(conv_template)

    @property
    def adds_special_tokens(self) -> bool:
        # HF chat templates write their own BOS; FastChat templates expect the tokenizer to add it.
        return self.conv_template is not None

    def _text(self, messages: list[Message], generation_prompt: bool) -> str:
        if self.conv_template is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        from fastchat.conversation import get_conv_template

        conv = get_conv_template(self.conv_template)
        user, assistant = conv.roles
        for m in messages:
            if m["role"] == "system":
                conv.set_system_message(m["content"])
            else:
                conv.append_message(user if m["role"] == "user" else assistant, m["content"])
        if generation_prompt:
            conv.append_message(assistant, None)
        return conv.get_prompt()

    def render(self, messages: list[Message]) -> Rendered:
        text = self._text(messages, generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._text(messages[:i], generation_prompt=True) if i else ""
            through = self._text(messages[: i + 1], generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise TemplateMismatch(f"turn {i} does not render as a prefix of the conversation")
            spans.append((len(before), len(through)))
        return Rendered(text, spans)


def tokenize(rendered: Rendered, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool) -> dict:
    """Token ids with each token's character offsets (needs a fast tokenizer)."""
    enc = tokenizer(rendered.text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return {"input_ids": enc["input_ids"], "offsets": enc["offset_mapping"]}


def mask_labels(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels equal to the ids on tokens that start inside an assistant span, -100 elsewhere.

    Special tokens the tokenizer added itself have an empty (0, 0) offset and stay masked.
    """
    labels = []
    for token, (start, end) in zip(input_ids, offsets):
        inside = end > start and any(s <= start < e for s, e in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def build_examples(
    conversations: list[list[Message]],
    renderer: ChatRenderer,
    max_length: int,
    progress: bool = True,
) -> tuple[list[dict], Counter]:
    """Render, tokenise, mask and truncate every conversation; count what happened to each."""
    examples, counts = [], Counter()
    tokenizer = renderer.tokenizer
    for messages in tqdm(conversations, desc="tokenising", disable=not progress, mininterval=1.0):
        try:
            rendered = renderer.render(messages)
        except TemplateMismatch:
            counts["dropped: template mismatch"] += 1
            continue
        enc = tokenize(rendered, tokenizer, renderer.adds_special_tokens)
        labels = mask_labels(enc["input_ids"], enc["offsets"], rendered.assistant_spans)
        if len(labels) > max_length:
            counts["truncated"] += 1
            enc["input_ids"], labels = enc["input_ids"][:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            counts["dropped: no assistant token left after truncation"] += 1
            continue
        counts["kept"] += 1
        examples.append({"input_ids": enc["input_ids"], "labels": labels})
    return examples, counts


class SupervisedDataset(torch.utils.data.Dataset):
    """Pre-tokenised examples; the collator pads them (input ids with pad, labels with -100)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {"input_ids": ex["input_ids"], "labels": ex["labels"], "attention_mask": [1] * len(ex["input_ids"])}


def make_dataset(
    conversations: list[list[Message]] | str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    conv_template: str | None = None,
) -> SupervisedDataset:
    """Examples from loaded conversations, or from a file path."""
    if isinstance(conversations, (str, Path)):
        conversations = load_conversations(conversations)
    renderer = ChatRenderer(tokenizer, conv_template)
    examples, counts = build_examples(conversations, renderer, max_length)
    logger.info("data: %d conversations -> %s", len(conversations), dict(counts))
    if not examples:
        raise DataError(f"no conversation left to train on ({dict(counts)})")
    return SupervisedDataset(examples)
