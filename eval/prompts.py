"""The prompt format evaluation speaks: the model's chat template, or a FastChat template by name.

A model trained with `--conv_template` carries a chat template that renders what training
rendered (training writes it into the saved tokenizer, checkpoints included), so evaluating a run
needs nothing more. A base model without a chat template (LLaMA-7B) is evaluated in a FastChat
format by name (`--conv_template vicuna_v1.1`), rendered by FastChat itself.

Prompts are tokenized with the tokenizer's special tokens unless the text already starts with
BOS: training's rule, and lm-evaluation-harness's with `add_bos_token=True`.
"""

from __future__ import annotations

Message = dict[str, str]


class PromptFormatError(ValueError):
    """No prompt format to evaluate in; the message says which flag gives one."""


def fastchat_render(name: str, messages: list[Message], generation_prompt: bool) -> str:
    """FastChat's rendering of ``messages`` in template ``name``.

    Training renders the same way (fastchat_plora/data.py); it is restated here because eval/
    imports no training code, and it is only used for base models, which carry no chat template.
    """
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


class PromptFormat:
    """How a list of messages becomes the prompt text and ids the model sees."""

    def __init__(self, tokenizer, conv_template: str | None = None, model: str = "the model"):
        self.tokenizer, self.conv_template = tokenizer, conv_template
        if conv_template is not None:
            from fastchat.conversation import conv_templates

            if conv_template not in conv_templates:
                raise PromptFormatError(f"conv_template={conv_template!r}: FastChat has no such template")
        elif not getattr(tokenizer, "chat_template", None):
            raise PromptFormatError(
                f"{model}: its tokenizer has no chat template; pass --conv_template with the format it was "
                "trained in (e.g. vicuna_v1.1)"
            )

    def render(self, messages: list[Message], generation_prompt: bool = True) -> str:
        if self.conv_template is not None:
            return fastchat_render(self.conv_template, messages, generation_prompt)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, prompt: str) -> list[int]:
        bos = self.tokenizer.bos_token
        special = not (bos and prompt.startswith(bos))
        return self.tokenizer(prompt, add_special_tokens=special)["input_ids"]


def harness_lm(model, prompt_format: PromptFormat, accelerator=None, **kwargs):
    """lm-evaluation-harness's HF model, wrapping each request in ``prompt_format``.

    With an ``accelerator`` of several processes (torchrun), each process holds its own copy of the
    model and the harness gives each a share of every task's documents, gathered on process 0. The
    harness shares the work this way only when it loads the model itself from a name; handed a loaded
    model (a folded checkpoint, or the copy the held-out loss also uses) it runs as one process, so
    the processes are set here: its evaluator reads `rank` and `world_size` and gathers through
    `accelerator`, as it does for a model it loaded under `accelerate launch`.
    """
    from lm_eval.models.huggingface import HFLM

    class FormattedHFLM(HFLM):
        def apply_chat_template(self, chat_history: list[Message], add_generation_prompt: bool = True) -> str:
            return prompt_format.render(chat_history, add_generation_prompt)

    lm = FormattedHFLM(pretrained=model, tokenizer=prompt_format.tokenizer, add_bos_token=True, **kwargs)
    if accelerator is not None and accelerator.num_processes > 1:
        lm.accelerator = accelerator
        lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
    return lm


def vllm_lm(model_path: str, prompt_format: PromptFormat, dtype: str, gpu_memory_utilization: float, **kwargs):
    """lm-evaluation-harness's vLLM model (batched generation, many times faster on a GPU), wrapping each
    request in ``prompt_format`` as `harness_lm` does. It loads the model from ``model_path`` itself."""
    from lm_eval.models.vllm_causallms import VLLM

    class FormattedVLLM(VLLM):
        def apply_chat_template(self, chat_history: list[Message], add_generation_prompt: bool = True) -> str:
            return prompt_format.render(chat_history, add_generation_prompt)

    return FormattedVLLM(pretrained=str(model_path), dtype=dtype, add_bos_token=True,
                         gpu_memory_utilization=gpu_memory_utilization, **kwargs)  # fmt: skip
