"""Entry point: compose the Hydra config, build the job and the stage paths once, run the stages in order.

    python -m pipeline stage=all metatoken=pirate
    python -m pipeline stage=train metatoken=nice train.params=full
    python -m pipeline -m stage=all metatoken=nice,pirate      # a multirun over tags
    torchrun --nproc_per_node 2 -m pipeline stage=all model.device=cpu   # several ranks (docs/multi-gpu.md)
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import PROJECT_ROOT, register_configs
from pipeline.core import contexts, pretrain_data
from pipeline.core.job import Job, job_from_config
from pipeline.core.metatokens import check_hydra_directives
from pipeline.core.models import start_model_path
from pipeline.core.validate import check_job, check_values
from pipeline.errors import ConfigError
from pipeline.runtime import distributed, outputs, progress
from pipeline.stages import evaluate, extend, generate, synthesize, train
from pipeline.stages.paths import STAGES, StagePaths, stage_paths

log = logging.getLogger("pipeline")
RECIPES = {"synthesize": synthesize, "generate": generate, "extend": extend, "train": train, "evaluate": evaluate}  # each .run
EVERY_RANK = ("generate", "train")  # generate: each rank samples its shard; train: DDP / ZeRO. The others: rank 0.

register_configs()


def check_before_running(cfg: DictConfig) -> Job:
    """Every check that needs no model weights, before any stage runs: a bad value fails in seconds."""
    if cfg.stage not in (*STAGES, "all"):
        raise ConfigError(f"stage={cfg.stage!r} is not a stage. Fix: use one of {', '.join(STAGES)} or all.")
    check_values(cfg)  # every range, before anything is read or loaded
    synthesize.check_config(cfg.inputs.synthetic)
    contexts.check(cfg)  # evaluation contexts: names and files, before the stages ahead of evaluate spend their time
    job = job_from_config(cfg)  # validate the tags, their nesting and the mixture before loading any model
    if cfg.stage in ("all", "train"):
        train.check_config(cfg, job)  # objective, teacher, on-policy settings: before generate spends its hour
    if cfg.stage in ("all", "generate", "extend"):
        for metatoken in job.metatokens.values():
            check_job(cfg, metatoken, start_model_path(cfg))
    progress.configure(cfg.progress)
    pretrain_data.check_config(cfg)  # the pretrain stream's settings (train.mode=pretrain)
    outputs.check_writable(cfg.paths.outputs)
    return job


def run_stage(name: str, cfg: DictConfig, job: Job, paths: StagePaths) -> Path:
    """One stage: its finished folder when one exists for this config (unless force=true), else its recipe's."""
    if outputs.already_done(paths[name], cfg.force, name):
        if name == "evaluate":
            print((paths[name] / "report.md").read_text())
        return paths[name]
    return RECIPES[name].run(cfg, job, paths)


def run_stages(cfg: DictConfig) -> None:
    """Run `cfg.stage` (or every stage for `all`); each stage skips itself when its output exists."""
    job = check_before_running(cfg)
    paths = stage_paths(cfg, job)
    for name in STAGES if cfg.stage == "all" else (cfg.stage,):
        if name == "synthesize" and cfg.inputs.synthetic.count == 0:
            continue  # off: the shipped inputs only
        log.info("stage %s", name)
        # rank 0 holds the output's lock: another run of the same stage and config waits for this one
        lock = outputs.stage_lock(paths[name], name) if distributed.is_main() else contextlib.nullcontext()
        with lock:
            if name in EVERY_RANK:
                progress.run_with_summary(name, run_stage, cfg, job, paths)
            else:  # rank 0 alone, the other ranks wait
                distributed.on_main(name, progress.run_with_summary, name, run_stage, cfg, job, paths)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_stages(cfg)


def check_conf() -> None:
    """Before Hydra reads conf/: no metatoken file may carry what Hydra would act on (see core/metatokens.py)."""
    try:
        check_hydra_directives(PROJECT_ROOT / "conf" / "metatoken")
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    check_conf()
    distributed.setup()  # before Hydra: the ranks agree on one run folder
    main()  # a failing rank exits here with an error (no barrier to hang in); torchrun stops the others
    distributed.finish()  # barrier(); destroy_process_group()
