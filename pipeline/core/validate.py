"""Checks that run before any model is loaded: a bad config fails in a second, not after an hour.

Each error names the file, the field and the fix. Only tokenizers and model configs are read here
(small files), never weights.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from transformers import AutoConfig, AutoTokenizer

from pipeline.core import conversations
from pipeline.core.data import load_inputs, split_inputs
from pipeline.core.formats import context_ids, row_input
from pipeline.core.metatokens import Metatoken, check_bootstrap_teacher, inner_tags
from pipeline.errors import ConfigError

# (field, test, what the field must be). Fields absent from a config (None for optional caps) are skipped.
AT_LEAST_ONE = "at least 1"
VALUE_RULES = [
    ("inputs.heldout_fraction", lambda v: 0 < v < 1, "between 0 and 1, exclusive (some inputs train, some are held out)"),
    ("inputs.max_train", lambda v: v >= 1, AT_LEAST_ONE),
    ("inputs.max_heldout", lambda v: v >= 1, AT_LEAST_ONE),
    ("generate.max_new_tokens", lambda v: v >= 1, AT_LEAST_ONE),
    ("generate.temperature", lambda v: v > 0, "above 0 (the teacher samples)"),
    ("generate.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("generate.logprobs_top_k", lambda v: v >= 1, AT_LEAST_ONE),
    ("generate.batch_size", lambda v: v >= 1, AT_LEAST_ONE),
    ("generate.vllm_shard_size", lambda v: v >= 1, AT_LEAST_ONE),
    ("train.batch_size", lambda v: v >= 1, AT_LEAST_ONE),
    ("train.grad_accum", lambda v: v >= 1, AT_LEAST_ONE),
    ("train.weight_decay", lambda v: v >= 0, "0 or more"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.lora_r", lambda v: v >= 1, AT_LEAST_ONE),
    ("train.lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.untagged_weight", lambda v: v >= 0, "0 or more"),
    ("train.logging_steps", lambda v: v >= 1, AT_LEAST_ONE),
    ("train.save_steps", lambda v: v >= 0, "0 (only at the end) or more"),
    ("train.save_total_limit", lambda v: v >= 1, AT_LEAST_ONE),
    ("train.teacher_memo_mb", lambda v: v >= 0, "0 (recompute) or more"),
    ("train.pretrain.block_size", lambda v: v >= 2, "at least 2"),
    ("evaluate.max_examples", lambda v: v >= 1, AT_LEAST_ONE),
    ("evaluate.batch_size", lambda v: v >= 1, AT_LEAST_ONE),
    ("evaluate.num_samples", lambda v: v >= 0, "0 or more"),
    ("evaluate.sample_max_new_tokens", lambda v: v >= 1, AT_LEAST_ONE),
    ("mixture.untagged", lambda v: 0 <= v < 1, "in [0, 1)"),
]


def _value(cfg, dotted: str):
    return OmegaConf.select(cfg, dotted, default=None)


def check_values(cfg) -> None:
    """Every numeric setting in its range, checked at once before any stage runs.

    A negative learning rate trains the wrong way and a zero batch size divides by zero; both would
    otherwise surface only after the stages before them spent their compute.
    """
    for dotted, ok, must_be in VALUE_RULES:
        value = _value(cfg, dotted)
        if value is not None and not ok(value):
            raise ConfigError(f"{dotted} is {value}. Fix: it must be {must_be}.")
    train = cfg.train
    if train.params in ("lora", "full") and not train.lr > 0:
        raise ConfigError(f"train.lr is {train.lr}. Fix: use a learning rate above 0 (e.g. 1e-3).")
    if train.params in ("embedding", "lora") and not train.embedding_lr > 0:
        raise ConfigError(f"train.embedding_lr is {train.embedding_lr}. Fix: use a learning rate above 0 (e.g. 1e-2).")
    if not (train.max_steps > 0 or train.epochs > 0):
        raise ConfigError(
            f"train.epochs is {train.epochs} and train.max_steps is {train.max_steps}: nothing would train. "
            f"Fix: set train.epochs above 0, or train.max_steps to at least 1."
        )


def check_split(cfg, rows: list[dict]) -> None:
    """At least one training and one held-out input after the split and the caps."""
    train_rows, heldout_rows = split_inputs(rows, cfg.inputs.heldout_fraction, cfg.inputs.max_train, cfg.inputs.max_heldout)
    for name, part, fix in (("training", train_rows, "lower"), ("held-out", heldout_rows, "raise")):
        if not part:
            raise ConfigError(
                f"{cfg.inputs.file}: {len(rows)} input(s) give {len(train_rows)} training and {len(heldout_rows)} "
                f"held-out input(s) with inputs.heldout_fraction={cfg.inputs.heldout_fraction}: no {name} input. "
                f"Fix: add inputs, or {fix} inputs.heldout_fraction."
            )


def longest_context(tokenizer, rows: list[dict], prompt, chat: bool, candidates: int = 8, position: str = "system") -> int:
    """Tokens of the longest context over the inputs, measured in tokens (not characters).

    The inputs are ranked by their own token counts (one batched call); the few longest are laid out
    in full, since the chat template adds the same tokens to each.
    """
    counts = [len(ids) for ids in tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]]
    longest = sorted(range(len(rows)), key=lambda i: -counts[i])[:candidates]
    return max(len(context_ids(tokenizer, row_input({**rows[i], "position": str(position)}, "text"), prompt, chat)) for i in longest)


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
    - at least one training and one held-out input; top-k no larger than the vocabulary;
    - the teacher's context for the longest input (in tokens) fits the model's window (and by how much it does not).
    """
    rows = load_inputs(cfg.inputs.file)
    conversations.check_config(cfg, rows)  # chat model, finetune, recorded teacher where needed
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
    unknown = [t for t in inner_tags(metatoken.prompt) if t not in tokenizer.get_vocab()]
    if unknown and cfg.generate.teacher_mode == "bootstrap":
        raise ConfigError(f"{metatoken.source}: the teacher does not know {unknown}.")
    check_split(cfg, rows)
    if cfg.generate.logprobs_top_k > len(tokenizer):
        raise ConfigError(
            f"generate.logprobs_top_k is {cfg.generate.logprobs_top_k}, more than the {len(tokenizer)} tokens of "
            f"{model_path}'s vocabulary. Fix: use at most {len(tokenizer)}."
        )
    window = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if not window:
        return
    # Held-out inputs (and evaluation) always read the fully expanded prompt: the reference teacher.
    readers = {"teacher": prompt, "reference teacher (held-out samples and evaluation)": metatoken.expanded}
    for reader, text in readers.items():
        needed = longest_context(tokenizer, rows, text, cfg.model.chat, position=cfg.inputs.prompt_position) + cfg.generate.max_new_tokens
        if needed > window:
            raise ConfigError(
                f"{metatoken.source}: the {reader}'s context needs {needed} tokens (prompt, longest input and "
                f"{cfg.generate.max_new_tokens} new tokens), {needed - window} more than the model's window of {window}. "
                f"Fix: shorten the prompt by at least {needed - window} tokens or lower generate.max_new_tokens"
                + (", or use nested tags with generate.teacher_mode=bootstrap." if reader == "teacher" else
                   "; the expanded prompt is what recovery is measured against, so it must fit the window.")
            )
