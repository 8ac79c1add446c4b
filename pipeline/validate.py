"""Checks that run before any model is loaded: a bad config fails in a second, not after an hour.

Each error names the file, the field and the fix. Only tokenizers and model configs are read here
(small files), never weights.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.data import load_inputs
from pipeline.formats import context_ids
from pipeline.metatokens import ConfigError, Metatoken, check_bootstrap_teacher, inner_tags


def check_model_path(path: str, field: str = "model.path") -> None:
    """A local model path that does not exist is a typo, not a hub id to try to download."""
    looks_local = path.startswith(("/", "./", "../", "~")) or Path(path).exists()
    if looks_local and not (Path(path).expanduser() / "config.json").is_file() and not (Path(path) / "adapter_config.json").is_file():
        raise ConfigError(
            f"{field}: {path} is not a Hugging Face model folder (no config.json). Fix: point {field} to a model "
            f"directory or hub id (for the default model, run `make setup`)."
        )


def check_job(cfg, metatoken: Metatoken, model_path: str) -> None:
    """Validate everything about a job that can be checked without weights.

    - the inputs file (fields, empty rows, duplicate ids);
    - the bootstrap teacher (exists, knows the inner tags);
    - the tag is new to the tokenizer it will be added to;
    - the teacher's context fits the model's context window (and by how much it does not).
    """
    from transformers import AutoConfig, AutoTokenizer

    rows = load_inputs(cfg.inputs.file)
    check_bootstrap_teacher(cfg, metatoken)
    check_model_path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if metatoken.tag in tokenizer.get_vocab():
        raise ConfigError(
            f"{metatoken.source}: field 'tag' is {metatoken.tag}, which the tokenizer of {model_path} already has. "
            f"Fix: choose a tag text the tokenizer does not know."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt = metatoken.teacher_prompt(cfg.generate.teacher_mode)
    unknown = [t for t in inner_tags(prompt) if t not in tokenizer.get_vocab()]
    if unknown and cfg.generate.teacher_mode == "bootstrap":
        raise ConfigError(f"{metatoken.source}: the teacher does not know {unknown}.")
    window = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if not window:
        return
    longest_input = max(rows, key=lambda r: len(r["text"]))["text"]
    # Held-out inputs (and evaluation) always read the fully expanded prompt: the reference teacher.
    readers = {"teacher": prompt, "reference teacher (held-out samples and evaluation)": metatoken.expanded}
    for reader, text in readers.items():
        needed = len(context_ids(tokenizer, longest_input, text, cfg.model.chat)) + cfg.generate.max_new_tokens
        if needed > window:
            raise ConfigError(
                f"{metatoken.source}: the {reader}'s context needs {needed} tokens (prompt, longest input and "
                f"{cfg.generate.max_new_tokens} new tokens), {needed - window} more than the model's window of {window}. "
                f"Fix: shorten the prompt by at least {needed - window} tokens or lower generate.max_new_tokens"
                + (", or use nested tags with generate.teacher_mode=bootstrap." if reader == "teacher" else
                   "; the expanded prompt is what recovery is measured against, so it must fit the window.")
            )
