"""The teacher: the model reading the full prompt, with the prompt's keys and values computed once.

Every teacher context starts with the same prompt tokens. They are run through the model once
(`PromptKV`); after that only what differs (the input, and during training the continuation) is
fed, through `reading_prompt`: the model's attention switches to `prompt_attention` (registered
with transformers' `AttentionInterface`), which attends to the one batch-1 copy of the prompt's
keys and values, while a `PromptSuffixCache` holds each row's own keys. While decoding, a batch
of B rows then reads the prompt's keys once per step instead of B times (times the query heads
per key head, which the stock GQA path repeats), and nothing of the prompt's size is copied per
batch or per step. Used by `generate` (sampling) and by `train.teacher=online` (teacher
distributions computed during training instead of read from disk, kept per example).

Models whose attention is not plain scaled dot-product (sliding windows, logit soft-capping) fall
back to a per-batch copy of an ordinary cache: same results, less speed.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.core.data import pad_examples
from pipeline.core.formats import context_ids
from pipeline.core.scoring import scored_logits

ATTENTION = "prompt_shared"  # the name our attention function is registered under


def shared_prefix_length(contexts: list[list[int]]) -> int:
    """How many leading token ids all contexts share (kept below the shortest, so each has a suffix)."""
    shortest = min(len(c) for c in contexts)
    n = 0
    while n < shortest - 1 and all(c[n] == contexts[0][n] for c in contexts):
        n += 1
    return n


MANY_QUERIES = 16  # from this many queries per row, SDPA's fused kernel on a copied prompt is faster (measured on CPU)


def shared_prompt_attention(query, prompt_keys, prompt_values, keys, values, mask, scaling: float) -> torch.Tensor:
    """Softmax attention of every row to one shared prompt followed by the row's own keys.

    query [B, H, q, d]; prompt_keys/values [1, Hkv, P, d] (one copy for the whole batch);
    keys/values [B, Hkv, S, d] (each row's own, after the prompt); mask [B, 1, q, S] boolean
    (True = may attend) or None (causal, no padding). Returns [B, q, H, d], exactly
    softmax([q.Kp, q.Ks]) @ [Vp; Vs]. Every query sees the whole prompt (it comes first), so no
    row is ever fully masked.

    Decoding (one query per row, every step) is where sharing pays: the prompt is read once for
    the batch and nothing of its size is copied. With many queries per row (teacher forcing, the
    first step of a batch) the one-off copy is cheap next to the scores, and SDPA's fused kernel
    computes them faster than a hand-written softmax.
    """
    b, q, s = query.shape[0], query.shape[2], keys.shape[2]
    if mask is None:  # causal over the rows' own keys, no padding
        mask = torch.ones(q, s, dtype=torch.bool, device=query.device).tril(s - q)[None, None]
    if q < MANY_QUERIES:
        return _attention_by_hand(query, prompt_keys, prompt_values, keys, values, mask, scaling)
    prompt_visible = torch.ones(*mask.shape[:-1], prompt_keys.shape[2], dtype=torch.bool, device=mask.device)
    out = F.scaled_dot_product_attention(
        query,
        torch.cat([prompt_keys.expand(b, -1, -1, -1), keys], dim=2),
        torch.cat([prompt_values.expand(b, -1, -1, -1), values], dim=2),
        attn_mask=torch.cat([prompt_visible, mask], dim=-1),
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous()


def _attention_by_hand(query, prompt_keys, prompt_values, keys, values, mask, scaling: float) -> torch.Tensor:
    """Few queries per row (decoding): scores by hand, the prompt's keys read once for all rows (mask given)."""
    b, h, q, d = query.shape
    h_kv, p, s = keys.shape[1], prompt_keys.shape[2], keys.shape[2]
    g = h // h_kv  # query heads per key/value head (grouped-query attention): query head j reads key head j // g
    # Scores in a [Hkv, B*G*q, keys] layout: the prompt block is then one matmul per key head for
    # all rows at once, against the single prompt copy.
    grouped = (query * scaling).reshape(b, h_kv, g * q, d)  # scaled here: the queries are the smallest tensor
    rows = grouped.transpose(0, 1).reshape(h_kv, b * g * q, d)
    prompt_scores = torch.matmul(rows, prompt_keys[0].transpose(1, 2))  # [Hkv, BGq, P]
    own_scores = torch.matmul(grouped, keys.transpose(2, 3))  # [B, Hkv, Gq, S]
    own_mask = mask.unsqueeze(2).expand(-1, -1, g, -1, -1).reshape(-1, 1, g * q, s)  # [B, 1, q, S] -> [B, 1, Gq, S]
    own_scores = own_scores.masked_fill(~own_mask, float("-inf"))
    own_scores = own_scores.transpose(0, 1).reshape(h_kv, b * g * q, s)
    weights = torch.softmax(torch.cat([prompt_scores, own_scores], dim=-1).float(), dim=-1).to(query.dtype)
    out = torch.matmul(weights[..., :p], prompt_values[0])  # [Hkv, BGq, d]
    own = weights[..., p:].reshape(h_kv, b, g * q, s).transpose(0, 1)  # [B, Hkv, Gq, S]
    out = out.view(h_kv, b, g * q, d).transpose(0, 1) + torch.matmul(own, values)  # [B, Hkv, Gq, d]
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous()


def prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (see `reading_prompt`): the shared prompt, then the row's own keys."""
    prompt_keys, prompt_values = module.shared_prompt_kv
    p = prompt_keys.shape[2]
    # The mask covers prompt + own keys (the cache reports the prompt's length); the prompt part is all True.
    mask = attention_mask[..., p:] if attention_mask is not None else None
    if mask is not None and mask.dtype != torch.bool:  # an additive float mask
        mask = mask == 0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return shared_prompt_attention(query, prompt_keys, prompt_values, key, value, mask, scale), None


AttentionInterface.register(ATTENTION, prompt_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@dataclass
class PromptKV:
    """The prompt's token ids and, in an ordinary cache, its keys and values ([1, Hkv, P, d] per layer)."""

    ids: list[int]
    cache: DynamicCache

    def __len__(self) -> int:
        return len(self.ids)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.layers[index].keys, self.cache.layers[index].values


@torch.no_grad()
def prompt_kv(model, prefix: list[int]) -> PromptKV:
    """Run the shared prompt (non-empty) through the model once and keep its keys and values."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix], device=model.device), past_key_values=cache, use_cache=True)
    return PromptKV(list(prefix), cache)


class PromptSuffixCache(DynamicCache):
    """A cache of each row's own keys that reports the shared prompt's length in front of them.

    Generation and the causal mask then place every new token after the prompt (positions, mask
    width), while only the rows' own keys are stored here; `prompt_attention` adds the prompt's.
    """

    def __init__(self, prompt_length: int):
        super().__init__()
        self.prompt_length = prompt_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prompt_length + super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        own_length, offset = super().get_mask_sizes(query_length, layer_idx)
        return self.prompt_length + own_length, offset


def attention_modules(model) -> list:
    """The model's self-attention modules (they know their layer and project keys)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]


def supports_shared_prompt(model) -> bool:
    """Whether `prompt_attention` computes this model's attention exactly (plain scaled dot-product)."""
    unsupported = ("sliding_window", "attn_logit_softcapping", "use_sliding_window")
    return not any(getattr(model.config, name, None) for name in unsupported) and bool(attention_modules(model))


@contextlib.contextmanager
def reading_prompt(model, prompt: PromptKV, batch_size: int):
    """Within this block, `model` reads `prompt` in front of whatever it is fed; yields the cache to pass.

    On supported models the prompt's keys are shared (see module docstring); otherwise the yielded
    cache is a per-batch copy of an ordinary one.
    """
    if not supports_shared_prompt(model):
        past = copy.deepcopy(prompt.cache)
        past.batch_repeat_interleave(batch_size)
        yield past
        return
    modules = attention_modules(model)
    for m in modules:
        m.shared_prompt_kv = prompt.layer(m.layer_idx)
    # The attention modules and the mask builder read the implementation from their configs.
    configs = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)}
    before = {key: c._attn_implementation for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = ATTENTION
    try:
        yield PromptSuffixCache(len(prompt))
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]
        for m in modules:
            del m.shared_prompt_kv


def prompt_prefix_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The token ids every context with this prompt starts with, whatever the input."""
    a = context_ids(tokenizer, "Hello there.", prompt, chat)
    b = context_ids(tokenizer, "What is 2 + 2?", prompt, chat)
    return a[: shared_prefix_length([a, b])]


class CachedPromptTeacher:
    """Teacher-forced distributions of a frozen model reading `prompt`, the prompt's keys computed once.

    The teacher is frozen, so an example's teacher logits never change: the first time an example
    is seen they are computed and kept (up to `memo_mb`), and later epochs read them back instead
    of running the teacher again. Exact: the kept tensor is the computed one.

    Args:
        frozen: a context-manager factory yielding the frozen teacher model (for LoRA students, the
            student itself with adapters switched off: no second copy in memory).
        tokenizer, prompt, chat: how teacher contexts are built (see formats.py).
        memo_mb: how many MB of teacher logits to keep (0: recompute every time).
    """

    def __init__(self, frozen, tokenizer, prompt: str, chat: bool, memo_mb: float = 0):
        self.frozen, self.tokenizer, self.prompt, self.chat = frozen, tokenizer, prompt, chat
        with frozen() as model:
            self.prompt_kv = prompt_kv(model, prompt_prefix_ids(tokenizer, prompt, chat))
        self.memo: dict[tuple, torch.Tensor] = {}
        self.memo_bytes, self.memo_limit = 0, memo_mb * 2**20
        self.computed = 0  # examples the teacher actually ran on (the rest came from the memo)

    def suffix_ids(self, text: str) -> list[int]:
        """The part of the teacher's context after the cached prompt."""
        ids = context_ids(self.tokenizer, text, self.prompt, self.chat)
        if ids[: len(self.prompt_kv)] != self.prompt_kv.ids:
            raise ValueError(f"teacher context for {text[:40]!r} does not start with the cached prompt")
        return ids[len(self.prompt_kv) :]

    @torch.no_grad()
    def continuation_logits(
        self, suffixes: list[list[int]], continuations: list[list[int]], keep: bool = True
    ) -> torch.Tensor:
        """Logits [B, T, V] predicting each continuation token after prompt + suffix (zeros past each end).

        `keep=False` for continuations that will not come again (the student's on-policy samples),
        so they do not fill the memo that later epochs of recorded continuations read from.
        """
        keys = [(tuple(s), tuple(c)) for s, c in zip(suffixes, continuations)]
        missing = [i for i, key in enumerate(keys) if key not in self.memo]
        rows: dict[int, torch.Tensor] = {}
        if missing:
            fresh = self._forward([suffixes[i] for i in missing], [continuations[i] for i in missing])
            self.computed += len(missing)
            for j, i in enumerate(missing):
                rows[i] = fresh[j, : len(continuations[i])]
                if keep and self.memo_bytes + rows[i].nbytes <= self.memo_limit:
                    self.memo[keys[i]] = rows[i].clone()  # a copy: a view would keep the whole batch alive
                    self.memo_bytes += rows[i].nbytes
        for i, key in enumerate(keys):
            rows.setdefault(i, self.memo.get(key))
        longest = max(len(c) for c in continuations)
        return torch.stack([torch.nn.functional.pad(rows[i], (0, 0, 0, longest - len(rows[i]))) for i in range(len(keys))])

    @torch.no_grad()
    def _forward(self, suffixes: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        batch = pad_examples(suffixes, continuations, self.tokenizer.pad_token_id)
        size, length = batch["input_ids"].shape
        start = len(self.prompt_kv)
        with self.frozen() as model, reading_prompt(model, self.prompt_kv, size) as past:
            device = model.device
            attention = torch.cat([torch.ones(size, start, dtype=torch.long), batch["attention_mask"]], dim=1)
            return scored_logits(  # the LM head only at the continuation's positions (pipeline/scoring.py)
                model,
                batch["output_positions"].to(device),
                input_ids=batch["input_ids"].to(device),
                attention_mask=attention.to(device),
                position_ids=(start + torch.arange(length)).expand(size, -1).to(device),
                past_key_values=past,
                use_cache=True,
            )
