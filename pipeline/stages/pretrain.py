"""The `pretrain` training mode: continued pretraining on a packed stream of tagged and plain documents.

`train.mode=pretrain` swaps the fine-tuning examples for a language-modelling stream (see
`pretrain_data` for the mixing and packing): teacher documents (tag + document opening + the
teacher's continuation, from the generate stage) mixed with plain text from any `datasets` source,
read with `streaming=True` so the corpus never has to fit in memory. The loss is next-token
cross-entropy on every token. Evaluation adds drift on held-out plain text (the first
`train.pretrain.plain.heldout_docs` documents of the plain source, which training skips).

    python -m pipeline experiment=pretrain_demo
    python -m pipeline stage=all model.chat=false inputs.file='${paths.data}/inputs/documents.jsonl' train.mode=pretrain
"""
from __future__ import annotations

import glob
import itertools
import math
from pathlib import Path
from typing import Iterator

import torch

from pipeline.runtime import outputs
from pipeline.core.losses import masked_mean, suppress, token_cross_entropy
from pipeline.errors import ConfigError
from pipeline.core.pretrain_data import (
    IGNORE,
    TAG_POSITIONS,
    BlockStream,
    Document,
    TaggedDoc,
    collate_blocks,
    mix_documents,
    tag_sources,
)
from pipeline.stages.train import DistillTrainer

MODES = ("finetune", "pretrain")
LOCAL_BUILDERS = ("json", "text", "csv", "parquet")  # datasets builders that read `data_files`


def check_config(cfg) -> None:
    """Fail on a bad pretrain setting before any model loads (called by `run_stages`)."""
    mode = cfg.train.mode
    if mode not in MODES:
        raise ConfigError(f"train.mode is {mode!r}. Fix: use one of {', '.join(MODES)}.")
    if mode != "pretrain":
        return
    p = cfg.train.pretrain
    for name in ("tagged_share", "tag_dropout"):
        if not 0.0 <= p[name] <= 1.0:
            raise ConfigError(f"train.pretrain.{name} is {p[name]}. Fix: use a probability between 0 and 1.")
    if p.tag_position not in TAG_POSITIONS:
        raise ConfigError(f"train.pretrain.tag_position is {p.tag_position!r}. Fix: use one of {', '.join(TAG_POSITIONS)}.")
    if p.tag_position == "random" and cfg.model.chat:
        raise ConfigError(
            "train.pretrain.tag_position=random needs model.chat=false: a chat model's tag is its system message. "
            "Fix: set model.chat=false or train.pretrain.tag_position=start."
        )
    if p.block_size < 2:
        raise ConfigError(f"train.pretrain.block_size is {p.block_size}. Fix: use at least 2 (typically 256-2048).")
    if p.plain.heldout_docs < 1:
        raise ConfigError("train.pretrain.plain.heldout_docs must be >= 1: evaluate measures drift on those documents.")
    if p.tagged_share < 1.0 and p.plain.path in LOCAL_BUILDERS:
        files = p.plain.data_files
        if not files or not any(glob.glob(f) for f in _as_list(files)):
            raise ConfigError(
                f"train.pretrain.plain.data_files is {files!r}, and no such file exists. Fix: point it to local "
                f"{p.plain.path} file(s), or set train.pretrain.plain.path to a hub dataset id (needs a network)."
            )


def _as_list(value) -> list[str]:
    """data_files is one path/glob or a list of them (a ListConfig from YAML)."""
    return [value] if isinstance(value, str) else [str(v) for v in value]


def data_key(cfg) -> dict:
    """What the pretrain stream depends on: its knobs, and the plain corpus's bytes where it is a local file."""
    key = outputs.plain(cfg.train.pretrain)
    files = key["plain"].get("data_files")
    if files:
        key["plain"]["data_files"] = [outputs.file_sha(f) if Path(f).is_file() else f for f in _as_list(files)]
    return key


def plain_source(plain_cfg, split: str):
    """The plain corpus as a streaming dataset: `split="heldout"` is its first `heldout_docs` documents, "train" the rest."""
    from datasets import load_dataset

    kwargs = {"data_files": list(_as_list(plain_cfg.data_files))} if plain_cfg.data_files else {}
    try:
        ds = load_dataset(plain_cfg.path, plain_cfg.name, split=plain_cfg.split, streaming=True, **kwargs)
    except Exception as err:  # datasets raises many types; the user needs the config field either way
        raise ConfigError(
            f"train.pretrain.plain: load_dataset({plain_cfg.path!r}, {plain_cfg.name!r}, split={plain_cfg.split!r}) "
            f"failed: {err}. Fix: name a local builder (json/text/csv/parquet) with data_files, or a reachable dataset."
        ) from None
    n = plain_cfg.heldout_docs
    return ds.take(n) if split == "heldout" else ds.skip(n)


def _text(row: dict, field: str):
    if field not in row:
        raise ConfigError(f"train.pretrain.plain.text_field is {field!r}, but the rows have {sorted(row)}. Fix: name the text column.")
    return row[field]


def plain_texts(plain_cfg, split: str) -> Iterator[str]:
    for row in plain_source(plain_cfg, split):
        text = str(_text(row, plain_cfg.text_field))
        if text.strip():
            yield text


def endless_plain(plain_cfg, tokenizer, seed: int) -> Iterator[list[int]]:
    """Tokenized plain training documents, pass after pass, each pass shuffled (buffer) by (seed, pass)."""
    ds = plain_source(plain_cfg, "train").shuffle(seed=seed, buffer_size=plain_cfg.shuffle_buffer)
    field = plain_cfg.text_field
    for epoch in itertools.count():
        ds.set_epoch(epoch)
        seen = 0
        for row in ds:
            seen += 1
            text = str(_text(row, field))
            if text.strip():
                yield tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]  # text stays text
        if not seen:
            raise ConfigError(
                f"train.pretrain.plain: no documents left after the {plain_cfg.heldout_docs} held-out ones. "
                "Fix: add text or lower train.pretrain.plain.heldout_docs."
            )


def tagged_docs(records, tokenizer, chat: bool, tags: list[str]) -> dict[str, list[TaggedDoc]]:
    """The teacher's training documents per tag, pre-tokenized with and without the tag."""
    from pipeline.core.formats import context_ids

    by_tag: dict[str, list[TaggedDoc]] = {}
    eos = tokenizer.eos_token_id
    for r in records:
        tag = "".join(r["tags"])
        continuation = list(r["output_ids"])
        ended = bool(continuation) and continuation[-1] == eos
        doc = TaggedDoc(
            tag=tag,
            tag_id=tokenizer.convert_tokens_to_ids(tag),
            tagged_context=context_ids(tokenizer, r["input"], tag, chat),
            plain_context=context_ids(tokenizer, r["input"], None, chat),
            continuation=continuation[:-1] if ended else continuation,
            ended=ended,  # a continuation cut at max_new_tokens gets an EOS separator that is not a target
        )
        by_tag.setdefault(tag, []).append(doc)
    wanted = list(tags) or sorted(by_tag)
    missing = [t for t in wanted if t not in by_tag]
    if missing:
        raise ConfigError(
            f"train.pretrain.tags lists {missing}, but the generated data holds only {sorted(by_tag)}. "
            "Fix: list tags this run generated (or leave train.pretrain.tags empty for all of them)."
        )
    return {t: by_tag[t] for t in wanted}


def document_factory(cfg, records, tokenizer):
    """seed -> the mixed document stream of this run (a fresh, identical stream for the same seed)."""
    p = cfg.train.pretrain
    docs = tagged_docs(records, tokenizer, cfg.model.chat, list(p.tags))

    def make(seed: int) -> Iterator[Document]:
        tagged = tag_sources(docs, seed)
        plain = endless_plain(p.plain, tokenizer, seed) if p.tagged_share < 1.0 else iter(())
        return mix_documents(tagged, plain, p.tagged_share, p.tag_dropout, p.tag_position, seed)

    return make, sum(len(d) for d in docs.values())


def count_steps(make_documents, seed: int, n_tagged: int, train_cfg) -> int:
    """Optimizer steps for `train.epochs` passes over the tagged documents (tokenizing only, no model)."""
    if train_cfg.max_steps > 0:
        return train_cfg.max_steps
    target, seen, tokens = math.ceil(train_cfg.epochs * n_tagged), 0, 0
    for doc in make_documents(seed):
        tokens += len(doc.ids) + 1
        seen += doc.kind != "plain"
        if seen >= target:
            break
    per_step = train_cfg.pretrain.block_size * train_cfg.batch_size * train_cfg.grad_accum
    return max(1, math.ceil(tokens / per_step))


def training_stream(cfg, records, tokenizer, tag_ids: list[int]) -> tuple[BlockStream, int]:
    """The packed block stream of this run and the number of optimizer steps it trains for."""
    make, n_tagged = document_factory(cfg, records, tokenizer)
    seed = cfg.train.seed
    stream = BlockStream(make, cfg.train.pretrain.block_size, tokenizer.eos_token_id, seed, ignore_ids=tag_ids)
    return stream, count_steps(make, seed, n_tagged, cfg.train)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, tag_ids: list[int]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, tags suppressed as everywhere else.

    logits [B, L, V], labels [B, L] (Hugging Face layout: labels[t] is predicted by logits[t-1]).
    """
    targets = labels[:, 1:]
    per_token = token_cross_entropy(suppress(logits[:, :-1], tag_ids), targets.clamp_min(0))
    return masked_mean(per_token, targets != IGNORE)


def packed_logits(model, batch: dict) -> torch.Tensor:
    """Forward a packed batch: no attention mask and no cache, so position ids fence each document."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


class PretrainTrainer(DistillTrainer):
    """The fine-tuning trainer with the language-modelling loss on packed blocks."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = lm_loss(packed_logits(model, inputs), inputs["labels"], self.tag_ids)
        return (loss, None) if return_outputs else loss


@torch.no_grad()
def plain_text_scores(cfg, base_path: str, student_dir: Path, tag_ids: list[int]) -> dict:
    """Drift on held-out plain text: KL(base || student) per token, and both models' per-token NLL.

    Teacher-forced on the held-out plain documents themselves (untagged), each cut to one block.
    """
    from pipeline.stages.evaluate import continuation_logits, mean_kl
    from pipeline.core.models import load_model, load_tokenizer

    p, bs = cfg.train.pretrain, cfg.evaluate.batch_size
    tok = load_tokenizer(str(student_dir))
    docs = [tok(t, add_special_tokens=True, split_special_tokens=True)["input_ids"][: p.block_size] for t in plain_texts(p.plain, "heldout")]
    docs = [d for d in docs if len(d) > 1]
    contexts, rest = [d[:1] for d in docs], [d[1:] for d in docs]
    scores = {}
    for name, path, tags in (("base", base_path, []), ("student", str(student_dir), tag_ids)):
        model = load_model(path, cfg.model.dtype, cfg.model.device)
        logits = continuation_logits(model, contexts, rest, tok.pad_token_id, bs, f"{name} plain", tags)
        scores[name] = logits
        nll = sum(token_cross_entropy(l, torch.tensor(r)).sum().item() for l, r in zip(logits, rest))
        scores[f"plain_nll_{name}"] = nll / sum(map(len, rest))
        del model
    return {
        "plain_drift_kl": mean_kl(scores.pop("base"), scores.pop("student")),
        **scores,
        "plain_heldout_docs": len(docs),
        "plain_tokens": sum(map(len, rest)),
    }
