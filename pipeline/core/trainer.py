"""What one training step is: examples and their collator, the distillation losses, and the Trainer.

One `DistillTrainer` (Hugging Face Trainer: checkpoints, logging, DDP, DeepSpeed) takes the objective as an
argument: `kl`, `sft` and `onpolicy` distil from the teacher; `lm` is the pretrain mode's next-token loss on
packed blocks (with `train.pretrain.loss=kl`, KL to the recorded distributions on the tokens generate wrote).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from pipeline.core import onpolicy, tag_rows
from pipeline.core.data import pad_2d, pad_examples
from pipeline.core.formats import context_ids, row_input
from pipeline.core.job import Job, student_context
from pipeline.core.losses import (
    full_kl,
    lm_kl_loss,
    lm_loss,
    masked_mean,
    suppress,
    token_cross_entropy,
    topk_bins,
    topk_kl,
)
from pipeline.core.scoring import ReferenceMemo, batch_logits, packed_logits
from pipeline.runtime import outputs

EMBEDDING_FILE = "embedding.safetensors"  # in LoRA checkpoints: the (tag rows of the) input embedding


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
                **({"teacher_suffix_ids": teacher.suffix_ids(row_input(r))} if teacher else {}),
                "context_ids": student_context(job, r, tokenizer, chat, seed)
                if job
                else context_ids(tokenizer, row_input(r), "".join(r["tags"]) or None, chat),
                "plain_context_ids": context_ids(tokenizer, row_input(r), None, chat),
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


def distill_loss(model, batch: dict, objective: str, tag_ids: list[int], teacher=None) -> torch.Tensor:
    """Mean per-token loss of the student (reading the tag) on the teacher's continuations.

    With an online `teacher`, `kl` matches its full distribution computed now from the prompt
    cache; otherwise the top-k recorded while generating.
    """
    student = batch_logits(model, batch, tag_ids)
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
    student = batch_logits(model, sampled, tag_ids)
    return masked_mean(onpolicy.divergence(student, target.to(student.device), settings), sampled["output_mask"])


def offpolicy_loss(model, batch: dict, tag_ids: list[int], teacher, settings) -> torch.Tensor:
    """The on-policy divergence on the teacher's recorded samples: recorded top-k bins, or the online teacher."""
    student = batch_logits(model, batch, tag_ids)
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
            return batch_logits(ref, rows, tag_ids, "plain_")

    target = compute(batch) if memo is None else memo.logits(compute, batch, tag_ids)
    student = batch_logits(model, batch, tag_ids, "plain_")
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

    # A peft checkpoint holds only the adapters, and the tag rows are a parameter HF's checkpoint does not
    # know: keep the embedding (tag rows written in) next to them, or a resumed run would restart the tag rows.
    # (DeepSpeed checkpoints hold the whole engine state and are restored by DeepSpeed itself.)
    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        embedding = self.model.get_input_embeddings()
        if tag_rows.attached(embedding) and not self.is_deepspeed_enabled and self.args.should_save:
            weight = tag_rows.merged_weight(embedding).cpu().contiguous()
            save_file({"weight": weight}, os.path.join(output_dir or self.args.output_dir, EMBEDDING_FILE))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # what the run's loss summed to so far (the Trainer keeps it only in memory)
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            summed = self.loss_sum_before + self._total_loss_scalar + float(self._tr_loss.item() if torch.is_tensor(self._tr_loss) else self._tr_loss)
            outputs.write_json(folder / LOSS_SUM_FILE, {"step": self.state.global_step, "loss_sum": summed})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path, embedding = os.path.join(resume_from_checkpoint, EMBEDDING_FILE), (model or self.model).get_input_embeddings()
        if os.path.exists(path) and tag_rows.attached(embedding):
            tag_rows.load(embedding, load_file(path)["weight"])

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
        if self.objective == "lm":  # the pretrain mode: next-token loss on packed blocks (KL where a token has a recorded distribution)
            logits = packed_logits(model, inputs)
            if "soft_mask" in inputs:  # train.pretrain.loss=kl: generated tokens against their recorded distributions
                loss = lm_kl_loss(logits, inputs["labels"], inputs["topk_ids"], inputs["topk_logprobs"], inputs["soft_mask"], self.tag_ids)
            else:
                loss = lm_loss(logits, inputs["labels"], self.tag_ids)
            return (loss, None) if return_outputs else loss
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
