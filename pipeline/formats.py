"""How a context is laid out for the teacher, the student and the untouched base model.

The student's context is the teacher's with the prompt text replaced by the tag, so the only thing
the tag has to learn is what the prompt did:
- chat models: the prompt (or the tag) is the system message;
- base models: the prompt (or the tag) is a text prefix before the document.
Without a prompt, a chat model gets its chat template's default (no system message given).
"""
from __future__ import annotations

from typing import Optional

BASE_PREFIX_SEPARATOR = "\n\n"


def context_text(tokenizer, text: str, system: Optional[str], chat: bool) -> str:
    """The context string a model reads before it writes its continuation.

    Args:
        tokenizer: supplies the chat template for chat models.
        text: the user request (chat) or document opening (base).
        system: the prompt, the tag(s), or None for the plain untagged context.
        chat: whether to use the chat template.
    """
    if chat:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": text}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text if system is None else system + BASE_PREFIX_SEPARATOR + text


def context_ids(tokenizer, text: str, system: Optional[str], chat: bool) -> list[int]:
    """Token ids of `context_text`; base models get their BOS token, chat templates carry their own."""
    rendered = context_text(tokenizer, text, system, chat)
    return tokenizer(rendered, add_special_tokens=not chat)["input_ids"]
