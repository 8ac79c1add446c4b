"""Metatoken specs: a tag (one new token) and the prompt it stands for.

A metatoken is defined by one YAML file in `conf/metatoken/`. This module turns that config into a
`Metatoken` with its prompt text resolved, and checks it before any compute, so that a bad file
fails in a second with a message that names the file, the field and the fix.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.probes import Probe

# One token: angle brackets around letters, digits, '_' or '-'. Spaces would let the tokenizer split it.
TAG_PATTERN = re.compile(r"^<[A-Za-z0-9_\-]+>$")


TEACHER_MODES = ("expand", "bootstrap")


class ConfigError(ValueError):
    """A user-facing configuration problem: the message says the file, the field and the fix."""


@dataclass(frozen=True)
class Metatoken:
    tag: str  # e.g. "<nice>"
    prompt: str  # the text the tag stands for, as written (it may mention other tags)
    source: str  # the file that defined it (for error messages and manifests)
    expanded: str = ""  # the prompt with every inner tag replaced, recursively, by its own prompt
    probe: Probe | None = None  # a behaviour counted in sampled answers (evaluate only; in no stage key)

    def __post_init__(self):
        if not self.expanded:  # a prompt without inner tags is its own expansion
            object.__setattr__(self, "expanded", self.prompt)

    @property
    def name(self) -> str:
        return self.tag.strip("<>")

    @property
    def prompt_sha(self) -> str:
        return hashlib.sha256((self.prompt + "\0" + self.expanded).encode()).hexdigest()

    def teacher_prompt(self, mode: str) -> str:
        """What the teacher reads: the expanded prompt, or (bootstrap) the prompt with its tags left in."""
        if mode not in TEACHER_MODES:
            raise ConfigError(f"generate.teacher_mode is {mode!r}. Fix: use one of {', '.join(TEACHER_MODES)}.")
        return self.expanded if mode == "expand" else self.prompt


def resolve_metatoken(cfg, data_dir: str | Path, source: str = "conf/metatoken/?.yaml") -> Metatoken:
    """Validate a metatoken config and read its prompt.

    Args:
        cfg: the `metatoken` config node (tag, prompt or prompt_file).
        data_dir: where `prompt_file` paths are relative to.
        source: the YAML file the node came from, named in errors.
    """
    tag = cfg.tag
    if not isinstance(tag, str) or not TAG_PATTERN.match(tag):
        raise ConfigError(
            f"{source}: field 'tag' is {tag!r}, which is not a single well-formed tag. "
            f"Fix: write it as '<name>' using letters, digits, '_' or '-', e.g. tag: \"<nice>\"."
        )
    if cfg.prompt and cfg.prompt_file:
        raise ConfigError(f"{source}: both 'prompt' and 'prompt_file' are set. Fix: keep exactly one.")
    if cfg.prompt_file:
        path = Path(data_dir) / cfg.prompt_file
        if not path.is_file():
            raise ConfigError(
                f"{source}: field 'prompt_file' points to {path}, which does not exist. "
                f"Fix: create the file or correct the path (it is relative to {data_dir})."
            )
        prompt = path.read_text(encoding="utf-8")
    else:
        prompt = cfg.prompt or ""
    prompt = prompt.strip()
    if not prompt:
        raise ConfigError(
            f"{source}: the prompt of {tag} is empty. Fix: set 'prompt' to the text the tag stands for, "
            f"or 'prompt_file' to a non-empty file under {data_dir}."
        )
    from pipeline.probes import probe_from_config  # probes raise this module's ConfigError

    return Metatoken(tag=tag, prompt=prompt, source=source, expanded=prompt, probe=probe_from_config(cfg.get("probe"), source))


def metatoken_source() -> str:
    """The YAML file Hydra took the metatoken from, for error messages (best effort)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"conf/metatoken/{HydraConfig.get().runtime.choices['metatoken']}.yaml"
    except Exception:  # not running under Hydra (tests, notebooks)
        return "metatoken config"


def job_metatoken(cfg) -> Metatoken:
    """The run's metatoken, resolved and validated, with its nested tags expanded."""
    metatoken = resolve_metatoken(cfg.metatoken, cfg.paths.data, metatoken_source())
    if not inner_tags(metatoken.prompt):
        return metatoken
    registry = load_registry(cfg.paths.metatokens, cfg.paths.data)
    registry[metatoken.tag] = metatoken  # the run's own definition wins (it may be overridden on the CLI)
    return replace(metatoken, expanded=expand(metatoken.tag, registry))


# --- nesting: a prompt may mention other metatokens -------------------------------------------------

TAG_MENTION = re.compile(r"<[A-Za-z0-9_\-]+>")
MAX_NESTING_DEPTH = 8


def inner_tags(prompt: str) -> list[str]:
    """Tags a prompt mentions, in order of first mention (each once)."""
    return list(dict.fromkeys(TAG_MENTION.findall(prompt)))


class Registry(dict):
    """tag -> Metatoken for every file in conf/metatoken, read lazily.

    Tags are read up front (so duplicates are caught); a file's prompt is read only when a prompt
    being expanded mentions its tag, so one broken, unrelated file does not stop every job.
    """

    def __init__(self, files: dict, data_dir: str | Path):
        super().__init__()
        self.files, self.data_dir = files, data_dir

    def __contains__(self, tag) -> bool:
        return dict.__contains__(self, tag) or tag in self.files

    def __getitem__(self, tag: str) -> Metatoken:
        if not dict.__contains__(self, tag):
            node, path = self.files[tag]
            dict.__setitem__(self, tag, resolve_metatoken(node, self.data_dir, path))
        return dict.__getitem__(self, tag)

    def tags(self) -> list[str]:
        return sorted(set(self.files) | set(dict.keys(self)))


def load_registry(conf_dir: str | Path, data_dir: str | Path) -> Registry:
    """Every metatoken defined in `conf_dir` (one YAML each), by tag.

    Two files defining the same tag are an error naming both files.
    """
    from omegaconf import OmegaConf

    from pipeline.config import MetatokenConfig

    files: dict = {}
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        node = OmegaConf.merge(OmegaConf.structured(MetatokenConfig), OmegaConf.load(path))
        if node.tag in files:
            raise ConfigError(f"{path} and {files[node.tag][1]} both define {node.tag}. Fix: give one of them another 'tag'.")
        files[node.tag] = (node, str(path))
    return Registry(files, data_dir)


def expand(tag: str, registry: dict[str, Metatoken], max_depth: int = MAX_NESTING_DEPTH) -> str:
    """The prompt of `tag` with every inner tag replaced, recursively, by its own prompt.

    Raises ConfigError, naming the files and the chain, for an unknown inner tag, a cycle
    (<a> uses <b> uses <a>), or nesting deeper than max_depth.
    """

    def walk(current: str, chain: tuple[str, ...]) -> str:
        where = " -> ".join(f"{t} ({registry[t].source})" for t in chain)
        if len(chain) > max_depth:
            raise ConfigError(f"metatokens nest deeper than {max_depth} levels: {where}. Fix: flatten the chain.")
        text = registry[current].prompt
        for inner in inner_tags(text):
            if inner not in registry:
                raise ConfigError(
                    f"{registry[current].source}: the prompt of {current} mentions {inner}, which no file in "
                    f"conf/metatoken defines (chain: {where}). Fix: define {inner} in conf/metatoken/, or remove it."
                )
            if inner in chain:
                cycle = " -> ".join(f"{t} ({registry[t].source})" for t in (*chain[chain.index(inner):], inner))
                raise ConfigError(f"metatokens form a cycle: {cycle}. Fix: remove one of these mentions.")
            text = text.replace(inner, walk(inner, (*chain, inner)))
        return text

    if tag not in registry:
        raise ConfigError(f"{tag} is not defined by any file in conf/metatoken. Fix: add conf/metatoken/<name>.yaml.")
    return walk(tag, (tag,))


def check_bootstrap_teacher(cfg, metatoken: Metatoken) -> None:
    """A bootstrap teacher must exist and know every inner tag as one token (checked before compute)."""
    if cfg.generate.teacher_mode != "bootstrap":
        return
    path = cfg.generate.bootstrap_model
    source = metatoken.source
    if not path or not (Path(path) / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"generate.bootstrap_model is {path!r}, which is not a trained output folder. Fix: point it to the "
            f"train output that knows the inner tags of {metatoken.tag} ({source}), e.g. outputs/train/<name>-<hash>."
        )
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    missing = [t for t in inner_tags(metatoken.prompt) if t not in vocab]
    if missing:
        raise ConfigError(
            f"{source}: {metatoken.tag} uses {', '.join(missing)}, which the bootstrap teacher {path} does not know. "
            f"Fix: train those tags first and point generate.bootstrap_model to that output, or use "
            f"generate.teacher_mode=expand."
        )
