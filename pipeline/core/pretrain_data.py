"""The `pretrain` training mode's data: continued pretraining on a packed stream of tagged and plain documents.

`train.mode=pretrain` swaps the fine-tuning examples for a language-modelling stream: teacher documents
(tag + document opening + the teacher's continuation, from the generate stage) mixed with plain text from
any `datasets` source, read with `streaming=True` so the corpus never has to fit in memory. The loss is
next-token cross-entropy on every token (`losses.lm_loss`, the trainer's `lm` objective). Evaluation adds
drift on held-out plain text (the first `train.pretrain.plain.heldout_docs` documents of the plain source,
which training skips).

    python -m pipeline experiment=pretrain_demo
    python -m pipeline stage=all model.chat=false inputs.file='${paths.data}/inputs/documents.jsonl' train.mode=pretrain

The stream, as small pure functions on token ids:

A stream of documents mixes teacher-generated tagged documents (tag + document opening + the
teacher's continuation) with plain untagged text, and is packed into fixed-length blocks:

    documents --mix_documents--> [ids, ids, ...] --pack_blocks--> Block(input_ids, position_ids, labels)

- Every decision about document i (tagged or plain, which tag, tag dropped or not, where the tag
  goes) is drawn from its own generator seeded by (seed, i), so the stream is a pure function of
  the seed: block k is the same whether the stream is read from the start or resumed at k.
  The whole state to checkpoint is (seed, blocks consumed); see `BlockStream`.
- Documents end with EOS and are cut across block edges (no token lost, none duplicated).
  Position ids restart at 0 for every piece of a document inside a block, which is how
  transformers' sdpa/eager/flash attention recognise packed sequences and keep attention inside a
  document (it needs `attention_mask=None` and `use_cache=False` in the forward call).
- Labels: every token is a target (the model's own next-token loss), except the first token of
  each piece (nothing before it in the block belongs to its document), tag tokens (the model
  reads tags, it never writes them, as in fine-tuning) and the EOS after a teacher continuation
  that was cut off at `generate.max_new_tokens` (it separates documents, but is no real ending).
- Soft targets (`train.pretrain.loss=kl`): a token generate wrote carries the top-k distribution
  generate recorded for it (`Soft`), and the block keeps it at that token's position, across block
  edges like the ids; the loss scores such positions with KL to it instead of cross-entropy.

    python -m pytest -q tests/unit/test_pretrain_data.py
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from datasets import load_dataset

from pipeline.core.formats import context_ids
from pipeline.core.losses import IGNORE
from pipeline.errors import ConfigError
from pipeline.runtime import outputs

TAG_POSITIONS = ("start", "random")


@dataclass(frozen=True)
class Soft:
    """The recorded distributions of a document's generated tokens: row j (top-k ids and log-probabilities)
    is the distribution the token at document position `start + j` was drawn from; position len(ids) is
    the EOS that packing appends (a row there only when generation ended with EOS)."""

    start: int
    topk_ids: Sequence[Sequence[int]]
    topk_logprobs: Sequence[Sequence[float]]


@dataclass(frozen=True)
class TaggedDoc:
    """One teacher document, pre-tokenized three ways so the mixture only picks and splices ids."""

    tag: str
    tag_id: int
    tagged_context: list[int]  # the context with the tag where the teacher had its prompt (document start)
    plain_context: list[int]  # the same context without any tag
    continuation: list[int]  # what the teacher wrote (without a final EOS: packing adds one)
    ended: bool = True  # False: the teacher was cut off (max_new_tokens), so the EOS after it is no target
    # loss=kl: the teacher's recorded top-k rows for the continuation (and its EOS when ended); None with loss=lm
    topk: Optional[tuple[Sequence, Sequence]] = None


@dataclass(frozen=True)
class Document:
    ids: list[int]
    kind: str  # "tagged" | "dropped" (a tagged document shown without its tag) | "plain"
    tag: Optional[str] = None
    ended: bool = True  # whether the EOS packing puts after it is a target (a real end of the document)
    soft: Optional[Soft] = None  # recorded distributions of its generated tokens (loss=kl), else None


@dataclass(frozen=True)
class Block:
    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]
    # per position: (top-k ids, log-probabilities) of the recorded distribution of the token there, or None;
    # the whole field is None when no position has one (loss=lm)
    soft: Optional[list] = None


def doc_rng(seed: int, index: int) -> random.Random:
    """A generator for document `index` alone: its draws do not depend on any other document."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def cycle_shuffled(items: Sequence, seed: int | str) -> Iterator:
    """Endless passes over `items`, each pass in a fresh order drawn from (seed, pass)."""
    for epoch in itertools.count():
        order = list(range(len(items)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for i in order:
            yield items[i]


def tag_sources(docs: dict[str, Sequence[TaggedDoc]], seed: int) -> dict[str, Iterator[TaggedDoc]]:
    """One endless shuffled source per tag. Seeds are strings (hashed by `random` with SHA-512), never
    Python's `hash()`, which changes between processes and would break resuming in a new one."""
    return {tag: cycle_shuffled(items, f"{seed}:{tag}") for tag, items in docs.items()}


def place_tag(doc: TaggedDoc, position: str, rng: random.Random) -> list[int]:
    """The tagged document's ids, with the tag at the document start or at a random token of the opening.

    `random` inserts the tag token anywhere from before the first token of the opening up to just
    before the continuation, so everything the teacher wrote under its prompt still follows the tag.
    """
    if position == "start":
        return doc.tagged_context + doc.continuation
    if position == "random":
        at = rng.randint(0, len(doc.plain_context))
        return doc.plain_context[:at] + [doc.tag_id] + doc.plain_context[at:] + doc.continuation
    raise ValueError(f"tag position {position!r}: use one of {TAG_POSITIONS}")


def mix_documents(
    tagged: dict[str, Iterator[TaggedDoc]],
    plain: Iterator[list[int] | Document],
    tagged_share: float,
    tag_dropout: float,
    tag_position: str,
    seed: int,
) -> Iterator[Document]:
    """The document stream: each document is tagged with probability `tagged_share`.

    A tagged document comes from one of the `tagged` sources (chosen uniformly: one per tag); with
    probability `tag_dropout` it keeps its text but loses its tag. The rest are plain text (id lists,
    which end, or `Document`s that say whether they end). Sources are consumed only when picked, so
    each tag's documents come in their own order.
    """
    tags = sorted(tagged)
    for index in itertools.count():
        rng = doc_rng(seed, index)
        if tags and rng.random() < tagged_share:
            tag = tags[rng.randrange(len(tags))] if len(tags) > 1 else tags[0]
            doc = next(tagged[tag])
            if rng.random() < tag_dropout:  # the teacher's distributions were under the prompt: plain LM targets here
                yield Document(doc.plain_context + doc.continuation, "dropped", tag, doc.ended)
            else:
                ids = place_tag(doc, tag_position, rng)
                soft = Soft(len(ids) - len(doc.continuation), *doc.topk) if doc.topk else None
                yield Document(ids, "tagged", tag, doc.ended, soft)
        else:
            try:
                item = next(plain)
            except StopIteration:
                return
            yield item if isinstance(item, Document) else Document(item, "plain")


def pack_blocks(
    documents: Iterable[Document | Sequence[int]],
    block_size: int,
    eos_id: int,
    ignore_ids: Iterable[int] = (),
    keep_tail: bool = False,
) -> Iterator[Block]:
    """Concatenate documents (each followed by EOS) and cut the result into blocks of `block_size`.

    A document longer than the room left is split; its next piece starts the next block. With
    `keep_tail`, a finite stream's last, shorter block is kept too (so no token is ever dropped).
    Documents are `Document`s or plain id lists (which count as ended).
    """
    if block_size < 2:
        raise ValueError(f"block size {block_size}: a block needs at least 2 tokens to have a target")
    ignore = set(ignore_ids)
    ids: list[int] = []
    rows: list = []  # per position: the recorded distribution of the token there, or None
    starts: list[int] = []  # where each piece begins inside the current block
    silent: set[int] = set()  # block positions that are no target (the EOS after a cut-off document)
    for doc in documents:
        ended = getattr(doc, "ended", True)
        rest = list(getattr(doc, "ids", doc)) + [eos_id]
        rest_rows = soft_rows(getattr(doc, "soft", None), len(rest))
        while rest:
            starts.append(len(ids))
            take = block_size - len(ids)
            ids.extend(rest[:take])
            rows.extend(rest_rows[:take])
            rest, rest_rows = rest[take:], rest_rows[take:]
            if not ended and not rest:
                silent.add(len(ids) - 1)
            if len(ids) == block_size:
                yield make_block(ids, starts, ignore, silent, rows)
                ids, rows, starts, silent = [], [], [], set()
    if keep_tail and ids:
        yield make_block(ids, starts, ignore, silent, rows)


def soft_rows(soft: Optional[Soft], length: int) -> list:
    """A document's per-position soft targets (ids + EOS: `length` positions), None where it has none."""
    rows = [None] * length
    if soft is not None:
        for j, row in enumerate(zip(soft.topk_ids, soft.topk_logprobs)):
            if soft.start + j < length:
                rows[soft.start + j] = row
    return rows


def make_block(ids: list[int], starts: list[int], ignore: set[int], silent: set[int] = frozenset(), rows=None) -> Block:
    """Position ids restart at each piece; labels skip each piece's first token, tag tokens and `silent` positions.
    A soft row stays only where its position is a target."""
    ends = starts[1:] + [len(ids)]
    positions = [p for s, e in zip(starts, ends) for p in range(e - s)]
    labels = [
        IGNORE if (p == 0 or t in ignore or i in silent) else t for i, (t, p) in enumerate(zip(ids, positions))
    ]
    soft = None
    if rows and any(r is not None for r in rows):
        soft = [r if label != IGNORE else None for r, label in zip(rows, labels)]
    return Block(list(ids), positions, labels, soft)


def generated_targets(block: Block) -> Block:
    """The block with only its generated tokens as targets (`train.pretrain.targets=generated`): a position
    without a recorded distribution (an opening, corpus text, a dropped-tag document) keeps its token as
    context but is no longer a label, so human text in the stream is read, never learned."""
    rows = block.soft or [None] * len(block.labels)
    labels = [label if row is not None else IGNORE for label, row in zip(block.labels, rows)]
    return Block(block.input_ids, block.position_ids, labels, block.soft)


class BlockStream(torch.utils.data.IterableDataset):
    """Packed blocks from a document factory, starting at block `start_block`.

    `make_documents(seed)` must return the same documents for the same seed (it is called again
    on every pass). The checkpointable state is `state_dict()`: the seed and the next block's
    index. Resuming re-reads the cheap (tokenize-only) stream up to that block; no model runs.
    """

    def __init__(
        self,
        make_documents: Callable[[int], Iterable[list[int]]],
        block_size: int,
        eos_id: int,
        seed: int,
        ignore_ids: Iterable[int] = (),
        start_block: int = 0,
        topk: int = 0,
        generated_only: bool = False,
    ):
        self.topk = topk  # > 0 (loss=kl): every block also carries its soft targets as k-wide rows
        self.generated_only = generated_only  # targets=generated: only positions with a soft row are targets
        self.make_documents = make_documents
        self.block_size = block_size
        self.eos_id = eos_id
        self.seed = seed
        self.ignore_ids = tuple(ignore_ids)
        self.start_block = start_block

    def blocks(self) -> Iterator[Block]:
        packed = pack_blocks(self.make_documents(self.seed), self.block_size, self.eos_id, self.ignore_ids)
        if self.generated_only:
            packed = map(generated_targets, packed)
        return itertools.islice(packed, self.start_block, None)

    def __iter__(self) -> Iterator[dict]:
        for block in self.blocks():
            row = {"input_ids": block.input_ids, "position_ids": block.position_ids, "labels": block.labels}
            if self.topk:
                row.update(soft_columns(block.soft or [None] * len(block.input_ids), self.topk))
            yield row

    def state_dict(self) -> dict:
        return {"seed": self.seed, "start_block": self.start_block}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.start_block = state["seed"], state["start_block"]


def soft_columns(soft: list, k: int) -> dict:
    """A block's soft targets as equal-width columns: `soft_mask` says where a row is; elsewhere the
    row is a placeholder (ids 0, log-probability 0) that the loss never reads."""
    ids, logprobs = [], []
    for row in soft:
        if row is not None and len(row[0]) != k:
            raise ValueError(f"a recorded top-k row has {len(row[0])} entries, the stream expects {k}")
        ids.append(list(row[0]) if row is not None else [0] * k)
        logprobs.append(list(row[1]) if row is not None else [0.0] * k)
    return {"topk_ids": ids, "topk_logprobs": logprobs, "soft_mask": [row is not None for row in soft]}


BLOCK_DTYPES = {"input_ids": torch.long, "position_ids": torch.long, "labels": torch.long,
                "topk_ids": torch.long, "topk_logprobs": torch.float32, "soft_mask": torch.bool}


def collate_blocks(rows: list[dict]) -> dict:
    """Stack equal-length blocks into tensors (no padding: every training block is full)."""
    return {key: torch.tensor([r[key] for r in rows], dtype=dtype) for key, dtype in BLOCK_DTYPES.items() if key in rows[0]}

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
    if p.plain_from == "untagged" and not cfg.mixture.untagged > 0:
        raise ConfigError(
            f"train.pretrain.plain_from=untagged reads the run's untagged training records, but mixture.untagged is "
            f"{cfg.mixture.untagged}. Fix: set mixture.untagged (e.g. 0.5: half the inputs continued without a prompt)."
        )
    if p.targets == "generated" and (p.loss != "kl" or p.plain_from != "untagged"):
        raise ConfigError(
            f"train.pretrain.targets=generated trains only the tokens generate wrote, scored against their recorded "
            f"distributions, but train.pretrain.loss is {p.loss} and train.pretrain.plain_from is {p.plain_from}. "
            "Fix: add train.pretrain.loss=kl train.pretrain.plain_from=untagged (the plain share must be generated "
            "too), or set train.pretrain.targets=all."
        )
    if p.plain.path in LOCAL_BUILDERS:  # evaluation reads its held-out documents whatever the plain share is
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
    for name, default in (("plain_from", "corpus"), ("loss", "lm"), ("targets", "all")):
        if key.get(name) == default:
            del key[name]  # the defaults: keys made before the fields existed stay valid
    files = key["plain"].get("data_files")
    if files:
        key["plain"]["data_files"] = [outputs.file_sha(f) if Path(f).is_file() else f for f in _as_list(files)]
    return key


def plain_source(plain_cfg, split: str):
    """The plain corpus as a streaming dataset: `split="heldout"` is its first `heldout_docs` documents, "train" the rest."""
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


def untagged_docs(records, tokenizer, chat: bool, soft: bool = False) -> list[Document]:
    """The untagged training records as plain documents: each input, then what the model wrote without any prompt
    (with `soft`, the distributions it wrote them from are the targets of those tokens)."""
    eos, docs = tokenizer.eos_token_id, []
    for r in records:
        if r["tags"]:
            continue
        continuation = list(r["output_ids"])
        ended = bool(continuation) and continuation[-1] == eos
        ids = context_ids(tokenizer, r["input"], None, chat) + (continuation[:-1] if ended else continuation)
        rows = Soft(len(ids) - len(continuation) + ended, r["topk_ids"], r["topk_logprobs"]) if soft else None
        docs.append(Document(ids, "plain", None, ended, rows))
    return docs


def tagged_docs(records, tokenizer, chat: bool, tags: list[str], soft: bool = False) -> dict[str, list[TaggedDoc]]:
    """The teacher's training documents per tag, pre-tokenized with and without the tag (untagged records are
    left out: they are plain text, see `untagged_docs`); with `soft`, each keeps the teacher's recorded top-k rows."""
    by_tag: dict[str, list[TaggedDoc]] = {}
    eos = tokenizer.eos_token_id
    for r in (r for r in records if r["tags"]):
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
            topk=(r["topk_ids"], r["topk_logprobs"]) if soft else None,
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
    soft = p.loss == "kl"
    docs = tagged_docs(records, tokenizer, cfg.model.chat, list(p.tags), soft)
    own = untagged_docs(records, tokenizer, cfg.model.chat, soft) if p.plain_from == "untagged" else None
    if own == []:
        raise ConfigError("train.pretrain.plain_from=untagged, but the generated data has no untagged training record. "
                          "Fix: raise mixture.untagged (e.g. 0.5), or set train.pretrain.plain_from=corpus.")

    def make(seed: int) -> Iterator[Document]:
        tagged = tag_sources(docs, seed)
        if p.tagged_share >= 1.0:
            plain = iter(())
        else:
            plain = cycle_shuffled(own, f"{seed}:untagged") if own is not None else endless_plain(p.plain, tokenizer, seed)
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
    topk = next((len(r["topk_ids"][0]) for r in records if r["topk_ids"]), 0) if cfg.train.pretrain.loss == "kl" else 0
    stream = BlockStream(make, cfg.train.pretrain.block_size, tokenizer.eos_token_id, seed, ignore_ids=tag_ids, topk=topk,
                         generated_only=cfg.train.pretrain.targets == "generated")
    return stream, count_steps(make, seed, n_tagged, cfg.train)
