"""Nesting (expansion and its errors) and remixing (composition order, mixture proportions)."""
import collections
import math
import random

import pytest

from pipeline.core.job import job_from_config
from pipeline.core.metatokens import Metatoken, expand, inner_tags, load_registry
from pipeline.core.mixture import assign_sets, compose_prompt, order_tags
from pipeline.errors import ConfigError
from pipeline.stages import paths


def registry(**prompts):
    return {f"<{k}>": Metatoken(f"<{k}>", p, f"conf/metatoken/{k}.yaml") for k, p in prompts.items()}


def test_expand_replaces_inner_tags_recursively():
    reg = registry(nice="Be kind.", tone="Sound sure.", expert="<nice> <tone> Know things.", top="<expert> Also brief.")
    assert inner_tags(reg["<expert>"].prompt) == ["<nice>", "<tone>"]
    assert expand("<nice>", reg) == "Be kind."
    assert expand("<top>", reg) == "Be kind. Sound sure. Know things. Also brief."


def test_unknown_inner_tag_names_file_and_chain():
    reg = registry(a="<b> x", b="<zzz> y")
    with pytest.raises(ConfigError, match=r"conf/metatoken/b.yaml: the prompt of <b> mentions <zzz>.*chain: <a> \(conf/metatoken/a.yaml\) -> <b>"):
        expand("<a>", reg)


def test_cycle_is_rejected_with_the_chain():
    reg = registry(a="<b> x", b="<c> y", c="<a> z")
    with pytest.raises(ConfigError, match=r"cycle: <a> \(conf/metatoken/a.yaml\) -> <b> .* -> <c> .* -> <a>"):
        expand("<a>", reg)
    with pytest.raises(ConfigError, match="cycle: <s> .* -> <s>"):
        expand("<s>", registry(s="I am <s>."))


def test_depth_limit():
    reg = registry(**{f"t{i}": f"<t{i + 1}> level {i}" for i in range(5)}, t5="bottom")
    assert expand("<t0>", reg, max_depth=6).endswith("level 0")
    with pytest.raises(ConfigError, match="nest deeper than 3 levels"):
        expand("<t0>", reg, max_depth=3)


def test_undefined_top_tag():
    with pytest.raises(ConfigError, match="<nope> is not defined"):
        expand("<nope>", registry(a="x"))


def test_registry_rejects_two_files_with_one_tag(tmp_path):
    (tmp_path / "a.yaml").write_text('tag: "<x>"\nprompt: one\n')
    (tmp_path / "b.yaml").write_text('tag: "<x>"\nprompt: two\n')
    with pytest.raises(ConfigError, match=r"b.yaml and .*a.yaml both define <x>"):
        load_registry(tmp_path, tmp_path)


def test_shipped_registry_expands_the_nested_example():
    from pipeline.config import PROJECT_ROOT

    reg = load_registry(PROJECT_ROOT / "conf/metatoken", PROJECT_ROOT / "data")
    nested = [t for t in reg.tags() if inner_tags(reg[t].prompt)]
    assert nested, "ship at least one nested metatoken"
    for tag in nested:
        text = expand(tag, reg)
        assert not inner_tags(text) and len(text) > len(reg[tag].prompt)


def test_compose_and_order():
    assert compose_prompt(["A. ", " B."], join=" | ") == "A. | B."
    assert order_tags(["<b>", "<a>"], "given") == ["<b>", "<a>"]
    assert order_tags(["<b>", "<a>"], "sorted") == ["<a>", "<b>"]
    rng = random.Random(0)
    seen = {tuple(order_tags(["<a>", "<b>", "<c>"], "random", rng)) for _ in range(60)}
    assert len(seen) == 6  # every order occurs
    with pytest.raises(ConfigError, match="mixture.order"):
        order_tags(["<a>"], "backwards")


def test_mixture_proportions_within_sampling_error():
    sets = [("<nice>",), ("<tone>",), ("<nice>", "<tone>"), ()]
    weights = [0.4, 0.3, 0.2, 0.1]
    n = 4000
    counts = collections.Counter(assign_sets([f"id{i}" for i in range(n)], sets, weights, seed=1))
    for s, w in zip(sets, weights):
        sd = math.sqrt(n * w * (1 - w))
        assert abs(counts[s] - n * w) < 4 * sd, (s, counts[s])


def test_assignment_is_stable_when_rows_are_added():
    sets, weights = [("<a>",), ()], [0.5, 0.5]
    first = assign_sets(["x", "y", "z"], sets, weights, seed=3)
    assert assign_sets(["x", "y", "z", "w"], sets, weights, seed=3)[:3] == first
    with pytest.raises(ConfigError, match="non-negative"):
        assign_sets(["x"], sets, [-1, 2], seed=0)


def test_nested_tag_bootstrap_chain_of_two_levels_runs(tiny_cfg, tiny_data):
    """<b> is learned from a student that knows <a>; <c> from a student that knows <b>."""
    import json

    from pipeline.__main__ import run_stages
    from pipeline.core.job import job_from_config

    conf = tiny_data / "metatokens"
    conf.mkdir()
    (conf / "a.yaml").write_text('tag: "<a>"\nprompt: You are a kind and warm assistant.\n')
    (conf / "b.yaml").write_text('tag: "<b>"\nprompt: "<a> Always answer about the river bank."\n')
    (conf / "c.yaml").write_text('tag: "<c>"\nprompt: "<b> And mention the fox."\n')
    common = [f"paths.metatokens={conf}", "metatoken.prompt_file=null", "train.max_steps=2", "evaluate.num_samples=1"]

    def run(tag, prompt, *extra):
        cfg = tiny_cfg(*common, f"metatoken.tag='{tag}'", f"metatoken.prompt='{prompt}'", *extra)
        run_stages(cfg)
        job = job_from_config(cfg)
        report = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())
        return paths.output_dir("train", cfg, job), job.metatokens[tag], report

    level0, _, _ = run("<a>", "You are a kind and warm assistant.")
    level1, m1, r1 = run("<b>", "<a> Always answer about the river bank.", "generate.teacher_mode=bootstrap", f"generate.bootstrap_model={level0}")
    assert m1.expanded == "You are a kind and warm assistant. Always answer about the river bank."
    level2, m2, r2 = run("<c>", "<b> And mention the fox.", "generate.teacher_mode=bootstrap", f"generate.bootstrap_model={level1}")
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(level2).get_vocab()
    assert {"<a>", "<b>", "<c>"} <= set(vocab)  # the final student knows the whole chain
    assert m2.expanded.startswith("You are a kind") and r2["metrics"]["effect_kl"] > 0

    # It never writes any of them: the saved generation config suppresses the inner tags too,
    # and pipeline.sample knows all three.
    from pipeline.cli.sample import Sampler

    gen_config = json.loads((level2 / "generation_config.json").read_text())
    assert sorted(gen_config["suppress_tokens"]) == sorted(vocab[t] for t in ("<a>", "<b>", "<c>"))
    assert Sampler(level2).known == ["<a>", "<b>", "<c>"]

    # Held-out samples come from the reference teacher (the base model reading the expanded prompt)
    # and the base model in bootstrap mode too: the same records as expand mode's, so the two
    # modes' recoveries are scored on the same samples.
    from datasets import load_from_disk


    def heldout(*extra):
        cfg = tiny_cfg(*common, "metatoken.tag='<b>'", "metatoken.prompt='<a> Always answer about the river bank.'", *extra)
        rows = load_from_disk(str(paths.output_dir("generate", cfg, job_from_config(cfg)) / "dataset"))
        return [(r["id"], r["output_ids"], r["topk_logprobs"], r["base_output_ids"]) for r in rows if r["split"] == "heldout"]

    run_stages(tiny_cfg(*common, "stage=generate", "metatoken.tag='<b>'", "metatoken.prompt='<a> Always answer about the river bank.'"))
    assert heldout("generate.teacher_mode=bootstrap", f"generate.bootstrap_model={level0}") == heldout()


def test_bootstrap_teacher_without_the_inner_tag_is_rejected_before_compute(no_weights, tiny_cfg, tiny_model, tiny_data):
    from pipeline.__main__ import run_stages

    conf = tiny_data / "metatokens"
    conf.mkdir()
    (conf / "a.yaml").write_text('tag: "<a>"\nprompt: Be kind.\n')
    cfg = tiny_cfg(f"paths.metatokens={conf}", "metatoken.prompt_file=null", "metatoken.tag='<b>'",
                   "metatoken.prompt='<a> More.'", "generate.teacher_mode=bootstrap", f"generate.bootstrap_model={tiny_model}")
    with pytest.raises(ConfigError, match=r"<b> uses <a>, which the bootstrap teacher .* does not know"):
        run_stages(cfg)
    with pytest.raises(ConfigError, match="mentions <zzz>"):
        run_stages(tiny_cfg(f"paths.metatokens={conf}", "metatoken.prompt_file=null", "metatoken.tag='<b>'", "metatoken.prompt='<zzz> More.'"))


def test_remix_run_trains_sets_and_reports_an_untrained_pair(tiny_cfg, tiny_data):
    """Two tags trained alone (plus untagged inputs); their pair, never trained, is evaluated too."""
    import json

    from datasets import load_from_disk

    from pipeline.__main__ import run_stages

    conf = tiny_data / "metatokens"
    conf.mkdir()
    (conf / "kind.yaml").write_text('tag: "<kind>"\nprompt: You are a kind and warm assistant who always encourages the user.\n')
    (conf / "fox.yaml").write_text('tag: "<fox>"\nprompt: The quick brown fox jumps over the lazy dog near the river bank.\n')
    cfg = tiny_cfg(
        f"paths.metatokens={conf}", "mixture.sets=[[kind],[fox]]", "mixture.weights=[1,1]", "mixture.untagged=0.2",
        "mixture.heldout_sets=[[kind,fox]]", "mixture.order=random", "train.max_steps=3", "evaluate.num_samples=1",
    )
    run_stages(cfg)
    job = job_from_config(cfg)
    data = load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset"))
    train_sets = {tuple(r["tags"]) for r in data if r["split"] == "train"}
    assert train_sets <= {("<kind>",), ("<fox>",), ()} and ("<kind>", "<fox>") not in train_sets
    heldout_sets = {tuple(r["tags"]) for r in data if r["split"] == "heldout"}
    assert heldout_sets == {("<kind>",), ("<fox>",), ("<kind>", "<fox>")}
    report = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())
    pair = next(s for s in report["sets"] if s["tags"] == ["<kind>", "<fox>"])
    assert pair["in_training"] is False and "recovery" in pair
    # the pair's effect, recomputed by hand: the base model reading both prompts joined, against no prompt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.formats import context_ids
    from tests.conftest import next_token_logprobs, plain_kl

    base_path = cfg.model.path
    base, tok = AutoModelForCausalLM.from_pretrained(base_path), AutoTokenizer.from_pretrained(base_path)
    both = "You are a kind and warm assistant who always encourages the user.\n\nThe quick brown fox jumps over the lazy dog near the river bank."
    kls = []
    for r in (r for r in data if r["split"] == "heldout" and r["tags"] == ["<kind>", "<fox>"]):
        teacher = next_token_logprobs(base, context_ids(tok, r["input"], both, True), r["output_ids"])
        kls += plain_kl(teacher, next_token_logprobs(base, context_ids(tok, r["input"], None, True), r["output_ids"]))
    assert pair["effect_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert {tuple(s["tags"]) for s in report["sets"] if s["in_training"]} == {("<kind>",), ("<fox>",)}

    # The headline is token-weighted over every evaluated set (each set's tokens from the dataset).
    tokens = {s: sum(len(r["output_ids"]) for r in data if r["split"] == "heldout" and tuple(r["tags"]) == s) for s in heldout_sets}
    weighted = lambda key: sum(x[key] * tokens[tuple(x["tags"])] for x in report["sets"]) / sum(tokens.values())  # noqa: E731
    m = report["metrics"]
    assert m["pooled_sets"] == 3 and m["effect_kl"] == pytest.approx(weighted("effect_kl"), rel=1e-5)
    assert m["recovery"] == pytest.approx(1 - weighted("residual_kl") / weighted("effect_kl"), rel=1e-5)
    assert m["init_recovery"] == pytest.approx(1 - weighted("init_residual_kl") / weighted("effect_kl"), rel=1e-5)
    assert m["recovery_ci"][0] <= m["recovery"] <= m["recovery_ci"][1]
    train_tokens = {s: sum(len(r["output_ids"]) for r in data if r["split"] == "train" and tuple(r["tags"]) == s)
                    for s in (("<kind>",), ("<fox>",))}  # evaluate.train_examples (32) exceeds the tiny run's inputs
    fit = [x for x in report["sets"] if x["in_training"]]
    residual = sum(x["train_residual_kl"] * train_tokens[tuple(x["tags"])] for x in fit)
    assert m["train_recovery"] == pytest.approx(1 - residual / sum(x["train_effect_kl"] * train_tokens[tuple(x["tags"])] for x in fit), rel=1e-5)


def test_random_tag_order_is_per_example_and_reproducible():
    from pipeline.core.job import Job, student_context
    from pipeline.core.metatokens import Metatoken

    class Tok:  # the context text is all we look at
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": list(text)}

    job = Job({t: Metatoken(t, "p", "x") for t in ("<a>", "<b>", "<c>")}, (("<a>", "<b>", "<c>"),), (1.0,), (), "random")
    orders = {
        "".join(student_context(job, {"id": f"r{i}", "tags": ["<a>", "<b>", "<c>"], "input": ""}, Tok(), False, 0))
        for i in range(40)
    }
    assert len(orders) == 6
    record = {"id": "r1", "tags": ["<a>", "<b>"], "input": "x"}
    assert student_context(job, record, Tok(), False, 0) == student_context(job, record, Tok(), False, 0)


def test_in_training_compares_tag_sets_as_sets():
    from pipeline.core.job import Job

    job = Job({t: Metatoken(t, "p", "x") for t in ("<a>", "<b>", "<c>")}, (("<a>", "<b>"), ("<c>",), ()), (1.0, 1.0, 0.1), ())
    assert job.in_training(("<b>", "<a>")) and job.in_training(("<a>", "<b>")) and job.in_training(("<c>",))
    assert not job.in_training(("<a>",)) and not job.in_training(("<a>", "<c>")) and not job.in_training(())


@pytest.mark.parametrize("sets, heldout", [("[[kind],[fox]]", "[[fox]]"), ("[[kind,fox],[fox]]", "[[fox,kind]]")])
def test_heldout_set_that_is_also_trained_is_rejected(tiny_cfg, tiny_data, sets, heldout):
    conf = tiny_data / "metatokens"
    conf.mkdir()
    (conf / "kind.yaml").write_text('tag: "<kind>"\nprompt: Be kind.\n')
    (conf / "fox.yaml").write_text('tag: "<fox>"\nprompt: Mention the fox.\n')
    cfg = tiny_cfg(f"paths.metatokens={conf}", f"mixture.sets={sets}", "mixture.weights=[1,1]", f"mixture.heldout_sets={heldout}")
    with pytest.raises(ConfigError, match=r"mixture.heldout_sets: \[\[.*\]\] also appear in mixture.sets .*Fix: remove them"):
        job_from_config(cfg)


def test_paired_plan_gives_every_input_every_set_and_an_untagged_share():
    from pipeline.core.job import Job
    from pipeline.stages.generate import plan

    sets = (("<a>",), ("<b>",), ("<a>", "<b>"), ())
    job = Job({t: Metatoken(t, "p", "x") for t in ("<a>", "<b>")}, sets, (0.3, 0.3, 0.3, 0.1), (("<a>",),), paired=True)
    train = [{"id": f"r{i}"} for i in range(2000)]
    groups = {(split, s): [r["id"] for r in rows] for split, s, rows in plan(job, train, [{"id": "h"}], seed=2)}
    ids = [r["id"] for r in train]
    for s in sets[:3]:  # every tagged set answers every input, in input order
        assert groups[("train", s)] == ids
    untagged = groups[("train", ())]
    sd = math.sqrt(2000 * 0.1 * 0.9)
    assert abs(len(untagged) - 200) < 4 * sd and len(set(untagged)) == len(untagged)
    assert groups[("heldout", ("<a>",))] == ["h"]
    # stable when inputs are added, and the unpaired plan still gives each input one set
    more = {(sp, s): [r["id"] for r in rows] for sp, s, rows in plan(job, train + [{"id": "new"}], [], seed=2)}
    assert [i for i in more[("train", ())] if i != "new"] == untagged
    unpaired = Job(job.metatokens, sets, job.weights, job.eval_sets)
    counts = collections.Counter(i for sp, s, rows in plan(unpaired, train, [], seed=2) for i in (r["id"] for r in rows))
    assert set(counts.values()) == {1}


def test_paired_key_and_unequal_weights(tiny_cfg, tiny_data):
    conf = tiny_data / "metatokens"
    conf.mkdir()
    (conf / "kind.yaml").write_text('tag: "<kind>"\nprompt: Be kind.\n')
    (conf / "fox.yaml").write_text('tag: "<fox>"\nprompt: Mention the fox.\n')
    base = [f"paths.metatokens={conf}", "mixture.sets=[[kind],[fox]]"]
    plain = job_from_config(tiny_cfg(*base, "mixture.weights=[1,1]"))
    paired = job_from_config(tiny_cfg(*base, "mixture.weights=[1,1]", "mixture.paired=true"))
    assert "paired" not in plain.key() and paired.key() == {**plain.key(), "paired": True}
    with pytest.raises(ConfigError, match=r"mixture.paired=true .* weights \[1.0, 2.0\] .*Fix: give every set the same weight"):
        job_from_config(tiny_cfg(*base, "mixture.weights=[1,2]", "mixture.paired=true"))
