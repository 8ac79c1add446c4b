"""Experiment tracking with Weights & Biases (`logger=wandb`; offline by default, `logger=none` turns it off).

Rank 0 alone logs. Train opens a run (job type `train`) with the whole config before the Trainer
starts; the Trainer's wandb callback then logs losses, learning rate and the throughput that
`JsonlLog` (below) adds. Evaluate logs its report (figures, metrics, samples table) through
`log_report`. Runs land in `<paths.outputs>/wandb`;
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
from pipeline.runtime import report as reports

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


def log_report(report_dir: str | Path, logger_cfg) -> None:
    """The report's figures, a samples table and the metrics, to a wandb run (offline unless told otherwise).

    Optional by design: a failure here (no network in online mode, a broken install) is a warning,
    never a lost evaluation; the files on disk are the report.
    """
    report_dir = Path(report_dir)
    try:
        import wandb

        report = reports.load(report_dir)
        run = wandb.init(
            project=logger_cfg.project,
            name=f"evaluate-{report_dir.name}",
            job_type="evaluate",
            mode=os.environ.get("WANDB_MODE", logger_cfg.wandb_mode),
            dir=str(report_dir.parents[1]),  # outputs/wandb, beside the stage folders
            config={"tag": reports.label(report), "model": report["model"], "train": report.get("train", {})},
            reinit="finish_previous",
        )
        table = wandb.Table(columns=["input", "base, no prompt", "teacher, full prompt", f"student, {reports.label(report)}"])
        for s in report["samples"]:
            table.add_data(s["input"], s["base"], s["teacher"], s["student"])
        images = {f"report/{p.stem}": wandb.Image(str(p), caption=reports.FIGURES.get(p.stem, ("",))[0])
                  for p in sorted((report_dir / reports.PLOTS).glob("*.png"))}
        run.log({**images, "report/samples": table})
        run.summary.update({f"eval/{k}": v for k, v in report["metrics"].items()})
        run.finish()
    except Exception as err:  # noqa: BLE001 - tracking must never cost the evaluation
        log.warning("wandb: could not log the report (%s); the report files in %s are complete", err, report_dir)


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
