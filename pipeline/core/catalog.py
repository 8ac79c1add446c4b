"""Where metatokens live: their definitions in `conf/metatoken/` and the trained outputs that hold them.

Shared by `python -m pipeline.list` and `python -m pipeline.sample`; reads YAML and JSON only (no model).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import PROJECT_ROOT, register_configs
from pipeline.core.metatokens import Metatoken, inner_tags, read_metatoken_file, resolve_metatoken
from pipeline.errors import ConfigError
from pipeline.runtime.outputs import MANIFEST, is_complete, read_manifest


def default_paths():
    """paths.* as the pipeline composes them (so conf/local/ overrides apply here too)."""
    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config")
    return OmegaConf.to_container(cfg.paths, resolve=True)


@dataclass
class Definition:
    """One `conf/metatoken/*.yaml`: the resolved metatoken, or the error that stops it resolving."""

    source: Path
    description: str = ""
    metatoken: Metatoken | None = None
    error: str | None = None
    contains: list[str] = field(default_factory=list)  # other defined tags its prompt mentions (nesting)


def definitions(conf_dir: str | Path, data_dir: str | Path) -> list[Definition]:
    """Every metatoken config, validated as the pipeline would, with nesting found from prompt texts."""
    found = []
    for path in sorted(Path(conf_dir, "metatoken").glob("*.yaml")):
        entry = Definition(source=path)
        try:  # every problem of one file is that file's row, never the whole listing's crash
            node = read_metatoken_file(path)
            entry.description = node.description
            entry.metatoken = resolve_metatoken(node, data_dir, f"conf/metatoken/{path.name}")
        except ConfigError as err:
            entry.error = str(err).splitlines()[0]
        found.append(entry)
    tags = [d.metatoken.tag for d in found if d.metatoken]
    for d in found:
        if d.metatoken:
            d.contains = [t for t in inner_tags(d.metatoken.prompt) if t != d.metatoken.tag and t in tags]
    return found


@dataclass
class TrainedOutput:
    path: Path
    tags: list[str]
    finished: str
    train: dict  # the train config from the manifest key (objective, params, ...)


def _added_tokens(model_dir: Path) -> dict[int, str]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return {}
    return {t["id"]: t["content"] for t in json.loads(path.read_text()).get("added_tokens", [])}


def tags_of(model_dir: str | Path) -> list[str]:
    """The metatokens a trained model holds.

    From the manifests (train -> extend) when the folder is a pipeline output; for a folder copied
    elsewhere, from its generation config: the tokens it must never generate are its tags.
    A bootstrapped student (extended from another trained output) also holds that output's tags:
    the chain of start models is followed, inner tags first.
    """
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():
        manifest = read_manifest(model_dir)
        if manifest.get("stage") == "extend" and "tag_ids" in manifest:
            start = Path(str(manifest.get("model_path", "")))
            inherited = tags_of(start) if (start / MANIFEST).is_file() else []
            return list(dict.fromkeys([*inherited, *manifest["tag_ids"]]))
        extended = manifest.get("base_extended")
        if extended and is_complete(Path(extended)):
            return tags_of(Path(extended))
    gen_cfg = model_dir / "generation_config.json"
    suppressed = json.loads(gen_cfg.read_text()).get("suppress_tokens") or [] if gen_cfg.is_file() else []
    added = _added_tokens(model_dir)
    return [added[i] for i in suppressed if i in added]


def trained_outputs(outputs_dir: str | Path) -> list[TrainedOutput]:
    """Every complete folder under <outputs>/train, newest first."""
    found = []
    for d in Path(outputs_dir, "train").glob("*"):
        if is_complete(d):
            manifest = read_manifest(d)
            found.append(TrainedOutput(d, tags_of(d), manifest.get("finished", ""), manifest["key"].get("train", {})))
    return sorted(found, key=lambda o: o.finished, reverse=True)


def chat_format(model_dir: str | Path, tokenizer) -> bool:
    """Whether the model was trained in the chat layout (from its manifests), else whether it has a chat template."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():
        extended = read_manifest(model_dir).get("base_extended")
        if extended and is_complete(Path(extended)):
            return bool(read_manifest(Path(extended))["key"]["model"]["chat"])
    return tokenizer.chat_template is not None
