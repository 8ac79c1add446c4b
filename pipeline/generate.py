"""Stage 1, generate: the teacher (the model reading the full prompt) writes continuations.

For every input it samples a continuation and records, at every generated position, the teacher's
top-k log-probabilities (taken from the logits of the same forward passes that sampled the token:
no second pass). Held-out inputs are also answered by the model without any prompt, which the
evaluation uses to measure drift and to show samples side by side.

    python -m pipeline stage=generate metatoken=pirate
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import torch
from datasets import Dataset

from pipeline.progress import tqdm  # bars only when someone watches (progress=...)

from pipeline import conversations, distributed, outputs, synthesize
from pipeline.data import load_inputs, split_inputs
from pipeline.formats import context_ids, row_input
from pipeline.job import Job, TagSet, job_from_config
from pipeline.metatokens import ConfigError
from pipeline.mixture import assign_sets
from pipeline.models import load_model, load_tokenizer, resolve_model_path, start_model_path
from pipeline.teacher import prompt_kv, reading_prompt, shared_prefix_length

log = logging.getLogger(__name__)
REFERENCE = "reference"  # held-out samples come from the base model reading the fully expanded prompt


def stage_key(cfg, job: Job) -> dict:
    inputs = {**outputs.plain(cfg.inputs), "file": outputs.file_sha(cfg.inputs.file)}
    inputs.pop("synthetic", None)  # added later: runs without synthetic inputs keep their folders
    if inputs.get("prompt_position") == "system":  # added later, as the default layout: keys stay
        inputs.pop("prompt_position")
    if cfg.inputs.synthetic.count > 0:
        inputs["synthetic"] = outputs.key_hash(synthesize.stage_key(cfg, job))
    return {
        "model": outputs.model_key(cfg.model),
        "job": job.key(),
        "mixture_seed": cfg.mixture.seed,
        "inputs": inputs,
        "generate": generate_key(cfg.generate),
        # bootstrap: held-out inputs are answered by the reference teacher and the base model, not the
        # bootstrap model (expand-mode keys stay as they were: there the two are the same model)
        **({"heldout_teacher": REFERENCE} if cfg.generate.teacher_mode == "bootstrap" else {}),
        **({"bootstrap": outputs.bootstrap_key(cfg.generate)} if cfg.generate.teacher_mode == "bootstrap" else {}),
    }


def generate_key(gen_cfg) -> dict:
    key = outputs.plain(gen_cfg)
    if key.get("backend") == "hf":  # how vLLM calls are sharded does not touch the HF sampler's records
        key.pop("vllm_shard_size", None)
    return key


def output_dir(cfg, job: Job) -> Path:
    return outputs.stage_dir(cfg.paths.outputs, "generate", job.label, stage_key(cfg, job))


@torch.no_grad()
def sample_with_logprobs(
    model, tokenizer, contexts: list[list[int]], gen_cfg, seed: int, prompt=None, suppress_ids: list[int] | None = None
) -> list[dict]:
    """Sample one continuation per context and keep the top-k log-probs at every generated position.

    With `prompt` (a `teacher.PromptKV`), the first `len(prompt)` tokens, the same in every context,
    are read from its keys and values instead of being computed again. The rest of each context is left-padded
    after that prefix; padding is masked and position ids skip it, so every row sees exactly its
    own context. A continuation ends at (and includes) the first EOS, so the student also learns
    where the teacher stops. `suppress_ids` (a student's tags) are never sampled.
    """
    device = model.device
    pad_id = tokenizer.pad_token_id
    prefix_len = len(prompt) if prompt is not None else 0
    suffixes = [c[prefix_len:] for c in contexts]
    width = max(len(s) for s in suffixes)
    length = prefix_len + width
    input_ids = torch.full((len(contexts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, (ctx, suffix) in enumerate(zip(contexts, suffixes)):
        input_ids[b, :prefix_len] = torch.tensor(ctx[:prefix_len], dtype=torch.long)
        attention_mask[b, :prefix_len] = 1
        input_ids[b, length - len(suffix) :] = torch.tensor(suffix)
        attention_mask[b, length - len(suffix) :] = 1
    reading = reading_prompt(model, prompt, len(contexts)) if prefix_len else contextlib.nullcontext(None)
    torch.manual_seed(seed)
    with reading as past:
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            past_key_values=past,
            do_sample=True,
            temperature=gen_cfg.temperature,
            top_p=gen_cfg.top_p,
            top_k=0,
            max_new_tokens=gen_cfg.max_new_tokens,
            pad_token_id=pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            **({"suppress_tokens": list(suppress_ids)} if suppress_ids else {}),
        )
    new_tokens = generated.sequences[:, length:].cpu()
    # Raw logits (before temperature / top-p), so the recorded distribution is the model's own.
    logprobs = torch.log_softmax(torch.stack(generated.logits, dim=1).float(), dim=-1).cpu()
    top_logprobs, top_ids = logprobs.topk(gen_cfg.logprobs_top_k, dim=-1)
    eos_ids = set(_eos_ids(model, tokenizer))
    results = []
    for b in range(len(contexts)):
        ids = new_tokens[b].tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))
        results.append(
            {
                "output_ids": ids[:end],
                "topk_ids": top_ids[b, :end].tolist(),
                "topk_logprobs": top_logprobs[b, :end].tolist(),
            }
        )
    return results


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted(set(eos) | {tokenizer.eos_token_id})


def sample_all(
    model, tokenizer, contexts, gen_cfg, desc: str, shard_dir: Path | None = None, dtype: str = "float32"
) -> list[dict]:
    """Batch the contexts (longest first, to waste little padding) and sample them all.

    With `gen_cfg.backend=vllm`, a "batch" is one engine call of `gen_cfg.vllm_shard_size` inputs.
    With `shard_dir`, each finished batch is written there at once (atomically), and batches whose
    shard exists are read back instead of sampled: a killed job restarted with the same command
    continues where it stopped, without losing or repeating a record. The batch plan and seeds do
    not depend on what was done before, so the result equals an uninterrupted run's.

    With `gen_cfg.prompt_cache`, the prefix all contexts share (the prompt) is run through the
    model once, and every batch reads its keys and values (shared, not copied: see teacher.py). Under several ranks the
    batches (planned the same way on every rank) are dealt round-robin, so each batch, its seed
    included, is exactly what one rank would have sampled.
    """
    prefix_len = shared_prefix_length(contexts) if gen_cfg.prompt_cache else 0
    prompt = None  # computed on the first batch that needs sampling (none, when resuming a finished group)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    vllm = gen_cfg.backend == "vllm"  # the engine batches and caches the shared prompt itself; we shard its calls
    size = gen_cfg.vllm_shard_size if vllm else gen_cfg.batch_size
    if vllm:
        from pipeline import vllm_backend
    if shard_dir is not None:
        shard_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = [None] * len(contexts)
    bar = tqdm(total=len(contexts), desc=desc, unit="sample", disable=not distributed.is_main())
    for batch_index, start in enumerate(range(0, len(order), size)):
        if not distributed.owns_batch(batch_index):  # several ranks: each samples its own batches
            continue
        chunk = order[start : start + size]
        shard = shard_dir / f"batch-{batch_index:05d}.json" if shard_dir is not None else None
        if shard is not None and shard.is_file():
            sampled = json.loads(shard.read_text())
        else:
            # The seed depends on the batch's first input, not on the order batches run in.
            seed = gen_cfg.seed * 1_000_003 + chunk[0]
            if vllm:  # `model` is the model's path: vLLM loads it itself; one seed per request, by input index
                seeds = [gen_cfg.seed * 1_000_003 + i for i in chunk]
                sampled = vllm_backend.sample_all(model, [contexts[i] for i in chunk], gen_cfg, seeds, dtype)
            else:
                if prefix_len and prompt is None:
                    prompt = prompt_kv(model, contexts[0][:prefix_len])
                sampled = sample_with_logprobs(model, tokenizer, [contexts[i] for i in chunk], gen_cfg, seed, prompt)
            if shard is not None:
                outputs.write_json(shard, sampled)
                _maybe_kill_for_test()
        for i, r in zip(chunk, sampled):
            results[i] = r
        bar.update(len(chunk))
    bar.close()
    return distributed.merge_shards(results)  # by input index: the same records whatever the number of ranks


KILL_AFTER_SHARDS_ENV = "PIPELINE_KILL_AFTER_SHARDS"  # fault injection (tests): SIGKILL after N new shards
_shards_written = 0


def _maybe_kill_for_test() -> None:
    global _shards_written
    _shards_written += 1
    if _shards_written == int(os.environ.get(KILL_AFTER_SHARDS_ENV, "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def plan(job: Job, train_rows: list[dict], heldout_rows: list[dict], seed: int) -> list[tuple[str, TagSet, list[dict]]]:
    """Which inputs the teacher answers under which tag set: (split, tag set, rows) groups.

    Training inputs are each assigned one set by the mixture's weights; every evaluated set
    answers all held-out inputs (so sets are compared on the same inputs).
    """
    assigned = assign_sets([r["id"] for r in train_rows], job.train_sets, job.weights, seed)
    groups = [("train", s, [r for r, a in zip(train_rows, assigned) if a == s]) for s in job.train_sets]
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


def run(cfg) -> Path:
    job = job_from_config(cfg)
    out_dir = output_dir(cfg, job)
    if outputs.already_done(out_dir, cfg.force, "generate"):
        return out_dir
    train_rows, heldout_rows = split_inputs(
        load_inputs(cfg.inputs.file), cfg.inputs.heldout_fraction, cfg.inputs.max_train, cfg.inputs.max_heldout
    )
    train_rows += synthesize.synthetic_rows(cfg, job)  # all to training: evaluation stays on shipped inputs
    columns = conversations.record_columns(train_rows + heldout_rows, cfg.inputs.prompt_position)  # {} for plain requests
    train_rows, heldout_rows = ([{**r, **columns(r)} for r in rows] for rows in (train_rows, heldout_rows))
    if cfg.generate.backend not in ("hf", "vllm"):
        raise ConfigError(f"generate.backend is {cfg.generate.backend!r}. Fix: use hf or vllm.")
    chat = cfg.model.chat
    groups = plan(job, train_rows, heldout_rows, cfg.mixture.seed)

    # Shards live in the stage's .partial folder on every rank (each writes its own batches), so a
    # killed job, restarted with the same command, picks up every finished batch.
    shard_root = out_dir.with_name(f".{out_dir.name}.partial") / "shards"
    with outputs.atomic_stage_dir(out_dir, "generate", stage_key(cfg, job), keep_partial=True, config=cfg) as (work, manifest):
        base, answers, decoders = {}, {}, {}
        for model_path, mode, own_groups, with_base in sampling_passes(cfg, groups):
            tokenizer, pass_base, pass_answers = sample_pass(cfg, job, model_path, mode, own_groups, heldout_rows, with_base, shard_root)
            base.update(pass_base)
            answers.update(pass_answers)
            decoders.update({(split, s): tokenizer for split, s, _ in own_groups})
        records = []
        for split, tag_set, rows in groups:  # in plan order: the dataset's order does not depend on the passes
            decode = decoders[(split, tag_set)].decode
            for row, t in zip(rows, answers[(split, tag_set)]):
                b = base.get(row["id"]) if split == "heldout" else None
                records.append(
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
        shutil.rmtree(work / "dataset", ignore_errors=True)  # a save cut short by a kill
        Dataset.from_list(records).save_to_disk(str(work / "dataset"))
        if distributed.is_main():  # every rank has merged its shards by now (merge_shards is collective)
            shutil.rmtree(shard_root, ignore_errors=True)  # the dataset holds every record
        tokenizer = load_tokenizer(start_model_path(cfg))
        plain_tokens = len(context_ids(tokenizer, "", None, chat))
        manifest.update(
            model_path=start_model_path(cfg),
            heldout_teacher=REFERENCE,
            tags={t: m.source for t, m in job.metatokens.items()},
            prompt_tokens={
                "+".join(s): len(context_ids(tokenizer, "", job.teacher_prompt(s, cfg.generate.teacher_mode), chat)) - plain_tokens
                for s in job.eval_sets
            },
            counts={f"{split} {'+'.join(s) or 'untagged'}": len(rows) for split, s, rows in groups},
            generated_tokens=sum(len(r["output_ids"]) + len(r["base_output_ids"]) for r in records),
        )
    log.info("generate: %d train + %d held-out samples -> %s", len(train_rows), len(heldout_rows), out_dir)
    return out_dir
