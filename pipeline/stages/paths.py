"""Every stage's key and folder in one place: the chain synthesize -> generate -> extend -> train -> evaluate.

A stage's folder is `outputs/<stage>/<label>-<hash of its key>`. Its key holds everything its result depends
on, upstream stages by the hashes of their own keys, so this module is the pipeline's DAG:

    synthesize --> generate --> train --> evaluate
                   extend   --/

Keys never change for an existing config: a field added later is left out while it holds its neutral default,
so results already on disk stay reusable (tests/stages/test_stage_keys.py pins them). `__main__` builds the
paths once per run (`stage_paths`) and hands them to every stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core import contexts, onpolicy
from pipeline.core.job import Job
from pipeline.core.pretrain_data import data_key
from pipeline.runtime import distributed, outputs

STAGES = ("synthesize", "generate", "extend", "train", "evaluate")
REFERENCE = "reference"  # held-out samples come from the base model reading the fully expanded prompt
# evaluate fields added after evaluations were cached: left out of the key while they hold these defaults
LATER_EVALUATE_DEFAULTS = {"train_examples": 32, "resamples": 1000, "strengths": [], "contexts": [], "context_examples": 24}


def synthesize_key(cfg, job: Job) -> dict:
    return {
        "model": outputs.model_key(cfg.model),
        "description": cfg.metatoken.description,  # heads a share of the seed lists
        "inputs_file": outputs.file_sha(cfg.inputs.file),  # examples and duplicates come from the shipped rows
        "heldout_fraction": cfg.inputs.heldout_fraction,  # which shipped rows may be shown as examples
        "synthetic": without_defaults(outputs.plain(cfg.inputs.synthetic), {"kind": "requests"}),  # added later
    }


def without_defaults(key: dict, later_defaults: dict) -> dict:
    """`key` without the fields added after keys were cached, where they hold their defaults (folders stay)."""
    return {k: v for k, v in key.items() if not (k in later_defaults and v == later_defaults[k])}


def generate_settings_key(gen_cfg) -> dict:
    key = outputs.plain(gen_cfg)
    if key.get("backend") == "hf":  # how vLLM calls are sharded does not touch the HF sampler's records
        key.pop("vllm_shard_size", None)
    return key


def generate_key(cfg, job: Job) -> dict:
    inputs = {**outputs.plain(cfg.inputs), "file": outputs.file_sha(cfg.inputs.file)}
    inputs.pop("synthetic", None)  # added later: runs without synthetic inputs keep their folders
    if inputs.get("prompt_position") == "system":  # added later, as the default layout: keys stay
        inputs.pop("prompt_position")
    if cfg.inputs.synthetic.count > 0:
        inputs["synthetic"] = outputs.key_hash(synthesize_key(cfg, job))
    return {
        "model": outputs.model_key(cfg.model),
        "job": job.key(),
        "mixture_seed": cfg.mixture.seed,
        "inputs": inputs,
        "generate": generate_settings_key(cfg.generate),
        # bootstrap: held-out inputs are answered by the reference teacher and the base model, not the
        # bootstrap model (expand-mode keys stay as they were: there the two are the same model)
        **({"heldout_teacher": REFERENCE} if cfg.generate.teacher_mode == "bootstrap" else {}),
        **({"bootstrap": outputs.bootstrap_key(cfg.generate)} if cfg.generate.teacher_mode == "bootstrap" else {}),
    }


def extend_key(cfg, job: Job) -> dict:
    return {
        "model": outputs.model_key(cfg.model),
        "tags": {m.tag: m.prompt_sha for m in job.metatokens.values()},
        "extend": outputs.plain(cfg.extend),
        "start": outputs.model_key(cfg.model) if cfg.generate.teacher_mode == "expand" else outputs.bootstrap_key(cfg.generate),
    }


def train_key(cfg, job: Job) -> dict:
    train_cfg = outputs.plain(cfg.train)
    train_cfg.pop("report_to", None)  # where logs go does not change the model
    train_cfg.pop("teacher_memo_mb", None)  # nor does keeping teacher logits instead of recomputing them
    train_cfg.pop("reference_memo_mb", None)  # nor keeping the untagged term's reference logits
    train_cfg.pop("save_total_limit", None)  # nor how many checkpoints are kept on the way
    train_cfg.pop("pretrain", None)
    if train_cfg.get("max_examples") is None:  # added later: runs without a cap keep their folders
        train_cfg.pop("max_examples", None)
    if not train_cfg.get("bf16", False):  # added later: float32 runs keep their folders
        train_cfg.pop("bf16", None)
    train_cfg = onpolicy.key_fields(train_cfg)  # kl / sft keys stay as they were before onpolicy existed
    if train_cfg.pop("mode", "finetune") == "pretrain":  # finetune keys stay as they were before pretrain existed
        train_cfg.update(mode="pretrain", pretrain=data_key(cfg))
    upstream = generate_key(cfg, job)
    upstream.pop("heldout_teacher", None)  # who answers the held-out inputs never touches training
    key = {
        "generate": outputs.key_hash(upstream),
        "extend": outputs.key_hash(extend_key(cfg, job)),
        "train": train_cfg,
    }
    if distributed.world_size() > 1:  # the global batch is batch_size x grad_accum x ranks (DDP or ZeRO: same math)
        key["world_size"] = distributed.world_size()
    return key


def evaluate_settings_key(eval_cfg) -> dict:
    """The evaluate config, without the fields added later while they hold their defaults (old keys stay)."""
    key = outputs.plain(eval_cfg)
    for name, default in LATER_EVALUATE_DEFAULTS.items():
        if key.get(name) == default:
            key.pop(name)
    return key


def evaluate_key(cfg, job: Job) -> dict:
    key = {"train": outputs.key_hash(train_key(cfg, job)), "evaluate": evaluate_settings_key(cfg.evaluate)}
    if cfg.generate.teacher_mode == "bootstrap":  # scored on the reference teacher's samples (not the bootstrap model's)
        key["heldout_teacher"] = REFERENCE
    probes = {t: vars(m.probe) for t, m in job.metatokens.items() if m.probe}
    if probes:  # an edited probe is a new evaluation, never the old counts reused
        key["probes"] = probes
    if cfg.evaluate.contexts:  # the contexts' inputs, by content
        key["context_inputs"] = contexts.key(cfg)
    return key


KEYS = {"synthesize": synthesize_key, "generate": generate_key, "extend": extend_key, "train": train_key, "evaluate": evaluate_key}


def stage_key(stage: str, cfg, job: Job) -> dict:
    """What `stage`'s result depends on (its folder's hash)."""
    return KEYS[stage](cfg, job)


def output_dir(stage: str, cfg, job: Job) -> Path:
    """`stage`'s folder for this config: outputs/<stage>/<label>-<hash>."""
    return outputs.stage_dir(cfg.paths.outputs, stage, job.label, stage_key(stage, cfg, job))


@dataclass(frozen=True)
class StagePaths:
    """Every stage's folder and key for one run, computed once (`stage_paths`)."""

    dirs: dict  # stage -> Path
    keys: dict  # stage -> dict

    def __getitem__(self, stage: str) -> Path:
        return self.dirs[stage]

    def key(self, stage: str) -> dict:
        return self.keys[stage]


def stage_paths(cfg, job: Job) -> StagePaths:
    keys = {stage: stage_key(stage, cfg, job) for stage in STAGES}
    dirs = {stage: outputs.stage_dir(cfg.paths.outputs, stage, job.label, key) for stage, key in keys.items()}
    return StagePaths(dirs, keys)
