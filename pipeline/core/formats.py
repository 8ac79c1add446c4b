"""How a context is laid out for the teacher, the student and the untouched base model.

The student's context is the teacher's with the prompt text replaced by the tag, so the only thing
the tag has to learn is what the prompt did:
- chat models: the prompt (or the tag) is the system message;
- base models: the prompt (or the tag) is a text prefix before the document.
Without a prompt, a chat model gets its chat template's default (no system message given).
"""
from __future__ import annotations

from typing import Optional

from pipeline.core.conversations import Conversation, conversation_ids

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


# Stands in for the user's text while the template is rendered, so the text can be tokenized on its own.
TEXT_MARKER = "\ue000user-text\ue001"  # private-use characters: no template or request writes them


def special_strings(tokenizer) -> list[str]:
    """The texts the tokenizer turns into special tokens (chat markers, BOS/EOS, the tags)."""
    return [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]


def row_input(row: dict, key: str = "input"):
    """What a row's context is built from: its text, or a `conversations.Conversation` when the row holds
    `messages` or its prompt sits elsewhere than the system message (`inputs.prompt_position`)."""
    messages, position = row.get("messages"), row.get("position") or "system"
    if not messages and position == "system":
        return row[key]
    return Conversation(tuple(messages or [{"role": "user", "content": row[key]}]), position)


def context_ids(tokenizer, text, system: Optional[str], chat: bool) -> list[int]:
    """Token ids of `context_text`; base models get their BOS token, chat templates carry their own.

    `text` may also be a `conversations.Conversation` (see `row_input`), laid out turn by turn.

    The user's text is always plain text: a request that contains `<pirate>` or `<|im_start|>` gets the
    characters, never the tag or the control token (only `system`, which the pipeline writes, may hold
    tags). Text without any special string is tokenized in one piece, exactly as before.
    """
    if not isinstance(text, str):
        return conversation_ids(tokenizer, text, system, chat)
    if not any(s in text for s in special_strings(tokenizer)):
        return tokenizer(context_text(tokenizer, text, system, chat), add_special_tokens=not chat)["input_ids"]
    rendered = context_text(tokenizer, TEXT_MARKER, system, chat)
    if rendered.count(TEXT_MARKER) != 1:
        raise ValueError(f"the chat template of {tokenizer.name_or_path} does not place the user's text once; cannot keep it plain")
    before, after = rendered.split(TEXT_MARKER)
    return (
        tokenizer(before, add_special_tokens=not chat)["input_ids"]
        + tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        + tokenizer(after, add_special_tokens=False)["input_ids"]
    )
