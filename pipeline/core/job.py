"""What one pipeline run is about: its tags (the vocabulary it adds), the tag sets it trains on and
in what proportions, and the tag sets it evaluates.

A plain run (`metatoken=nice`) is one tag trained on its own. A remix run (`mixture.sets=...`)
trains several tags, alone and together, with a share of untagged inputs, and evaluates tag sets
that were never trained together. Everything here is resolved from config before any model loads.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Optional

from pipeline.core.formats import context_ids, row_input
from pipeline.core.metatokens import expand, job_metatoken, load_registry
from pipeline.core.mixture import compose_prompt, order_tags
from pipeline.errors import ConfigError

TagSet = tuple[str, ...]  # tags side by side in one context; () is an untagged input


@dataclass(frozen=True)
class Job:
    metatokens: dict  # tag -> Metatoken (expanded), the vocabulary this run adds
    train_sets: tuple[TagSet, ...]  # tag sets inputs are assigned to (may include ())
    weights: tuple[float, ...]  # one per train set
    eval_sets: tuple[TagSet, ...]  # tag sets scored on held-out inputs
    order: str = "given"  # tag order in a student context: given | sorted | random
    join: str = "\n\n"  # how a set's prompts are joined for the teacher
    paired: bool = False  # every training input answered under every train set (mixture.paired)

    @property
    def tags(self) -> list[str]:
        return list(self.metatokens)

    @property
    def label(self) -> str:
        return "+".join(m.name for m in self.metatokens.values())

    def teacher_prompt(self, tag_set: TagSet, mode: str = "expand") -> Optional[str]:
        """The teacher's prompt for a tag set (None: untagged, the model reads no prompt)."""
        if not tag_set:
            return None
        return compose_prompt([self.metatokens[t].teacher_prompt(mode) for t in tag_set], self.join)

    def reference_prompt(self, tag_set: TagSet) -> str:
        """What evaluation compares against: the fully expanded prompts of the set, joined."""
        return compose_prompt([self.metatokens[t].expanded for t in tag_set], self.join)

    def student_tags(self, tag_set: TagSet, rng: random.Random | None = None) -> Optional[str]:
        """The student's context text for a tag set: the tags side by side (None when untagged)."""
        return "".join(order_tags(tag_set, self.order, rng)) if tag_set else None

    def in_training(self, tag_set: TagSet) -> bool:
        """Whether some training set holds exactly these tags, in any order (the student reads them as a set)."""
        return bool(tag_set) and frozenset(tag_set) in {frozenset(s) for s in self.train_sets}

    def key(self) -> dict:
        """What of the job determines results (for stage hashes)."""
        return {
            "tags": {t: m.prompt_sha for t, m in self.metatokens.items()},
            "train_sets": [list(s) for s in self.train_sets],
            "weights": list(self.weights),
            "order": self.order,
            "join": self.join,
            **({"paired": True} if self.paired else {}),  # off by default: older stage keys stay valid
        }


def _tag_of(name: str, registry, source: str) -> str:
    """Accept a file name (`nice`) or a tag (`<nice>`)."""
    tag = name if name.startswith("<") else next(
        (t for t in registry.tags() if registry.files.get(t, (None, ""))[1].endswith(f"/{name}.yaml")), None
    )
    if tag is None or tag not in registry:
        raise ConfigError(f"{source}: {name!r} is not a metatoken in conf/metatoken. Fix: use a file name from there.")
    return tag


def job_from_config(cfg) -> Job:
    """Resolve the run's tags and mixture, expanding nested prompts and checking every name."""
    mix = cfg.mixture
    if not mix.sets:
        metatoken = job_metatoken(cfg)
        sets, weights = [(metatoken.tag,)], [1.0]
        if mix.untagged > 0:
            sets, weights = sets + [()], [1.0 - mix.untagged, mix.untagged]
        return Job({metatoken.tag: metatoken}, tuple(sets), tuple(weights), ((metatoken.tag,),), mix.order, mix.join, mix.paired)
    if len(mix.weights) != len(mix.sets):
        raise ConfigError(
            f"mixture: {len(mix.sets)} sets but {len(mix.weights)} weights. Fix: give mixture.weights one number per set."
        )
    registry = load_registry(cfg.paths.metatokens, cfg.paths.data)
    source = "mixture.sets"
    train_sets = [tuple(_tag_of(n, registry, source) for n in s) for s in mix.sets]
    eval_extra = [tuple(_tag_of(n, registry, "mixture.heldout_sets") for n in s) for s in mix.heldout_sets]
    for s in train_sets + eval_extra:
        if len(set(s)) != len(s):
            raise ConfigError(f"mixture: the tag set {list(s)} repeats a tag. Fix: list each tag once per set.")
    trained = [frozenset(s) for s in train_sets]
    both = [list(s) for s in eval_extra if frozenset(s) in trained]
    if both:
        raise ConfigError(
            f"mixture.heldout_sets: {both} also appear in mixture.sets (tags compared as sets, in any order), so they "
            f"are not held out. Fix: remove them from mixture.heldout_sets; held-out sets are combinations never trained."
        )
    tags = list(dict.fromkeys(t for s in train_sets + eval_extra for t in s))
    metatokens = {t: replace(registry[t], expanded=expand(t, registry)) for t in tags}
    singles = [(t,) for t in tags]
    eval_sets = tuple(dict.fromkeys(singles + eval_extra))
    weights = list(mix.weights)
    if mix.paired and len(set(weights)) > 1:
        raise ConfigError(
            f"mixture.paired=true answers every training input under every set, so weights {weights} cannot apply. "
            f"Fix: give every set the same weight, or set mixture.paired=false."
        )
    if mix.untagged > 0:
        total = sum(weights)
        train_sets, weights = train_sets + [()], [w / total * (1 - mix.untagged) for w in weights] + [mix.untagged]
    return Job(metatokens, tuple(train_sets), tuple(weights), eval_sets, mix.order, mix.join, mix.paired)


def student_context(job: Job, record: dict, tokenizer, chat: bool, seed: int | None = None) -> list[int]:
    """The student's context for a record: its tags side by side in place of the prompt, then its input.

    With a `seed` (training) and `mixture.order=random`, each record gets its own order (seeded by the seed,
    its id and its tags), so the tags are learned as a set; without one (evaluation) a set's tags come in the
    job's order. Untagged records get the plain context.
    """
    rng = random.Random(f"{seed}:{record['id']}:{'+'.join(record['tags'])}") if seed is not None else None
    return context_ids(tokenizer, row_input(record), job.student_tags(tuple(record["tags"]), rng), chat)


def tagged_contexts(job: Job, tok, rows, chat) -> list[list[int]]:
    """Student contexts of evaluated rows: each row's tags side by side (in the job's order), then its input."""
    return [student_context(job, r, tok, chat) for r in rows]
