"""The cross-tag matrix (pipeline/crosstag.py): its math on hand-built cases with known answers, and a remix run
on the tiny model whose every cell, margin retention and nearest-own share is recomputed by a plain loop."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.core import crosstag
from pipeline.stages import paths


def test_margin_retention_on_known_numbers():
    # the issue's <nice> row: own 0.50, other tags 0.39 and 0.31, other prompts 0.67 and 0.50 -> 0.11 / 0.33
    assert crosstag.margin_retention(0.50, [0.39, 0.31], [0.67, 0.50]) == pytest.approx(1 / 3)
    # a tag as distinct as its prompt keeps all of the lead; one no nearer than another tag keeps none
    assert crosstag.margin_retention(0.9, [0.2], [0.3]) == pytest.approx(1.0)
    assert crosstag.margin_retention(0.4, [0.4, 0.1], [0.5, 0.2]) == pytest.approx(0.0)
    # another tag nearer than the own one: negative
    assert crosstag.margin_retention(0.3, [0.5], [0.0]) == pytest.approx(-0.2)
    # elementwise over resamples
    got = crosstag.margin_retention(np.array([0.5, 0.9]), [np.array([0.25, 0.1])], [np.array([0.5, 0.2])])
    assert got == pytest.approx([0.5, 1.0])
    # another prompt that does everything the own prompt does leaves no lead: undefined, not infinite
    assert np.isnan(crosstag.margin_retention(0.5, [0.1], [1.0]))


def test_nearest_own_counts_ties_for_the_own_tag():
    residuals = [[1.0, 2.0, 3.0, 0.5],   # own tag
                 [2.0, 1.0, 3.0, 0.4],   # another tag: nearer on inputs 1 and 3
                 [3.0, 3.0, 3.0, 9.0]]
    assert crosstag.nearest_own(residuals, 0).tolist() == [True, False, True, False]
    assert crosstag.nearest_own(residuals, 1).tolist() == [False, True, True, True]  # input 2: all three tie
    assert crosstag.nearest_own(residuals, 2).tolist() == [False, False, True, False]


def test_pooled_margin_is_token_weighted_over_inputs():
    effect = np.array([1.0, 3.0])  # summed over each input's tokens: the long input weighs 3x
    own, other = np.array([0.5, 0.5]), np.array([0.5, 2.5])  # recoveries 1 - 1/4 = 0.75 and 1 - 3/4 = 0.25
    prompt = np.array([1.0, 1.0])  # 1 - 2/4 = 0.5
    assert crosstag.pooled_margin(effect, [own, other], [prompt], 0) == pytest.approx((0.75 - 0.25) / 0.5)
    assert crosstag.pooled_margin(effect, [own, other], [prompt], 1) == pytest.approx((0.25 - 0.75) / 0.5)


def _hand_built():
    """Two tags, three inputs, per-token KLs chosen so every figure has a known value."""
    a, b = ("<a>",), ("<b>",)
    job = SimpleNamespace(eval_sets=(a, b, ("<a>", "<b>")))
    rows = [{"id": f"x{i}"} for i in range(3)]
    heldout = {a: rows, b: rows, ("<a>", "<b>"): rows}
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    ref = {"heldout": {a: {"effect_tokens": [t(1.0, 1.0), t(2.0), t(1.0)]},   # effect sums 2, 2, 1 -> 5
                       b: {"effect_tokens": [t(2.0), t(2.0), t(1.0, 1.0)]}}}  # 2, 2, 2 -> 6
    tag_sums = {(a, a): [0.5, 0.5, 0.5], (a, b): [1.0, 0.4, 1.0],   # own 1 - 1.5/5 = 0.7, other 1 - 2.4/5 = 0.52
                (b, b): [1.0, 1.0, 1.0], (b, a): [1.5, 1.5, 0.5]}   # own 1 - 3/6 = 0.5, other 1 - 3.5/6
    prompt_sums = {(a, b): [1.0, 1.0, 0.5], (b, a): [0.0, 1.0, 2.0]}  # 1 - 2.5/5 = 0.5 ; 1 - 3/6 = 0.5
    return job, heldout, ref, tag_sums, prompt_sums


def test_figures_on_a_hand_built_case():
    job, heldout, ref, tag_sums, prompt_sums = _hand_built()
    ct = crosstag.figures(job, heldout, ref, tag_sums, prompt_sums, SimpleNamespace(resamples=500, seed=0))
    assert ct["tags"] == ["<a>", "<b>"]  # the pair is not a row or a column
    rec = [[c["recovery"] for c in row] for row in ct["student"]]
    assert rec == [[pytest.approx(0.7), pytest.approx(0.52)], [pytest.approx(1 - 3.5 / 6), pytest.approx(0.5)]]
    assert ct["prompts"][0][0] is None and ct["prompts"][0][1]["recovery"] == pytest.approx(0.5)
    pa, pb = ct["per_tag"]
    assert pa["margin_retention"] == pytest.approx((0.7 - 0.52) / 0.5)
    assert pb["margin_retention"] == pytest.approx((0.5 - (1 - 3.5 / 6)) / 0.5)
    assert pa["best_other_tag"] == "<b>" and pa["best_other_prompt"] == "<b>"
    # <a>'s samples: own nearer on x0 and x2, <b> nearer on x1; <b>'s samples: own nearer on x0, x1, not x2
    assert pa["nearest_own"] == pytest.approx(2 / 3) and pb["nearest_own"] == pytest.approx(2 / 3)
    assert ct["nearest_own"] == pytest.approx(4 / 6)
    assert ct["margin_retention_min"] == pytest.approx(min(pa["margin_retention"], pb["margin_retention"]))
    # intervals: the same resamples of the inputs, the statistic written out by hand
    from pipeline.core.losses import bootstrap_interval

    a, b = ("<a>",), ("<b>",)
    e, own, other, prompt = (np.array(v) for v in ([2.0, 2.0, 1.0], tag_sums[(a, a)], tag_sums[(a, b)], prompt_sums[(a, b)]))
    stat = lambda e, o, x, p: ((1 - o.sum(-1) / e.sum(-1)) - (1 - x.sum(-1) / e.sum(-1))) / (p.sum(-1) / e.sum(-1))  # noqa: E731
    assert pa["margin_retention_ci"] == pytest.approx(list(bootstrap_interval(stat, e, own, other, prompt, resamples=500, seed=0)))
    hits = np.array([1.0, 0.0, 1.0])
    assert pa["nearest_own_ci"] == pytest.approx(list(bootstrap_interval(lambda h: h.mean(-1), hits, resamples=500, seed=0)))
    assert ct["nearest_own_ci"] == pytest.approx(  # per input: 2, 1, 1 of its 2 samples nearest their own tag
        list(bootstrap_interval(lambda h: h.sum(-1) / (2 * h.shape[-1]), np.array([2.0, 1.0, 1.0]), resamples=500, seed=0)))
    assert 0 <= ct["nearest_own_ci"][0] < ct["nearest_own_ci"][1] <= 1


# ---------------------------------------------------------------- a remix run on the tiny model

KIND = "You are a kind and warm assistant who always encourages the user."
FOX = "The quick brown fox jumps over the lazy dog near the river bank."


@pytest.fixture(scope="module")
def remix(tiny_model, tmp_path_factory):
    from datasets import load_from_disk

    from pipeline.__main__ import run_stages
    from pipeline.core.job import job_from_config
    from tests.conftest import compose, tiny_overrides, write_tiny_data

    root = tmp_path_factory.mktemp("crosstag")
    data = write_tiny_data(root / "data")
    conf = data / "metatokens"
    conf.mkdir()
    (conf / "kind.yaml").write_text(f'tag: "<kind>"\nprompt: {KIND}\n')
    (conf / "fox.yaml").write_text(f'tag: "<fox>"\nprompt: {FOX}\n')
    cfg = compose(tiny_overrides(
        tiny_model, data, root / "outputs", f"paths.metatokens={conf}", "mixture.sets=[[kind],[fox]]",
        "mixture.weights=[1,1]", "mixture.untagged=0.2", "mixture.heldout_sets=[[kind,fox]]", "mixture.order=random",
        "train.max_steps=6", "train.embedding_lr=0.05", "evaluate.num_samples=1", "evaluate.train_examples=0",
    ))
    run_stages(cfg)
    job = job_from_config(cfg)
    out = paths.output_dir("evaluate", cfg, job)
    rows = [r for r in load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")) if r["split"] == "heldout"]
    return SimpleNamespace(cfg=cfg, report=json.loads((out / "report.json").read_text()), out=out, rows=rows,
                           model=tiny_model, train_dir=paths.output_dir("train", cfg, job))


def test_matrix_diagonal_equals_evaluate_recovery(remix):
    """The diagonal is scored again by the cross-tag code (its own contexts and passes): it must agree with `sets`."""
    ct = remix.report["crosstag"]
    assert ct["tags"] == ["<kind>", "<fox>"]
    by_set = {s["tags"][0]: s for s in remix.report["sets"] if len(s["tags"]) == 1}
    for i, tag in enumerate(ct["tags"]):
        assert ct["student"][i][i]["recovery"] == pytest.approx(by_set[tag]["recovery"], abs=1e-6)
        assert ct["student"][i][i]["recovery_ci"] == pytest.approx(by_set[tag]["recovery_ci"], abs=1e-6)
        assert ct["per_tag"][i]["own_recovery"] == pytest.approx(by_set[tag]["recovery"], abs=1e-6)


def test_every_cell_and_figure_equals_a_plain_loop(remix):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.losses import bootstrap_interval
    from tests.conftest import next_token_logprobs, plain_kl

    base, base_tok = AutoModelForCausalLM.from_pretrained(remix.model), AutoTokenizer.from_pretrained(remix.model)
    student, student_tok = AutoModelForCausalLM.from_pretrained(remix.train_dir), AutoTokenizer.from_pretrained(remix.train_dir)
    banned = student_tok.convert_tokens_to_ids(["<kind>", "<fox>"])

    def ctx(tok, system, text):  # the chat template by hand, not pipeline.formats
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    prompts, tags = {"<kind>": KIND, "<fox>": FOX}, ["<kind>", "<fox>"]
    ct = remix.report["crosstag"]
    effect, student_sums, prompt_sums = {}, {}, {}
    for a in tags:
        rows = [r for r in remix.rows if r["tags"] == [a]]
        assert len(rows) == ct["per_tag"][tags.index(a)]["examples"] >= 2
        teacher = [next_token_logprobs(base, ctx(base_tok, prompts[a], r["input"]), r["output_ids"]) for r in rows]
        read = lambda model, tok, system, ban=(): [  # noqa: E731
            sum(plain_kl(p, next_token_logprobs(model, ctx(tok, system, r["input"]), r["output_ids"], ban)))
            for p, r in zip(teacher, rows)]
        effect[a] = read(base, base_tok, None)
        for b in tags:
            student_sums[(a, b)] = read(student, student_tok, b, banned)
            if b != a:
                prompt_sums[(a, b)] = read(base, base_tok, prompts[b])
    for i, a in enumerate(tags):
        for j, b in enumerate(tags):
            assert ct["student"][i][j]["recovery"] == pytest.approx(1 - sum(student_sums[(a, b)]) / sum(effect[a]), abs=1e-4)
            if b != a:
                assert ct["prompts"][i][j]["recovery"] == pytest.approx(1 - sum(prompt_sums[(a, b)]) / sum(effect[a]), abs=1e-4)
        own = 1 - sum(student_sums[(a, a)]) / sum(effect[a])
        (b,) = [t for t in tags if t != a]
        other = 1 - sum(student_sums[(a, b)]) / sum(effect[a])
        prompt = 1 - sum(prompt_sums[(a, b)]) / sum(effect[a])
        fig = ct["per_tag"][i]
        assert fig["margin_retention"] == pytest.approx((own - other) / (1 - prompt), abs=1e-3)
        hits = [x <= y for x, y in zip(student_sums[(a, a)], student_sums[(a, b)])]
        assert fig["nearest_own"] == pytest.approx(sum(hits) / len(hits))
        # the interval resamples inputs: recomputed here from the plain loop's per-input sums
        stat = lambda e, s_own, s_other, p: ((1 - s_own.sum(-1) / e.sum(-1)) - (1 - s_other.sum(-1) / e.sum(-1))) / (p.sum(-1) / e.sum(-1))  # noqa: E731
        low, high = bootstrap_interval(stat, effect[a], student_sums[(a, a)], student_sums[(a, b)], prompt_sums[(a, b)],
                                       resamples=remix.cfg.evaluate.resamples, seed=remix.cfg.evaluate.seed)
        assert fig["margin_retention_ci"] == [pytest.approx(low, abs=1e-3), pytest.approx(high, abs=1e-3)]


def test_report_shows_the_matrix_and_its_heatmap(remix):
    md = (remix.out / "report.md").read_text()
    html = (remix.out / "report.html").read_text()
    assert "## Cross-tag matrix (`<kind>+<fox>`)" in md and "| `<kind>` |" in md and "margin retention" in md
    assert (remix.out / "plots" / "crosstag-0.png").is_file()
    assert "alt='Cross-tag matrix' src='data:image/png;base64," in html
    own = remix.report["crosstag"]["student"][0][0]
    assert f"{own['recovery']:.3f}" in md
