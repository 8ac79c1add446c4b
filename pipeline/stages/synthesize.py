"""Stage 0, synthesize: the model writes its own training requests, so training inputs have no ceiling.

(`inputs.synthetic.kind=openings`: openings of texts instead, for a base model that continues documents.)

The shipped file holds a few hundred human-written requests; distillation needs more (the fidelity
study in docs/fidelity.md shows recovery rising with the number of training inputs). Here the base
model itself (no prompt, no tag) continues numbered lists of real training requests (self-instruct);
a share of the lists is headed by what the tag's assistant does (its description), for requests on
the tag's own topic. Each answer is cleaned to one request, and exact
and near-duplicates are removed, among themselves and against every shipped input, so the
human-written held-out inputs that evaluation uses are never duplicated by a training input.

The output is a JSONL file of {"id", "text"} rows (`syn-00000`, ...) in the stage folder; `generate`
adds its rows to the shipped training split. Off by default (`inputs.synthetic.count=0`).

    python -m pipeline stage=synthesize metatoken=pirate inputs.synthetic.count=1000
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

from pipeline.core import models  # models.load_model at call time: the tests' no-weights guard replaces it there
from pipeline.core.data import is_heldout, load_inputs
from pipeline.core.formats import context_ids
from pipeline.core.job import Job
from pipeline.core.sampling import sample_all
from pipeline.errors import ConfigError
from pipeline.runtime import outputs
from pipeline.stages.paths import StagePaths

log = logging.getLogger(__name__)
FILE = "inputs.jsonl"

# A seed is the opening of a numbered list of real (training) requests; the model writes the next
# item. Read as plain text, not as a chat: asked in a chat for "a request", a small model writes about
# assistants, or answers in the persona it was shown, instead of writing a request to one.
HEADER = "A list of messages that people sent to an AI assistant, on many different topics.\n\n"
TAG_HEADER = "A list of messages that people sent to an AI assistant that {description}.\n\n"
# kind=openings: the first sentences of texts for a base model to continue. A tag's description says how a text is
# written, not what it is about, so these lists are never headed by it.
OPENINGS_HEADER = ("A list of the opening sentences of many different texts: news reports, stories, encyclopedia "
                   "entries, recipes, reviews, letters, essays.\n\n")
HEADERS = {"requests": (HEADER, TAG_HEADER), "openings": (OPENINGS_HEADER, OPENINGS_HEADER)}
EXAMPLES_PER_SEED = 5
_LEAD_IN = re.compile(r"^(sure|here|okay|ok|certainly|of course)\b[^:\n]*:\s*", re.IGNORECASE)


def seeds(descriptions: list[str], examples: list[str], count: int, tag_share: float, seed: int, kind: str = "requests") -> list[str]:
    """`count` list openings, each of `EXAMPLES_PER_SEED` examples drawn from `examples`; a `tag_share`
    of them names what a tag's assistant does (one of `descriptions`), for requests on its own topic."""
    header_plain, header_tag = HEADERS[kind]
    rng = random.Random(seed)
    described = [d.strip().rstrip(".") for d in descriptions if d.strip()]
    out = []
    for _ in range(count):
        shown = rng.sample(examples, min(EXAMPLES_PER_SEED, len(examples)))
        header = header_plain
        if described and rng.random() < tag_share:
            header = header_tag.format(description=rng.choice(described))
        out.append(header + "".join(f"{i + 1}. {e}\n" for i, e in enumerate(shown)) + f"{len(shown) + 1}.")
    return out


def clean_request(text: str, min_words: int, max_words: int) -> str | None:
    """One request out of the model's answer, or None when the answer is no usable request.

    Drops a lead-in ("Sure, here is a question:"), quotes, and everything after the first line;
    keeps answers of `min_words`..`max_words` words that end like a sentence.
    """
    text = text.strip().split("\n")[0].strip()
    text = _LEAD_IN.sub("", text).strip().strip('"“”').strip()
    if not text or ("<" in text and ">" in text):  # no markup or tag-like strings in a training input
        return None
    words = text.split()
    if not min_words <= len(words) <= max_words or text[-1] not in ".?!":
        return None
    return text


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def shingles(text: str, n: int = 3) -> frozenset:
    """Word n-grams of the normalised text (the whole text when it is shorter than n words)."""
    words = normalise(text).split()
    return frozenset(tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1)))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def deduplicate(candidates: list[str], existing: list[str], threshold: float) -> list[str]:
    """Candidates in order, without exact or near-duplicates (Jaccard of word 3-grams >= threshold)
    of each other or of any `existing` text."""
    seen_exact = {normalise(t) for t in existing}
    kept_shingles = [shingles(t) for t in existing]
    kept = []
    for text in candidates:
        exact = normalise(text)
        if exact in seen_exact:
            continue
        sh = shingles(text)
        if any(jaccard(sh, other) >= threshold for other in kept_shingles):
            continue
        seen_exact.add(exact)
        kept_shingles.append(sh)
        kept.append(text)
    return kept


def check_config(syn_cfg) -> None:
    """Values that would waste a whole synthesis run, caught before any model loads."""
    where = "inputs.synthetic"
    if syn_cfg.count < 0:
        raise ConfigError(f"{where}.count is {syn_cfg.count}. Fix: 0 (off) or the number of training inputs to write.")
    if not 0.0 <= syn_cfg.tag_share <= 1.0:
        raise ConfigError(f"{where}.tag_share is {syn_cfg.tag_share}. Fix: a share between 0 and 1.")
    if not 0.0 < syn_cfg.near_duplicate <= 1.0:
        raise ConfigError(f"{where}.near_duplicate is {syn_cfg.near_duplicate}. Fix: a Jaccard threshold in (0, 1].")
    if not 1 <= syn_cfg.min_words <= syn_cfg.max_words:
        raise ConfigError(f"{where}.min_words/max_words are {syn_cfg.min_words}/{syn_cfg.max_words}. Fix: 1 <= min <= max.")
    if syn_cfg.max_rounds < 1 or syn_cfg.max_new_tokens < 1:
        raise ConfigError(f"{where}.max_rounds and max_new_tokens must be >= 1. Fix: raise them.")


def write_requests(model, tokenizer, job: Job, cfg, work: Path) -> tuple[list[dict], int]:
    """Sample rounds of requests until `count` unique ones are kept (each round's answers are a shard,
    so a killed run resumes); returns the rows and how many answers were sampled."""
    syn = cfg.inputs.synthetic
    # The sampler's settings: the HF sampler with the shared-prefix cache (the seeds share the system message).
    sampling = SimpleNamespace(
        backend="hf", prompt_cache=True, batch_size=syn.batch_size, max_new_tokens=syn.max_new_tokens,
        temperature=syn.temperature, top_p=syn.top_p, logprobs_top_k=1, seed=syn.seed,
    )
    shipped_rows = [r for r in load_inputs(cfg.inputs.file) if not r.get("messages")]  # requests are the examples
    shipped = [r["text"] for r in shipped_rows]
    # Only training rows are shown as examples: held-out inputs must stay unseen.
    examples = [r["text"] for r in shipped_rows if not is_heldout(r["id"], cfg.inputs.heldout_fraction)]
    kept: list[str] = []
    sampled = 0
    for round_index in range(syn.max_rounds):
        need = syn.count - len(kept)
        if need <= 0:
            break
        # Ask for more than needed: a share of answers is no usable request or a duplicate.
        batch = seeds([cfg.metatoken.description], examples, int(need * syn.oversample) + 1, syn.tag_share,
                      syn.seed * 7919 + round_index, syn.kind)
        contexts = [context_ids(tokenizer, s, None, chat=False) for s in batch]  # a text to continue
        answers = sample_all(model, tokenizer, contexts, sampling, f"synthesize round {round_index}", work / f"round-{round_index}")
        sampled += len(answers)
        texts = [tokenizer.decode(a["output_ids"], skip_special_tokens=True) for a in answers]
        cleaned = [c for c in (clean_request(t, syn.min_words, syn.max_words) for t in texts) if c]
        kept += deduplicate(cleaned, shipped + kept, syn.near_duplicate)[:need]
    if len(kept) < syn.count:
        raise ConfigError(
            f"synthesize: {len(kept)} unique requests after {syn.max_rounds} rounds ({sampled} answers), "
            f"{syn.count} asked for. Fix: raise inputs.synthetic.max_rounds or oversample, or ask for fewer."
        )
    return [{"id": f"syn-{i:05d}", "text": t} for i, t in enumerate(kept)], sampled


def run(cfg, job: Job, paths: StagePaths) -> Path | None:
    """Write `inputs.synthetic.count` requests (nothing to do when it is 0)."""
    if cfg.inputs.synthetic.count == 0:
        log.info("synthesize: inputs.synthetic.count=0, nothing to do")
        return None
    check_config(cfg.inputs.synthetic)
    out_dir = paths["synthesize"]
    model_path = models.start_model_path(cfg)
    tokenizer = models.load_tokenizer(model_path)
    model = models.load_model(model_path, cfg.model.dtype, cfg.model.device)
    with outputs.atomic_stage_dir(out_dir, "synthesize", paths.key("synthesize"), keep_partial=True, config=cfg) as (work, manifest):
        rows, sampled = write_requests(model, tokenizer, job, cfg, work)
        (work / FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        for shards in work.glob("round-*"):  # the file holds every kept request
            shutil.rmtree(shards)
        manifest.update(count=len(rows), sampled=sampled, model_path=model_path)
    log.info("synthesize: %d requests (%d answers sampled) -> %s", len(rows), sampled, out_dir)
    return out_dir


def synthetic_rows(cfg, paths: StagePaths) -> list[dict]:
    """The synthesized training rows for this config ([] when off); generate adds them to its train split."""
    if cfg.inputs.synthetic.count == 0:
        return []
    outputs.require({"synthesize": paths["synthesize"]}, by="generate")
    return load_inputs(paths["synthesize"] / FILE)
