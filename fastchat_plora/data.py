"""Conversations in, training examples out: render, tokenise, mask.

A conversation is a list of role/content messages (`sources.py` reads them from ShareGPT, OpenAI
messages and Alpaca records). Rendering goes through the tokenizer's chat template by default, or
a FastChat template by name (`--conv_template vicuna_v1.1`). Rendering returns the text and the
character spans of the trained assistant turns; tokenising keeps the character offsets of each
token; masking sets the label of every token outside those spans to -100. Keeping the three apart
lets each be tested alone.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the file (and line)."""


# {"role": "system" | "user" | "assistant", "content": str}; an assistant turn left out of the loss
# also carries "train": False.
Message = dict


@dataclass
class Rendered:
    text: str
    assistant_spans: list[tuple[int, int]]  # [start, end) character offsets into text


class TemplateMismatch(ValueError):
    """A template whose shorter conversations do not render as prefixes of longer ones."""


# FastChat's separator styles that a chat template can express, by name:
# (separator after the system prompt, dropped when the system prompt is empty?, between role and
#  message, after the role that opens the reply, whether user and assistant turns end in sep and sep2)
CONVERTIBLE_STYLES = {
    "ADD_COLON_SINGLE": ("sep", False, ": ", ":", False),
    "ADD_COLON_TWO": ("sep", False, ": ", ":", True),
    "ADD_COLON_SPACE_SINGLE": ("sep", False, ": ", ": ", False),
    "NO_COLON_SINGLE": ("", False, "", "", False),
    "NO_COLON_TWO": ("", False, "", "", True),
    "ADD_NEW_LINE_SINGLE": ("sep", True, "\n", "\n", False),
}
PROBES = [  # conversations a converted template must render exactly as FastChat does
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3.\nSlowly."},
     {"role": "assistant", "content": "1 2 3"}],
]  # fmt: skip


def fastchat_render(name: str, messages: list[Message], generation_prompt: bool) -> str:
    """The text FastChat's template ``name`` makes of ``messages`` (and the reply's opening when asked)."""
    from fastchat.conversation import get_conv_template

    conv = get_conv_template(name)
    user, assistant = conv.roles[:2]
    for m in messages:
        if m["role"] == "system":
            conv.set_system_message(m["content"])
        else:
            conv.append_message(user if m["role"] == "user" else assistant, m["content"])
    if generation_prompt:
        conv.append_message(assistant, None)
    return conv.get_prompt()


def fastchat_chat_template(name: str) -> str:
    """A Jinja chat template that renders exactly what FastChat's template ``name`` renders.

    Training with ``--conv_template`` writes it into the saved tokenizer, so evaluation,
    `apply_chat_template`, vLLM and any other consumer see the prompts training saw. Raises
    DataError for a template FastChat lacks or whose separator style has no conversion here.
    """
    from fastchat.conversation import conv_templates, get_conv_template

    if name not in conv_templates:
        raise DataError(f"conv_template={name!r}: FastChat has no such template")
    conv = get_conv_template(name)
    style = getattr(conv.sep_style, "name", str(conv.sep_style))
    if len(conv.roles) != 2 or conv.messages:
        raise DataError(f"conv_template={name!r}: it has fixed few-shot turns or other roles; no chat template here")
    if style not in CONVERTIBLE_STYLES:
        supported = ", ".join(sorted(CONVERTIBLE_STYLES))
        raise DataError(f"conv_template={name!r}: its separator style {style} has no chat template here ({supported})")
    start_sep, skip_if_empty, join, opening, two = CONVERTIBLE_STYLES[style]
    parts = conv.system_template.format(system_message="\x00").split("\x00")
    if len(parts) != 2:  # a fixed system prompt: FastChat ignores system messages
        raise DataError(f"conv_template={name!r}: its system prompt takes no system message; no chat template here")
    prefix, suffix = parts

    def lit(text: str) -> str:  # a Jinja string literal
        return json.dumps(text)

    sep2 = conv.sep2 if two else conv.sep
    template = (
        f"{{%- set ns = namespace(system={lit(prefix + conv.system_message + suffix)}) -%}}"
        "{%- for message in messages if message['role'] == 'system' -%}"
        f"{{%- set ns.system = {lit(prefix)} + message['content'] + {lit(suffix)} -%}}"
        "{%- endfor -%}"
        "{{- ns.system -}}"
        + (f"{{%- if ns.system -%}}{{{{- {lit(conv.sep)} -}}}}{{%- endif -%}}" if skip_if_empty else "")
        + (f"{{{{- {lit(conv.sep)} -}}}}" if start_sep and not skip_if_empty else "")
        + "{%- for message in messages if message['role'] != 'system' -%}"
        f"{{%- set role = {lit(conv.roles[0])} if message['role'] == 'user' else {lit(conv.roles[1])} -%}}"
        "{%- if message['content'] -%}"
        f"{{%- set end = {lit(conv.sep)} if loop.index0 % 2 == 0 else {lit(sep2)} -%}}"
        f"{{{{- role + {lit(join)} + message['content'] + end -}}}}"
        f"{{%- else -%}}{{{{- role + {lit(opening)} -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {lit(conv.roles[1] + opening)} -}}}}{{%- endif -%}}"
    )
    for probe in PROBES:
        for cut, generation_prompt in ((len(probe), False), (len(probe) - 1, True)):
            expected = fastchat_render(name, probe[:cut], generation_prompt)
            if render_jinja(template, probe[:cut], generation_prompt) != expected:
                raise DataError(f"conv_template={name!r}: its chat template does not render as FastChat does")
    return template


def render_jinja(template: str, messages: list[Message], generation_prompt: bool) -> str:
    """Render a chat template as transformers does (a sandboxed Jinja with trimmed blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=generation_prompt)


def check_conv_template(name: str) -> None:
    """A FastChat template name that exists and converts to a chat template; DataError otherwise."""
    fastchat_chat_template(name)


def use_prompt_format(tokenizer: PreTrainedTokenizerBase, conv_template: str | None, model: str) -> None:
    """Make ``tokenizer`` carry the chat template training renders with, so the saved model does too.

    A named FastChat template replaces the tokenizer's own; without one the tokenizer must have a
    chat template (LLaMA-7B has none), else DataError before any model loads.
    """
    if conv_template is not None:
        tokenizer.chat_template = fastchat_chat_template(conv_template)
    elif not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{model}: the tokenizer has no chat template; pass --conv_template (e.g. vicuna_v1.1)")


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
            raise DataError("the tokenizer has no chat template; pass --conv_template (e.g. vicuna_v1.1)")
        if conv_template is not None:
            check_conv_template(conv_template)

    def _text(self, messages: list[Message], generation_prompt: bool) -> str:
        if self.conv_template is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return fastchat_render(self.conv_template, messages, generation_prompt)

    def prompt(self, messages: list[Message]) -> str:
        """The conversation up to its first assistant turn (all of it, without one), ending in the generation prompt."""
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        return self._text(messages[:first], generation_prompt=True)

    def render(self, messages: list[Message]) -> Rendered:
        text = self._text(messages, generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or not m.get("train", True):
                continue
            before = self._text(messages[:i], generation_prompt=True) if i else ""
            through = self._text(messages[: i + 1], generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise TemplateMismatch(f"turn {i} does not render as a prefix of the conversation")
            spans.append((len(before), len(through)))
        return Rendered(text, spans)


def adds_special_tokens(text: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """The tokenizer's special tokens (its BOS) are added unless the rendered text already starts with BOS.

    One rule for FastChat templates (which leave BOS to the tokenizer) and chat templates that write
    their own; it is also lm-evaluation-harness's rule with ``add_bos_token=True``, which
    evaluation uses, so evaluation tokenizes prompts as training did.
    """
    bos = tokenizer.bos_token
    return not (bos and text.startswith(bos))


def tokenize(rendered: Rendered, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Token ids with each token's character offsets (needs a fast tokenizer)."""
    special = adds_special_tokens(rendered.text, tokenizer)
    enc = tokenizer(rendered.text, add_special_tokens=special, return_offsets_mapping=True)
    return {"input_ids": enc["input_ids"], "offsets": enc["offset_mapping"]}


def generation_prompts(conversations: list[list[Message]], renderer: ChatRenderer) -> list[tuple[str, list[int]]]:
    """Each conversation's prompt (up to its first reply) as text and token ids, tokenised as in training."""
    prompts = []
    for messages in conversations:
        text = renderer.prompt(messages)
        ids = renderer.tokenizer(text, add_special_tokens=adds_special_tokens(text, renderer.tokenizer))["input_ids"]
        prompts.append((text, ids))
    return prompts


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
        enc = tokenize(rendered, tokenizer)
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
    conversations: list[list[Message]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    conv_template: str | None = None,
) -> SupervisedDataset:
    """Training examples from loaded conversations."""
    renderer = ChatRenderer(tokenizer, conv_template)
    examples, counts = build_examples(conversations, renderer, max_length)
    logger.info("data: %d conversations -> %s", len(conversations), dict(counts))
    if not examples:
        raise DataError(f"no conversation left to train on ({dict(counts)})")
    return SupervisedDataset(examples)
