"""Stage 4, evaluate: how much of the prompt's effect does the tag recover, and what did it cost?

Scored on held-out inputs, teacher-forced on the teacher's own samples, with full-vocabulary
distributions computed live (not the top-k kept for training):
- effect   = KL(teacher with prompt || base model without prompt), per token;
- residual = KL(teacher with prompt || student with tag), per token;
- recovery = 1 - residual / effect (1.0: the tag does all the prompt did; 0: nothing);
- drift    = KL(base || student) on untagged held-out inputs, teacher-forced on the base model's
             own samples (what training cost elsewhere);
- prompt tokens saved per call; samples side by side: base, teacher with prompt, student with tag.
The same numbers for the freshly extended model (tag initialised, not trained) are reported as a
baseline, so the report shows what training added.

    python -m pipeline stage=evaluate metatoken=pirate
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import load_from_disk

from pipeline.core import card, contexts, crosstag, strength
from pipeline.core import report as reports
from pipeline.core.catalog import tags_of
from pipeline.core.formats import context_ids, row_input
from pipeline.core.job import Job, tagged_contexts
from pipeline.core.losses import (
    bootstrap_interval,
    pooled_recovery,
    position_means,
    recovery,
    recovery_by_position,
    token_cross_entropy,
)
from pipeline.core.models import load_model, load_tokenizer, resolve_model_path
from pipeline.core.pretrain_data import plain_texts
from pipeline.core.probes import probe_report
from pipeline.core.sampling import sample_answers, sample_student
from pipeline.core.scoring import continuation_logits, drift_figures, kl_figures, load_scored_model, mean_kl, token_kls
from pipeline.runtime import outputs
from pipeline.stages.paths import StagePaths

log = logging.getLogger(__name__)


def reference_scores(base, tok, job: Job, rows_by_set: dict, cfg, split: str) -> dict:
    """For each set: the reference teacher's logits on its rows' samples, the effect per token, the teacher's context length.

    The reference teacher is the base model reading the fully expanded prompts of the set, whatever
    teacher generated the data, so recovery means the same in every mode.
    """
    chat, bs, scored = cfg.model.chat, cfg.evaluate.batch_size, {}
    for tag_set, rows in rows_by_set.items():
        outs, name = [r["output_ids"] for r in rows], f"{split} {'+'.join(tag_set)}"
        teacher_ctx = [context_ids(tok, row_input(r), job.reference_prompt(tag_set), chat) for r in rows]
        plain_ctx = [context_ids(tok, row_input(r), None, chat) for r in rows]
        teacher = continuation_logits(base, teacher_ctx, outs, tok.pad_token_id, bs, f"teacher {name}")
        effect_tokens = token_kls(teacher, continuation_logits(base, plain_ctx, outs, tok.pad_token_id, bs, f"base {name}"))
        scored[tag_set] = {"teacher": teacher, "effect_tokens": effect_tokens, "teacher_len": sum(map(len, teacher_ctx)) / len(rows)}
    return scored


def load_rows(cfg, job: Job, gen_dir: Path) -> tuple[dict, dict]:
    """(held-out rows per evaluated set, up to `evaluate.train_examples` training rows per trained set)."""
    data = load_from_disk(str(gen_dir / "dataset"))
    data = data.remove_columns([c for c in ("topk_ids", "topk_logprobs") if c in data.column_names])  # not read here: rows stay small
    heldout = [r for r in data if r["split"] == "heldout"]
    by_set = {s: [r for r in heldout if tuple(r["tags"]) == s][: cfg.evaluate.max_examples] for s in job.eval_sets}
    if not all(by_set.values()):
        raise ValueError(f"{gen_dir}: no held-out rows to evaluate. Fix: raise inputs.heldout_fraction or inputs.max_heldout.")
    trained = {}
    if cfg.evaluate.train_examples > 0:
        train_rows = [r for r in data if r["split"] == "train" and r["tags"]]
        for s in job.eval_sets:
            rows = [r for r in train_rows if frozenset(r["tags"]) == frozenset(s)][: cfg.evaluate.train_examples]
            if rows:
                trained[s] = [{**r, "tags": list(s)} for r in rows]  # scored like held-out: the set's own tag order
    return by_set, trained


def probe_figures(job: Job, tag_set, rows: list[dict], student_answers: list[str], eval_cfg) -> list[dict]:
    """Each of the set's tags that has a probe, on base / teacher / student answers to the held-out inputs."""
    answers = {"base": [r["base_output"] for r in rows], "teacher": [r["output"] for r in rows], "student": student_answers}
    return [probe_report(job.metatokens[t].probe, t, answers, eval_cfg.resamples, eval_cfg.seed) for t in tag_set if job.metatokens[t].probe]


def score_untrained(model, tok, job: Job, cfg, heldout: dict, ref: dict, tag_ids: list[int]) -> tuple[dict, dict]:
    """The freshly extended model (tag initialised, not trained): its figures and per-token residuals per set."""
    figures, residual_tokens = {}, {}
    for tag_set, rows in heldout.items():
        contexts = tagged_contexts(job, tok, rows, cfg.model.chat)
        logits = continuation_logits(model, contexts, [r["output_ids"] for r in rows], tok.pad_token_id, cfg.evaluate.batch_size, f"init {'+'.join(tag_set)}", tag_ids)
        residual_tokens[tag_set] = token_kls(ref["heldout"][tag_set]["teacher"], logits)
        figures[tag_set] = kl_figures(ref["heldout"][tag_set]["effect_tokens"], residual_tokens[tag_set], cfg.evaluate, "init_")
    return figures, residual_tokens


def score_student(model, tok, job: Job, cfg, heldout: dict, trained: dict, ref: dict, tag_ids: list[int]):
    """The trained student: held-out and training-input recovery, contexts, probes and side-by-side samples per set."""
    chat, bs, eval_cfg = cfg.model.chat, cfg.evaluate.batch_size, cfg.evaluate
    scores, samples, residual_tokens = {}, [], {"heldout": {}, "train": {}}
    for tag_set, rows in heldout.items():
        name, contexts = "+".join(tag_set), tagged_contexts(job, tok, rows, chat)
        logits = continuation_logits(model, contexts, [r["output_ids"] for r in rows], tok.pad_token_id, bs, f"student {name}", tag_ids)
        residual_tokens["heldout"][tag_set] = token_kls(ref["heldout"][tag_set]["teacher"], logits)
        student_len = sum(map(len, contexts)) / len(rows)
        teacher_len = ref["heldout"][tag_set]["teacher_len"]
        scores[tag_set] = {
            **kl_figures(ref["heldout"][tag_set]["effect_tokens"], residual_tokens["heldout"][tag_set], eval_cfg),
            "prompt_tokens_saved": round(teacher_len - student_len), "teacher_context_tokens": teacher_len, "student_context_tokens": student_len,
        }
        if tag_set in trained:  # fit: the same scorer on inputs the student was trained on
            train_ctx = tagged_contexts(job, tok, trained[tag_set], chat)
            train_logits = continuation_logits(model, train_ctx, [r["output_ids"] for r in trained[tag_set]], tok.pad_token_id, bs, f"student train {name}", tag_ids)
            residual_tokens["train"][tag_set] = token_kls(ref["train"][tag_set]["teacher"], train_logits)
            fit = kl_figures(ref["train"][tag_set]["effect_tokens"], residual_tokens["train"][tag_set], eval_cfg, "train_")
            scores[tag_set].update(train_examples=len(trained[tag_set]), train_effect_kl=torch.cat(ref["train"][tag_set]["effect_tokens"]).mean().item(), **fit)
        # (with generate.base_samples=false there are no base answers to compare with, so no probe)
        if any(job.metatokens[t].probe for t in tag_set) and all(r["base_output_ids"] for r in rows):
            answers, _ = sample_answers(model, tok, contexts, cfg.generate, tag_ids)
            scores[tag_set]["probes"] = probe_figures(job, tag_set, rows, answers, eval_cfg)
        shown = rows[: eval_cfg.num_samples]
        texts = sample_student(model, tok, contexts[: len(shown)], cfg.generate, eval_cfg)
        samples += [
            {"id": r["id"], "tags": list(tag_set), "input": r["input"], "base": r["base_output"], "teacher": r["output"], "student": t}
            for r, t in zip(shown, texts)
        ]
    return scores, samples, residual_tokens


def pooled_over_sets(effect: dict, residual: dict, rows: dict, eval_cfg, prefix: str = "") -> dict:
    """Effect, residual and recovery token-weighted over every set's inputs, with recovery's 95% interval.

    Every evaluated set answers the same held-out inputs, so an input's KLs are summed over the sets
    and the bootstrap resamples inputs (with all their sets), as it does for one set.
    """
    by_input: dict = {}
    for tag_set, per_example in residual.items():
        for row, e, r in zip(rows[tag_set], effect[tag_set], per_example):
            sums = by_input.setdefault(row["id"], [0.0, 0.0, 0])
            sums[0], sums[1], sums[2] = sums[0] + e.sum().item(), sums[1] + r.sum().item(), sums[2] + len(e)
    effect_sum, residual_sum, tokens = (sum(v[k] for v in by_input.values()) for k in range(3))
    interval = bootstrap_interval(pooled_recovery, [v[1] for v in by_input.values()], [v[0] for v in by_input.values()],
                                  resamples=eval_cfg.resamples, seed=eval_cfg.seed)
    return {prefix + "effect_kl": effect_sum / tokens, prefix + "residual_kl": residual_sum / tokens,
            prefix + "recovery": recovery(effect_sum, residual_sum), prefix + "recovery_ci": list(interval)}


def pooled_headline(heldout, trained, ref, residual_tokens, init_tokens, scores, eval_cfg) -> dict:
    """The headline of a run with several tag sets: every figure token-weighted over all evaluated sets."""
    effect = {s: ref["heldout"][s]["effect_tokens"] for s in heldout}
    headline = {**pooled_over_sets(effect, residual_tokens["heldout"], heldout, eval_cfg),
                **{k: v for k, v in pooled_over_sets(effect, init_tokens, heldout, eval_cfg, "init_").items() if k != "init_effect_kl"}}
    if residual_tokens["train"]:
        train_effect = {s: ref["train"][s]["effect_tokens"] for s in residual_tokens["train"]}
        headline.update(pooled_over_sets(train_effect, residual_tokens["train"], trained, eval_cfg, "train_"),
                        train_examples=sum(len(trained[s]) for s in residual_tokens["train"]))
    for key in ("teacher_context_tokens", "student_context_tokens"):  # per call, averaged over the sets
        headline[key] = sum(scores[s][key] for s in heldout) / len(heldout)
    headline["prompt_tokens_saved"] = round(headline["teacher_context_tokens"] - headline["student_context_tokens"])
    headline["pooled_sets"] = len(heldout)
    return headline


@dataclass
class BaseScores:
    """What the base model gives every later score: the reference teacher's logits, and its own untagged answers."""

    ref: dict  # "heldout" / "train" -> set -> reference_scores
    drift_rows: list  # held-out rows of the first set that have a base answer
    base_on_base: list | None  # the base model's logits on its own untagged answers (None: no base answers)
    cross_prompts: dict | None  # two or more tags: every prompt on each prompt's samples (core/crosstag.py)
    contexts: dict | None  # evaluate.contexts: the reference teacher on each context's inputs (core/contexts.py)


def score_base(cfg, job: Job, heldout: dict, trained: dict, gen_dir: Path) -> BaseScores:
    base_path = resolve_model_path(cfg.model)
    base_tok = load_tokenizer(base_path)
    base = load_model(base_path, cfg.model.dtype, cfg.model.device)
    ref = {"heldout": reference_scores(base, base_tok, job, heldout, cfg, "heldout"), "train": reference_scores(base, base_tok, job, trained, cfg, "train")}
    drift_rows = [r for r in heldout[job.eval_sets[0]] if r["base_output_ids"]]
    base_plain = [context_ids(base_tok, row_input(r), None, cfg.model.chat) for r in drift_rows]
    drift_outs = [r["base_output_ids"] for r in drift_rows]
    base_on_base = continuation_logits(base, base_plain, drift_outs, base_tok.pad_token_id, cfg.evaluate.batch_size, "base untagged") if drift_rows else None
    cross = crosstag.prompt_cells(base, base_tok, job, heldout, ref, cfg) if crosstag.applies(job) else None
    ctx_ref = contexts.reference(base, base_tok, job, cfg, contexts.trained_ids(gen_dir)) if cfg.evaluate.contexts else None
    return BaseScores(ref, drift_rows, base_on_base, cross, ctx_ref)


def untagged_drift(model, tok, base: BaseScores, cfg, tag_ids: list[int], prefix: str) -> dict:
    """KL(base || model) on the base model's own untagged answers."""
    if base.base_on_base is None:
        return {}
    plain = [context_ids(tok, row_input(r), None, cfg.model.chat) for r in base.drift_rows]
    outs = [r["base_output_ids"] for r in base.drift_rows]
    name = f"{'init' if prefix else 'student'} untagged"
    logits = continuation_logits(model, plain, outs, tok.pad_token_id, cfg.evaluate.batch_size, name, tag_ids)
    return drift_figures(base.base_on_base, logits, cfg.evaluate, prefix)


def build_report(cfg, job: Job, paths: StagePaths, heldout, trained, scored: dict) -> dict:
    """report.json: the headline metrics (one set's, or pooled over several), every set, drift, samples, plot data."""
    first, eval_cfg, ref = job.eval_sets[0], cfg.evaluate, scored["ref"]
    effect = {s: torch.cat(ref["heldout"][s]["effect_tokens"]).mean().item() for s in job.eval_sets}
    scores = {s: {"effect_kl": effect[s], **scored["init"][s], **scored["scores"][s]} for s in job.eval_sets}
    sets = [{"tags": list(s), "in_training": job.in_training(s), "heldout_examples": len(heldout[s]), **scores[s]} for s in job.eval_sets]
    pooled = pooled_headline(heldout, trained, ref, scored["residual_tokens"], scored["init_tokens"], scores, eval_cfg) if len(sets) > 1 else {}
    return {
        "tag": job.student_tags(first),
        "tags": job.tags,
        "model": cfg.model.name,
        "heldout_examples": len(heldout[first]),
        "scored_tokens": sum(len(r["output_ids"]) for r in heldout[first]),
        "train": {k: cfg.train[k] for k in ("mode", "objective", "params", "teacher", "epochs", "max_steps", "lr", "embedding_lr")},
        # the headline: a plain run's one set; with several sets, token-weighted over all of them (each is in `sets`)
        "metrics": {**(scores[first] if len(sets) == 1 else pooled), **scored["drift"]},
        "sets": sets,
        **({"crosstag": crosstag.figures(job, heldout, ref, scored["cross"]["tags"], scored["cross"]["prompts"], eval_cfg)} if scored["cross"] else {}),
        **({"contexts": contexts.figures(job, scored["ctx_ref"], scored["ctx_residual"], ref["heldout"], scored["residual_tokens"]["heldout"], eval_cfg)} if scored["ctx_ref"] else {}),
        "intervals": {"level": 0.95, "over": "inputs", "resamples": eval_cfg.resamples, "seed": eval_cfg.seed},
        "drift": scored["drift"],
        # each held-out input's KLs summed over its tokens: runs on the same inputs compare pairwise (losses.paired_difference)
        "per_input": {"+".join(s): [{"id": r["id"], "effect": e.sum().item(), "residual": x.sum().item(), "tokens": len(e)}
                                    for r, e, x in zip(heldout[s], ref["heldout"][s]["effect_tokens"], scored["residual_tokens"]["heldout"][s])]
                      for s in job.eval_sets},
        "samples": scored["samples"],
        "per_position": scored["per_position"],
        "output": str(paths["evaluate"]),
        "inputs": {"generate": str(paths["generate"]), "extend": str(paths["extend"]), "train": str(paths["train"])},
        **({"strength": scored["strength"]} if scored["strength"] is not None else {}),
    }


def score_all(cfg, job: Job, paths: StagePaths, heldout: dict, trained: dict, strengths: list[float]) -> dict:
    """Base, untrained (extended) and trained models, one after another (one model in memory at a time)."""
    first, train_dir = job.eval_sets[0], paths["train"]
    base = score_base(cfg, job, heldout, trained, paths["generate"])
    per_position = {}  # mean KL at each continuation position, for the first set (the report's KL plot)
    per_position["effect_kl"], per_position["count"] = position_means(base.ref["heldout"][first]["effect_tokens"])
    # Every tag the student holds is suppressed (a bootstrapped student's inner tags too), as when it samples.
    tag_ids = sorted(load_tokenizer(str(train_dir)).convert_tokens_to_ids(t) for t in tags_of(train_dir))
    tok, model = load_scored_model(paths["extend"], job, cfg)  # the untrained tag: what training added
    init, init_tokens = score_untrained(model, tok, job, cfg, heldout, base.ref, tag_ids)
    per_position["init_residual_kl"] = position_means(init_tokens[first])[0]
    drift = untagged_drift(model, tok, base, cfg, tag_ids, "init_")
    del model
    tok, model = load_scored_model(train_dir, job, cfg)
    scores, samples, residual_tokens = score_student(model, tok, job, cfg, heldout, trained, base.ref, tag_ids)
    per_position["residual_kl"] = position_means(residual_tokens["heldout"][first])[0]
    for split, key in (("heldout", "recovery_bins"), ("train", "train_recovery_bins")):  # where along the answer the tag falls short
        if first in residual_tokens[split]:  # (fit: on the training inputs, beside held-out)
            per_position[key] = recovery_by_position(
                base.ref[split][first]["effect_tokens"], residual_tokens[split][first], resamples=cfg.evaluate.resamples, seed=cfg.evaluate.seed
            )
    cross = {"prompts": base.cross_prompts, "tags": crosstag.tag_cells(model, tok, job, heldout, base.ref, cfg, tag_ids)} if base.cross_prompts is not None else None
    ctx_residual = contexts.score(model, tok, job, cfg, base.contexts, tag_ids) if base.contexts else None
    drift.update(untagged_drift(model, tok, base, cfg, tag_ids, ""))
    del model
    if cfg.train.mode == "pretrain":  # drift on held-out plain text, the pretrain mixture's other half
        drift.update(plain_text_scores(cfg, resolve_model_path(cfg.model), train_dir, tag_ids))
    sweep = None
    if strengths:  # the tag at several strengths, by guidance (core/strength.py)
        sweep = strength.sweep(cfg, job, heldout[first], base.ref["heldout"][first], resolve_model_path(cfg.model), train_dir, tag_ids, strengths)
    return {"ref": base.ref, "init": init, "init_tokens": init_tokens, "scores": scores, "samples": samples,
            "residual_tokens": residual_tokens, "per_position": per_position, "drift": drift,
            "cross": cross, "ctx_ref": base.contexts, "ctx_residual": ctx_residual, "strength": sweep}


def run(cfg, job: Job, paths: StagePaths) -> Path:
    strengths = strength.check(cfg, job)  # a bad evaluate.strengths fails here, before any model loads
    out_dir, train_dir = paths["evaluate"], paths["train"]
    outputs.require({"generate": paths["generate"], "extend": paths["extend"], "train": train_dir}, by="evaluate")
    heldout, trained = load_rows(cfg, job, paths["generate"])
    scored = score_all(cfg, job, paths, heldout, trained, strengths)
    report = build_report(cfg, job, paths, heldout, trained, scored)
    with outputs.atomic_stage_dir(out_dir, "evaluate", paths.key("evaluate"), config=cfg) as (work, manifest):
        outputs.write_json(work / "report.json", report)
        if scored["ctx_ref"]:
            contexts.write_answers(work, scored["ctx_ref"], scored["ctx_residual"])
        reports.render(work)  # report.md, report.html, plots/
        manifest.update(metrics=report["metrics"], sets=report["sets"])
    card.refresh(train_dir, report, cfg, job)  # the train folder's model card gets recovery and drift
    if cfg.logger.report_to == "wandb":
        reports.log_to_wandb(out_dir, cfg.logger)
    print((out_dir / "report.md").read_text())
    sets, drift = report["sets"], report["drift"]
    each = "" if len(sets) == 1 else " (" + ", ".join(f"{''.join(x['tags'])} {x['recovery']:.3f}" for x in sets) + ")"
    log.info("evaluate: recovery %.3f%s, drift %.5f -> %s", report["metrics"]["recovery"], each, drift.get("drift_kl", float("nan")), out_dir)
    return out_dir


@torch.no_grad()
def plain_text_scores(cfg, base_path: str, student_dir: Path, tag_ids: list[int]) -> dict:
    """Drift on held-out plain text: KL(base || student) per token, and both models' per-token NLL.

    Teacher-forced on the held-out plain documents themselves (untagged), each cut to one block.
    """
    p, bs = cfg.train.pretrain, cfg.evaluate.batch_size
    tok = load_tokenizer(str(student_dir))
    docs = [tok(t, add_special_tokens=True, split_special_tokens=True)["input_ids"][: p.block_size] for t in plain_texts(p.plain, "heldout")]
    docs = [d for d in docs if len(d) > 1]
    contexts, rest = [d[:1] for d in docs], [d[1:] for d in docs]
    scores = {}
    for name, path, tags in (("base", base_path, []), ("student", str(student_dir), tag_ids)):
        model = load_model(path, cfg.model.dtype, cfg.model.device)
        logits = continuation_logits(model, contexts, rest, tok.pad_token_id, bs, f"{name} plain", tags)
        scores[name] = logits
        nll = sum(token_cross_entropy(l, torch.tensor(r)).sum().item() for l, r in zip(logits, rest))
        scores[f"plain_nll_{name}"] = nll / sum(map(len, rest))
        del model
    return {
        "plain_drift_kl": mean_kl(scores.pop("base"), scores.pop("student")),
        **scores,
        "plain_heldout_docs": len(docs),
        "plain_tokens": sum(map(len, rest)),
    }
