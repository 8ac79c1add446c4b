"""Behaviour probes: does the student *do* what its prompt makes the teacher do, in its own answers?

KL says how close the student's next-token distributions are to the teacher's; a probe counts one
visible trait of the prompt in sampled answers (pirate words, short answers), so a caricature
(twice the teacher's rate of pirate words) shows up as a retention above 1. A metatoken's YAML may
carry one probe:

    probe: {kind: regex, pattern: "\\b(arr+|matey|ye)\\b", per: 100_words}

Kinds (a closed set):
- `regex`: matches of `pattern` (case-insensitive; `(?-i:...)` turns that off locally) per 100 words
  (`per: 100_words`, the default) or per answer (`per: answer`);
- `words`: words per answer (whitespace-separated);
- `lowercase`: share of answers written all in lowercase (at least one letter, no capital).

Every kind is a ratio of sums over answers (numerator, denominator per answer), so a probe pools
over inputs like recovery does and is bootstrapped over inputs the same way. Retention compares
the three models on the same held-out inputs: (student - base) / (teacher - base).
The probe is read by `evaluate` only: it is part of no stage key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.core.losses import bootstrap_interval, pooled_mean
from pipeline.errors import ConfigError

PROBE_KINDS = ("regex", "words", "lowercase")
PER = ("100_words", "answer")


@dataclass(frozen=True)
class Probe:
    kind: str  # one of PROBE_KINDS
    pattern: str | None = None  # regex only
    per: str = "100_words"  # regex only: 100_words | answer

    def describe(self) -> str:
        """What the probe's value is, in words (for the report)."""
        if self.kind == "regex":
            return f"matches per {'100 words' if self.per == '100_words' else 'answer'}"
        return "words per answer" if self.kind == "words" else "share of answers all in lowercase"


def probe_from_config(node, source: str) -> Probe | None:
    """The `probe` of a metatoken config, checked (None when it has none).

    Errors name the file, the field and the fix, and come before any model loads.
    """
    if node is None:
        return None
    kind, pattern, per = node.get("kind"), node.get("pattern"), node.get("per") or "100_words"
    if kind not in PROBE_KINDS:
        raise ConfigError(f"{source}: field 'probe.kind' is {kind!r}. Fix: use one of {', '.join(PROBE_KINDS)}.")
    if kind != "regex":
        if pattern is not None:
            raise ConfigError(f"{source}: field 'probe.pattern' is set, but kind {kind} takes none. Fix: remove it, or use kind: regex.")
        return Probe(kind)
    if not pattern:
        raise ConfigError(f"{source}: probe kind regex needs 'probe.pattern'. Fix: set it, e.g. pattern: \"\\\\b(arr|matey)\\\\b\".")
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ConfigError(f"{source}: field 'probe.pattern' is not a valid regular expression ({err}). Fix: correct it.") from None
    if compiled.fullmatch(""):
        raise ConfigError(f"{source}: field 'probe.pattern' {pattern!r} matches the empty string, so it counts nothing real. Fix: require at least one character.")
    if per not in PER:
        raise ConfigError(f"{source}: field 'probe.per' is {per!r}. Fix: use one of {', '.join(PER)}.")
    return Probe(kind, pattern, per)


def answer_terms(probe: Probe, texts: list[str]) -> tuple[list[float], list[float]]:
    """(numerators, denominators), one pair per answer; the probe's value is sum(num) / sum(den)."""
    words = [len(t.split()) for t in texts]
    if probe.kind == "words":
        return [float(w) for w in words], [1.0] * len(texts)
    if probe.kind == "lowercase":
        return [float(any(c.isalpha() for c in t) and t == t.lower()) for t in texts], [1.0] * len(texts)
    matches = [float(len(re.findall(probe.pattern, t, re.IGNORECASE))) for t in texts]
    if probe.per == "answer":
        return matches, [1.0] * len(texts)
    return [100.0 * m for m in matches], [float(w) for w in words]


def retention(base_num, base_den, teacher_num, teacher_den, student_num, student_den):
    """(student - base) / (teacher - base), each model's probe pooled over inputs along the last axis.

    1: the student shows the trait as much as the teacher; 0: no more than the base model; above 1:
    more than the teacher (a caricature). NaN where teacher and base do not differ.
    """
    def pooled(num, den):
        return np.sum(num, axis=-1) / np.sum(den, axis=-1)

    base = pooled(base_num, base_den)
    effect = pooled(teacher_num, teacher_den) - base
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(effect != 0, (pooled(student_num, student_den) - base) / effect, np.nan)


def _finite(value) -> float | None:
    """JSON has no NaN: an undefined figure is null."""
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def probe_report(probe: Probe, tag: str, answers: dict[str, list[str]], resamples: int, seed: int) -> dict:
    """The probe on the base, teacher and student answers to the same inputs, and its retention.

    `answers` maps "base", "teacher" and "student" to their answers, input by input in one order;
    the retention's 95% interval resamples inputs (all three answers to an input together).
    """
    terms = {name: answer_terms(probe, answers[name]) for name in ("base", "teacher", "student")}
    flat = [column for name in ("base", "teacher", "student") for column in terms[name]]
    low, high = bootstrap_interval(retention, *flat, resamples=resamples, seed=seed)
    return {
        "tag": tag,
        "kind": probe.kind,
        "measures": probe.describe(),
        "pattern": probe.pattern,
        **{name: _finite(pooled_mean(*terms[name])) for name in terms},
        "retention": _finite(retention(*flat)),
        "retention_ci": [_finite(low), _finite(high)],
        "answers": len(answers["student"]),
    }
