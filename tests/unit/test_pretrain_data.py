"""The pretrain stream: packing, mixture proportions, tag dropout and placement, resume, document fences."""
import itertools
import random

import pytest
import torch

from pipeline.core.losses import lm_loss
from pipeline.core.pretrain_data import (
    IGNORE,
    BlockStream,
    Document,
    TaggedDoc,
    collate_blocks,
    cycle_shuffled,
    mix_documents,
    pack_blocks,
)
from pipeline.core.scoring import packed_logits

EOS, TAG_A, TAG_B = 1, 900, 901


def random_docs(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 500) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def teacher_docs(tag: str, tag_id: int, n: int) -> list[TaggedDoc]:
    return [
        TaggedDoc(tag, tag_id, [tag_id, 5, 6, 10 + i], [5, 6, 10 + i], [100 + i, 101 + i], ended=i % 2 == 0) for i in range(n)
    ]


def mixed(seed=0, share=0.3, dropout=0.0, position="start", tags=("<a>", "<b>")):
    ids = {"<a>": TAG_A, "<b>": TAG_B}
    tagged = {t: cycle_shuffled(teacher_docs(t, ids[t], 7), seed) for t in tags}
    plain = itertools.cycle(random_docs(13, seed))
    return mix_documents(tagged, plain, share, dropout, position, seed)


@pytest.mark.parametrize("block_size", [2, 7, 32, 1000])
def test_packing_loses_and_duplicates_nothing_and_fences_documents(block_size):
    docs = random_docs(50)
    blocks = list(pack_blocks(docs, block_size, EOS, keep_tail=True))
    flat = [t for b in blocks for t in b.input_ids]
    assert flat == [t for d in docs for t in d + [EOS]]  # every token once, in order
    assert all(len(b.input_ids) == block_size for b in blocks[:-1]) and 0 < len(blocks[-1].input_ids) <= block_size
    # Document starts in the flat stream, and block edges: exactly where position ids restart at 0.
    doc_starts, at = set(), 0
    for d in docs:
        doc_starts.add(at)
        at += len(d) + 1
    piece_starts = doc_starts | {i * block_size for i in range(len(blocks))}
    flat_positions = [p for b in blocks for p in b.position_ids]
    assert {i for i, p in enumerate(flat_positions) if p == 0} == piece_starts
    assert all(p == flat_positions[i - 1] + 1 for i, p in enumerate(flat_positions) if i not in piece_starts)
    # Loss on every token except each piece's first (nothing of its document precedes it in the block).
    flat_labels = [t for b in blocks for t in b.labels]
    assert [i for i, t in enumerate(flat_labels) if t == IGNORE] == sorted(piece_starts)
    assert all(flat_labels[i] == flat[i] for i in range(len(flat)) if i not in piece_starts)


def test_without_tail_only_full_blocks_come_out():
    blocks = list(pack_blocks(random_docs(20), 16, EOS))
    total = sum(len(d) + 1 for d in random_docs(20))
    assert len(blocks) == total // 16 and all(len(b.input_ids) == 16 for b in blocks)


def test_tags_and_cut_off_ends_are_never_targets():
    docs = [Document([TAG_A, 5, 6, 7], "tagged", "<a>", ended=False), Document([8, TAG_A, 9], "tagged", "<a>"), [3, 4]]
    (block,) = pack_blocks(docs, 64, EOS, ignore_ids=[TAG_A], keep_tail=True)
    assert block.input_ids == [TAG_A, 5, 6, 7, EOS, 8, TAG_A, 9, EOS, 3, 4, EOS]
    # positions 0 (doc start), 4 (EOS after a cut-off continuation), 5 (doc start), 6 (tag), 9 (doc start)
    assert [i for i, t in enumerate(block.labels) if t == IGNORE] == [0, 4, 5, 6, 9]
    assert block.labels[8] == EOS  # a real end is learned


def test_mixture_proportions_are_within_sampling_error():
    n, share = 4000, 0.3
    docs = list(itertools.islice(mixed(share=share), n))
    tagged = [d for d in docs if d.kind != "plain"]
    sigma = (share * (1 - share) / n) ** 0.5
    assert abs(len(tagged) / n - share) < 4 * sigma
    per_tag = sum(d.tag == "<a>" for d in tagged) / len(tagged)
    assert abs(per_tag - 0.5) < 4 * (0.25 / len(tagged)) ** 0.5
    assert [d.kind for d in itertools.islice(mixed(share=0.0), 200)] == ["plain"] * 200
    assert all(d.kind == "tagged" for d in itertools.islice(mixed(share=1.0), 200))
    only_a = list(itertools.islice(mixed(share=1.0, tags=("<a>",)), 200))
    assert {d.tag for d in only_a} == {"<a>"} and not any(TAG_B in d.ids for d in only_a)


def test_tag_dropout_rate_and_dropped_documents_keep_their_text():
    dropout = 0.25
    docs = [d for d in itertools.islice(mixed(share=1.0, dropout=dropout), 3000)]
    dropped = [d for d in docs if d.kind == "dropped"]
    assert abs(len(dropped) / len(docs) - dropout) < 4 * (dropout * (1 - dropout) / len(docs)) ** 0.5
    assert not any(TAG_A in d.ids or TAG_B in d.ids for d in dropped)
    assert all(d.ids.count({"<a>": TAG_A, "<b>": TAG_B}[d.tag]) == 1 for d in docs if d.kind == "tagged")
    # A dropped document is the same teacher text as a tagged one, minus the tag.
    tagged_texts = {tuple(t for t in d.ids if t not in (TAG_A, TAG_B)) for d in docs if d.kind == "tagged"}
    assert {tuple(d.ids) for d in dropped} <= tagged_texts


def test_random_tag_position_stays_inside_the_opening():
    docs = [d for d in itertools.islice(mixed(share=1.0, position="random"), 500)]
    where = set()
    for d in docs:
        at = d.ids.index(TAG_A if d.tag == "<a>" else TAG_B)
        rest = d.ids[:at] + d.ids[at + 1 :]
        assert len(rest) == 5 and at <= 3  # opening [5, 6, x], then the two continuation tokens, tag before them
        where.add(at)
    assert where == {0, 1, 2, 3}


def test_resume_at_a_block_boundary_gives_the_same_next_batch():
    def make(seed):
        return mixed(seed=seed, share=0.4, dropout=0.1)

    full = BlockStream(make, 24, EOS, seed=3, ignore_ids=[TAG_A, TAG_B])
    uninterrupted = list(itertools.islice(full, 40))
    state = BlockStream(make, 24, EOS, seed=3, start_block=16).state_dict()  # what a checkpoint keeps
    resumed = BlockStream(make, 24, EOS, seed=0)
    resumed.load_state_dict(state)
    assert list(itertools.islice(resumed, 24)) == uninterrupted[16:]
    # through a DataLoader, as the Trainer reads it: batch 4 of the full run == batch 0 of the resumed one
    loader = lambda s: torch.utils.data.DataLoader(s, batch_size=4, collate_fn=collate_blocks)  # noqa: E731
    fifth = next(itertools.islice(loader(full), 4, None))
    first_resumed = next(iter(loader(resumed)))
    assert all(torch.equal(fifth[k], first_resumed[k]) for k in fifth)
    other_seed = list(itertools.islice(BlockStream(make, 24, EOS, seed=4), 40))
    assert other_seed != uninterrupted


def test_packed_attention_does_not_cross_documents(tiny_model):
    """Logits of a document packed after another equal its logits alone; a plain causal mask would differ."""
    from pipeline.core.models import load_model

    model = load_model(str(tiny_model))
    first, second = [5, 17, 33, 8, 40, 12], [21, 9, 14, 30]
    (block,) = pack_blocks([first, second], 64, EOS, keep_tail=True)
    batch = collate_blocks([{"input_ids": block.input_ids, "position_ids": block.position_ids, "labels": block.labels}])
    with torch.no_grad():
        packed = packed_logits(model, batch)[0]
        alone = model(torch.tensor([second + [EOS]])).logits[0]
        crossing = model(batch["input_ids"]).logits[0]  # one causal sequence: the second document sees the first
    start = len(first) + 1
    assert torch.allclose(packed[start:], alone, atol=1e-5)
    assert not torch.allclose(crossing[start:], alone, atol=1e-3)
    # the loss is the model's own next-token loss when no tag is suppressed
    labels = torch.tensor([second + [EOS]])
    expected = model(input_ids=labels, labels=labels).loss
    assert torch.allclose(lm_loss(alone[None], labels, []), expected, atol=1e-5)


def test_the_stream_is_the_same_in_a_new_process():
    """Resuming happens in a new process: nothing in the stream may depend on Python's per-process hash seed."""
    import subprocess
    import sys

    from pipeline.config import PROJECT_ROOT

    script = (
        "import itertools\n"
        "from tests.unit.test_pretrain_data import EOS, mixed_via_sources\n"
        "from pipeline.core.pretrain_data import pack_blocks\n"
        "print([b.input_ids for b in itertools.islice(pack_blocks(mixed_via_sources(5), 16, EOS), 30)])\n"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", script], cwd=PROJECT_ROOT, env={**__import__("os").environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1 and len(next(iter(runs))) > 100


def mixed_via_sources(seed):
    from pipeline.core.pretrain_data import tag_sources

    docs = {"<a>": teacher_docs("<a>", TAG_A, 7), "<b>": teacher_docs("<b>", TAG_B, 5)}
    return mix_documents(tag_sources(docs, seed), itertools.cycle(random_docs(13, seed)), 0.5, 0.2, "random", seed)


def test_untagged_records_become_the_plain_share_and_keep_their_cut_off_ends():
    from pipeline.core.pretrain_data import tagged_docs, untagged_docs

    class Tok:  # base-model layout: BOS, then the text's characters as ids; a tag is one id
        eos_token_id = EOS

        def __call__(self, text, add_special_tokens=True, **_):
            return {"input_ids": [2] * add_special_tokens + [ord(c) for c in text]}

        def convert_tokens_to_ids(self, tag):
            return TAG_A

    records = [
        {"tags": ["<a>"], "input": "ab", "output_ids": [7, 8, EOS]},
        {"tags": [], "input": "cd", "output_ids": [5, 6, EOS]},  # the model without prompt, and it ended
        {"tags": [], "input": "e", "output_ids": [9, 9]},  # cut off at max_new_tokens
    ]
    plain = untagged_docs(records, Tok(), chat=False)
    assert plain == [Document([2, ord("c"), ord("d"), 5, 6], "plain", None, True), Document([2, ord("e"), 9, 9], "plain", None, False)]
    assert list(tagged_docs(records, Tok(), False, [])) == ["<a>"]  # untagged records are no tag's documents
    # mixed in with tagged_share 0: the stream is exactly those documents, their ends as they were
    stream = mix_documents({"<a>": iter(())}, cycle_shuffled(plain, 0), 0.0, 0.0, "start", seed=0)
    first = list(itertools.islice(stream, 4))
    assert sorted(map(tuple, (d.ids for d in first[:2]))) == sorted(tuple(d.ids) for d in plain)
    (block,) = pack_blocks(first[:2], 64, EOS, keep_tail=True)
    cut = next(i for i, d in enumerate(first[:2]) if not d.ended)
    end_of_cut = sum(len(d.ids) + 1 for d in first[: cut + 1]) - 1
    assert block.input_ids[end_of_cut] == EOS and block.labels[end_of_cut] == IGNORE  # no real end: no target


def row_for(token: int, k: int = 3) -> tuple[list[int], list[float]]:
    """A recorded top-k row that names the token it was recorded for (its first id) and its position in
    the logprobs, so a test can tell which token a row landed on."""
    return [token] + [token + 1000 + j for j in range(k - 1)], [-0.5 - 0.01 * token] + [-3.0] * (k - 1)


@pytest.mark.parametrize("block_size", [3, 5, 16, 200])
def test_soft_targets_stay_on_the_token_they_were_recorded_for(block_size):
    """loss=kl: every generated token keeps its recorded row across block edges; openings, plain text, piece
    starts and the EOS after a cut-off continuation get none."""
    from pipeline.core.pretrain_data import Soft

    rng = random.Random(block_size)
    docs, expected = [], []  # expected: per flat position, the token a row must name (None: no row)
    for i in range(30):
        opening = [rng.randrange(2, 500) for _ in range(rng.randrange(1, 6))]
        generated = [rng.randrange(2, 500) for _ in range(rng.randrange(1, 8))]
        ended = i % 3 != 0
        if i % 4 == 3:  # plain text: no rows at all
            docs.append(Document(opening + generated, "plain"))
            expected += [None] * (len(opening) + len(generated) + 1)
            continue
        recorded = generated + [EOS] * ended  # generation recorded a row for its EOS only when it ended with one
        rows = [row_for(t) for t in recorded]
        docs.append(Document(opening + generated, "tagged", "<a>", ended, Soft(len(opening), *map(list, zip(*rows)))))
        expected += [None] * len(opening) + generated + ([EOS] if ended else [None])
    blocks = list(pack_blocks(docs, block_size, EOS, keep_tail=True))
    flat_rows = [r for b in blocks for r in (b.soft or [None] * len(b.input_ids))]
    flat_labels = [t for b in blocks for t in b.labels]
    assert len(flat_rows) == len(expected)
    for i, (row, token) in enumerate(zip(flat_rows, expected)):
        if token is None or flat_labels[i] == IGNORE:  # a piece's first token has no target, so no row either
            assert row is None, i
        else:
            assert row == tuple(row_for(token)), i
    assert sum(r is not None for r in flat_rows) > 50  # the test exercised many rows
    # As training batches: the columns hold the same rows, the mask marks exactly them.
    stream = BlockStream(lambda seed: iter(docs), block_size, EOS, seed=0, topk=3)
    rows = list(itertools.islice(stream, 2))  # full blocks only: one when the blocks are long
    batch = collate_blocks(rows)
    assert batch["topk_ids"].shape == (len(rows), block_size, 3) and batch["soft_mask"].dtype == torch.bool
    for b, block in enumerate(blocks[: len(rows)]):
        for t, row in enumerate(block.soft or [None] * block_size):
            assert bool(batch["soft_mask"][b, t]) == (row is not None)
            if row is not None:
                assert batch["topk_ids"][b, t].tolist() == row[0]
                assert batch["topk_logprobs"][b, t].tolist() == pytest.approx(row[1])


def test_without_soft_targets_blocks_and_batches_are_as_before():
    docs = [Document([TAG_A, 5, 6], "tagged", "<a>"), Document([7, 8], "plain")]
    (block,) = pack_blocks(docs, 64, EOS, ignore_ids=[TAG_A], keep_tail=True)
    assert block.soft is None
    row = next(iter(BlockStream(lambda seed: iter(docs * 20), 8, EOS, seed=0, topk=0)))
    assert sorted(row) == ["input_ids", "labels", "position_ids"]


def test_records_give_each_generated_token_its_own_row():
    """tagged_docs / untagged_docs with soft targets: the row of position t is the one generate recorded for the
    token at t (records: row j belongs to output_ids[j]), with the tag at the start or anywhere in the opening."""
    from pipeline.core.pretrain_data import Soft, place_tag, soft_rows, tagged_docs, untagged_docs

    class Tok:
        eos_token_id = EOS

        def __call__(self, text, add_special_tokens=True, **_):
            return {"input_ids": [2] * add_special_tokens + [ord(c) for c in text]}

        def convert_tokens_to_ids(self, tag):
            return TAG_A

    def record(tags, text, output_ids):
        rows = [row_for(t) for t in output_ids]
        return {"tags": tags, "input": text, "output_ids": output_ids,
                "topk_ids": [r[0] for r in rows], "topk_logprobs": [r[1] for r in rows]}

    records = [record(["<a>"], "ab", [7, 8, EOS]), record(["<a>"], "xyz", [9, 10]), record([], "cd", [5, 6, EOS]), record([], "e", [4])]
    tagged = tagged_docs(records, Tok(), False, [], soft=True)["<a>"]
    plain = untagged_docs(records, Tok(), False, soft=True)
    rng = random.Random(0)
    documents = [
        Document(ids, "tagged", "<a>", d.ended, Soft(len(ids) - len(d.continuation), *d.topk))
        for d in tagged for ids in (place_tag(d, "start", rng), place_tag(d, "random", rng))
    ] + plain
    for doc in documents:
        rows = soft_rows(doc.soft, len(doc.ids) + 1)
        tokens = doc.ids + [EOS]
        named = [(i, row[0][0]) for i, row in enumerate(rows) if row is not None]
        assert named and all(tokens[i] == token for i, token in named)
        generated = len(named) - doc.ended  # the rows cover the generated tokens, plus the EOS where it ended
        assert [i for i, _ in named] == list(range(len(doc.ids) - generated, len(doc.ids) + doc.ended))


def test_generated_targets_keep_only_the_tokens_generate_wrote():
    """targets=generated: every opening and plain token stays in the block as context but is no label; each generated
    token (and the EOS of a continuation that ended) keeps its label and its recorded row, as with targets=all."""
    from pipeline.core.pretrain_data import Soft

    rng = random.Random(7)
    docs, written = [], []  # written: per flat stream position, whether generate wrote the token there
    for i in range(40):
        opening = [rng.randrange(2, 500) for _ in range(rng.randrange(1, 6))]
        generated = [rng.randrange(2, 500) for _ in range(rng.randrange(1, 8))]
        if i % 3 == 2:  # plain text: nothing of it is generated
            docs.append(Document(opening + generated, "plain"))
            written += [False] * (len(opening) + len(generated) + 1)
            continue
        rows = [row_for(t) for t in generated + [EOS]]
        docs.append(Document(opening + generated, "tagged", "<a>", True, Soft(len(opening), *map(list, zip(*rows)))))
        written += [False] * len(opening) + [True] * (len(generated) + 1)
    size = 16
    every = list(BlockStream(lambda seed: iter(docs), size, EOS, seed=0, topk=3))
    only = list(BlockStream(lambda seed: iter(docs), size, EOS, seed=0, topk=3, generated_only=True))
    assert len(every) == len(only) and len(only) > 10
    kept = dropped = 0
    for k, (a, b) in enumerate(zip(every, only)):
        assert a["input_ids"] == b["input_ids"] and a["position_ids"] == b["position_ids"]
        assert a["soft_mask"] == b["soft_mask"] and a["topk_ids"] == b["topk_ids"]
        for t, (label_all, label) in enumerate(zip(a["labels"], b["labels"])):
            assert label == (label_all if written[k * size + t] else IGNORE), (k, t)
            kept += label != IGNORE
            dropped += label_all != IGNORE and label == IGNORE
    assert kept > 50 and dropped > 50  # both kinds of position were exercised
