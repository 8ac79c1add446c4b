"""Synthetic training inputs: cleaning, de-duplication, and the stage on the tiny model."""
import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from pipeline.__main__ import run_stages
from pipeline.core.job import job_from_config
from pipeline.errors import ConfigError
from pipeline.runtime import outputs
from pipeline.stages import paths, synthesize
from pipeline.stages.synthesize import clean_request, deduplicate, jaccard, shingles


def test_clean_request_keeps_one_request_and_drops_the_rest():
    assert clean_request(' Sure, here is a question: "How do I keep basil alive indoors?"\n7. Why is', 4, 60) == (
        "How do I keep basil alive indoors?"
    )
    assert clean_request("How do I fix a flat tyre on my bike?", 4, 60) == "How do I fix a flat tyre on my bike?"
    assert clean_request("Help me", 4, 60) is None  # too short
    assert clean_request("What does <pirate> mean in this text?", 4, 60) is None  # tag-like markup
    assert clean_request("Write a poem about the sea and", 4, 60) is None  # cut off mid-sentence
    assert clean_request(" ".join(["word"] * 70) + ".", 4, 60) is None  # too long


def test_jaccard_of_word_trigrams_by_hand():
    a, b = shingles("How do I boil an egg?"), shingles("how do I boil an EGG quickly")
    # a: {how do i, do i boil, i boil an, boil an egg}; b adds {an egg quickly}: 4 shared of 5
    assert jaccard(a, b) == pytest.approx(4 / 5)


def test_deduplicate_removes_exact_and_near_copies_of_each_other_and_of_existing_rows():
    existing = ["How do I boil an egg without cracking the shell?"]
    candidates = [
        "how do I boil an egg without cracking the shell",  # exact after normalising: a shipped row
        "How do I boil an egg without cracking the shell quickly?",  # near copy of the shipped row
        "What is the best way to learn the guitar as an adult?",
        "What is the best way to learn the guitar as an adult beginner?",  # near copy of the previous one
        "Why is the sea salty?",
    ]
    assert deduplicate(candidates, existing, threshold=0.6) == [candidates[2], candidates[4]]


def test_bad_values_stop_before_any_model_loads(tiny_cfg):
    for override, field in [
        ("inputs.synthetic.count=-3", "count"),
        ("inputs.synthetic.tag_share=1.5", "tag_share"),
        ("inputs.synthetic.near_duplicate=0", "near_duplicate"),
    ]:
        cfg = tiny_cfg("stage=all", "inputs.synthetic.count=4", override)
        with pytest.raises(ConfigError, match=f"inputs.synthetic.{field}"):
            run_stages(cfg)
        assert not Path(cfg.paths.outputs).exists()  # nothing ran


def test_generate_key_is_unchanged_when_synthetic_inputs_are_off(tiny_cfg):
    cfg = tiny_cfg()
    key = paths.stage_key("generate", cfg, job_from_config(cfg))
    assert "synthetic" not in key["inputs"]  # folders made before the stage existed stay valid
    on = tiny_cfg("inputs.synthetic.count=3")
    assert outputs.key_hash(paths.stage_key("generate", on, job_from_config(on))) != outputs.key_hash(key)


def test_synthesized_rows_join_training_only_and_duplicate_no_shipped_input(tiny_cfg, monkeypatch):
    """The tiny random model writes gibberish, so its answers are replaced by scripted ones: what is
    tested is the stage around the sampler (rounds, cleaning, de-duplication, the split, resume)."""
    scripted = iter(
        [
            "How do I boil an egg without cracking the shell? (0)",  # a shipped input: must be dropped
            "Sure: What is a good name for a small boat?",
            "What is a good name for a small boat?",  # duplicate of the previous one
            "no",
            "How warm should a room be for sleeping well?",
            "Which houseplants survive in a dark corner?",
        ]
        * 10
    )
    calls = []

    def fake_sample_all(model, tokenizer, contexts, sampling, desc, shard_dir=None):
        calls.append(len(contexts))
        return [{"output_ids": tokenizer(next(scripted), add_special_tokens=False)["input_ids"]} for _ in contexts]

    monkeypatch.setattr(synthesize, "sample_all", fake_sample_all)
    cfg = tiny_cfg("stage=synthesize", "inputs.synthetic.count=3", "inputs.synthetic.oversample=1.0")
    run_stages(cfg)
    monkeypatch.undo()  # the teacher samples with the real sampler
    cfg.stage = "generate"
    run_stages(cfg)
    job = job_from_config(cfg)
    syn_dir = paths.output_dir("synthesize", cfg, job)
    rows = [json.loads(line) for line in (syn_dir / synthesize.FILE).read_text().splitlines()]
    assert [r["text"] for r in rows] == [
        "What is a good name for a small boat?",
        "How warm should a room be for sleeping well?",
        "Which houseplants survive in a dark corner?",
    ]
    assert calls == [4, 3]  # round 0: 3 + 1 seeds, keeps 1; round 1: 2 + 1 seeds, keeps 2
    data = load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset"))
    train_ids = {r["id"] for r in data if r["split"] == "train"}
    heldout_ids = {r["id"] for r in data if r["split"] == "heldout"}
    assert {r["id"] for r in rows} <= train_ids and not train_ids & heldout_ids
    assert not any(i.startswith("syn-") for i in heldout_ids)
    summary = outputs.read_manifest(syn_dir)
    assert summary["count"] == 3


def test_openings_lists_never_name_the_tag_and_keep_requests_keys(tiny_cfg):
    """kind=openings heads every seed list with the openings header (a tag's description is how a text is written,
    not a topic), shows the given examples, and keys its own folder; kind=requests keeps the old key."""
    from pipeline.stages.synthesize import OPENINGS_HEADER, seeds

    examples = [f"The {w} opened its doors on a grey morning in March." for w in ("bakery", "museum", "school", "harbour", "mill", "inn")]
    lists = seeds(["talks like a pirate"], examples, 20, tag_share=1.0, seed=0, kind="openings")
    assert all(s.startswith(OPENINGS_HEADER) and "pirate" not in s and s.endswith("\n6.") for s in lists)
    assert all(sum(e in s for e in examples) == 5 for s in lists)
    requests = seeds(["talks like a pirate"], examples, 20, tag_share=1.0, seed=0)
    assert all("talks like a pirate" in s for s in requests)
    cfg = tiny_cfg("inputs.synthetic.count=3")
    key = paths.stage_key("synthesize", cfg, job_from_config(cfg))
    assert "kind" not in key["synthetic"]  # folders made before the field existed stay valid
    openings = tiny_cfg("inputs.synthetic.count=3", "inputs.synthetic.kind=openings")
    assert paths.stage_key("synthesize", openings, job_from_config(openings))["synthetic"]["kind"] == "openings"
