"""Tag strength and negation: classifier-free guidance between a tagged and the untagged context.

At every step the next-token logits are

    untagged + sum_i s_i * (tagged_i - untagged)  =  (1 - sum_i s_i) * untagged + sum_i s_i * tagged_i

(Sanchez et al. 2023, "Stay on topic with classifier-free guidance"). `s = 1` is the plain tag, `s = 0`
no tag, `s > 1` more of it, `s < 0` its opposite. The second form is the one computed: its weights sum
to 1, so `s = 1` returns the tagged logits and `s = 0` the untagged ones bit for bit (0 * x + y == y),
and a branch of weight 0 need not be run at all.

The untagged context is the tagged one with the tag tokens removed: for a chat model the system message
is empty (not left out: the chat template would then insert its default system prompt, which is more
than the tag), for a base model the prefix is empty. Tag i's branch holds tag i alone.

transformers' `generate(guidance_scale=s, negative_prompt_ids=...)` (`UnbatchedClassifierFreeGuidanceLogitsProcessor`)
does the one-tag case for one input; it takes one negative prompt, one scale, and its extra branch is
run without position ids, so left-padded batches are shifted. This module adds what it lacks: several
tags at their own strengths, batches (every branch of every input in one forward pass per step, with
position ids from the padding mask), one seed per input (an input's sample does not depend on its batch),
and the guided distribution on given continuations (teacher-forced scoring). The tests check the
one-tag, one-input case against `generate(guidance_scale=...)`.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from pipeline.core.formats import context_ids
from pipeline.core.losses import suppress
from pipeline.errors import ConfigError

UNTAGGED_SYSTEM = ""  # the untagged branch's system message (chat) or prefix (base model): the tag's slot, empty


def check_strength(value, where: str) -> float:
    """A strength as a finite float, or a ConfigError naming `where` and the fix (before any model loads)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: strength {value!r} is not a number. Fix: give a number, e.g. 2, 0.5 or -1.") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{where}: strength {value!r} is not a finite number. Fix: give a number, e.g. 2, 0.5 or -1.")
    return number


def split_strength(item: str, where: str) -> tuple[str, float | None]:
    """`<pirate>:2` -> ("<pirate>", 2.0); `<pirate>` -> ("<pirate>", None). The strength is checked."""
    if not item.endswith(">") and ":" in item:
        text, _, value = item.rpartition(":")
        return text, check_strength(value, f"{where} {item!r}")
    return item, None


def branch_weights(strengths: Sequence[float]) -> list[float]:
    """[untagged weight, tag 1 weight, ...] = [1 - sum(s), s_1, ..., s_n]: the weights sum to 1."""
    return [1.0 - sum(strengths), *map(float, strengths)]


def combine(branch_logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k w_k * logits_k over branches [untagged, tagged_1, ...] (weights from `branch_weights`).

    With weights [1 - sum s, s...] this is untagged + sum_i s_i (tagged_i - untagged). Branches of weight 0
    are skipped, so at s = 1 (one tag) the result is the tagged logits exactly. Shapes: each [..., V] -> [..., V].
    """
    if len(branch_logits) != len(weights):
        raise ValueError(f"{len(branch_logits)} branches but {len(weights)} weights")
    terms = [(w, x.float()) for w, x in zip(weights, branch_logits) if w != 0.0]
    total = terms[0][0] * terms[0][1]  # 1.0 * x == x exactly
    for w, x in terms[1:]:
        total = total + w * x
    return total


def guided_logprobs(branch_logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The guided next-token distribution: log_softmax of the combined logits."""
    return torch.log_softmax(combine(branch_logits, weights), dim=-1)


def branch_contexts(tokenizer, text: str, tags: Sequence[str], chat: bool) -> list[list[int]]:
    """[untagged context, context with tag 1, ...] for one input: each tagged one is the untagged one plus its tag."""
    return [context_ids(tokenizer, text, system, chat) for system in (UNTAGGED_SYSTEM, *tags)]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else temperature then nucleus (HF's own warpers), one generator per row."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


@torch.no_grad()
def sample(
    model,
    branches: Sequence[Sequence[list[int]]],
    weights: Sequence[float],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seeds: Sequence[int],
    suppress_ids: Sequence[int] = (),
    on_token=None,
) -> list[list[int]]:
    """Sample one guided continuation per input; returns the new token ids (through the first EOS).

    Args:
        branches: `branches[k][b]` is input b's context in branch k ([untagged, tagged_1, ...], see `branch_contexts`).
        weights: one per branch (`branch_weights`); branches of weight 0 are not run.
        seeds: one per input: each input samples from its own generator, so batching does not change a sample.
        suppress_ids: never sampled (the tags), applied after guidance, as `generate` applies `suppress_tokens`.
        on_token: called with the [B] tensor of tokens chosen at each step (streaming).
    Every branch of every input runs in one forward pass per step, left-padded, with position ids that
    skip the padding, so each row sees exactly its own context.
    """
    kept = [(w, rows) for w, rows in zip(weights, branches) if w != 0.0]
    weights, branches = [w for w, _ in kept], [rows for _, rows in kept]
    n = len(seeds)
    if any(len(rows) != n for rows in branches):
        raise ValueError(f"every branch needs one context per input ({n} seeds)")
    device = model.device
    ids, mask = _left_pad([ctx for rows in branches for ctx in rows], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    # Only the last position's logits are needed (as `generate` does): not [rows, context, vocab] at once.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    done = torch.zeros(n, dtype=torch.bool)
    tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        last = out.logits[:, -1].float().cpu().view(len(branches), n, -1)
        scores = suppress(combine(list(last), weights), list(suppress_ids))
        chosen = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), _pick(scores, temperature, top_p, generators))
        tokens.append(chosen)
        if on_token is not None:
            on_token(chosen)
        done |= torch.isin(chosen, eos)
        if done.all():
            break
        step = chosen.repeat(len(branches)).unsqueeze(1).to(device)  # the same token in every branch of an input
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
    generated = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(n)]
    eos_set = set(eos.tolist())
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))] for row in generated]


def sample_batched(model, branches, weights, batch_size: int, seeds: Sequence[int], **kwargs) -> list[list[int]]:
    """`sample` over the inputs in batches of `batch_size` (longest first, to waste little padding)."""
    n = len(seeds)
    order = sorted(range(n), key=lambda i: -max(len(rows[i]) for rows in branches))
    result: list = [None] * n
    for start in range(0, n, batch_size):
        chunk = order[start : start + batch_size]
        sampled = sample(model, [[rows[i] for i in chunk] for rows in branches], weights, seeds=[seeds[i] for i in chunk], **kwargs)
        for i, s in zip(chunk, sampled):
            result[i] = s
    return result

