"""Experiment tracking with Weights & Biases (`logger=wandb`; offline by default, `logger=none` turns it off).

Rank 0 alone logs. Train opens a run (job type `train`) with the whole config before the Trainer
starts; the Trainer's wandb callback then logs losses, learning rate and the throughput that
`distributed.JsonlLog` adds. Evaluate logs its report (figures, metrics, samples table) through
`report.log_to_wandb`. Runs land in `<paths.outputs>/wandb`;
`wandb sync` uploads offline runs later.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.runtime import distributed, outputs


def enabled(cfg) -> bool:
    return cfg.logger.report_to == "wandb" and distributed.is_main()


def start(cfg, job_type: str, name: str, group: str):
    """Open a wandb run on rank 0 (None when tracking is off or on other ranks)."""
    if not enabled(cfg):
        return None
    import wandb

    os.environ.setdefault("WANDB_MODE", cfg.logger.wandb_mode)  # an explicit WANDB_MODE (e.g. disabled) wins
    os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
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
