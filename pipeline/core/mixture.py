"""Remixing: contexts that carry several tags at once, and how much data each tag set gets.

A training mixture is a list of tag sets with weights, plus a share of untagged inputs (which keep
the model's untagged behaviour in place). A paired mixture answers every training input under every
tag set instead, so the tag is the only difference between the examples of one input. The teacher's prompt for a set is the composition of
its tags' prompts, joined in a configured order; the student reads the tags side by side.
These are pure functions so their proportions and orders can be tested exactly.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from pipeline.errors import ConfigError


def compose_prompt(prompts: Sequence[str], join: str = "\n\n") -> str:
    """The teacher's prompt for a tag set: the members' (expanded) prompts, in the given order."""
    return join.join(p.strip() for p in prompts)


def order_tags(tags: Sequence[str], order: str, rng: random.Random | None = None) -> list[str]:
    """Tag order in a context: `given` (as configured), `sorted` (alphabetical), `random` (per example)."""
    if order == "given":
        return list(tags)
    if order == "sorted":
        return sorted(tags)
    if order == "random":
        shuffled = list(tags)
        (rng or random.Random(0)).shuffle(shuffled)
        return shuffled
    raise ConfigError(f"mixture.order is {order!r}. Fix: use given, sorted or random.")


def assign_sets(row_ids: Sequence[str], sets: Sequence[tuple[str, ...]], weights: Sequence[float], seed: int):
    """Give each input one tag set (an empty tuple = untagged), drawn with the mixture's weights.

    The draw for a row depends only on its id and the seed, so adding rows leaves earlier
    assignments unchanged.
    """
    if len(sets) != len(weights) or not sets:
        raise ConfigError("mixture: every tag set needs a weight. Fix: list `sets` and their `weights` pairwise.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"mixture weights {list(weights)} must be non-negative with a positive sum.")
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)
    assigned = []
    for row_id in row_ids:
        u = random.Random(f"{seed}:{row_id}").random()
        index = next((i for i, c in enumerate(cumulative) if u < c), len(sets) - 1)
        assigned.append(tuple(sets[index]))
    return assigned


def pair_sets(row_ids: Sequence[str], tagged_sets: Sequence[tuple[str, ...]], untagged: float, seed: int):
    """Paired mixture: every input gets every tagged set, and a seeded share `untagged` of inputs also untagged.

    Returns one tuple of tag sets per row. As in `assign_sets`, a row's draw depends only on its id and
    the seed.
    """
    if not tagged_sets:
        raise ConfigError("mixture.paired needs at least one tag set. Fix: list them in mixture.sets.")
    if not 0 <= untagged < 1:
        raise ConfigError(f"mixture.untagged is {untagged}. Fix: use a share in [0, 1).")
    paired = []
    for row_id in row_ids:
        plain = untagged > 0 and random.Random(f"{seed}:{row_id}").random() < untagged
        paired.append(tuple(tagged_sets) + (((),) if plain else ()))
    return paired
