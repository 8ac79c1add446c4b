"""Port a trained output's tags to another model: the same definitions, inputs and settings, another model.

    python -m pipeline.port from=outputs/train/pirate-0965a9483c model=hf model.path=HuggingFaceTB/SmolLM2-360M-Instruct model.name=smollm2-360m
    python -m pipeline.port from=outputs/train/<folder> model=hf model.path=<gpt2-like dir> model.name=g train.lora_targets=[c_attn]

A prompt outlives a model; so should a tag's definition. The source output's train manifest holds the
resolved config it ran with; the port swaps `model` for the one given (what the main CLI takes: `model=<name>`
and `model.*` overrides), applies any other `key=value` overrides to the new run only (e.g. LoRA target
names of another architecture), and runs the whole chain (generate, extend, train, evaluate) for every tag
and tag set. Outputs made before manifests held their config are reproduced from the overrides that made
them (`source="experiment=demo ..."`), checked against the folder's hash. One report, `outputs/port/...`
(`report.md`, `report.json`), puts both models side by side per tag set: recovery, drift, prompt tokens saved.
Everything is checked before any model loads.
"""
from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.__main__ import run_stages
from pipeline.config import PROJECT_ROOT, Config, register_configs
from pipeline.core.job import job_from_config
from pipeline.errors import ConfigError
from pipeline.runtime import outputs
from pipeline.stages import paths

log = logging.getLogger(__name__)
SCORES = ("recovery", "recovery_ci", "effect_kl", "residual_kl", "prompt_tokens_saved")


def parse(argv: list[str]) -> tuple[Path, list[str], list[str], list[str]]:
    """(source folder, model overrides, other overrides for the new run, overrides that made the source)."""
    source, model, extra, made_by = None, [], [], []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"port: {arg!r} is not key=value. Fix: e.g. from=outputs/train/<folder> model=hf model.path=...")
        if key == "from":
            source = Path(value)
        elif key == "source":
            made_by = shlex.split(value)
        elif key == "model" or key.startswith("model."):
            model.append(arg)
        else:
            extra.append(arg)
    if source is None or not model:
        raise ConfigError("port: needs from=outputs/train/<folder> and model=... (a model config name, or model=hf model.path=... model.name=...).")
    return source, model, extra, made_by


def compose(overrides: list[str]) -> DictConfig:
    """The real conf/ tree composed with overrides, as `python -m pipeline` would."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def source_config(folder: Path, made_by: list[str]) -> DictConfig:
    """The config the source output ran with, checked to name exactly that folder again."""
    manifest = outputs.train_manifest(folder, by="port")
    if "config" in manifest:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), manifest["config"])
    elif made_by:
        cfg = compose(made_by)
    else:
        raise ConfigError(
            f"port: {folder / outputs.MANIFEST} predates manifests that record their config. "
            f'Fix: add source="<the overrides that made it>", e.g. source="experiment=demo".'
        )
    again = paths.output_dir("train", cfg, job_from_config(cfg)).name
    if again != folder.name:
        raise ConfigError(
            f"port: the source config names {again}, not {folder.name}: its inputs, prompts or metatoken files changed "
            "since (or source= lists other overrides). Fix: restore them, or give the overrides that made this folder."
        )
    return cfg


def target_config(source: DictConfig, model_overrides: list[str], extra: list[str]) -> DictConfig:
    """The source config on the other model, plus the overrides meant for the new run."""
    target = OmegaConf.merge(source, {"stage": "all", "force": False})
    target.model = compose(model_overrides).model
    if extra:
        try:
            target = OmegaConf.merge(target, OmegaConf.from_dotlist(extra))
        except Exception as err:  # an unknown key or a wrong type, from the structured schema
            raise ConfigError(f"port: the override(s) {extra} do not fit the config: {err}") from None
    if outputs.model_key(target.model) == outputs.model_key(source.model):
        raise ConfigError(f"port: model {target.model.name} is the source's own model. Fix: give another model.")
    if target.generate.teacher_mode == "bootstrap" and target.generate.bootstrap_model == source.generate.bootstrap_model:
        raise ConfigError(
            f"port: the source bootstrapped from {source.generate.bootstrap_model}, a model of the source. "
            "Fix: port that output first and add generate.bootstrap_model=<its port's train folder>."
        )
    return target


def check_lora_targets(cfg) -> None:
    """LoRA target names are per architecture (q_proj vs c_attn): fail before any work when none exist."""
    if cfg.train.params != "lora" or cfg.model.gguf_package:
        return
    with torch.device("meta"):  # the module tree without weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(cfg.model.path)))
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if not list(module.children())}
    if not set(cfg.train.lora_targets) & leaves:
        raise ConfigError(
            f"port: train.lora_targets {list(cfg.train.lora_targets)} name no module of {cfg.model.path}. "
            f"Fix: add train.lora_targets=[...] from its modules: {', '.join(sorted(leaves))}."
        )


def scores_of(report: dict) -> tuple[dict, float | None]:
    """tag set -> its scores (those the port compares), and the run's drift."""
    by_set = {tuple(s["tags"]): {k: s.get(k) for k in SCORES} | {"in_training": s.get("in_training")} for s in report["sets"]}
    return by_set, report.get("drift", {}).get("drift_kl")


def side_by_side(source: dict, target: dict, from_dir: str) -> dict:
    """The port's report: per tag set, the source's and the target's scores (sets in the source's order)."""
    src, src_drift = scores_of(source)
    tgt, tgt_drift = scores_of(target)
    sets = [
        {"tags": list(s), "in_training": src[s]["in_training"],
         "source": {k: src[s][k] for k in SCORES}, "target": {k: tgt.get(s, {}).get(k) for k in SCORES}}
        for s in src
    ]
    return {
        "from": from_dir,
        "models": {"source": source["model"], "target": target["model"]},
        "sets": sets,
        "drift_kl": {"source": src_drift, "target": tgt_drift},
        "reports": {"source": source["output"], "target": target["output"]},
        "train": {"source": source["inputs"]["train"], "target": target["inputs"]["train"]},
    }


def _cell(value, digits: int = 3) -> str:
    return "–" if value is None else (str(value) if isinstance(value, int) else f"{value:.{digits}f}")


def to_markdown(port: dict) -> str:
    a, b = port["models"]["source"], port["models"]["target"]
    tags = sorted({t for s in port["sets"] for t in s["tags"]})
    lines = [
        f"# {', '.join(f'`{t}`' for t in tags)}: {a} → {b}",
        "",
        f"The same metatoken definitions, inputs and settings as `{port['from']}`, trained again on {b}.",
        "",
        f"| tags | trained on this set | recovery, {a} | recovery, {b} | prompt tokens saved, {a} | prompt tokens saved, {b} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in port["sets"]:
        cells = [f"`{''.join(s['tags'])}`", "yes" if s["in_training"] else "no (held-out set)",
                 _cell(s["source"]["recovery"]), _cell(s["target"]["recovery"]),
                 _cell(s["source"]["prompt_tokens_saved"]), _cell(s["target"]["prompt_tokens_saved"])]
        lines.append("| " + " | ".join(cells) + " |")
    drift = port["drift_kl"]
    lines += [
        "",
        f"Drift on untagged inputs (nats/token): {a} {_cell(drift['source'], 4)}, {b} {_cell(drift['target'], 4)}.",
        "",
        f"Reports: `{port['reports']['source']}` and `{port['reports']['target']}`; "
        f"trained models: `{port['train']['source']}` and `{port['train']['target']}`.",
    ]
    return "\n".join(lines) + "\n"


def run(argv: list[str]) -> Path:
    """Check everything, run the chain on the other model (and evaluate the source if it was not), report."""
    folder, model_overrides, extra, made_by = parse(argv)
    source = source_config(folder, made_by)
    target = target_config(source, model_overrides, extra)
    check_lora_targets(target)
    source_job, target_job = job_from_config(source), job_from_config(target)
    key = {"source": paths.stage_key("evaluate", source, source_job), "target": paths.stage_key("evaluate", target, target_job)}
    out_dir = outputs.stage_dir(source.paths.outputs, "port", source_job.label, key)
    if outputs.already_done(out_dir, bool(source.force), "port"):
        print((out_dir / "report.md").read_text())
        return out_dir
    if not outputs.is_complete(paths.output_dir("evaluate", source, source_job)):
        run_stages(OmegaConf.merge(source, {"stage": "evaluate"}))  # the source's side of the table
    run_stages(target)
    reports = [json.loads((paths.output_dir("evaluate", c, j) / "report.json").read_text()) for c, j in ((source, source_job), (target, target_job))]
    port = side_by_side(*reports, from_dir=str(folder))
    with outputs.atomic_stage_dir(out_dir, "port", key, config=target) as (work, manifest):
        outputs.write_json(work / "report.json", port)
        outputs.write_text(work / "report.md", to_markdown(port))
        manifest.update(source=str(folder), target=port["train"]["target"])
    print((out_dir / "report.md").read_text())
    return out_dir


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return Path()
    return run(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    main()
