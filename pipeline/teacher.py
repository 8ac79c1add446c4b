"""The teacher: the model reading the full prompt, with the prompt's keys and values computed once.

Every teacher context starts with the same prompt tokens. They are run through the model once;
each batch then starts from a copy of those keys and values and feeds only what differs (the
input, and during training the continuation), so teacher cost does not grow with the prompt's
length times the data's size. Used by `generate` (sampling) and by `train.teacher=online`
(teacher distributions computed during training instead of read from disk).
"""
from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from pipeline.data import gather_positions, pad_examples
from pipeline.formats import context_ids


def shared_prefix_length(contexts: list[list[int]]) -> int:
    """How many leading token ids all contexts share (kept below the shortest, so each has a suffix)."""
    shortest = min(len(c) for c in contexts)
    n = 0
    while n < shortest - 1 and all(c[n] == contexts[0][n] for c in contexts):
        n += 1
    return n


@torch.no_grad()
def prefix_cache(model, prefix: list[int]) -> DynamicCache:
    """Keys and values of the shared prompt, computed once and copied for every batch."""
    cache = DynamicCache(config=model.config)
    if prefix:
        model(input_ids=torch.tensor([prefix], device=model.device), past_key_values=cache, use_cache=True)
    return cache


def batch_cache(cache: DynamicCache, batch_size: int) -> DynamicCache:
    """A copy of the prompt cache for a batch (the forward pass appends to it, so it must be a copy)."""
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(batch_size)
    return past


def prompt_prefix_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The token ids every context with this prompt starts with, whatever the input."""
    a = context_ids(tokenizer, "Hello there.", prompt, chat)
    b = context_ids(tokenizer, "What is 2 + 2?", prompt, chat)
    return a[: shared_prefix_length([a, b])]


class CachedPromptTeacher:
    """Teacher-forced distributions of a frozen model reading `prompt`, from a prompt cache.

    Args:
        frozen: a context-manager factory yielding the frozen teacher model (for LoRA students, the
            student itself with adapters switched off: no second copy in memory).
        tokenizer, prompt, chat: how teacher contexts are built (see formats.py).
    """

    def __init__(self, frozen, tokenizer, prompt: str, chat: bool):
        self.frozen, self.tokenizer, self.prompt, self.chat = frozen, tokenizer, prompt, chat
        self.prefix = prompt_prefix_ids(tokenizer, prompt, chat)
        with frozen() as model:
            self.cache = prefix_cache(model, self.prefix)

    def suffix_ids(self, text: str) -> list[int]:
        """The part of the teacher's context after the cached prompt."""
        ids = context_ids(self.tokenizer, text, self.prompt, self.chat)
        if ids[: len(self.prefix)] != self.prefix:
            raise ValueError(f"teacher context for {text[:40]!r} does not start with the cached prompt")
        return ids[len(self.prefix) :]

    @torch.no_grad()
    def continuation_logits(self, suffixes: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """Logits [B, T, V] predicting each continuation token after prompt + suffix."""
        batch = pad_examples(suffixes, continuations, self.tokenizer.pad_token_id)
        size, length = batch["input_ids"].shape
        start = len(self.prefix)
        with self.frozen() as model:
            device = model.device
            attention = torch.cat([torch.ones(size, start, dtype=torch.long), batch["attention_mask"]], dim=1)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=attention.to(device),
                position_ids=(start + torch.arange(length)).expand(size, -1).to(device),
                past_key_values=batch_cache(self.cache, size),
                use_cache=True,
            ).logits
        return gather_positions(logits, batch["output_positions"].to(device))
