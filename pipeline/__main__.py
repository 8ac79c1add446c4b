"""Entry point: compose the Hydra config and run one stage, or all of them in order.

    python -m pipeline stage=all metatoken=pirate
    python -m pipeline stage=train metatoken=nice train.params=full
    python -m pipeline -m stage=all metatoken=nice,pirate      # a multirun over tags
    torchrun --nproc_per_node 2 -m pipeline stage=all model.device=cpu   # several ranks (README: multi-GPU)
"""
from __future__ import annotations

import contextlib
import logging

import hydra
from omegaconf import DictConfig

from pipeline import distributed
from pipeline.config import register_configs

log = logging.getLogger("pipeline")
STAGES = ("synthesize", "generate", "extend", "train", "evaluate")

register_configs()


def run_stages(cfg: DictConfig) -> None:
    """Run `cfg.stage` (or every stage for `all`); each stage skips itself when its output exists."""
    from pipeline import contexts, evaluate, extend, generate, outputs, progress, synthesize, train
    from pipeline.job import job_from_config
    from pipeline.metatokens import ConfigError
    from pipeline.models import start_model_path
    from pipeline.validate import check_job, check_values

    modules = {"synthesize": synthesize, "generate": generate, "extend": extend, "train": train, "evaluate": evaluate}
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
    if cfg.train.mode != "finetune":
        from pipeline.pretrain import check_config

        check_config(cfg)  # and the pretrain stream's settings
    outputs.check_writable(cfg.paths.outputs)
    for name in STAGES if cfg.stage == "all" else (cfg.stage,):
        if name == "synthesize" and cfg.inputs.synthetic.count == 0:
            continue  # off: the shipped inputs only
        log.info("stage %s", name)
        # rank 0 holds the output's lock: another run of the same stage and config waits for this one
        lock = outputs.stage_lock(modules[name].output_dir(cfg, job), name) if distributed.is_main() else contextlib.nullcontext()
        with lock:
            if name in ("generate", "train"):  # every rank works (generate: its shard; train: DDP / ZeRO)
                progress.run_with_summary(name, modules[name].run, cfg)
            else:  # extend and evaluate: rank 0 alone, the other ranks wait
                distributed.on_main(name, progress.run_with_summary, name, modules[name].run, cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_stages(cfg)


def check_conf() -> None:
    """Before Hydra reads conf/: no metatoken file may carry what Hydra would act on (see metatokens.py)."""
    import sys

    from pipeline.config import PROJECT_ROOT
    from pipeline.metatokens import ConfigError, check_hydra_directives

    try:
        check_hydra_directives(PROJECT_ROOT / "conf" / "metatoken")
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    check_conf()
    distributed.setup()  # before Hydra: the ranks agree on one run folder
    main()  # a failing rank exits here with an error (no barrier to hang in); torchrun stops the others
    distributed.finish()  # barrier(); destroy_process_group()
