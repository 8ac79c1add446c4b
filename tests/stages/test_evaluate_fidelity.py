"""Evaluate's figures for the fidelity study, against independent computations on the tiny model:
held-out and training-input recovery (a plain loop over full logits), their bootstrap intervals,
the probe on the three models' answers, and student answers that never hold a tag."""
import json
from types import SimpleNamespace

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import run_stages
from pipeline.core import sampling
from pipeline.core.job import job_from_config
from pipeline.core.losses import bootstrap_interval, pooled_recovery
from pipeline.stages import paths
from tests.conftest import compose, tiny_overrides, write_tiny_data

PROMPT = "You are a kind and warm assistant who always encourages the user."


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    data = write_tiny_data(root / "data")
    cfg = compose(tiny_overrides(tiny_model, data, root / "outputs", "train.max_steps=6", "train.embedding_lr=0.05",
                                 "evaluate.train_examples=5", "metatoken.probe.kind=words", "metatoken.probe.pattern=null"))
    run_stages(cfg)
    job = job_from_config(cfg)
    report = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())
    rows = list(load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")))
    return SimpleNamespace(cfg=cfg, model=tiny_model, report=report, rows=rows, train_dir=paths.output_dir("train", cfg, job))


def context(tok, system, text):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def continuation_logprobs(model, ctx, out, vocab):
    """Log-probs over the base vocabulary (a student's tag rows get no probability: tags are suppressed)."""
    logits = model(torch.tensor([ctx + out])).logits[0, len(ctx) - 1 : len(ctx) - 1 + len(out), :vocab]
    return torch.log_softmax(logits.double(), -1)


def plain_loop(run, rows):
    """Per-input sums of effect KL(teacher || base) and residual KL(teacher || student), one input at a time."""
    effects, residuals = plain_loop_tokens(run, rows)
    return [e.sum().item() for e in effects], [r.sum().item() for r in residuals]


def plain_loop_tokens(run, rows):
    """Effect and residual KL at every answer token, one input at a time."""
    base = AutoModelForCausalLM.from_pretrained(run.model)
    student = AutoModelForCausalLM.from_pretrained(run.train_dir)
    base_tok, student_tok = AutoTokenizer.from_pretrained(run.model), AutoTokenizer.from_pretrained(run.train_dir)
    vocab = len(base_tok)
    effects, residuals = [], []
    for r in rows:
        out = r["output_ids"]
        p = continuation_logprobs(base, context(base_tok, PROMPT, r["input"]), out, vocab)
        q_base = continuation_logprobs(base, context(base_tok, None, r["input"]), out, vocab)
        q_student = continuation_logprobs(student, context(student_tok, "<kind>", r["input"]), out, vocab)
        effects.append((p.exp() * (p - q_base)).sum(-1))
        residuals.append((p.exp() * (p - q_student)).sum(-1))
    return effects, residuals


def test_heldout_and_train_input_recovery_equal_a_plain_loop(run):
    m = run.report["metrics"]
    heldout = [r for r in run.rows if r["split"] == "heldout"]
    trained = [r for r in run.rows if r["split"] == "train" and r["tags"] == ["<kind>"]][:5]
    assert len(trained) == 5 and m["train_examples"] == 5
    for rows, key in ((heldout, "recovery"), (trained, "train_recovery")):
        effects, residuals = plain_loop(run, rows)
        assert m[key] == pytest.approx(1 - sum(residuals) / sum(effects), abs=1e-4), key
        low, high = bootstrap_interval(pooled_recovery, residuals, effects, resamples=1000, seed=0)
        assert m[key + "_ci"] == [pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4)], key
        assert low <= m[key] <= high
    # the per-input sums the report keeps for paired comparisons are the plain loop's, input by input
    effects, residuals = plain_loop(run, heldout)
    (per_input,) = run.report["per_input"].values()
    assert [e["id"] for e in per_input] == [r["id"] for r in heldout]
    assert [e["effect"] for e in per_input] == pytest.approx(effects, abs=1e-4)
    assert [e["residual"] for e in per_input] == pytest.approx(residuals, abs=1e-4)
    assert [e["tokens"] for e in per_input] == [len(r["output_ids"]) for r in heldout]
    tokens = sum(len(r["output_ids"]) for r in trained)
    assert m["train_effect_kl"] == pytest.approx(sum(plain_loop(run, trained)[0]) / tokens, abs=1e-5)


def test_recovery_along_the_answer_equals_a_plain_loop_per_bin(run):
    """report.json's recovery bins (answer tokens 1, 2-4, 5-16, 17 on) against per-token KLs from a plain loop,
    and the table in report.md."""
    heldout = [r for r in run.rows if r["split"] == "heldout"]
    trained = [r for r in run.rows if r["split"] == "train" and r["tags"] == ["<kind>"]][:5]
    for rows, key in ((heldout, "recovery_bins"), (trained, "train_recovery_bins")):
        effects, residuals = plain_loop_tokens(run, rows)
        bins = run.report["per_position"][key]
        longest = max(len(e) for e in effects)
        starts = [s for s in (0, 1, 4, 16) if s < longest]
        assert [b["start"] for b in bins] == starts, key
        for b in bins:
            lo, hi = b["start"], b["end"] or longest
            e = sum(x[lo:hi].sum().item() for x in effects)
            r = sum(x[lo:hi].sum().item() for x in residuals)
            assert b["recovery"] == pytest.approx(1 - r / e, abs=1e-4), key
            assert b["effect_share"] == pytest.approx(e / sum(x.sum().item() for x in effects), abs=1e-4), key
            assert b["recovery_ci"][0] <= b["recovery"] <= b["recovery_ci"][1], key
    markdown = next((run.train_dir.parents[1] / "evaluate").glob("*/report.md")).read_text()
    assert "Recovery along the answer" in markdown and "recovery, training inputs" in markdown


def test_probe_is_reported_for_base_teacher_and_student(run):
    (probe,) = run.report["metrics"]["probes"]
    heldout = [r for r in run.rows if r["split"] == "heldout"]
    words = lambda texts: sum(len(t.split()) for t in texts) / len(texts)  # noqa: E731
    assert probe["tag"] == "<kind>" and probe["kind"] == "words" and probe["answers"] == len(heldout)
    assert probe["base"] == pytest.approx(words([r["base_output"] for r in heldout]))
    assert probe["teacher"] == pytest.approx(words([r["output"] for r in heldout]))
    if probe["teacher"] != probe["base"]:
        assert probe["retention"] == pytest.approx((probe["student"] - probe["base"]) / (probe["teacher"] - probe["base"]))


def test_student_answers_never_hold_a_tag(run):
    """A student that wants to write its tag (its logit raised by 50) still never samples it."""
    from pipeline.core.formats import context_ids

    tok = AutoTokenizer.from_pretrained(run.train_dir)
    model = AutoModelForCausalLM.from_pretrained(run.train_dir)
    tag = tok.convert_tokens_to_ids("<kind>")
    model.generation_config.suppress_tokens = None  # not the saved protection: the one sample_answers applies
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(-1, torch.tensor([tag]), torch.full((*out.shape[:-1], 1), 50.0)))
    contexts = [context_ids(tok, t, "<kind>", True) for t in ("Hi there", "How do I boil an egg?", "Why is the sky blue?")]
    _, wanted = sampling.sample_answers(model, tok, contexts, run.cfg.generate, [])
    assert all(tag in ids for ids in wanted)  # it would write the tag
    _, ids = sampling.sample_answers(model, tok, contexts, run.cfg.generate, [tag])
    assert all(len(i) > 0 and tag not in i for i in ids)


def test_a_run_with_one_tag_has_no_cross_tag_matrix(run):
    """The matrix needs two tags; a single-tag report stays as it was (no field, no section)."""
    assert "crosstag" not in run.report
    assert "Cross-tag" not in (paths.output_dir("evaluate", run.cfg, job_from_config(run.cfg)) / "report.md").read_text()
