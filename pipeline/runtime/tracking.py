"""Experiment tracking with Weights & Biases (`logger=wandb`; offline by default, `logger=none` turns it off).

Rank 0 alone logs. Train opens a run (job type `train`) with the whole config before the Trainer
starts; the Trainer's wandb callback then logs losses, learning rate and the throughput that
`JsonlLog` (below) adds. Evaluate logs its report (figures, metrics, samples table) through
`core.report.log_to_wandb`. Runs land in `<paths.outputs>/wandb`;
`wandb sync` uploads offline runs later.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from pipeline.runtime import distributed, faults, outputs

log = logging.getLogger(__name__)


def enabled(cfg) -> bool:
    return cfg.logger.report_to == "wandb" and distributed.is_main()


def set_environment(logger_cfg) -> None:
    """WANDB_MODE and WANDB_PROJECT from the logger config, for wandb.init and for the Trainer's wandb callback.

    An explicit environment variable wins (WANDB_MODE=disabled in tests and CI).
    """
    os.environ.setdefault("WANDB_MODE", logger_cfg.wandb_mode)
    os.environ.setdefault("WANDB_PROJECT", logger_cfg.project)


def start(cfg, job_type: str, name: str, group: str):
    """Open a wandb run on rank 0 (None when tracking is off or on other ranks)."""
    if not enabled(cfg):
        return None
    import wandb

    set_environment(cfg.logger)
    out = Path(cfg.paths.outputs)
    out.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.logger.project,
        name=f"{job_type}-{name}",
        group=group,
        job_type=job_type,
        dir=str(out),
        config=outputs.plain(cfg),
        mode=os.environ["WANDB_MODE"],
        reinit="finish_previous",
    )


def finish(run) -> None:
    if run is not None:
        run.finish()


class JsonlLog(TrainerCallback):
    """Rank 0 appends every Trainer log (loss, lr, grad norm) plus throughput to `train_log.jsonl`.

    Throughput (steps, samples and input tokens per second since the last log) is added to the log
    dict itself, so wandb receives it too (this callback runs before the wandb one). On a resume the
    lines written after the checkpoint's step are dropped: the file holds one line per logged step.
    """

    def __init__(self, path: Path, global_batch: int):
        self.path = Path(path)
        self.global_batch = global_batch
        self.last = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        kept = []
        if self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= state.global_step]
        self.path.write_text("".join(l + "\n" for l in kept))
        self.last = (time.time(), state.global_step, state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        now, step, tokens = time.time(), state.global_step, state.num_input_tokens_seen
        if self.last and step > self.last[1] and "loss" in logs:
            seconds = max(now - self.last[0], 1e-9)
            logs["steps_per_second"] = round((step - self.last[1]) / seconds, 4)
            logs["samples_per_second"] = round((step - self.last[1]) * self.global_batch / seconds, 3)
            if tokens and self.last[2] is not None:
                logs["tokens_per_second"] = round((tokens - self.last[2]) / seconds, 1)
            self.last = (now, step, tokens)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "epoch": state.epoch, "time": round(now, 3), **logs}) + "\n")


def train_callbacks(work: Path, global_batch: int) -> list[TrainerCallback]:
    """The training log, then any fault a crash test planned (runtime/faults.py)."""
    return [JsonlLog(work / "train_log.jsonl", global_batch), *faults.train_callbacks()]


def add_callbacks_first(trainer, callbacks) -> None:
    """Put our callbacks before the reporting ones, so the throughput they add reaches wandb."""
    handler = trainer.callback_handler
    for cb in reversed(callbacks):
        handler.callbacks.insert(0, cb)
