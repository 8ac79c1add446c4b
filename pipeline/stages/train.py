"""Stage 3, train: teach the student (the model reading just the tag) to act like the teacher.

Objectives:
- `kl`:  match the teacher's recorded top-k distribution at every position (dense signal);
- `sft`: cross-entropy on the teacher's sampled tokens;
- `onpolicy`: the student samples from its tagged context, the teacher scores those tokens with its
  full distribution, reverse KL or generalised JSD (core/onpolicy.py: the steps, the cost).
Trainable parameters:
- `embedding`: only the new tag rows (the rest of the model is untouched, so untagged text cannot drift);
- `lora`: LoRA adapters (peft) plus the new tag rows;
- `full`: every weight.
SmolLM2 ties input and output embeddings, and peft cannot train single rows of a tied matrix, so the
tag rows train as their own small parameter (core/tag_rows.py) and are written into the matrix at save.

The result is a plain Hugging Face directory (model + tokenizer; LoRA merged unless
`train.merge_lora=false`, which saves a peft adapter instead).

    python -m pipeline stage=train metatoken=pirate train.objective=kl train.params=lora
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from pathlib import Path

import torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments, get_scheduler, set_seed
from transformers.trainer_utils import get_last_checkpoint

from pipeline.core import card, onpolicy, tag_rows
from pipeline.core.catalog import tags_of
from pipeline.core.job import Job
from pipeline.core.models import load_model, load_tokenizer
from pipeline.core.pretrain_data import collate_blocks, training_stream
from pipeline.core.teacher import CachedPromptTeacher
from pipeline.core.trainer import LOSS_SUM_FILE, DistillCollator, DistillTrainer, build_examples, whole_run_loss
from pipeline.errors import ConfigError
from pipeline.runtime import distributed, outputs, progress, tracking
from pipeline.stages.paths import StagePaths

log = logging.getLogger(__name__)
OBJECTIVES = ("kl", "sft", "onpolicy")
PARAMS = ("embedding", "lora", "full")
TEACHERS = ("recorded", "online")


def check_config(cfg, job: Job) -> None:
    """Fail on a bad train setting before any stage runs (called by `run_stages` and by `run`)."""
    train_cfg = cfg.train
    if train_cfg.teacher not in TEACHERS:
        raise ConfigError(f"train.teacher is {train_cfg.teacher!r}. Fix: use one of {', '.join(TEACHERS)}.")
    if train_cfg.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective is {train_cfg.objective!r}. Fix: use one of {', '.join(OBJECTIVES)}.")
    if train_cfg.objective == "onpolicy":
        onpolicy.check_settings(cfg, job)
    if train_cfg.max_examples is not None and train_cfg.max_examples < 1:
        raise ConfigError(f"train.max_examples is {train_cfg.max_examples}. Fix: use a positive number, or null for all.")
    if train_cfg.bf16 and cfg.model.device == "cpu" and not cpu_has_bf16():
        log.warning("train.bf16=true on a CPU without AVX-512 BF16 or AMX: bf16 steps are emulated and slower than "
                    "float32 here. Fix: train.bf16=false.")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (where bf16 autocast pays on CPU)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def prepare_trainable(model, train_cfg, tag_ids: list[int]):
    """Choose what trains; returns (model, optimizer param groups)."""
    if train_cfg.params not in PARAMS:
        raise ConfigError(f"train.params is {train_cfg.params!r}. Fix: use one of {', '.join(PARAMS)}.")
    if train_cfg.params == "full":
        model.requires_grad_(True)
        return model, [{"params": [p for p in model.parameters() if p.requires_grad], "lr": train_cfg.lr}]
    model.requires_grad_(False)
    if train_cfg.params == "lora":
        lora = LoraConfig(
            r=train_cfg.lora_r,
            lora_alpha=train_cfg.lora_alpha,
            lora_dropout=train_cfg.lora_dropout,
            target_modules=list(train_cfg.lora_targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    # after peft, which freezes every parameter that is not an adapter
    rows = tag_rows.attach(model.get_input_embeddings(), tag_ids)
    groups = [{"params": [rows], "lr": train_cfg.embedding_lr, "weight_decay": 0.0}]
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and p is not rows]
    if adapters:
        groups.append({"params": adapters, "lr": train_cfg.lr})
    return model, groups


def frozen_start(model, params: str, ext_dir: Path, cfg):
    """A context-manager factory yielding the frozen starting model (the untagged term's reference
    and the online teacher)."""
    if params == "embedding":
        return lambda: contextlib.nullcontext(model)  # only the tag row trains; nothing else can change
    if params == "lora":
        return lambda: _adapters_off(model)
    with distributed.unsharded():  # under ZeRO-3 the frozen copy stays whole on each rank (it has no engine)
        frozen = load_model(str(ext_dir), cfg.model.dtype, distributed.device(cfg.model)).requires_grad_(False)
    return lambda: contextlib.nullcontext(frozen)


@contextlib.contextmanager
def _adapters_off(model):
    with model.disable_adapter():
        yield model


def held_tag_ids(ext_dir: Path, tokenizer) -> list[int]:
    """Ids of every tag the extended model holds: its new tags and, when bootstrapped, its teacher's."""
    return sorted(tokenizer.convert_tokens_to_ids(t) for t in tags_of(ext_dir))


def save_student(model, tokenizer, out: Path, merge_lora: bool, tag_ids: list[int]) -> None:
    """Save the student; `tag_ids` are every tag it holds (a bootstrapped student's inner tags too)."""
    # generate() in plain transformers then never writes a tag (the student reads tags, never emits them).
    model.generation_config.suppress_tokens = sorted(tag_ids)
    tag_rows.merge(model.get_input_embeddings())  # the trained tag rows into the (tied) matrix: a plain model
    if hasattr(model, "merge_and_unload") and merge_lora:
        model = model.merge_and_unload()
    elif hasattr(model, "merge_and_unload"):
        # An unmerged adapter keeps the resized embedding in the adapter so the tag rows travel with it.
        model.save_pretrained(out, save_embedding_layers=True)
        tokenizer.save_pretrained(out)
        return
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _loss_so_far(checkpoint: str | None) -> tuple[float, int]:
    """(summed loss, steps) at a checkpoint; (0, 0) when there is none."""
    path = Path(checkpoint or "", LOSS_SUM_FILE)
    if not checkpoint or not path.is_file():
        return 0.0, 0
    saved = json.loads(path.read_text())
    return saved["loss_sum"], saved["step"]


def load_records(cfg, gen_dir: Path):
    """The generated training records (the first `train.max_examples` of them, when set)."""
    records = load_from_disk(str(gen_dir / "dataset")).filter(lambda r: r["split"] == "train")
    if cfg.train.max_examples is not None:
        records = records.select(range(min(cfg.train.max_examples, len(records))))
    return records


def online_teacher(cfg, job: Job, frozen, tokenizer):
    """The teacher that scores continuations now, from one prompt's cache (online teacher, on-policy); else None."""
    if cfg.train.teacher != "online" and cfg.train.objective != "onpolicy":  # onpolicy: it scores the samples
        return None
    if len(job.train_sets) != 1:
        raise ConfigError(
            "train.teacher=online computes one prompt's cache; this run trains several tag sets (mixture). "
            "Fix: use train.teacher=recorded for mixtures."
        )
    prompt = job.teacher_prompt(job.train_sets[0], cfg.generate.teacher_mode)
    return CachedPromptTeacher(frozen, tokenizer, prompt, cfg.model.chat, cfg.train.teacher_memo_mb)


def total_steps(train_cfg, n_examples: int, global_batch: int, pretrain_steps: int | None) -> int:
    if pretrain_steps is not None:
        steps = pretrain_steps
    else:
        steps_per_epoch = math.ceil(n_examples / global_batch)
        steps = train_cfg.max_steps if train_cfg.max_steps > 0 else math.ceil(steps_per_epoch * train_cfg.epochs)
    if steps < 1:  # max_steps=0 makes the Trainer fall back to its own epoch count
        raise ConfigError(f"train: {steps} steps to run. Fix: set train.epochs above 0 or train.max_steps to at least 1.")
    return steps


def training_args(cfg, work: Path, run_name: str, steps: int, ds_config) -> TrainingArguments:
    train_cfg = cfg.train
    if train_cfg.report_to == "wandb":
        tracking.set_environment(cfg.logger)
    return TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=train_cfg.grad_accum,
        max_steps=steps,
        logging_steps=train_cfg.logging_steps,
        save_strategy="steps" if train_cfg.save_steps > 0 else "no",
        save_steps=max(train_cfg.save_steps, 1),
        save_total_limit=train_cfg.save_total_limit,
        report_to=[] if train_cfg.report_to == "none" else [train_cfg.report_to],
        run_name=run_name,
        seed=train_cfg.seed,
        use_cpu=cfg.model.device == "cpu",
        bf16=train_cfg.bf16,  # accelerate wraps the model's forward in bf16 autocast (CPU or GPU)
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress.enabled(),
        deepspeed=ds_config,
        include_num_input_tokens_seen=True,
    )


def make_trainer(
    train_cfg, model, args, examples, optimizers, tokenizer, tag_ids, frozen, teacher, zero3: bool = False
) -> DistillTrainer:
    """The one Trainer, its objective chosen here: the distillation objective, or `lm` in the pretrain mode."""
    pretraining = train_cfg.mode == "pretrain"
    return DistillTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=collate_blocks if pretraining else DistillCollator(tokenizer.pad_token_id),
        optimizers=optimizers,
        objective="lm" if pretraining else train_cfg.objective,
        tag_ids=tag_ids,
        # untagged inputs never read the tag row, so with `embedding` there is nothing to preserve
        untagged_weight=train_cfg.untagged_weight if train_cfg.params != "embedding" and not pretraining else 0.0,
        reference=None if pretraining else frozen,
        teacher=teacher,
        # ZeRO-3: each reference pass gathers the sharded weights with every rank, so no rank may skip one
        reference_memo_mb=0 if zero3 else train_cfg.reference_memo_mb,
        **(
            {"onpolicy_settings": onpolicy.Settings.from_config(train_cfg), "pad_id": tokenizer.pad_token_id}
            if train_cfg.objective == "onpolicy" and not pretraining
            else {}
        ),
    )


def fit(trainer: DistillTrainer, cfg, work: Path, run_name: str):
    """Train, resuming from the last checkpoint in `work` when there is one; returns (result, the whole run's mean loss)."""
    last = get_last_checkpoint(str(work / "checkpoints")) if (work / "checkpoints").is_dir() else None
    before = _loss_so_far(last)  # read now: save_total_limit may delete that checkpoint during training
    trainer.loss_sum_before = before[0]
    run = tracking.start(cfg, "train", run_name, group=run_name)  # rank 0; HF's wandb callback logs into it
    result = trainer.train(resume_from_checkpoint=last)
    tracking.finish(run)
    final = whole_run_loss(*before, result.training_loss, result.global_step) if last else result.training_loss
    return result, final


def run(cfg, job: Job, paths: StagePaths) -> Path:
    out_dir, train_cfg = paths["train"], cfg.train
    check_config(cfg, job)
    gen_dir, ext_dir = paths["generate"], paths["extend"]
    outputs.require({"generate": gen_dir, "extend": ext_dir}, by="train")
    records = load_records(cfg, gen_dir)
    tokenizer = load_tokenizer(str(ext_dir))
    model = load_model(str(ext_dir), cfg.model.dtype, "cpu")
    tag_ids = list(outputs.read_manifest(ext_dir)["tag_ids"].values())
    set_seed(train_cfg.seed)  # LoRA's random init: the same whether or not other stages ran first in this process
    model, groups = prepare_trainable(model, train_cfg, tag_ids)
    model.train()
    frozen = frozen_start(model, train_cfg.params, ext_dir, cfg)
    pretraining = train_cfg.mode == "pretrain"
    teacher, pretrain_steps = None, None
    if pretraining:  # a packed stream of tagged + plain documents, LM loss (core/pretrain_data.py)
        examples, pretrain_steps = training_stream(cfg, records, tokenizer, tag_ids)
    else:
        teacher = online_teacher(cfg, job, frozen, tokenizer)
        examples = build_examples(records, tokenizer, cfg.model.chat, teacher, job, cfg.mixture.seed)
    n_examples = len(records) if pretraining else len(examples)

    ds_config = distributed.deepspeed_config(cfg)  # validated before any training work
    with outputs.atomic_stage_dir(out_dir, "train", paths.key("train"), keep_partial=True, shared=True, config=cfg) as (work, manifest):
        global_batch = train_cfg.batch_size * train_cfg.grad_accum * distributed.world_size()
        steps = total_steps(train_cfg, n_examples, global_batch, pretrain_steps)
        optimizer = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)
        scheduler = get_scheduler("cosine", optimizer, int(train_cfg.warmup_ratio * steps), steps)
        args = training_args(cfg, work, out_dir.name, steps, ds_config)
        distributed.check_world_size(args)
        log.info("train: rank %d of world size %d (deepspeed: %s)", args.process_index, args.world_size, bool(ds_config))
        zero3 = bool(ds_config) and ds_config["zero_optimization"]["stage"] == 3
        trainer = make_trainer(
            train_cfg, model, args, examples, (optimizer, scheduler), tokenizer, tag_ids, frozen, teacher, zero3
        )
        progress.attach(trainer)  # the step bar also shows the loss
        tracking.add_callbacks_first(trainer, tracking.train_callbacks(work, global_batch))
        result, final_loss = fit(trainer, cfg, work, out_dir.name)
        distributed.barrier()  # every rank has written its last checkpoint files
        with distributed.full_params(trainer.model):  # ZeRO-3: gather the weights; rank 0 saves them
            if distributed.is_main():
                save_student(trainer.model, tokenizer, work, train_cfg.merge_lora, held_tag_ids(ext_dir, tokenizer))
        if not distributed.is_main():
            return out_dir
        outputs.write_json(work / "train_log.json", trainer.state.log_history)
        manifest.update(
            base_extended=str(ext_dir),
            examples=n_examples,
            steps=steps,
            final_loss=final_loss,
            train_seconds=round(result.metrics.get("train_runtime", 0.0), 1),
            world_size=distributed.world_size(),
            deepspeed_stage=ds_config["zero_optimization"]["stage"] if ds_config else None,
        )
        manifest["card"] = card.facts(cfg, job, tokenizer)  # the model card's facts, for evaluate to add its scores
        card.write(work, manifest, name=out_dir.name)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    log.info("train: %d examples, %d steps, loss %.4f -> %s", n_examples, steps, result.training_loss, out_dir)
    return out_dir
