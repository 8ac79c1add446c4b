"""Evaluation contexts: does a tag keep working on kinds of input it was never trained on?

`evaluate.contexts` names input sets beyond the held-out requests (default: none):
- `documents`: the shipped document openings (data/inputs/documents.jsonl), each given as a user turn;
- `conversations`: the shipped conversations (data/inputs/conversations.jsonl), the prompt or tag where
  `inputs.prompt_position` puts it;
- `long`: a held-out request after a pasted passage of 300+ tokens (shipped document openings joined);
- `plain`: the document openings as plain text to continue, with no chat template whatever `model.chat`
  says (the prompt or the tags ahead of the text, as a base model reads them): a chat-trained tag outside
  the chat format, and for a base model (`model.chat=false`) its own format.
Inputs the run trained on are left out. For each context and each evaluated tag set the base model
reading the set's fully expanded prompt (the reference teacher) answers up to `evaluate.context_examples`
inputs with generate's sampling settings; then, teacher-forced on those answers, full vocabulary:
    recovery = 1 - KL(teacher || student with the tags) / KL(teacher || base without prompt),
with its 95% bootstrap interval over the context's inputs, and
    transfer = context recovery / held-out recovery (1: the tag works there as well as where it was trained),
whose interval resamples both input sets, each on its own (they are different inputs).

    python -m pipeline experiment=demo "evaluate.contexts=[documents,conversations,long]"
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from datasets import load_from_disk

from pipeline.core.data import is_heldout, load_inputs
from pipeline.core.formats import context_ids, row_input
from pipeline.core.job import tagged_contexts
from pipeline.core.losses import percentile_interval, pooled_recovery
from pipeline.core.probes import probe_report
from pipeline.core.sampling import sample_answers
from pipeline.core.scoring import continuation_logits, kl_figures, token_kls
from pipeline.errors import ConfigError
from pipeline.runtime.formatting import interval, label, number
from pipeline.runtime.outputs import file_sha

NAMES = ("documents", "conversations", "long", "plain")
LONG_PASSAGE_TOKENS = 300  # the passage ahead of a long input's request is at least this long (in the model's tokens)
FILES = {"documents": "documents.jsonl", "conversations": "conversations.jsonl", "plain": "documents.jsonl"}


# ---------------------------------------------------------------- the math (pure)


def transfer_interval(ctx_residual, ctx_effect, held_residual, held_effect, resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of recovery(context) / recovery(held-out), from per-input KL sums.

    The two input sets are different inputs, so each resample draws each set's inputs on its own (with
    replacement, the same count as it has), and the ratio of the two token-weighted recoveries is recomputed.
    Resamples where the held-out recovery is 0 (ratio undefined) are left out.
    """
    rng = np.random.default_rng(seed)
    cr, ce, hr, he = (np.asarray(a, dtype=np.float64) for a in (ctx_residual, ctx_effect, held_residual, held_effect))
    if not len(cr) or not len(hr):
        return float("nan"), float("nan")
    ci, hi = rng.integers(0, len(cr), size=(resamples, len(cr))), rng.integers(0, len(hr), size=(resamples, len(hr)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = pooled_recovery(cr[ci], ce[ci]) / pooled_recovery(hr[hi], he[hi])
    return percentile_interval(ratio, level)


def long_input(passage: str, request: str) -> str:
    """A long input: the pasted passage, then the request (a user pastes first and asks after)."""
    return f"{passage}\n\n{request}"


# ---------------------------------------------------------------- inputs


def check(cfg) -> None:
    """Every named context exists and its file is there (before any model loads)."""
    for name in cfg.evaluate.contexts:
        if str(name) not in NAMES:
            raise ConfigError(f"evaluate.contexts: {name!r} is not a context. Fix: use some of {', '.join(NAMES)}.")
    for name in {str(n) for n in cfg.evaluate.contexts}:
        path = Path(cfg.paths.data) / "inputs" / FILES.get(name, FILES["documents"])
        if not path.is_file():
            raise ConfigError(f"evaluate.contexts: {name} reads {path}, which does not exist. Fix: restore the shipped file or drop {name}.")


def key(cfg) -> dict:
    """What the contexts read (their files' contents), for the evaluate key when any context is asked for."""
    names = {str(n) for n in cfg.evaluate.contexts}
    files = {FILES.get(n, FILES["documents"]) for n in names} | ({"requests"} if "long" in names else set())
    return {f: file_sha(cfg.inputs.file if f == "requests" else Path(cfg.paths.data) / "inputs" / f) for f in sorted(files)}


def context_rows(name: str, cfg, tokenizer, trained_ids: set) -> list[dict]:
    """Up to `evaluate.context_examples` rows ({"id", "input", maybe "messages", "position"}) never trained on."""
    inputs = Path(cfg.paths.data) / "inputs"
    position = str(cfg.inputs.prompt_position)
    if name == "long":
        docs = load_inputs(inputs / FILES["documents"])
        passage, i = "", 0
        while len(tokenizer(passage, add_special_tokens=False)["input_ids"]) < LONG_PASSAGE_TOKENS:
            if i == len(docs):
                raise ConfigError(f"{inputs / FILES['documents']}: its openings are under {LONG_PASSAGE_TOKENS} tokens together. Fix: restore the shipped file.")
            passage, i = (passage + "\n\n" + docs[i]["text"]).strip(), i + 1
        requests = [r for r in load_inputs(cfg.inputs.file) if not r.get("messages") and is_heldout(r["id"], cfg.inputs.heldout_fraction)]
        rows = [{"id": f"long-{r['id']}", "text": long_input(passage, r["text"])} for r in requests if r["id"] not in trained_ids]
    else:
        rows = [r for r in load_inputs(inputs / FILES[name]) if r["id"] not in trained_ids]
    rows = rows[: cfg.evaluate.context_examples]
    return [{"id": r["id"], "input": r["text"], **({"messages": r["messages"]} if r.get("messages") else {}),
             **({"position": position} if position != "system" else {})} for r in rows]


# ---------------------------------------------------------------- scoring (evaluate's hooks)


def chat_of(name: str, cfg) -> bool:
    """Whether a context's inputs go through the chat template: `plain` never does."""
    return False if name == "plain" else cfg.model.chat


def has_probe(job, tag_set) -> bool:
    return any(job.metatokens[t].probe for t in tag_set)


def reference(base, tok, job, cfg, trained_ids: set) -> dict:
    """name -> set -> {"rows", "teacher" logits, "effect_tokens"}: the reference teacher's answers on each context.

    Where a tag of the set has a probe, the base model also answers each input without prompt
    (`base_output` in the rows), for the probe's retention.
    """
    bs, scored = cfg.evaluate.batch_size, {}
    for name in (str(n) for n in cfg.evaluate.contexts):
        chat = chat_of(name, cfg)
        rows = context_rows(name, cfg, tok, trained_ids)
        if not rows:
            raise ConfigError(f"evaluate.contexts: {name} has no input the run did not train on. Fix: drop {name}.")
        scored[name] = {}
        plain_ctx = [context_ids(tok, row_input(r), None, chat) for r in rows]
        base_answers = None
        for tag_set in job.eval_sets:
            teacher_ctx = [context_ids(tok, row_input(r), job.reference_prompt(tag_set), chat) for r in rows]
            texts, outs = sample_answers(base, tok, teacher_ctx, cfg.generate, [])
            if has_probe(job, tag_set) and base_answers is None:  # one untagged answer per input serves every set
                base_answers = sample_answers(base, tok, plain_ctx, cfg.generate, [])[0]
            answered = [{**r, "output_ids": o, "output": t, **({"base_output": b} if has_probe(job, tag_set) else {})}
                        for r, o, t, b in zip(rows, outs, texts, base_answers or [None] * len(rows))]
            label = f"{name} {'+'.join(tag_set)}"
            teacher = continuation_logits(base, teacher_ctx, outs, tok.pad_token_id, bs, f"teacher {label}")
            plain = continuation_logits(base, plain_ctx, outs, tok.pad_token_id, bs, f"base {label}")
            scored[name][tag_set] = {"rows": answered, "teacher": teacher, "effect_tokens": token_kls(teacher, plain)}
    return scored


def score(student, tok, job, cfg, ref: dict, tag_ids) -> dict:
    """name -> set -> {"tokens": per-token KL(teacher || student with the set's tags), one tensor per input,
    "answers": the student's sampled answers where the set has a probe, else None}."""
    residual = {}
    for name, by_set in ref.items():
        residual[name] = {}
        for tag_set, got in by_set.items():
            rows = [{**r, "tags": list(tag_set)} for r in got["rows"]]
            tagged = tagged_contexts(job, tok, rows, chat_of(name, cfg))
            logits = continuation_logits(student, tagged, [r["output_ids"] for r in rows],
                                         tok.pad_token_id, cfg.evaluate.batch_size, f"student {name} {'+'.join(tag_set)}", list(tag_ids))
            answers = sample_answers(student, tok, tagged, cfg.generate, list(tag_ids))[0] if has_probe(job, tag_set) else None
            residual[name][tag_set] = {"tokens": token_kls(got["teacher"], logits), "answers": answers}
    return residual


def figures(job, ref: dict, residual: dict, heldout_ref: dict, heldout_residual: dict, eval_cfg) -> list[dict]:
    """One entry per (context, tag set): recovery with its interval, held-out recovery, transfer with its interval,
    and the probes of the set's tags (retention with its interval) where they have one."""
    out = []
    for name, by_set in ref.items():
        for tag_set, got in by_set.items():
            sums = lambda tokens: [t.sum().item() for t in tokens]  # noqa: E731
            tokens, answers = residual[name][tag_set]["tokens"], residual[name][tag_set]["answers"]
            ce, cr = sums(got["effect_tokens"]), sums(tokens)
            he, hr = sums(heldout_ref[tag_set]["effect_tokens"]), sums(heldout_residual[tag_set])
            held = float(pooled_recovery(hr, he))
            fig = kl_figures(got["effect_tokens"], tokens, eval_cfg)
            if answers is not None:  # the probe on base / teacher / student answers to the context's inputs
                said = {"base": [r["base_output"] for r in got["rows"]], "teacher": [r["output"] for r in got["rows"]], "student": answers}
                fig["probes"] = [probe_report(job.metatokens[t].probe, t, said, eval_cfg.resamples, eval_cfg.seed)
                                 for t in tag_set if job.metatokens[t].probe]
            out.append({
                "context": name, "tags": list(tag_set), "examples": len(got["rows"]),
                "effect_kl": float(np.mean(np.concatenate([t.numpy() for t in got["effect_tokens"]]))), **fig,
                "heldout_recovery": held,
                "transfer": fig["recovery"] / held if held else None,
                "transfer_ci": list(transfer_interval(cr, ce, hr, he, eval_cfg.resamples, eval_cfg.seed)),
                "sample": {"input": got["rows"][0]["input"], "teacher": got["rows"][0]["output"]},
            })
    return out


def blocks(report: dict) -> list[tuple]:
    """The report's section on evaluation contexts (report.py's block kinds), empty when none were asked for."""
    entries = report.get("contexts")
    if not entries:
        return []
    return [
        ("h2", f"Evaluation contexts (`{label(report)}`)"),
        ("table", ["context", "tags", "inputs", "effect KL", "recovery", "95% interval", "held-out recovery", "transfer", "95% interval",
                   "probe retention", "95% interval"], [
            [e["context"], "".join(e["tags"]), str(e["examples"]), number(e["effect_kl"], 4), number(e["recovery"], 3),
             interval(e["recovery_ci"], 3), number(e["heldout_recovery"], 3), number(e["transfer"], 2), interval(e["transfer_ci"], 2),
             *probe_cells(e)]
            for e in entries]),
        ("p", "Inputs the run never trained on: **documents** (document openings given as user turns), **conversations** "
              "(multi-turn, the tag where `inputs.prompt_position` puts it), **long** (a held-out request after a pasted passage "
              f"of {LONG_PASSAGE_TOKENS}+ tokens), **plain** (document openings continued as plain text, no chat template). The reference teacher answers each; **recovery** is scored on those answers as "
              "on the held-out ones; **transfer** = recovery / held-out recovery (1: the tag works there as where it was "
              "trained), its interval resampling both input sets."),
    ]


def probe_cells(entry: dict) -> list[str]:
    """The first probe's retention and interval ("–" without a probe)."""
    probes = entry.get("probes") or []
    if not probes:
        return ["–", "–"]
    return [number(probes[0]["retention"], 2), interval(probes[0]["retention_ci"], 2)]


def trained_ids(gen_dir) -> set:
    """Ids of the inputs the run trained on (its generate dataset's training split): no context reuses them."""
    data = load_from_disk(str(gen_dir / "dataset")).select_columns(["id", "split"])
    return {i for i, s in zip(data["id"], data["split"]) if s == "train"}


ANSWERS = "context_answers.jsonl"  # in the evaluate folder: what the reference teacher wrote on each context


def write_answers(folder, ref: dict, residual: dict) -> None:
    """One line per (context, tag set, input): the teacher's answer that recovery was scored on, and where the
    set has a probe, the base model's and the student's answers that it counted."""
    with open(folder / ANSWERS, "w", encoding="utf-8") as f:
        for name, by_set in ref.items():
            for tag_set, got in by_set.items():
                students = residual[name][tag_set]["answers"] or [None] * len(got["rows"])
                for r, student in zip(got["rows"], students):
                    f.write(json.dumps({"context": name, "tags": list(tag_set), "id": r["id"], "input": r["input"],
                                        **({"messages": r["messages"]} if r.get("messages") else {}),
                                        "output": r["output"], "output_ids": r["output_ids"],
                                        **({"base_output": r["base_output"], "student_output": student} if student is not None else {})},
                                       ensure_ascii=False) + "\n")
