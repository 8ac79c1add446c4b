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
from pathlib import Path

import torch
from datasets import load_from_disk
from pipeline import card, contexts, crosstag, extend, generate, outputs, report as reports, train
from pipeline.data import gather_positions, pad_examples
from pipeline.formats import context_ids, row_input
from pipeline.catalog import tags_of
from pipeline.losses import bootstrap_interval, full_kl, pooled_mean, pooled_recovery, position_means, recovery, suppress
from pipeline.probes import probe_report
from pipeline.progress import tqdm  # bars only when someone watches (progress=...)
from pipeline.job import Job, job_from_config
from pipeline.metatokens import ConfigError
from pipeline.models import load_model, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)
LATER_DEFAULTS = {"train_examples": 32, "resamples": 1000, "strengths": [], "contexts": [], "context_examples": 24}  # fields added after evaluations were cached


def stage_key(cfg, job: Job) -> dict:
    key = {"train": outputs.key_hash(train.stage_key(cfg, job)), "evaluate": evaluate_key(cfg.evaluate)}
    if cfg.generate.teacher_mode == "bootstrap":  # scored on the reference teacher's samples (not the bootstrap model's)
        key["heldout_teacher"] = generate.REFERENCE
    probes = {t: vars(m.probe) for t, m in job.metatokens.items() if m.probe}
    if probes:  # an edited probe is a new evaluation, never the old counts reused
        key["probes"] = probes
    if cfg.evaluate.contexts:  # the contexts' inputs, by content
        key["context_inputs"] = contexts.key(cfg)
    return key


def evaluate_key(eval_cfg) -> dict:
    """The evaluate config, without the fields added later while they hold their defaults (old keys stay)."""
    key = outputs.plain(eval_cfg)
    for name, default in LATER_DEFAULTS.items():
        if key.get(name) == default:
            key.pop(name)
    return key


def output_dir(cfg, job: Job) -> Path:
    return outputs.stage_dir(cfg.paths.outputs, "evaluate", job.label, stage_key(cfg, job))


@torch.no_grad()
def continuation_logits(
    model, contexts, continuations, pad_id, batch_size: int, desc: str, tag_ids: list[int] = ()
) -> list[torch.Tensor]:
    """Logits [T_i, V] that predict each continuation token after its context, teacher-forced.

    Tags are suppressed, as the saved model's generation config does when it samples.
    """
    result = []
    for start in tqdm(range(0, len(contexts), batch_size), desc=desc, unit="batch", leave=False):
        batch = pad_examples(contexts[start : start + batch_size], continuations[start : start + batch_size], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)
        ).logits
        picked = suppress(gather_positions(logits, batch["output_positions"].to(model.device)), list(tag_ids))
        picked = picked.float().cpu()
        result.extend(picked[b, : int(batch["output_mask"][b].sum())] for b in range(picked.shape[0]))
    return result


def token_kls(p_logits: list[torch.Tensor], q_logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """KL(p || q) at every continuation position, one tensor per example."""
    return [full_kl(p, q) for p, q in zip(p_logits, q_logits)]


def mean_kl(p_logits: list[torch.Tensor], q_logits: list[torch.Tensor]) -> float:
    """Token-weighted mean of KL(p || q) over all continuation positions."""
    return torch.cat(token_kls(p_logits, q_logits)).mean().item()


def tagged_contexts(job: Job, tok, rows, chat) -> list[list[int]]:
    """Student contexts: the record's tags side by side (in the job's order), then its input."""
    return [context_ids(tok, row_input(r), job.student_tags(tuple(r["tags"])), chat) for r in rows]


@torch.no_grad()
def sample_student(student, tok, contexts, gen_cfg, eval_cfg) -> list[str]:
    """The student's own answers with the tags (its generation config suppresses tags: it never writes one)."""
    texts = []
    for context in contexts:
        ids = torch.tensor([context], device=student.device)
        torch.manual_seed(eval_cfg.seed)
        out = student.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=gen_cfg.temperature,
            top_p=gen_cfg.top_p,
            top_k=0,
            max_new_tokens=eval_cfg.sample_max_new_tokens,
            pad_token_id=tok.pad_token_id,
        )
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


@torch.no_grad()
def sample_answers(model, tok, contexts, gen_cfg, tag_ids: list[int]) -> tuple[list[str], list[list[int]]]:
    """The model's answers with generate's sampling settings (temperature, top-p, length, per-batch seeds),
    so a probe compares it with the teacher's and the base model's answers like for like; tags are never sampled.

    Returns (decoded answers, their token ids), in the order of `contexts`.
    """
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # longest first, as generate batches
    ids: list = [None] * len(contexts)
    for start in tqdm(range(0, len(order), gen_cfg.batch_size), desc="student answers", unit="batch", leave=False):
        chunk = order[start : start + gen_cfg.batch_size]
        seed = gen_cfg.seed * 1_000_003 + chunk[0]
        sampled = generate.sample_with_logprobs(model, tok, [contexts[i] for i in chunk], gen_cfg, seed, suppress_ids=tag_ids)
        for i, record in zip(chunk, sampled):
            ids[i] = record["output_ids"]
    return [tok.decode(i, skip_special_tokens=True) for i in ids], ids


def kl_figures(effect_tokens, residual_tokens, eval_cfg, prefix: str = "") -> dict:
    """Residual and recovery (token-weighted over the inputs) with recovery's 95% bootstrap interval over inputs."""
    residual = torch.cat(residual_tokens).mean().item()
    effect = torch.cat(effect_tokens).mean().item()
    interval = bootstrap_interval(
        pooled_recovery, [t.sum().item() for t in residual_tokens], [t.sum().item() for t in effect_tokens],
        resamples=eval_cfg.resamples, seed=eval_cfg.seed,
    )
    return {prefix + "residual_kl": residual, prefix + "recovery": recovery(effect, residual), prefix + "recovery_ci": list(interval)}


def drift_figures(base_logits, model_logits, eval_cfg, prefix: str = "") -> dict:
    """Drift KL(base || model) per token on untagged inputs, with its 95% bootstrap interval over inputs."""
    per_token = token_kls(base_logits, model_logits)
    interval = bootstrap_interval(
        pooled_mean, [t.sum().item() for t in per_token], [len(t) for t in per_token], resamples=eval_cfg.resamples, seed=eval_cfg.seed
    )
    return {prefix + "drift_kl": torch.cat(per_token).mean().item(), prefix + "drift_kl_ci": list(interval)}


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


def load_scored_model(path: Path, job: Job, cfg):
    tok = load_tokenizer(str(path))
    missing = [t for t in job.tags if t not in tok.get_vocab()]
    if missing:
        raise ConfigError(f"{path}: its tokenizer lacks {missing}. Fix: re-run extend and train with this config.")
    return tok, load_model(str(path), cfg.model.dtype, cfg.model.device)


def run(cfg) -> Path:
    from pipeline import strength

    job = job_from_config(cfg)
    strengths = strength.check(cfg, job)  # a bad evaluate.strengths fails here, before any model loads
    out_dir = output_dir(cfg, job)
    if outputs.already_done(out_dir, cfg.force, "evaluate"):
        print((out_dir / "report.md").read_text())
        return out_dir
    gen_dir, ext_dir, train_dir = generate.output_dir(cfg, job), extend.output_dir(cfg, job), train.output_dir(cfg, job)
    outputs.require({"generate": gen_dir, "extend": ext_dir, "train": train_dir}, by="evaluate")
    heldout, trained = load_rows(cfg, job, gen_dir)
    chat, bs, eval_cfg = cfg.model.chat, cfg.evaluate.batch_size, cfg.evaluate
    base_path = resolve_model_path(cfg.model)
    base_tok = load_tokenizer(base_path)
    base = load_model(base_path, cfg.model.dtype, cfg.model.device)
    ref = {"heldout": reference_scores(base, base_tok, job, heldout, cfg, "heldout"), "train": reference_scores(base, base_tok, job, trained, cfg, "train")}
    first = job.eval_sets[0]
    per_position = {}  # mean KL at each continuation position, for the first set (the report's KL plot)
    per_position["effect_kl"], per_position["count"] = position_means(ref["heldout"][first]["effect_tokens"])
    drift_rows = [r for r in heldout[first] if r["base_output_ids"]]
    drift_outs = [r["base_output_ids"] for r in drift_rows]
    base_plain = [context_ids(base_tok, row_input(r), None, chat) for r in drift_rows]
    base_on_base = continuation_logits(base, base_plain, drift_outs, base_tok.pad_token_id, bs, "base untagged") if drift_rows else None
    # two or more tags: every tag and every other prompt on each prompt's samples (pipeline/crosstag.py)
    cross = {"prompts": crosstag.prompt_cells(base, base_tok, job, heldout, ref, cfg)} if crosstag.applies(job) else None
    ctx_ref = contexts.reference(base, base_tok, job, cfg, contexts.trained_ids(gen_dir)) if cfg.evaluate.contexts else None
    del base

    # Every tag the student holds is suppressed (a bootstrapped student's inner tags too), as when it samples.
    tag_ids = sorted(load_tokenizer(str(train_dir)).convert_tokens_to_ids(t) for t in tags_of(train_dir))
    drift = {}

    def untagged_drift(model, tok, prefix: str) -> dict:  # KL(base || model) on the base model's own untagged answers
        if base_on_base is None:
            return {}
        plain = [context_ids(tok, row_input(r), None, chat) for r in drift_rows]
        logits = continuation_logits(model, plain, drift_outs, tok.pad_token_id, bs, f"{'init' if prefix else 'student'} untagged", tag_ids)
        return drift_figures(base_on_base, logits, eval_cfg, prefix)

    tok, model = load_scored_model(ext_dir, job, cfg)  # the untrained tag: what training added
    init, init_tokens = score_untrained(model, tok, job, cfg, heldout, ref, tag_ids)
    per_position["init_residual_kl"] = position_means(init_tokens[first])[0]
    drift.update(untagged_drift(model, tok, "init_"))
    del model
    tok, model = load_scored_model(train_dir, job, cfg)
    scores, samples, residual_tokens = score_student(model, tok, job, cfg, heldout, trained, ref, tag_ids)
    per_position["residual_kl"] = position_means(residual_tokens["heldout"][first])[0]
    if cross is not None:
        cross["tags"] = crosstag.tag_cells(model, tok, job, heldout, ref, cfg, tag_ids)
    ctx_residual = contexts.score(model, tok, job, cfg, ctx_ref, tag_ids) if ctx_ref else None
    drift.update(untagged_drift(model, tok, ""))
    del model

    if cfg.train.mode == "pretrain":  # drift on held-out plain text, the pretrain mixture's other half
        from pipeline.pretrain import plain_text_scores

        drift.update(plain_text_scores(cfg, base_path, train_dir, tag_ids))
    if strengths:  # the tag at several strengths, by guidance (pipeline/strength.py)
        sweep = strength.sweep(cfg, job, heldout[first], ref["heldout"][first], base_path, train_dir, tag_ids, strengths)
    effect = {s: torch.cat(ref["heldout"][s]["effect_tokens"]).mean().item() for s in job.eval_sets}
    scores = {s: {"effect_kl": effect[s], **init[s], **scores[s]} for s in job.eval_sets}
    sets = [{"tags": list(s), "in_training": job.in_training(s), "heldout_examples": len(heldout[s]), **scores[s]} for s in job.eval_sets]
    report = {
        "tag": job.student_tags(first),
        "tags": job.tags,
        "model": cfg.model.name,
        "heldout_examples": len(heldout[first]),
        "scored_tokens": sum(len(r["output_ids"]) for r in heldout[first]),
        "train": {k: cfg.train[k] for k in ("mode", "objective", "params", "teacher", "epochs", "max_steps", "lr", "embedding_lr")},
        # the headline: a plain run's one set; with several sets, token-weighted over all of them (each is in `sets`)
        "metrics": {**(scores[first] if len(sets) == 1 else pooled_headline(heldout, trained, ref, residual_tokens, init_tokens, scores, eval_cfg)), **drift},
        "sets": sets,
        **({"crosstag": crosstag.figures(job, heldout, ref, cross["tags"], cross["prompts"], eval_cfg)} if cross else {}),
        **({"contexts": contexts.figures(ctx_ref, ctx_residual, ref["heldout"], residual_tokens["heldout"], eval_cfg)} if ctx_ref else {}),
        "intervals": {"level": 0.95, "over": "inputs", "resamples": eval_cfg.resamples, "seed": eval_cfg.seed},
        "drift": drift,
        "samples": samples,
        "per_position": per_position,
        "output": str(out_dir),
        "inputs": {"generate": str(gen_dir), "extend": str(ext_dir), "train": str(train_dir)},
        **({"strength": sweep} if strengths else {}),
    }
    with outputs.atomic_stage_dir(out_dir, "evaluate", stage_key(cfg, job), config=cfg) as (work, manifest):
        outputs.write_json(work / "report.json", report)
        if ctx_ref:
            contexts.write_answers(work, ctx_ref)
        reports.render(work)  # report.md, report.html, plots/
        manifest.update(metrics=report["metrics"], sets=sets)
    card.refresh(train_dir, report, cfg, job)  # the train folder's model card gets recovery and drift
    if cfg.logger.report_to == "wandb":
        reports.log_to_wandb(out_dir, cfg.logger)
    print((out_dir / "report.md").read_text())
    each = "" if len(sets) == 1 else " (" + ", ".join(f"{''.join(x['tags'])} {x['recovery']:.3f}" for x in sets) + ")"
    log.info("evaluate: recovery %.3f%s, drift %.5f -> %s", report["metrics"]["recovery"], each, drift.get("drift_kl", float("nan")), out_dir)
    return out_dir
