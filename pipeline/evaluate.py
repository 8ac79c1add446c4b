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
from tqdm.auto import tqdm

from pipeline import extend, generate, outputs, train
from pipeline.data import gather_positions, pad_examples
from pipeline.formats import context_ids
from pipeline.losses import full_kl, recovery, suppress
from pipeline.metatokens import Metatoken, job_metatoken
from pipeline.models import load_model, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)


def stage_key(cfg, metatoken: Metatoken) -> dict:
    return {"train": outputs.key_hash(train.stage_key(cfg, metatoken)), "evaluate": outputs.plain(cfg.evaluate)}


def output_dir(cfg, metatoken: Metatoken) -> Path:
    return outputs.stage_dir(cfg.paths.outputs, "evaluate", metatoken.name, stage_key(cfg, metatoken))


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


def mean_kl(p_logits: list[torch.Tensor], q_logits: list[torch.Tensor]) -> float:
    """Token-weighted mean of KL(p || q) over all continuation positions."""
    per_token = torch.cat([full_kl(p, q) for p, q in zip(p_logits, q_logits)])
    return per_token.mean().item()


def score_student(student, tok, rows, teacher_logits, base_on_base, chat, eval_cfg, name, tag_ids) -> dict:
    """Residual KL to the teacher on tagged inputs, and drift from the base on untagged ones."""
    tagged = [context_ids(tok, r["input"], "".join(r["tags"]), chat) for r in rows]
    student_logits = continuation_logits(
        student, tagged, [r["output_ids"] for r in rows], tok.pad_token_id, eval_cfg.batch_size, f"{name} tagged", tag_ids
    )
    scores = {"residual_kl": mean_kl(teacher_logits, student_logits)}
    if base_on_base is not None:
        drift_rows = [r for r in rows if r["base_output_ids"]]
        plain = [context_ids(tok, r["input"], None, chat) for r in drift_rows]
        student_plain = continuation_logits(
            student, plain, [r["base_output_ids"] for r in drift_rows], tok.pad_token_id, eval_cfg.batch_size,
            f"{name} untagged", tag_ids,
        )
        scores["drift_kl"] = mean_kl(base_on_base, student_plain)
    return scores


@torch.no_grad()
def sample_student(student, tok, rows, chat, gen_cfg, eval_cfg) -> list[str]:
    """The student's own answers with the tag (its generation config suppresses tags, so it never writes one)."""
    texts = []
    for r in rows:
        ids = torch.tensor([context_ids(tok, r["input"], "".join(r["tags"]), chat)], device=student.device)
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


def render_markdown(report: dict) -> str:
    m = report["metrics"]
    training = f"objective `{report['train']['objective']}`"
    if report["train"].get("mode", "finetune") == "pretrain":
        training = "continued pretraining (LM loss on packed tagged + plain documents)"
    lines = [
        f"# Metatoken report: {report['tag']}",
        "",
        f"Model `{report['model']}`, {report['heldout_examples']} held-out inputs, {report['scored_tokens']} scored tokens. "
        f"Training: {training}, params `{report['train']['params']}`.",
        "",
        "| model | KL to teacher (nats/token) | recovery | drift KL on untagged (nats/token) |",
        "|---|---:|---:|---:|",
        f"| base, no prompt | {m['effect_kl']:.4f} (= effect) | 0 | 0 |",
        f"| extended, tag untrained | {m['init_residual_kl']:.4f} | {m['init_recovery']:.3f} | {m.get('init_drift_kl', float('nan')):.5f} |",
        f"| **student with tag** | **{m['residual_kl']:.4f}** | **{m['recovery']:.3f}** | {m.get('drift_kl', float('nan')):.5f} |",
        "",
        f"Prompt tokens saved per call: **{m['prompt_tokens_saved']}** "
        f"(teacher context {m['teacher_context_tokens']:.0f} tokens on average, student {m['student_context_tokens']:.0f}).",
        "",
        "recovery = 1 - residual / effect, where effect = KL(teacher with prompt || base without prompt) and "
        "residual = KL(teacher with prompt || student with tag), teacher-forced on the teacher's held-out samples.",
        "",
    ]
    if "plain_drift_kl" in m:
        lines += [
            f"Held-out plain text ({m['plain_heldout_docs']} documents, {m['plain_tokens']} tokens, never trained on): "
            f"drift KL(base || student) **{m['plain_drift_kl']:.4f}** nats/token; "
            f"NLL base {m['plain_nll_base']:.4f} -> student {m['plain_nll_student']:.4f} nats/token.",
            "",
        ]
    lines += ["## Samples (held-out inputs)"]
    for s in report["samples"]:
        lines += [
            "",
            f"**Input:** {s['input']}",
            "",
            f"- *base, no prompt:* {s['base']}",
            f"- *teacher, full prompt:* {s['teacher']}",
            f"- *student, {report['tag']}:* {s['student']}",
        ]
    return "\n".join(lines).replace("\r", "") + "\n"


def run(cfg) -> Path:
    metatoken = job_metatoken(cfg)
    out_dir = output_dir(cfg, metatoken)
    if outputs.is_complete(out_dir) and not cfg.force:
        log.info("evaluate: %s is complete, nothing to do", out_dir)
        print((out_dir / "report.md").read_text())
        return out_dir
    gen_dir, ext_dir, train_dir = (
        generate.output_dir(cfg, metatoken),
        extend.output_dir(cfg, [metatoken]),
        train.output_dir(cfg, metatoken),
    )
    for stage, d in (("generate", gen_dir), ("extend", ext_dir), ("train", train_dir)):
        if not outputs.is_complete(d):
            raise FileNotFoundError(f"evaluate needs the {stage} output {d}. Fix: run `python -m pipeline stage={stage}` with the same config first (or stage=all).")
    rows = list(load_from_disk(str(gen_dir / "dataset")).filter(lambda r: r["split"] == "heldout"))
    rows = rows[: cfg.evaluate.max_examples] if cfg.evaluate.max_examples else rows
    if not rows:
        raise ValueError(f"{gen_dir}: no held-out rows to evaluate. Fix: raise inputs.heldout_fraction or inputs.max_heldout.")
    chat, bs = cfg.model.chat, cfg.evaluate.batch_size
    base_path = resolve_model_path(cfg.model)
    base_tok = load_tokenizer(base_path)
    base = load_model(base_path, cfg.model.dtype, cfg.model.device)
    outputs_ids = [r["output_ids"] for r in rows]

    teacher_ctx = [context_ids(base_tok, r["input"], metatoken.prompt, chat) for r in rows]
    plain_ctx = [context_ids(base_tok, r["input"], None, chat) for r in rows]
    teacher_logits = continuation_logits(base, teacher_ctx, outputs_ids, base_tok.pad_token_id, bs, "teacher")
    base_logits = continuation_logits(base, plain_ctx, outputs_ids, base_tok.pad_token_id, bs, "base")
    effect = mean_kl(teacher_logits, base_logits)
    base_on_base = None
    if all(r["base_output_ids"] for r in rows):
        base_on_base = continuation_logits(
            base, plain_ctx, [r["base_output_ids"] for r in rows], base_tok.pad_token_id, bs, "base untagged"
        )
    del base

    metrics = {"effect_kl": effect}
    for name, path in (("init", ext_dir), ("student", train_dir)):
        tok = load_tokenizer(str(path))
        model = load_model(str(path), cfg.model.dtype, cfg.model.device)
        tag_ids = list(outputs.read_manifest(ext_dir)["tag_ids"].values())
        scores = score_student(model, tok, rows, teacher_logits, base_on_base, chat, cfg.evaluate, name, tag_ids)
        prefix = "" if name == "student" else "init_"
        metrics[prefix + "residual_kl"] = scores["residual_kl"]
        metrics[prefix + "recovery"] = recovery(effect, scores["residual_kl"])
        if "drift_kl" in scores:
            metrics[prefix + "drift_kl"] = scores["drift_kl"]
        if name == "student":
            shown = rows[: cfg.evaluate.num_samples]
            student_texts = sample_student(model, tok, shown, chat, cfg.generate, cfg.evaluate)
            student_ctx = [context_ids(tok, r["input"], "".join(r["tags"]), chat) for r in rows]
        del model

    if cfg.train.mode == "pretrain":  # drift on held-out plain text, the pretrain mixture's other half
        from pipeline.pretrain import plain_text_scores

        metrics.update(plain_text_scores(cfg, base_path, train_dir, tag_ids))
    teacher_len = sum(map(len, teacher_ctx)) / len(rows)
    student_len = sum(map(len, student_ctx)) / len(rows)
    metrics.update(
        prompt_tokens_saved=round(teacher_len - student_len),
        teacher_context_tokens=teacher_len,
        student_context_tokens=student_len,
    )
    report = {
        "tag": metatoken.tag,
        "model": cfg.model.name,
        "heldout_examples": len(rows),
        "scored_tokens": sum(map(len, outputs_ids)),
        "train": {k: cfg.train[k] for k in ("mode", "objective", "params", "epochs", "max_steps", "lr", "embedding_lr")},
        "metrics": metrics,
        "samples": [
            {"id": r["id"], "input": r["input"], "base": r["base_output"], "teacher": r["output"], "student": s}
            for r, s in zip(shown, student_texts)
        ],
        "inputs": {"generate": str(gen_dir), "extend": str(ext_dir), "train": str(train_dir)},
    }
    with outputs.atomic_stage_dir(out_dir, "evaluate", stage_key(cfg, metatoken)) as (work, manifest):
        outputs.write_json(work / "report.json", report)
        (work / "report.md").write_text(render_markdown(report))
        manifest.update(metrics=metrics)
    print(render_markdown(report))
    log.info("evaluate: recovery %.3f, drift %.5f -> %s", metrics["recovery"], metrics.get("drift_kl", float("nan")), out_dir)
    return out_dir
