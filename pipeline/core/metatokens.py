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

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from pipeline.config import MetatokenConfig
from pipeline.core.probes import Probe, probe_from_config
from pipeline.errors import ConfigError

# One token: angle brackets around letters, digits, '_' or '-'. Spaces would let the tokenizer split it.
TAG_PATTERN = re.compile(r"^<[A-Za-z0-9_\-]+>$")


TEACHER_MODES = ("expand", "bootstrap")


@dataclass(frozen=True)
class Metatoken:
    tag: str  # e.g. "<nice>"
    prompt: str  # the text the tag stands for, as written (it may mention other tags)
    source: str  # the file that defined it (for error messages and manifests)
    expanded: str = ""  # the prompt with every inner tag replaced, recursively, by its own prompt
    probe: Probe | None = None  # a behaviour counted in sampled answers (in the evaluate key only)

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
        return self.expanded if mode == "expand" else unescape(self.prompt)


FIELDS = ("tag", "prompt", "prompt_file", "description", "probe")  # all a metatoken file may hold
ESCAPED_INTERPOLATION = "\\${"  # `\${` writes a literal `${` (OmegaConf's own escape)


def _raw_fields(cfg, source: str) -> dict:
    """The node's values as written, refusing `${...}`: a prompt is data, and an interpolation such as
    `${oc.env:SECRET}` would pull the environment into the data, the reports and the manifests."""
    raw = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
    fields = {}
    for name in FIELDS:
        value = raw.get(name)
        if isinstance(value, str) and "${" in value.replace(ESCAPED_INTERPOLATION, ""):
            raise ConfigError(
                f"{source}: field '{name}' holds an interpolation (${{...}}); a metatoken is plain data. "
                f"Fix: write the text itself (a literal '${{' is written '\\${{')."
            )
        fields[name] = value.replace(ESCAPED_INTERPOLATION, "${") if isinstance(value, str) else value
    return fields


def read_prompt_file(prompt_file: str, data_dir: str | Path, source: str) -> str:
    """A prompt file's text: relative paths stay inside `data_dir`; a directory or non-UTF-8 file is named."""
    path = Path(data_dir) / prompt_file
    if not Path(prompt_file).is_absolute() and not path.resolve().is_relative_to(Path(data_dir).resolve()):
        raise ConfigError(
            f"{source}: field 'prompt_file' is {prompt_file!r}, which leads outside {data_dir}. "
            f"Fix: keep prompt files under paths.data (or give an absolute path on purpose)."
        )
    if path.is_dir():
        raise ConfigError(f"{source}: field 'prompt_file' points to {path}, which is a directory. Fix: name the prompt's text file.")
    if not path.is_file():
        raise ConfigError(
            f"{source}: field 'prompt_file' points to {path}, which does not exist. "
            f"Fix: create the file or correct the path (it is relative to {data_dir})."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{source}: the prompt file {path} is not UTF-8 text (byte {err.start}: {err.reason}). Fix: save it as UTF-8."
        ) from None


def resolve_metatoken(cfg, data_dir: str | Path, source: str = "conf/metatoken/?.yaml") -> Metatoken:
    """Validate a metatoken config and read its prompt.

    Args:
        cfg: the `metatoken` config node (tag, prompt or prompt_file).
        data_dir: where `prompt_file` paths are relative to.
        source: the YAML file the node came from, named in errors.
    """
    cfg = _raw_fields(cfg, source)
    tag = cfg["tag"]
    if not isinstance(tag, str) or not TAG_PATTERN.match(tag):
        raise ConfigError(
            f"{source}: field 'tag' is {tag!r}, which is not a single well-formed tag. "
            f"Fix: write it as '<name>' using letters, digits, '_' or '-', e.g. tag: \"<nice>\"."
        )
    if cfg["prompt"] and cfg["prompt_file"]:
        raise ConfigError(f"{source}: both 'prompt' and 'prompt_file' are set. Fix: keep exactly one.")
    if cfg["prompt_file"]:
        prompt = read_prompt_file(cfg["prompt_file"], data_dir, source)
    else:
        prompt = cfg["prompt"] or ""
    prompt = prompt.strip()
    if not prompt:
        raise ConfigError(
            f"{source}: the prompt of {tag} is empty. Fix: set 'prompt' to the text the tag stands for, "
            f"or 'prompt_file' to a non-empty file under {data_dir}."
        )
    return Metatoken(tag=tag, prompt=prompt, source=source, expanded=unescape(prompt), probe=probe_from_config(cfg.get("probe"), source))


def metatoken_source() -> str:
    """The YAML file Hydra took the metatoken from, for error messages (best effort)."""
    try:
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

# A tag mention; `\<word>` is the literal text `<word>` (an HTML tag, a placeholder), not a mention.
TAG_MENTION = re.compile(r"(?<!\\)<[A-Za-z0-9_\-]+>")
ESCAPED_MENTION = re.compile(r"\\(<[A-Za-z0-9_\-]+>)")
MAX_NESTING_DEPTH = 8


def inner_tags(prompt: str) -> list[str]:
    r"""Tags a prompt mentions, in order of first mention (each once); escaped `\<word>` is not one."""
    return list(dict.fromkeys(TAG_MENTION.findall(prompt)))


def unescape(text: str) -> str:
    r"""The text a model reads: `\<word>` written in a prompt becomes the literal `<word>`."""
    return ESCAPED_MENTION.sub(r"\1", text)


HYDRA_KEYS = ("hydra", "defaults")  # keys Hydra acts on while composing: never in a metatoken file


def hydra_directives(text: str) -> list[str]:
    """What in a metatoken file's text Hydra would act on: a `# @package` header, `hydra` or `defaults` keys."""
    found = [line.strip() for line in text.splitlines() if re.match(r"\s*#\s*@package", line)]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return found  # not YAML at all: reported as such when the file is read
    return found + [f"key '{k}'" for k in HYDRA_KEYS if isinstance(data, dict) and k in data]


def read_metatoken_file(path: str | Path):
    """A metatoken file as plain data (a config node of MetatokenConfig), or ConfigError naming the file.

    Only these fields are allowed: no `# @package` header, no `hydra` or `defaults` keys (which
    would make Hydra call code or pull in other configs), no interpolation (checked when resolved).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}). Fix: save it as UTF-8.") from None
    directives = hydra_directives(text)
    if directives:
        raise ConfigError(
            f"{path}: a metatoken file is plain data, but it holds {', '.join(directives)}. "
            f"Fix: keep only {', '.join(FIELDS)}."
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]}). Fix: correct the file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a mapping of {', '.join(FIELDS)}. Fix: write e.g. tag: \"<nice>\" and prompt: ...")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}. Fix: a metatoken file holds only {', '.join(FIELDS)}.")
    try:
        return OmegaConf.merge(OmegaConf.structured(MetatokenConfig), OmegaConf.create(data))
    except ValueError as err:  # omegaconf's validation errors (a list where a string belongs, ...)
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}. Fix: correct the field.") from None


def check_hydra_directives(conf_dir: str | Path) -> None:
    """Refuse to start when a metatoken file holds what Hydra acts on while composing.

    Hydra reads the chosen file before any pipeline code runs, and would honour a `# @package _global_`
    header or a `hydra.callbacks` entry (arbitrary code); so this runs before Hydra does, on every file.
    Files that are merely broken (bad tag, missing prompt, not UTF-8) are left for the run that uses them.
    """
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        try:
            directives = hydra_directives(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if directives:
            raise ConfigError(
                f"{path}: a metatoken file is plain data, but it holds {', '.join(directives)}, which Hydra would act "
                f"on. Fix: keep only {', '.join(FIELDS)} in it (or move the file out of {conf_dir})."
            )


class Registry(dict):
    """tag -> Metatoken for every file in conf/metatoken, read lazily.

    Tags are read up front (so duplicates are caught); a file's prompt is read only when a prompt
    being expanded mentions its tag, so one broken, unrelated file does not stop every job. Files that
    cannot be read at all are kept in `errors` and named when a prompt mentions a tag nobody defines.
    """

    def __init__(self, files: dict, data_dir: str | Path, errors: dict | None = None):
        super().__init__()
        self.files, self.data_dir, self.errors = files, data_dir, errors or {}

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
    files: dict = {}
    errors: dict = {}  # path -> message, for files whose tag cannot even be read
    for path in sorted(Path(conf_dir).glob("*.yaml")):
        try:
            node = read_metatoken_file(path)
        except ConfigError as err:
            errors[str(path)] = str(err)
            continue
        if node.tag in files:
            raise ConfigError(f"{path} and {files[node.tag][1]} both define {node.tag}. Fix: give one of them another 'tag'.")
        files[node.tag] = (node, str(path))
    return Registry(files, data_dir, errors)


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
                broken = getattr(registry, "errors", {})
                unread = f" These files could not be read: {'; '.join(broken.values())}." if broken else ""
                raise ConfigError(
                    f"{registry[current].source}: the prompt of {current} mentions {inner}, which no file in "
                    f"conf/metatoken defines (chain: {where}).{unread} Fix: define {inner} in conf/metatoken/, "
                    f"write it as \\{inner} if it is literal text, or remove it."
                )
            if inner in chain:
                cycle = " -> ".join(f"{t} ({registry[t].source})" for t in (*chain[chain.index(inner):], inner))
                raise ConfigError(f"metatokens form a cycle: {cycle}. Fix: remove one of these mentions.")
            inner_text = walk(inner, (*chain, inner))
            text = re.sub(rf"(?<!\\){re.escape(inner)}", lambda _: inner_text, text)
        return text

    if tag not in registry:
        raise ConfigError(f"{tag} is not defined by any file in conf/metatoken. Fix: add conf/metatoken/<name>.yaml.")
    return unescape(walk(tag, (tag,)))


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
    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    missing = [t for t in inner_tags(metatoken.prompt) if t not in vocab]
    if missing:
        raise ConfigError(
            f"{source}: {metatoken.tag} uses {', '.join(missing)}, which the bootstrap teacher {path} does not know. "
            f"Fix: train those tags first and point generate.bootstrap_model to that output, or use "
            f"generate.teacher_mode=expand."
        )
