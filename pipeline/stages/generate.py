"""Stage 1, generate: the teacher (the model reading the full prompt) writes continuations.

For every input it samples a continuation and records, at every generated position, the teacher's
top-k log-probabilities (taken from the logits of the same forward passes that sampled the token:
no second pass). Held-out inputs are also answered by the model without any prompt, which the
evaluation uses to measure drift and to show samples side by side.

    python -m pipeline stage=generate metatoken=pirate
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from datasets import Dataset

from pipeline.core import conversations
from pipeline.core.data import load_inputs, split_inputs
from pipeline.core.formats import context_ids, row_input
from pipeline.core.job import Job, TagSet
from pipeline.core.mixture import assign_sets, pair_sets
from pipeline.core.models import load_model, load_tokenizer, resolve_model_path, start_model_path
from pipeline.core.sampling import sample_all
from pipeline.errors import ConfigError
from pipeline.runtime import distributed, outputs
from pipeline.stages import synthesize
from pipeline.stages.paths import REFERENCE, StagePaths

log = logging.getLogger(__name__)


def plan(job: Job, train_rows: list[dict], heldout_rows: list[dict], seed: int) -> list[tuple[str, TagSet, list[dict]]]:
    """Which inputs the teacher answers under which tag set: (split, tag set, rows) groups.

    Training inputs are each assigned one set by the mixture's weights, or, paired, every tagged set
    (plus untagged for the untagged share); every evaluated set answers all held-out inputs (so sets
    are compared on the same inputs).
    """
    ids = [r["id"] for r in train_rows]
    if job.paired:
        untagged = dict(zip(job.train_sets, job.weights)).get((), 0.0)
        per_row = pair_sets(ids, [s for s in job.train_sets if s], untagged, seed)
    else:
        per_row = [(s,) for s in assign_sets(ids, job.train_sets, job.weights, seed)]
    groups = [("train", s, [r for r, sets in zip(train_rows, per_row) if s in sets]) for s in job.train_sets]
    groups += [("heldout", s, heldout_rows) for s in job.eval_sets]
    return [g for g in groups if g[2]]


def sampling_passes(cfg, groups) -> list[tuple[str, str, list, bool]]:
    """Which model answers which groups: (model path, teacher mode, groups, whether it also answers without prompt).

    Held-out inputs are always answered by the reference teacher (the base model reading the fully
    expanded prompt) and, without prompt, by the base model itself, so evaluation scores every
    teacher mode on the same kind of samples. In bootstrap mode the bootstrap model answers only
    the training inputs.
    """
    if cfg.generate.teacher_mode != "bootstrap":
        return [(start_model_path(cfg), "expand", groups, True)]
    heldout = [g for g in groups if g[0] == "heldout"]
    return [(resolve_model_path(cfg.model), "expand", heldout, True),
            (start_model_path(cfg), "bootstrap", [g for g in groups if g[0] == "train"], False)]


def sample_pass(cfg, job: Job, model_path: str, mode: str, groups, heldout_rows, with_base: bool, shard_root: Path):
    """Load one model and answer its groups; returns (tokenizer, base samples by input id, teacher samples per group)."""
    tokenizer = load_tokenizer(model_path)
    # vLLM loads the model itself, from the path; the HF sampler gets the loaded model.
    model = model_path if cfg.generate.backend == "vllm" else load_model(model_path, cfg.model.dtype, distributed.device(cfg.model))
    chat, base = cfg.model.chat, {}
    if with_base and cfg.generate.base_samples and heldout_rows:  # the model without prompt, for drift and side by side
        plain = [context_ids(tokenizer, row_input(r, "text"), None, chat) for r in heldout_rows]
        sampled = sample_all(model, tokenizer, plain, cfg.generate, "base heldout", shard_root / "base-heldout", cfg.model.dtype)
        base = dict(zip((r["id"] for r in heldout_rows), sampled))
    answers = {}
    for split, tag_set, rows in groups:
        prompt = job.teacher_prompt(tag_set, mode)
        contexts = [context_ids(tokenizer, row_input(r, "text"), prompt, chat) for r in rows]
        name = "+".join(t.strip("<>") for t in tag_set) or "untagged"
        answers[(split, tag_set)] = sample_all(
            model, tokenizer, contexts, cfg.generate, f"teacher {split} {name}", shard_root / f"{split}-{name}", cfg.model.dtype
        )
    return tokenizer, base, answers


def records(groups, answers: dict, base: dict, decoders: dict, columns) -> list[dict]:
    """The dataset's rows, in plan order (so its order does not depend on the sampling passes)."""
    rows_out = []
    for split, tag_set, rows in groups:
        decode = decoders[(split, tag_set)].decode
        for row, t in zip(rows, answers[(split, tag_set)]):
            b = base.get(row["id"]) if split == "heldout" else None
            rows_out.append(
                {
                    "id": row["id"],
                    "split": split,
                    "tags": list(tag_set),
                    "input": row["text"],
                    "output": decode(t["output_ids"], skip_special_tokens=True),
                    **t,
                    "base_output": decode(b["output_ids"], skip_special_tokens=True) if b else "",
                    "base_output_ids": b["output_ids"] if b else [],
                    **columns(row),  # conversations: the turns and where the prompt sat
                }
            )
    return rows_out


def facts(cfg, job: Job, groups, rows: list[dict]) -> dict:
    """What the manifest says about the data: each set's prompt length in tokens, counts, tokens generated."""
    tokenizer, chat = load_tokenizer(start_model_path(cfg)), cfg.model.chat
    plain_tokens = len(context_ids(tokenizer, "", None, chat))
    return dict(
        model_path=start_model_path(cfg),
        heldout_teacher=REFERENCE,
        tags={t: m.source for t, m in job.metatokens.items()},
        prompt_tokens={
            "+".join(s): len(context_ids(tokenizer, "", job.teacher_prompt(s, cfg.generate.teacher_mode), chat)) - plain_tokens
            for s in job.eval_sets
        },
        counts={f"{split} {'+'.join(s) or 'untagged'}": len(group) for split, s, group in groups},
        generated_tokens=sum(len(r["output_ids"]) + len(r["base_output_ids"]) for r in rows),
    )


def run(cfg, job: Job, paths: StagePaths) -> Path:
    out_dir = paths["generate"]
    train_rows, heldout_rows = split_inputs(
        load_inputs(cfg.inputs.file), cfg.inputs.heldout_fraction, cfg.inputs.max_train, cfg.inputs.max_heldout
    )
    train_rows += synthesize.synthetic_rows(cfg, paths)  # all to training: evaluation stays on shipped inputs
    columns = conversations.record_columns(train_rows + heldout_rows, cfg.inputs.prompt_position)  # {} for plain requests
    train_rows, heldout_rows = ([{**r, **columns(r)} for r in rows] for rows in (train_rows, heldout_rows))
    if cfg.generate.backend not in ("hf", "vllm"):
        raise ConfigError(f"generate.backend is {cfg.generate.backend!r}. Fix: use hf or vllm.")
    groups = plan(job, train_rows, heldout_rows, cfg.mixture.seed)

    # Shards live in the stage's .partial folder on every rank (each writes its own batches), so a
    # killed job, restarted with the same command, picks up every finished batch.
    shard_root = out_dir.with_name(f".{out_dir.name}.partial") / "shards"
    with outputs.atomic_stage_dir(out_dir, "generate", paths.key("generate"), keep_partial=True, config=cfg) as (work, manifest):
        base, answers, decoders = {}, {}, {}
        for model_path, mode, own_groups, with_base in sampling_passes(cfg, groups):
            tokenizer, pass_base, pass_answers = sample_pass(cfg, job, model_path, mode, own_groups, heldout_rows, with_base, shard_root)
            base.update(pass_base)
            answers.update(pass_answers)
            decoders.update({(split, s): tokenizer for split, s, _ in own_groups})
        rows = records(groups, answers, base, decoders, columns)
        shutil.rmtree(work / "dataset", ignore_errors=True)  # a save cut short by a kill
        Dataset.from_list(rows).save_to_disk(str(work / "dataset"))
        if distributed.is_main():  # every rank has merged its shards by now (merge_shards is collective)
            shutil.rmtree(shard_root, ignore_errors=True)  # the dataset holds every record
        manifest.update(facts(cfg, job, groups, rows))
    log.info("generate: %d train + %d held-out samples -> %s", len(train_rows), len(heldout_rows), out_dir)
    return out_dir
