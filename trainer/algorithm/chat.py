"""Chat messages -> prompt token ids, through the tokenizer's own chat template.

Environments speak in chat messages; generators take token ids. The template is the
model's (Qwen2.5-Instruct's ChatML, the default model's copy of it, ...), so the same
environment prompts any chat model the way it was trained to be prompted.

The template is rendered to text and then encoded with ``add_special_tokens=False``:
templates already write the BOS/role markers they need, and letting the tokenizer add
its own would double a BOS on models that have one (a classic source of off-policy
prompts).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` to prompt text with the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template; use an instruct/chat model "
            "(e.g. Qwen/Qwen2.5-0.5B-Instruct) or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the chat-template prompt for ``messages``."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
