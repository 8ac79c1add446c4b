"""The continued-pretraining data stream, as small pure functions on token ids.

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

    python -m pytest -q tests/test_pretrain_data.py
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

IGNORE = -100  # the label Hugging Face losses skip
TAG_POSITIONS = ("start", "random")


@dataclass(frozen=True)
class TaggedDoc:
    """One teacher document, pre-tokenized three ways so the mixture only picks and splices ids."""

    tag: str
    tag_id: int
    tagged_context: list[int]  # the context with the tag where the teacher had its prompt (document start)
    plain_context: list[int]  # the same context without any tag
    continuation: list[int]  # what the teacher wrote (without a final EOS: packing adds one)
    ended: bool = True  # False: the teacher was cut off (max_new_tokens), so the EOS after it is no target


@dataclass(frozen=True)
class Document:
    ids: list[int]
    kind: str  # "tagged" | "dropped" (a tagged document shown without its tag) | "plain"
    tag: Optional[str] = None
    ended: bool = True  # whether the EOS packing puts after it is a target (a real end of the document)


@dataclass(frozen=True)
class Block:
    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]


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
    plain: Iterator[list[int]],
    tagged_share: float,
    tag_dropout: float,
    tag_position: str,
    seed: int,
) -> Iterator[Document]:
    """The document stream: each document is tagged with probability `tagged_share`.

    A tagged document comes from one of the `tagged` sources (chosen uniformly: one per tag); with
    probability `tag_dropout` it keeps its text but loses its tag. The rest are plain text.
    Sources are consumed only when picked, so each tag's documents come in their own order.
    """
    tags = sorted(tagged)
    for index in itertools.count():
        rng = doc_rng(seed, index)
        if tags and rng.random() < tagged_share:
            tag = tags[rng.randrange(len(tags))] if len(tags) > 1 else tags[0]
            doc = next(tagged[tag])
            if rng.random() < tag_dropout:
                yield Document(doc.plain_context + doc.continuation, "dropped", tag, doc.ended)
            else:
                yield Document(place_tag(doc, tag_position, rng), "tagged", tag, doc.ended)
        else:
            try:
                yield Document(next(plain), "plain")
            except StopIteration:
                return


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
    starts: list[int] = []  # where each piece begins inside the current block
    silent: set[int] = set()  # block positions that are no target (the EOS after a cut-off document)
    for doc in documents:
        ended = getattr(doc, "ended", True)
        rest = list(getattr(doc, "ids", doc)) + [eos_id]
        while rest:
            starts.append(len(ids))
            take = block_size - len(ids)
            ids.extend(rest[:take])
            rest = rest[take:]
            if not ended and not rest:
                silent.add(len(ids) - 1)
            if len(ids) == block_size:
                yield make_block(ids, starts, ignore, silent)
                ids, starts, silent = [], [], set()
    if keep_tail and ids:
        yield make_block(ids, starts, ignore, silent)


def make_block(ids: list[int], starts: list[int], ignore: set[int], silent: set[int] = frozenset()) -> Block:
    """Position ids restart at each piece; labels skip each piece's first token, tag tokens and `silent` positions."""
    ends = starts[1:] + [len(ids)]
    positions = [p for s, e in zip(starts, ends) for p in range(e - s)]
    labels = [
        IGNORE if (p == 0 or t in ignore or i in silent) else t for i, (t, p) in enumerate(zip(ids, positions))
    ]
    return Block(list(ids), positions, labels)


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
    ):
        self.make_documents = make_documents
        self.block_size = block_size
        self.eos_id = eos_id
        self.seed = seed
        self.ignore_ids = tuple(ignore_ids)
        self.start_block = start_block

    def blocks(self) -> Iterator[Block]:
        packed = pack_blocks(self.make_documents(self.seed), self.block_size, self.eos_id, self.ignore_ids)
        return itertools.islice(packed, self.start_block, None)

    def __iter__(self) -> Iterator[dict]:
        for block in self.blocks():
            yield {"input_ids": block.input_ids, "position_ids": block.position_ids, "labels": block.labels}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "start_block": self.start_block}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.start_block = state["seed"], state["start_block"]


def collate_blocks(rows: list[dict]) -> dict:
    """Stack equal-length blocks into tensors (no padding: every training block is full)."""
    return {key: torch.tensor([r[key] for r in rows], dtype=torch.long) for key in ("input_ids", "position_ids", "labels")}
