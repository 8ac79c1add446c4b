"""Stage 3, train: teach the student (the model reading just the tag) to act like the teacher.

Objectives:
- `kl`:  match the teacher's recorded top-k distribution at every position (dense signal);
- `sft`: cross-entropy on the teacher's sampled tokens;
- `onpolicy`: the student samples from its tagged context, the teacher scores those tokens with its
  full distribution, reverse KL or generalised JSD (pipeline/onpolicy.py: the steps, the cost).
Trainable parameters:
- `embedding`: only the new tag rows (the rest of the model is untouched, so untagged text cannot drift);
- `lora`: LoRA adapters (peft) plus the new tag rows;
- `full`: every weight.
SmolLM2 ties input and output embeddings, and peft cannot train single rows of a tied matrix, so the
tag rows train through a gradient mask on the (shared) embedding matrix.

The result is a plain Hugging Face directory (model + tokenizer; LoRA merged unless
`train.merge_lora=false`, which saves a peft adapter instead).

    python -m pipeline stage=train metatoken=pirate train.objective=kl train.params=lora
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import math
import os
import shutil
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import Trainer, TrainingArguments, get_scheduler, set_seed
from transformers.trainer_utils import get_last_checkpoint

from pipeline import card, distributed, extend, generate, onpolicy, outputs, progress, tracking
from pipeline.data import pad_2d, pad_examples
from pipeline.formats import context_ids
from pipeline.losses import full_kl, masked_mean, suppress, token_cross_entropy, topk_bins, topk_kl
from pipeline.job import Job, job_from_config
from pipeline.metatokens import ConfigError
from pipeline.models import load_model, load_tokenizer
from pipeline.scoring import ReferenceMemo, scored_logits
from pipeline.teacher import CachedPromptTeacher

log = logging.getLogger(__name__)
OBJECTIVES = ("kl", "sft", "onpolicy")
PARAMS = ("embedding", "lora", "full")
TEACHERS = ("recorded", "online")
EMBEDDING_FILE = "embedding.safetensors"  # in LoRA checkpoints: the (tag rows of the) input embedding


def stage_key(cfg, job: Job) -> dict:
    train_cfg = outputs.plain(cfg.train)
    train_cfg.pop("report_to", None)  # where logs go does not change the model
    train_cfg.pop("teacher_memo_mb", None)  # nor does keeping teacher logits instead of recomputing them
    train_cfg.pop("reference_memo_mb", None)  # nor keeping the untagged term's reference logits
    train_cfg.pop("save_total_limit", None)  # nor how many checkpoints are kept on the way
    train_cfg.pop("pretrain", None)
    if train_cfg.get("max_examples") is None:  # added later: runs without a cap keep their folders
        train_cfg.pop("max_examples", None)
    train_cfg = onpolicy.key_fields(train_cfg)  # kl / sft keys stay as they were before onpolicy existed
    if train_cfg.pop("mode", "finetune") == "pretrain":  # finetune keys stay as they were before pretrain existed
        from pipeline.pretrain import data_key

        train_cfg.update(mode="pretrain", pretrain=data_key(cfg))
    generate_key = generate.stage_key(cfg, job)
    generate_key.pop("heldout_teacher", None)  # who answers the held-out inputs never touches training
    key = {
        "generate": outputs.key_hash(generate_key),
        "extend": outputs.key_hash(extend.stage_key(cfg, job)),
        "train": train_cfg,
    }
    if distributed.world_size() > 1:  # the global batch is batch_size x grad_accum x ranks (DDP or ZeRO: same math)
        key["world_size"] = distributed.world_size()
    return key


def output_dir(cfg, job: Job) -> Path:
    return outputs.stage_dir(cfg.paths.outputs, "train", job.label, stage_key(cfg, job))


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


def student_context(job: Job, record: dict, tokenizer, chat: bool, seed: int) -> list[int]:
    """The student's context for a record: its tags side by side in place of the prompt.

    With `mixture.order=random` each record gets its own order (seeded by its id), so the tags
    are learned as a set; untagged records get the plain context.
    """
    rng = random.Random(f"{seed}:{record['id']}:{'+'.join(record['tags'])}")
    return context_ids(tokenizer, record["input"], job.student_tags(tuple(record["tags"]), rng), chat)


def build_examples(records, tokenizer, chat: bool, teacher=None, job: Job | None = None, seed: int = 0) -> list[dict]:
    """Student examples: the tag(s) in place of the prompt, then the teacher's continuation.

    `plain_context_ids` is the same input with no tag, for the term that keeps untagged
    behaviour in place; with an online teacher, `teacher_suffix_ids` is the teacher's context
    after its cached prompt.
    """
    examples = []
    for r in records:
        examples.append(
            {
                **({"teacher_suffix_ids": teacher.suffix_ids(r["input"])} if teacher else {}),
                "context_ids": student_context(job, r, tokenizer, chat, seed)
                if job
                else context_ids(tokenizer, r["input"], "".join(r["tags"]) or None, chat),
                "plain_context_ids": context_ids(tokenizer, r["input"], None, chat),
                "output_ids": r["output_ids"],
                "topk_ids": r["topk_ids"],
                "topk_logprobs": r["topk_logprobs"],
            }
        )
    return examples


class DistillCollator:
    """Pads student examples and the teacher's top-k tables to one batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict:
        batch = pad_examples([e["context_ids"] for e in examples], [e["output_ids"] for e in examples], self.pad_id)
        k = len(examples[0]["topk_ids"][0])
        batch["output_ids"] = pad_2d([[[t] for t in e["output_ids"]] for e in examples], 1, 0, torch.long)[..., 0]
        batch["topk_ids"] = pad_2d([e["topk_ids"] for e in examples], k, 0, torch.long)
        batch["topk_logprobs"] = pad_2d([e["topk_logprobs"] for e in examples], k, -1e4, torch.float)
        plain = pad_examples([e["plain_context_ids"] for e in examples], [e["output_ids"] for e in examples], self.pad_id)
        batch.update({f"plain_{name}": value for name, value in plain.items()})
        if "teacher_suffix_ids" in examples[0]:
            batch["teacher_suffix_ids"] = [e["teacher_suffix_ids"] for e in examples]
            batch["continuations"] = [e["output_ids"] for e in examples]
            batch["student_contexts"] = [e["context_ids"] for e in examples]  # where on-policy samples start
        return batch


def continuation_logits(model, batch: dict, tag_ids: list[int], prefix: str = "") -> torch.Tensor:
    """Logits [B, T, V] that predict each continuation token (teacher-forced), tags suppressed."""
    logits = scored_logits(  # the LM head only at the continuation's positions (pipeline/scoring.py)
        model, batch[prefix + "output_positions"], input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]
    )
    return suppress(logits, tag_ids)


def distill_loss(model, batch: dict, objective: str, tag_ids: list[int], teacher=None) -> torch.Tensor:
    """Mean per-token loss of the student (reading the tag) on the teacher's continuations.

    With an online `teacher`, `kl` matches its full distribution computed now from the prompt
    cache; otherwise the top-k recorded while generating.
    """
    student = continuation_logits(model, batch, tag_ids)
    if objective == "kl" and teacher is not None:
        target = suppress(teacher.continuation_logits(batch["teacher_suffix_ids"], batch["continuations"]), tag_ids)
        per_token = full_kl(target, student)
    elif objective == "kl":
        per_token = topk_kl(student, batch["topk_ids"], batch["topk_logprobs"])
    else:
        per_token = token_cross_entropy(student, batch["output_ids"])
    return masked_mean(per_token, batch["output_mask"])


def onpolicy_loss(model, sampler, batch: dict, tag_ids: list[int], teacher, settings, seed: int, pad_id: int):
    """The divergence between student and teacher on continuations the student samples now.

    `sampler` is the model to sample from (the training model, unwrapped from DDP); the student's
    teacher-forced pass on its own samples then carries the gradient.
    """
    contexts = batch["student_contexts"]
    samples = onpolicy.sample_student(sampler, contexts, tag_ids, pad_id, settings, seed)
    sampled = {k: v.to(batch["input_ids"].device) for k, v in pad_examples(contexts, samples, pad_id).items()}
    target = suppress(teacher.continuation_logits(batch["teacher_suffix_ids"], samples, keep=False), tag_ids)
    student = continuation_logits(model, sampled, tag_ids)
    return masked_mean(onpolicy.divergence(student, target.to(student.device), settings), sampled["output_mask"])


def offpolicy_loss(model, batch: dict, tag_ids: list[int], teacher, settings) -> torch.Tensor:
    """The on-policy divergence on the teacher's recorded samples: recorded top-k bins, or the online teacher."""
    student = continuation_logits(model, batch, tag_ids)
    if settings.recorded_offpolicy:
        student, target = topk_bins(student, batch["topk_ids"], batch["topk_logprobs"])
    else:
        target = suppress(teacher.continuation_logits(batch["teacher_suffix_ids"], batch["continuations"]), tag_ids)
    return masked_mean(onpolicy.divergence(student, target.to(student.device), settings), batch["output_mask"])


def preserve_loss(model, reference, batch: dict, tag_ids: list[int], memo: ReferenceMemo | None = None) -> torch.Tensor:
    """KL(reference || student) on the same inputs without a tag: keeps untagged behaviour in place.

    `reference` is a context manager factory that yields the frozen starting model (for LoRA, the
    same model with its adapters switched off, so no second copy is held in memory). With a `memo`,
    each example's reference logits are computed once and read back in later epochs.
    """

    def compute(rows: dict) -> torch.Tensor:
        with torch.no_grad(), reference() as ref:
            return continuation_logits(ref, rows, tag_ids, "plain_")

    target = compute(batch) if memo is None else memo.logits(compute, batch, tag_ids)
    student = continuation_logits(model, batch, tag_ids, "plain_")
    return masked_mean(full_kl(target, student), batch["plain_output_mask"])


class TrainingDiverged(FloatingPointError):
    """A NaN or infinite loss: training stops, and the last good checkpoint stays on disk."""


LOSS_SUM_FILE = "loss_sum.json"  # in each checkpoint: the summed per-step loss so far, for the whole run's mean


def whole_run_loss(before_sum: float, before_steps: int, resumed_mean: float, total_steps: int) -> float:
    """Mean per-step loss of a run resumed at `before_steps`: the earlier steps' sum plus the resumed part's.

    The Trainer's `training_loss` after a resume averages only the steps run since the checkpoint.
    """
    return (before_sum + resumed_mean * (total_steps - before_steps)) / max(total_steps, 1)


class DistillTrainer(Trainer):
    """HF Trainer with the distillation loss (it keeps checkpoints, logging, DeepSpeed and DDP)."""

    # compute_loss returns a per-batch mean, never a sum over `num_items_in_batch`: the Trainer must divide
    # it by the accumulation steps. (With `labels` in a batch, as in pretrain mode, it would otherwise
    # assume the loss was already normalised, and gradients would be grad_accum times too large.)
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        objective: str,
        tag_ids: list[int],
        untagged_weight=0.0,
        reference=None,
        teacher=None,
        onpolicy_settings=None,
        pad_id: int = 0,
        reference_memo_mb: float = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.onpolicy_settings, self.pad_id = onpolicy_settings, pad_id
        self._draw = (-1, -1)  # (global step, micro-batch within it) of the last loss: seeds on-policy draws
        self.teacher = teacher
        self.tag_ids = tag_ids
        self.untagged_weight = untagged_weight
        self.reference = reference
        self.reference_memo = ReferenceMemo(reference_memo_mb) if reference_memo_mb > 0 else None
        self.client_optimizers = kwargs.get("optimizers", (None, None))
        self.loss_sum_before = 0.0  # a resumed run: the summed loss of the steps before its checkpoint

    def create_optimizer(self, model=None):
        # DeepSpeed's init drops the optimizer given to __init__ and asks for a new one: hand ours back.
        if self.optimizer is None:
            self.optimizer = self.client_optimizers[0]
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = self.client_optimizers[1]
        return super().create_scheduler(num_training_steps, optimizer)

    # A peft checkpoint holds only the adapters, but the tag rows train in the base embedding: keep it
    # next to them, or a resumed LoRA run would restart the tag rows from their initial values.
    # (DeepSpeed checkpoints hold the whole engine state and are restored by DeepSpeed itself.)
    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if hasattr(self.model, "peft_config") and not self.is_deepspeed_enabled and self.args.should_save:
            from safetensors.torch import save_file

            weight = self.model.get_input_embeddings().weight.detach().cpu().contiguous()
            save_file({"weight": weight}, os.path.join(output_dir or self.args.output_dir, EMBEDDING_FILE))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # what the run's loss summed to so far (the Trainer keeps it only in memory)
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            summed = self.loss_sum_before + self._total_loss_scalar + float(self._tr_loss.item() if torch.is_tensor(self._tr_loss) else self._tr_loss)
            outputs.write_json(folder / LOSS_SUM_FILE, {"step": self.state.global_step, "loss_sum": summed})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, EMBEDDING_FILE)
        if os.path.exists(path):
            from safetensors.torch import load_file

            with torch.no_grad():
                (model or self.model).get_input_embeddings().weight.copy_(load_file(path)["weight"])

    def _onpolicy_step_loss(self, model, inputs) -> torch.Tensor:
        """On- or off-policy, as drawn for this (step, micro-batch); the samples' seed depends on nothing else."""
        step = self.state.global_step  # completed optimizer steps: restored from the checkpoint on resume
        micro = self._draw[1] + 1 if self._draw[0] == step else 0
        self._draw = (step, micro)
        settings = self.onpolicy_settings
        if not onpolicy.is_onpolicy_step(settings, step, micro):
            return offpolicy_loss(model, inputs, self.tag_ids, self.teacher, settings)
        seed = onpolicy.draw_seed(settings.seed, step, micro, self.args.process_index, "samples")
        sampler = self.accelerator.unwrap_model(model)
        return onpolicy_loss(model, sampler, inputs, self.tag_ids, self.teacher, settings, seed, self.pad_id)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective == "onpolicy":
            loss = self._onpolicy_step_loss(model, inputs)
        else:
            loss = distill_loss(model, inputs, self.objective, self.tag_ids, self.teacher)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"train: the loss became {loss.item()} at step {self.state.global_step + 1}. The checkpoints saved so "
                f"far are kept in {self.args.output_dir} and a re-run with the same config resumes from the last one. "
                f"Fix: lower train.lr / train.embedding_lr, or check the generate output for empty samples."
            )
        if self.untagged_weight > 0 and self.reference is not None:
            loss = loss + self.untagged_weight * preserve_loss(model, self.reference, inputs, self.tag_ids, self.reference_memo)
        return (loss, None) if return_outputs else loss


def mask_to_rows(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Let gradient reach only `rows` of `weight` (Adam then leaves the other rows exactly as they were)."""
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[rows] = 1.0
    weight.register_hook(lambda grad: grad * keep)


def prepare_trainable(model, train_cfg, tag_ids: list[int]):
    """Choose what trains; returns (model, optimizer param groups)."""
    if train_cfg.params not in PARAMS:
        raise ConfigError(f"train.params is {train_cfg.params!r}. Fix: use one of {', '.join(PARAMS)}.")
    if train_cfg.params == "full":
        model.requires_grad_(True)
        return model, [{"params": [p for p in model.parameters() if p.requires_grad], "lr": train_cfg.lr}]
    model.requires_grad_(False)
    if train_cfg.params == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=train_cfg.lora_r,
            lora_alpha=train_cfg.lora_alpha,
            lora_dropout=train_cfg.lora_dropout,
            target_modules=list(train_cfg.lora_targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    mask_to_rows(embedding, tag_ids)
    groups = [{"params": [embedding], "lr": train_cfg.embedding_lr, "weight_decay": 0.0}]
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and p is not embedding]
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
    from pipeline.catalog import tags_of

    return sorted(tokenizer.convert_tokens_to_ids(t) for t in tags_of(ext_dir))


def save_student(model, tokenizer, out: Path, merge_lora: bool, tag_ids: list[int]) -> None:
    """Save the student; `tag_ids` are every tag it holds (a bootstrapped student's inner tags too)."""
    # generate() in plain transformers then never writes a tag (the student reads tags, never emits them).
    model.generation_config.suppress_tokens = sorted(tag_ids)
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


def run(cfg) -> Path:
    job = job_from_config(cfg)
    out_dir = output_dir(cfg, job)
    if outputs.already_done(out_dir, cfg.force, "train"):
        return out_dir
    train_cfg = cfg.train
    check_config(cfg, job)
    gen_dir, ext_dir = generate.output_dir(cfg, job), extend.output_dir(cfg, job)
    outputs.require({"generate": gen_dir, "extend": ext_dir}, by="train")
    records = load_from_disk(str(gen_dir / "dataset")).filter(lambda r: r["split"] == "train")
    if train_cfg.max_examples is not None:
        records = records.select(range(min(train_cfg.max_examples, len(records))))
    tokenizer = load_tokenizer(str(ext_dir))
    model = load_model(str(ext_dir), cfg.model.dtype, "cpu")
    tag_ids = list(outputs.read_manifest(ext_dir)["tag_ids"].values())
    set_seed(train_cfg.seed)  # LoRA's random init: the same whether or not other stages ran first in this process
    model, groups = prepare_trainable(model, train_cfg, tag_ids)
    model.train()
    frozen = frozen_start(model, train_cfg.params, ext_dir, cfg)
    pretraining = train_cfg.mode == "pretrain"
    teacher = None
    if pretraining:  # a packed stream of tagged + plain documents, LM loss (pipeline/pretrain.py)
        from pipeline import pretrain

        examples, pretrain_steps = pretrain.training_stream(cfg, records, tokenizer, tag_ids)
    else:
        if train_cfg.teacher == "online" or train_cfg.objective == "onpolicy":  # onpolicy: it scores the samples
            if len(job.train_sets) != 1:
                raise ConfigError(
                    "train.teacher=online computes one prompt's cache; this run trains several tag sets (mixture). "
                    "Fix: use train.teacher=recorded for mixtures."
                )
            prompt = job.teacher_prompt(job.train_sets[0], cfg.generate.teacher_mode)
            teacher = CachedPromptTeacher(frozen, tokenizer, prompt, cfg.model.chat, train_cfg.teacher_memo_mb)
        examples = build_examples(records, tokenizer, cfg.model.chat, teacher, job, cfg.mixture.seed)
    n_examples = len(records) if pretraining else len(examples)

    ds_config = distributed.deepspeed_config(cfg)  # validated before any training work
    with outputs.atomic_stage_dir(out_dir, "train", stage_key(cfg, job), keep_partial=True, shared=True, config=cfg) as (work, manifest):
        global_batch = train_cfg.batch_size * train_cfg.grad_accum * distributed.world_size()
        if pretraining:
            total_steps = pretrain_steps
        else:
            steps_per_epoch = math.ceil(len(examples) / global_batch)
            total_steps = train_cfg.max_steps if train_cfg.max_steps > 0 else math.ceil(steps_per_epoch * train_cfg.epochs)
        if total_steps < 1:  # max_steps=0 makes the Trainer fall back to its own epoch count
            raise ConfigError(f"train: {total_steps} steps to run. Fix: set train.epochs above 0 or train.max_steps to at least 1.")
        optimizer = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)
        scheduler = get_scheduler("cosine", optimizer, int(train_cfg.warmup_ratio * total_steps), total_steps)
        if train_cfg.report_to == "wandb":
            os.environ.setdefault("WANDB_MODE", cfg.logger.wandb_mode)
            os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
        args = TrainingArguments(
            output_dir=str(work / "checkpoints"),
            per_device_train_batch_size=train_cfg.batch_size,
            gradient_accumulation_steps=train_cfg.grad_accum,
            max_steps=total_steps,
            logging_steps=train_cfg.logging_steps,
            save_strategy="steps" if train_cfg.save_steps > 0 else "no",
            save_steps=max(train_cfg.save_steps, 1),
            save_total_limit=train_cfg.save_total_limit,
            report_to=[] if train_cfg.report_to == "none" else [train_cfg.report_to],
            run_name=out_dir.name,
            seed=train_cfg.seed,
            use_cpu=cfg.model.device == "cpu",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=not progress.enabled(),
            deepspeed=ds_config,
            include_num_input_tokens_seen=True,
        )
        distributed.check_world_size(args)
        log.info("train: rank %d of world size %d (deepspeed: %s)", args.process_index, args.world_size, bool(ds_config))
        trainer = (pretrain.PretrainTrainer if pretraining else DistillTrainer)(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=pretrain.collate_blocks if pretraining else DistillCollator(tokenizer.pad_token_id),
            optimizers=(optimizer, scheduler),
            objective=train_cfg.objective,
            tag_ids=tag_ids,
            # untagged inputs never read the tag row, so with `embedding` there is nothing to preserve
            untagged_weight=train_cfg.untagged_weight if train_cfg.params != "embedding" and not pretraining else 0.0,
            reference=None if pretraining else frozen,
            teacher=teacher,
            # ZeRO-3: each reference pass gathers the sharded weights with every rank, so no rank may skip one
            reference_memo_mb=0 if ds_config and ds_config["zero_optimization"]["stage"] == 3 else train_cfg.reference_memo_mb,
            **(
                {"onpolicy_settings": onpolicy.Settings.from_config(train_cfg), "pad_id": tokenizer.pad_token_id}
                if train_cfg.objective == "onpolicy" and not pretraining
                else {}
            ),
        )
        progress.attach(trainer)  # the step bar also shows the loss
        distributed.add_callbacks_first(trainer, distributed.train_callbacks(work, global_batch))
        last = get_last_checkpoint(str(work / "checkpoints")) if (work / "checkpoints").is_dir() else None
        before = _loss_so_far(last)  # read now: save_total_limit may delete that checkpoint during training
        trainer.loss_sum_before = before[0]
        run = tracking.start(cfg, "train", out_dir.name, group=out_dir.name)  # rank 0; HF's wandb callback logs into it
        result = trainer.train(resume_from_checkpoint=last)
        tracking.finish(run)
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
            steps=total_steps,
            final_loss=whole_run_loss(*before, result.training_loss, result.global_step) if last else result.training_loss,
            train_seconds=round(result.metrics.get("train_runtime", 0.0), 1),
            world_size=distributed.world_size(),
            deepspeed_stage=ds_config["zero_optimization"]["stage"] if ds_config else None,
        )
        manifest["card"] = card.facts(cfg, job, tokenizer)  # the model card's facts, for evaluate to add its scores
        card.write(work, manifest, name=out_dir.name)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    log.info("train: %d examples, %d steps, loss %.4f -> %s", n_examples, total_steps, result.training_loss, out_dir)
    return out_dir
