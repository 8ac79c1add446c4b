"""Metatoken specs: a tag (one new token) and the prompt it stands for.

A metatoken is defined by one YAML file in `conf/metatoken/`. This module turns that config into a
`Metatoken` with its prompt text resolved, and checks it before any compute, so that a bad file
fails in a second with a message that names the file, the field and the fix.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

# One token: angle brackets around letters, digits, '_' or '-'. Spaces would let the tokenizer split it.
TAG_PATTERN = re.compile(r"^<[A-Za-z0-9_\-]+>$")


class ConfigError(ValueError):
    """A user-facing configuration problem: the message says the file, the field and the fix."""


@dataclass(frozen=True)
class Metatoken:
    tag: str  # e.g. "<nice>"
    prompt: str  # the full text the tag stands for
    source: str  # the file that defined it (for error messages and manifests)

    @property
    def name(self) -> str:
        return self.tag.strip("<>")

    @property
    def prompt_sha(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()


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
    return Metatoken(tag=tag, prompt=prompt, source=source)


def metatoken_source() -> str:
    """The YAML file Hydra took the metatoken from, for error messages (best effort)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"conf/metatoken/{HydraConfig.get().runtime.choices['metatoken']}.yaml"
    except Exception:  # not running under Hydra (tests, notebooks)
        return "metatoken config"


def job_metatoken(cfg) -> Metatoken:
    """The run's metatoken, resolved and validated."""
    return resolve_metatoken(cfg.metatoken, cfg.paths.data, metatoken_source())
