"""Conversations as inputs: a row of an inputs file may carry `messages` instead of `text`.

    {"id": "conv-0001", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."},
                                     {"role": "user", "content": "..."}]}

Turns alternate user / assistant, start and end with a user turn; the teacher writes the next assistant
turn. Where the prompt (teacher) or the tag (student) sits is `inputs.prompt_position`:
- `system` (default): the system message ahead of the whole conversation, as for single requests;
- `last_user`: a system message right before the last user turn, so a tag can be switched on part way
  through a conversation (the chat template must accept a system turn there; ChatML templates do).
A conversation's context is built piece by piece: the template's own text (its control tokens), every
turn's content as plain text (a `<|im_start|>` or a tag typed by a user stays characters), and the
prompt or tags, the one part the pipeline writes. So a teacher's and a student's contexts for one row
differ exactly where the prompt and the tag sit.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

from pipeline.errors import ConfigError

ROLES = ("user", "assistant")
POSITIONS = ("system", "last_user")
_MARK = "\ue000{}\ue001"  # private-use characters: no template or input writes them
_MARKS = re.compile("\ue000([^\ue001]*)\ue001")


class Conversation(NamedTuple):
    """A conversation input and where its prompt or tag goes (see the module docstring)."""

    messages: tuple  # ({"role": ..., "content": ...}, ...), alternating, ending with a user turn
    position: str = "system"


def check_messages(messages, where: str) -> list[dict]:
    """The turns of a row's `messages`, or a ConfigError naming the place, the field and the fix."""
    fix = "Fix: `messages` is a list of {\"role\": \"user\"|\"assistant\", \"content\": text}, alternating, starting and ending with user."
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: field 'messages' must be a non-empty list of turns. {fix}")
    turns = []
    for i, turn in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(turn, dict) or set(turn) - {"role", "content"}:
            raise ConfigError(f"{where}: field '{field}' must be an object with only 'role' and 'content'. {fix}")
        expected = ROLES[i % 2]
        if turn.get("role") != expected:
            raise ConfigError(f"{where}: field '{field}.role' is {turn.get('role')!r}, expected {expected!r} (turns alternate, "
                              f"starting with user; a system message is the pipeline's, not the input's). {fix}")
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ConfigError(f"{where}: field '{field}.content' is missing or empty. {fix}")
        turns.append({"role": expected, "content": content.strip()})
    if turns[-1]["role"] != "user":
        raise ConfigError(f"{where}: field 'messages[{len(turns) - 1}].role' is 'assistant': the last turn must be the "
                          f"user's (the teacher writes the next assistant turn). {fix}")
    return turns


def transcript(messages) -> str:
    """A conversation as one readable text (reports, listings)."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def layout(messages, system: Optional[str], position: str) -> list[dict]:
    """The messages the chat template renders: the turns, with the system text where `position` puts it."""
    if position not in POSITIONS:
        raise ConfigError(f"inputs.prompt_position is {position!r}. Fix: use one of {', '.join(POSITIONS)}.")
    turns = [dict(m) for m in messages]
    if system is None:
        return turns
    at = 0 if position == "system" else len(turns) - 1
    return turns[:at] + [{"role": "system", "content": system}] + turns[at:]


def conversation_ids(tokenizer, conversation: Conversation, system: Optional[str], chat: bool) -> list[int]:
    """Token ids of a conversation's context: template text, plain turn contents and the prompt or tags."""
    if not chat:
        raise ConfigError("a conversation input needs a chat model. Fix: set model.chat=true, or use rows with 'text'.")
    pieces = [m["content"] for m in conversation.messages]
    marked = [{"role": m["role"], "content": _MARK.format(i)} for i, m in enumerate(conversation.messages)]
    messages = layout(marked, None if system is None else _MARK.format("system"), conversation.position)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    found = _MARKS.findall(rendered)
    expected = [m["content"][1:-1] for m in messages]
    if found != expected:
        raise ValueError(f"the chat template of {tokenizer.name_or_path} does not place each turn once, in order; "
                         f"cannot lay out a conversation")
    ids = []
    for i, text in enumerate(_MARKS.split(rendered)):
        if i % 2 == 0:  # the template's own text: its control tokens are meant
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        elif text == "system":  # the prompt or the tags: written by the pipeline, tags are tokens
            ids += tokenizer(system, add_special_tokens=False)["input_ids"]
        else:  # what a user (or the assistant before) wrote: always plain text
            ids += tokenizer(pieces[int(text)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


def record_columns(rows, position: str):
    """Generate's extra record columns: none for plain requests read with the prompt as system message (their
    datasets stay as they were); otherwise every record gets its turns ([] for a request) and the position."""
    if str(position) == "system" and not any(r.get("messages") for r in rows):
        return lambda row: {}
    return lambda row: {"messages": [dict(m) for m in row.get("messages") or []], "position": str(position)}


def check_config(cfg, rows) -> None:
    """What conversations and `inputs.prompt_position` need, checked before any model loads."""
    position = str(cfg.inputs.prompt_position)
    has_turns = any(r.get("messages") for r in rows)
    if not (has_turns or position != "system"):
        return
    why = f"{cfg.inputs.file} holds conversations" if has_turns else f"inputs.prompt_position is {position}"
    if not cfg.model.chat:
        raise ConfigError(f"{why}, which need a chat model (turns and system messages). Fix: set model.chat=true, "
                          f"or use rows with 'text' and inputs.prompt_position=system.")
    if cfg.train.mode == "pretrain":
        raise ConfigError(f"{why}; train.mode=pretrain packs plain documents. Fix: use train.mode=finetune.")
    if position != "system" and str(cfg.train.teacher) == "online" and str(cfg.train.objective) != "sft":
        raise ConfigError(f"inputs.prompt_position is {position}: the prompt is not a prefix every context shares, which "
                          f"train.teacher=online caches. Fix: use train.teacher=recorded, or inputs.prompt_position=system.")
