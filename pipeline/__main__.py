"""Entry point: compose the Hydra config and run one stage, or all of them in order.

    python -m pipeline stage=all metatoken=pirate
    python -m pipeline stage=train metatoken=nice train.params=full
    python -m pipeline -m stage=all metatoken=nice,pirate      # a multirun over tags
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs

log = logging.getLogger("pipeline")
STAGES = ("generate", "extend", "train", "evaluate")

register_configs()


def run_stages(cfg: DictConfig) -> None:
    """Run `cfg.stage` (or every stage for `all`); each stage skips itself when its output exists."""
    from pipeline import evaluate, extend, generate, train
    from pipeline.metatokens import ConfigError, job_metatoken

    modules = {"generate": generate, "extend": extend, "train": train, "evaluate": evaluate}
    if cfg.stage not in (*STAGES, "all"):
        raise ConfigError(f"stage={cfg.stage!r} is not a stage. Fix: use one of {', '.join(STAGES)} or all.")
    job_metatoken(cfg)  # validate the metatoken before loading any model
    if cfg.train.mode != "finetune":
        from pipeline.pretrain import check_config

        check_config(cfg)  # and the pretrain stream's settings
    for name in STAGES if cfg.stage == "all" else (cfg.stage,):
        log.info("stage %s", name)
        modules[name].run(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_stages(cfg)


if __name__ == "__main__":
    main()
