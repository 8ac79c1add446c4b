"""On-policy distillation (`train.objective=onpolicy`): the student writes, the teacher grades every token.

The recorded objectives (`kl`, `sft`) show the student only the teacher's own continuations; at
inference the student continues its own, and where it drifts from the teacher it was never
corrected (GKD, Agarwal et al. 2024; on-policy context distillation). Here each training step:

1. the student, reading its tag (`train.student_context`), samples a continuation for every input
   of the batch (`sample_student`: eval mode, no grad, tags suppressed as in the saved model);
2. the teacher (the frozen model reading the full prompt, through `CachedPromptTeacher`'s shared
   prompt cache) scores those tokens with its full distribution;
3. the loss is a divergence between the student's and the teacher's full distributions at every
   sampled position (`divergence`: reverse KL(student || teacher), or the generalised JSD with
   `train.onpolicy_beta`), with a teacher-forced student pass that carries the gradient. No
   gradient flows through the sampling itself (as in GKD): the per-position loss is exact.

A share `1 - train.onpolicy_share` of steps is off-policy: the same divergence on the teacher's
recorded samples, against the recorded top-k as k+1 bins (`train.teacher=recorded`) or the online
teacher's full distribution (`train.teacher=online`). The untagged-preservation term
(`train.untagged_weight`) is added on every step, as for the other objectives.

Cost: an on-policy step samples `batch_size x onpolicy_max_new_tokens` tokens one position at a
time, then runs the teacher over them (its logits are never kept: the samples are new every step).
The default model on 2 CPU cores samples about 40 tokens/s batched; measured with `<pirate>`, batch
8 x 48 tokens, on 2 cores shared with another job: 41 s per on-policy step against 21 s for `kl`, so
on-policy training costs about twice as much per step. The default length is the teacher's
(`generate.max_new_tokens`); a shorter `train.onpolicy_max_new_tokens` is cheaper.

Reproducible: which steps are on-policy, and each batch's samples, are drawn from seeds derived from
(`train.seed`, global step, micro-batch, rank), never from a running generator, so a run resumed
from a checkpoint draws exactly what an uninterrupted run draws.

    python -m pipeline stage=train metatoken=pirate train.objective=onpolicy train.onpolicy_loss=jsd train.onpolicy_beta=0.5
"""
from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass

import torch

from pipeline.core.losses import generalized_jsd
from pipeline.errors import ConfigError

LOSSES = ("reverse_kl", "jsd")
FIELDS = (  # the TrainConfig fields that only count with objective=onpolicy (left out of other train keys)
    "onpolicy_loss",
    "onpolicy_beta",
    "onpolicy_share",
    "onpolicy_max_new_tokens",
    "onpolicy_temperature",
    "onpolicy_top_p",
)


@dataclass(frozen=True)
class Settings:
    """The on-policy knobs of one run (from `train.onpolicy_*`)."""

    loss: str
    beta: float
    share: float
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    recorded_offpolicy: bool  # off-policy steps: the recorded top-k (True) or the online teacher (False)

    @classmethod
    def from_config(cls, train_cfg) -> Settings:
        return cls(
            loss=train_cfg.onpolicy_loss,
            beta=float(train_cfg.onpolicy_beta),
            share=float(train_cfg.onpolicy_share),
            max_new_tokens=int(train_cfg.onpolicy_max_new_tokens),
            temperature=float(train_cfg.onpolicy_temperature),
            top_p=float(train_cfg.onpolicy_top_p),
            seed=int(train_cfg.seed),
            recorded_offpolicy=train_cfg.teacher == "recorded",
        )


def key_fields(train_key: dict) -> dict:
    """The train key without the on-policy fields that do not change the result.

    Every other objective drops them all, so train outputs made before on-policy existed keep
    their folders; reverse KL has no beta.
    """
    if train_key.get("objective") != "onpolicy":
        return {k: v for k, v in train_key.items() if k not in FIELDS}
    if train_key.get("onpolicy_loss") == "reverse_kl":
        return {k: v for k, v in train_key.items() if k != "onpolicy_beta"}
    return dict(train_key)


def check_settings(cfg, job) -> None:
    """Fail on a bad on-policy setting before any stage runs; each message names the field and the fix."""
    t = cfg.train
    if t.mode != "finetune":
        raise ConfigError(
            f"train.objective=onpolicy distils (context, continuation) pairs; train.mode={t.mode} trains with the LM "
            f"loss. Fix: use train.mode=finetune, or another objective."
        )
    if t.onpolicy_loss not in LOSSES:
        raise ConfigError(f"train.onpolicy_loss is {t.onpolicy_loss!r}. Fix: use one of {', '.join(LOSSES)}.")
    for name, low, high in (("onpolicy_beta", 0.0, 1.0), ("onpolicy_share", 0.0, 1.0)):
        if not low <= t[name] <= high:
            raise ConfigError(f"train.{name} is {t[name]}. Fix: use a number between {low:g} and {high:g}.")
    if t.onpolicy_max_new_tokens < 1:
        raise ConfigError(
            f"train.onpolicy_max_new_tokens is {t.onpolicy_max_new_tokens}. Fix: use at least 1 (default: generate.max_new_tokens)."
        )
    if not t.onpolicy_temperature > 0:
        raise ConfigError(f"train.onpolicy_temperature is {t.onpolicy_temperature}. Fix: use a temperature above 0.")
    if not 0 < t.onpolicy_top_p <= 1:
        raise ConfigError(f"train.onpolicy_top_p is {t.onpolicy_top_p}. Fix: use a number in (0, 1] (1 = off).")
    if len(job.train_sets) != 1 or not job.train_sets[0]:
        raise ConfigError(
            "train.objective=onpolicy scores the student's samples with one prompt's cached teacher; this run trains "
            "several tag sets (mixture, or mixture.untagged > 0). Fix: train one tag set, or use train.objective=kl."
        )


def draw_seed(seed: int, step: int, micro: int, rank: int, what: str) -> int:
    """A seed that depends only on where in training we are (stable across processes and resumes)."""
    digest = hashlib.sha256(f"{what}:{seed}:{step}:{micro}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def is_onpolicy_step(settings: Settings, step: int, micro: int) -> bool:
    """Whether this (step, micro-batch) samples from the student; the same on every rank."""
    if settings.share >= 1.0:
        return True
    return random.Random(draw_seed(settings.seed, step, micro, 0, "share")).random() < settings.share


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The on-policy loss per position: reverse KL(student || teacher) or the generalised JSD."""
    beta = 1.0 if settings.loss == "reverse_kl" else settings.beta
    return generalized_jsd(student_logits, teacher_logits, beta)


def generation_config(model, tag_ids: list[int], settings: Settings, pad_id: int):
    """The student's own generation settings (its EOS ids etc.), sampling, with its tags suppressed.

    The saved student suppresses its tags (`train.save_student`), and so do its samples here: the
    student reads tags, never writes them.
    """
    config = copy.deepcopy(model.generation_config)
    config.update(
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        suppress_tokens=sorted(tag_ids),
        pad_token_id=pad_id,
    )
    return config


def eos_ids(model, pad_id: int) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [pad_id])


@torch.no_grad()
def sample_student(model, contexts: list[list[int]], tag_ids: list[int], pad_id: int, settings: Settings, seed: int):
    """One continuation per context from the student (eval mode, no grad), ending at its first EOS.

    Contexts are left-padded (generate places each row's positions after its own padding). The
    global random state is left as it was: the samples come from `seed` alone, and nothing else in
    training (dropout, data order) sees a different generator because sampling happened.
    """
    width = max(len(c) for c in contexts)
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, ctx in enumerate(contexts):
        input_ids[b, width - len(ctx) :] = torch.tensor(ctx)
        attention_mask[b, width - len(ctx) :] = 1
    was_training = model.training
    device = model.device
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            sequences = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=generation_config(model, tag_ids, settings, pad_id),
            )
    finally:
        model.train(was_training)
    stops = eos_ids(model, pad_id)
    samples = []
    for row in sequences[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        samples.append(row[:end])
    return samples
