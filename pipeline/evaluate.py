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
from pipeline import card, extend, generate, outputs, report as reports, train
from pipeline.data import gather_positions, pad_examples
from pipeline.formats import context_ids
from pipeline.losses import full_kl, position_means, recovery, suppress
from pipeline.progress import tqdm  # bars only when someone watches (progress=...)
from pipeline.job import Job, job_from_config
from pipeline.metatokens import ConfigError
from pipeline.models import load_model, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)


def stage_key(cfg, job: Job) -> dict:
    return {"train": outputs.key_hash(train.stage_key(cfg, job)), "evaluate": outputs.plain(cfg.evaluate)}


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
    return [context_ids(tok, r["input"], job.student_tags(tuple(r["tags"])), chat) for r in rows]


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


def run(cfg) -> Path:
    job = job_from_config(cfg)
    out_dir = output_dir(cfg, job)
    if outputs.already_done(out_dir, cfg.force, "evaluate"):
        print((out_dir / "report.md").read_text())
        return out_dir
    gen_dir, ext_dir, train_dir = generate.output_dir(cfg, job), extend.output_dir(cfg, job), train.output_dir(cfg, job)
    outputs.require({"generate": gen_dir, "extend": ext_dir, "train": train_dir}, by="evaluate")
    heldout = list(load_from_disk(str(gen_dir / "dataset")).filter(lambda r: r["split"] == "heldout"))
    by_set = {s: [r for r in heldout if tuple(r["tags"]) == s][: cfg.evaluate.max_examples] for s in job.eval_sets}
    if not all(by_set.values()):
        raise ValueError(f"{gen_dir}: no held-out rows to evaluate. Fix: raise inputs.heldout_fraction or inputs.max_heldout.")
    chat, bs = cfg.model.chat, cfg.evaluate.batch_size
    base_path = resolve_model_path(cfg.model)
    base_tok = load_tokenizer(base_path)
    base = load_model(base_path, cfg.model.dtype, cfg.model.device)
    pad = base_tok.pad_token_id

    # The reference teacher is the base model reading the fully expanded prompts of the set, whatever
    # teacher generated the data (expand or bootstrap), so recovery means the same in every mode.
    teacher_logits, effect, teacher_len = {}, {}, {}
    first = job.eval_sets[0]
    per_position = {}  # mean KL at each continuation position, for the first set (the report's KL plot)
    for tag_set, rows in by_set.items():
        outs = [r["output_ids"] for r in rows]
        name = "+".join(tag_set)
        teacher_ctx = [context_ids(base_tok, r["input"], job.reference_prompt(tag_set), chat) for r in rows]
        plain_ctx = [context_ids(base_tok, r["input"], None, chat) for r in rows]
        teacher_logits[tag_set] = continuation_logits(base, teacher_ctx, outs, pad, bs, f"teacher {name}")
        effect_tokens = token_kls(teacher_logits[tag_set], continuation_logits(base, plain_ctx, outs, pad, bs, f"base {name}"))
        effect[tag_set] = torch.cat(effect_tokens).mean().item()
        teacher_len[tag_set] = sum(map(len, teacher_ctx)) / len(rows)
        if tag_set == first:
            per_position["effect_kl"], per_position["count"] = position_means(effect_tokens)
    drift_rows = [r for r in by_set[job.eval_sets[0]] if r["base_output_ids"]]
    drift_plain = [context_ids(base_tok, r["input"], None, chat) for r in drift_rows]
    drift_outs = [r["base_output_ids"] for r in drift_rows]
    base_on_base = continuation_logits(base, drift_plain, drift_outs, pad, bs, "base untagged") if drift_rows else None
    del base

    scores = {s: {"effect_kl": effect[s]} for s in job.eval_sets}
    drift, samples = {}, []
    tag_ids = list(outputs.read_manifest(ext_dir)["tag_ids"].values())
    for name, path in (("init", ext_dir), ("student", train_dir)):
        tok = load_tokenizer(str(path))
        missing = [t for t in job.tags if t not in tok.get_vocab()]
        if missing:
            raise ConfigError(f"{path}: its tokenizer lacks {missing}. Fix: re-run extend and train with this config.")
        model = load_model(str(path), cfg.model.dtype, cfg.model.device)
        prefix = "" if name == "student" else "init_"
        for tag_set, rows in by_set.items():
            contexts = tagged_contexts(job, tok, rows, chat)
            logits = continuation_logits(model, contexts, [r["output_ids"] for r in rows], tok.pad_token_id, bs, f"{name} {'+'.join(tag_set)}", tag_ids)
            residual_tokens = token_kls(teacher_logits[tag_set], logits)
            residual = torch.cat(residual_tokens).mean().item()
            if tag_set == first:
                per_position[prefix + "residual_kl"] = position_means(residual_tokens)[0]
            scores[tag_set][prefix + "residual_kl"] = residual
            scores[tag_set][prefix + "recovery"] = recovery(effect[tag_set], residual)
            if name == "student":
                scores[tag_set]["prompt_tokens_saved"] = round(teacher_len[tag_set] - sum(map(len, contexts)) / len(rows))
                scores[tag_set]["teacher_context_tokens"] = teacher_len[tag_set]
                scores[tag_set]["student_context_tokens"] = sum(map(len, contexts)) / len(rows)
                shown = rows[: cfg.evaluate.num_samples]
                texts = sample_student(model, tok, contexts[: len(shown)], cfg.generate, cfg.evaluate)
                samples += [
                    {"id": r["id"], "tags": list(tag_set), "input": r["input"], "base": r["base_output"], "teacher": r["output"], "student": t}
                    for r, t in zip(shown, texts)
                ]
        if base_on_base is not None:
            plain_logits = continuation_logits(model, [context_ids(tok, r["input"], None, chat) for r in drift_rows], drift_outs, tok.pad_token_id, bs, f"{name} untagged", tag_ids)
            drift[prefix + "drift_kl"] = mean_kl(base_on_base, plain_logits)
        del model

    if cfg.train.mode == "pretrain":  # drift on held-out plain text, the pretrain mixture's other half
        from pipeline.pretrain import plain_text_scores

        drift.update(plain_text_scores(cfg, base_path, train_dir, tag_ids))
    trained_sets = {s for s in job.train_sets if s}
    sets = [{"tags": list(s), "in_training": s in trained_sets, "heldout_examples": len(by_set[s]), **scores[s]} for s in job.eval_sets]
    report = {
        "tag": job.student_tags(first),
        "tags": job.tags,
        "model": cfg.model.name,
        "heldout_examples": len(by_set[first]),
        "scored_tokens": sum(len(r["output_ids"]) for r in by_set[first]),
        "train": {k: cfg.train[k] for k in ("mode", "objective", "params", "teacher", "epochs", "max_steps", "lr", "embedding_lr")},
        "metrics": {**scores[first], **drift},  # the first set (a plain run's only one), plus drift
        "sets": sets,
        "drift": drift,
        "samples": samples,
        "per_position": per_position,
        "output": str(out_dir),
        "inputs": {"generate": str(gen_dir), "extend": str(ext_dir), "train": str(train_dir)},
    }
    with outputs.atomic_stage_dir(out_dir, "evaluate", stage_key(cfg, job), config=cfg) as (work, manifest):
        outputs.write_json(work / "report.json", report)
        reports.render(work)  # report.md, report.html, plots/
        manifest.update(metrics=report["metrics"], sets=sets)
    card.refresh(train_dir, report, cfg, job)  # the train folder's model card gets recovery and drift
    if cfg.logger.report_to == "wandb":
        reports.log_to_wandb(out_dir, cfg.logger)
    print((out_dir / "report.md").read_text())
    log.info("evaluate: recovery %.3f, drift %.5f -> %s", report["metrics"]["recovery"], drift.get("drift_kl", float("nan")), out_dir)
    return out_dir
