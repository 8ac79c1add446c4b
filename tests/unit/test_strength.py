"""The tag-strength sweep (evaluate.strengths, python -m pipeline.strength) on one tiny run, against independent
computations: a plain loop over full logits for KL and NLL, guided samples drawn again one input at a time."""
import json
from types import SimpleNamespace

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import run_stages
from pipeline.cli import strength as strength_cli
from pipeline.config import EvaluateConfig
from pipeline.core import guidance
from pipeline.core.job import job_from_config
from pipeline.core.sampling import _eos_ids
from pipeline.errors import ConfigError
from pipeline.stages import evaluate, paths
from tests.conftest import compose, run_recipe, tiny_overrides, write_tiny_data

PROMPT = "You are a kind and warm assistant who always encourages the user."
STRENGTHS = [-1.0, 0.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("strength")
    data = write_tiny_data(root / "data")
    cfg = compose(tiny_overrides(tiny_model, data, root / "outputs", "train.max_steps=6", "train.embedding_lr=0.05",
                                 "evaluate.train_examples=0", "metatoken.probe.kind=words", "metatoken.probe.pattern=null",
                                 "generate.max_new_tokens=5", f"evaluate.strengths=[{','.join(map(str, STRENGTHS))}]"))
    run_stages(cfg)
    job = job_from_config(cfg)
    eval_dir = paths.output_dir("evaluate", cfg, job)
    report = json.loads((eval_dir / "report.json").read_text())
    heldout = [r for r in load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")) if r["split"] == "heldout"]
    return SimpleNamespace(cfg=cfg, root=root, model=tiny_model, report=report, heldout=heldout, eval_dir=eval_dir,
                           train_dir=paths.output_dir("train", cfg, job))


def chat_context(tok, system, text):
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]
    return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def logprobs(model, ctx, out, vocab=None):
    """[T, V] log-probs predicting `out` after `ctx`, one unpadded forward (tags given no probability by `vocab`)."""
    logits = model(torch.tensor([ctx + out])).logits[0, len(ctx) - 1 : len(ctx) - 1 + len(out)].double()
    if vocab is not None:
        logits[:, vocab:] = float("-inf")
    return torch.log_softmax(logits, -1)


def test_kl_and_recovery_at_each_strength_match_a_plain_loop(run):
    base, student = AutoModelForCausalLM.from_pretrained(run.model), AutoModelForCausalLM.from_pretrained(run.train_dir)
    base_tok, tok = AutoTokenizer.from_pretrained(run.model), AutoTokenizer.from_pretrained(run.train_dir)
    vocab = len(base_tok)  # the tag rows beyond it are suppressed
    sweep = run.report["strength"]
    assert sweep["tag"] == "<kind>" and [p["strength"] for p in sweep["points"]] == STRENGTHS
    effect = {s: 0.0 for s in STRENGTHS} | {"effect": 0.0}
    for r in run.heldout:
        out = r["output_ids"]
        p = logprobs(base, chat_context(base_tok, PROMPT, r["input"]), out)
        q_base = logprobs(base, chat_context(base_tok, None, r["input"]), out)
        untagged = logprobs(student, chat_context(tok, "", r["input"]), out, vocab)  # the tag's slot left empty
        tagged = logprobs(student, chat_context(tok, "<kind>", r["input"]), out, vocab)
        effect["effect"] += float((p.exp() * (p - q_base)).sum())
        for s in STRENGTHS:
            q = torch.log_softmax(untagged[:, :vocab] + s * (tagged[:, :vocab] - untagged[:, :vocab]), -1)
            effect[s] += float((p.exp() * (p - q)).sum())
    tokens = sum(len(r["output_ids"]) for r in run.heldout)
    assert sweep["effect_kl"] == pytest.approx(effect["effect"] / tokens, rel=1e-4)
    for point in sweep["points"]:
        s = point["strength"]
        assert point["residual_kl"] == pytest.approx(effect[s] / tokens, rel=1e-3, abs=1e-6)
        assert point["recovery"] == pytest.approx(1 - effect[s] / effect["effect"], abs=1e-4)
        assert point["recovery_ci"][0] < point["recovery_ci"][1]  # (a ratio's percentile interval may sit beside its estimate)
    # s = 1 is the plain tag: the evaluation's own headline, the same figure exactly
    at_one = next(p for p in sweep["points"] if p["strength"] == 1.0)
    assert at_one["residual_kl"] == run.report["metrics"]["residual_kl"] and at_one["recovery"] == run.report["metrics"]["recovery"]


def test_guided_answers_probe_and_fluency_match_samples_drawn_again(run):
    """Each strength's answers, drawn again one input at a time, give the probe and NLL figures the sweep reports."""
    base, student = AutoModelForCausalLM.from_pretrained(run.model), AutoModelForCausalLM.from_pretrained(run.train_dir)
    base_tok, tok = AutoTokenizer.from_pretrained(run.model), AutoTokenizer.from_pretrained(run.train_dir)
    gen = run.cfg.generate
    tag_ids = tok.convert_tokens_to_ids(["<kind>"])
    for point in run.report["strength"]["points"]:
        s, answers = point["strength"], []
        for i, r in enumerate(run.heldout):
            branches = [[c] for c in guidance.branch_contexts(tok, r["input"], ["<kind>"], True)]
            answers += guidance.sample(student, branches, guidance.branch_weights([s]), pad_id=tok.pad_token_id,
                                       eos_ids=_eos_ids(student, tok), max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                       top_p=gen.top_p, seeds=[run.cfg.evaluate.seed * 1_000_003 + i], suppress_ids=tag_ids)
        texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
        assert point["probe"]["student"] == pytest.approx(sum(len(t.split()) for t in texts) / len(texts))
        assert point["words"] == pytest.approx(point["probe"]["student"])
        for key, system in (("base", None), ("teacher", PROMPT)):
            nll = sum(-float(logprobs(base, chat_context(base_tok, system, r["input"]), a).gather(-1, torch.tensor(a)[:, None]).sum())
                      for r, a in zip(run.heldout, answers))
            assert point["fluency"][key]["nll"] == pytest.approx(nll / sum(map(len, answers)), rel=1e-4), (s, key)
            low, high = point["fluency"][key]["nll_ci"]
            assert low <= point["fluency"][key]["nll"] <= high
    assert not any(t in tag_ids for a in answers for t in a)


def test_report_has_the_strength_section_and_plot(run):
    markdown = (run.eval_dir / "report.md").read_text()
    assert "## Tag strength (`<kind>`)" in markdown and "plots/strength.png" in markdown
    assert (run.eval_dir / "plots" / "strength.png").read_bytes().startswith(b"\x89PNG")
    rows = [line for line in markdown.splitlines() if line.startswith("| `") and line.split("|")[1].strip(" `") in ("-1", "0", "1", "2")]
    assert len(rows) == len(STRENGTHS)
    first = run.report["strength"]["points"][0]
    assert rows[0].split("|")[3].strip() == f"{first['recovery']:.3f}"


def test_the_option_is_off_by_default_and_out_of_the_stage_key(tiny_cfg):
    cfg = tiny_cfg()
    assert list(cfg.evaluate.strengths) == [] and EvaluateConfig().strengths == []
    assert "strengths" not in paths.evaluate_settings_key(cfg.evaluate)
    swept = tiny_cfg("evaluate.strengths=[0,2]")
    assert paths.evaluate_settings_key(swept.evaluate)["strengths"] == [0.0, 2.0]  # a sweep is a new evaluation


def test_bad_strengths_fail_before_any_model_loads(tiny_cfg, no_weights):
    for bad in ("[nan]", "[1,inf]"):
        cfg = tiny_cfg(f"evaluate.strengths={bad}", "stage=evaluate")
        with pytest.raises(ConfigError, match=r"evaluate.strengths\[\d\].*not a finite number"):
            run_recipe(evaluate, cfg)
    with pytest.raises(Exception, match="strengths"):  # the structured schema: a float list
        tiny_cfg("evaluate.strengths=[lots]")
    for argv, match in ((["strengths=[1,x]", "from=x"], "not a number"), (["from=x", "strengths=[nan]"], "not a finite"),
                        (["strengths=[1]"], "needs from="), (["from=x", "strenghts=[1]"], "is not one of")):
        with pytest.raises(ConfigError, match=match):
            strength_cli.parse(argv)


def test_standalone_command_writes_the_doc_and_resumes_from_its_cache(run, tmp_path, monkeypatch):
    out, work = tmp_path / "docs" / "strength.md", tmp_path / "work"
    argv = [f"from={run.train_dir}", "strengths=[0,2]", f"out={out}", f"work={work}"]
    strength_cli.main(argv)
    result = json.loads((tmp_path / "docs" / "strength" / "strength.json").read_text())
    swept = {p["strength"]: p for p in run.report["strength"]["points"]}
    for point in result["points"]:  # the same figures as the evaluate option's, from the same folders
        assert point["recovery"] == pytest.approx(swept[point["strength"]]["recovery"], abs=1e-6)
        assert point["fluency"]["base"]["nll"] == pytest.approx(swept[point["strength"]]["fluency"]["base"]["nll"], rel=1e-5)
    text = out.read_text()
    assert "python -m pipeline.strength from=" in text and "strength/strength.png" in text
    assert (tmp_path / "docs" / "strength" / "strength.png").read_bytes().startswith(b"\x89PNG")
    assert len(list(work.glob("*/samples_*.json"))) == 2

    def refuse(*args, **kwargs):
        pytest.fail("sampled again despite the cache")

    monkeypatch.setattr(guidance, "sample_batched", refuse)
    strength_cli.main(argv)  # a rerun reads the cached answers
    assert json.loads((tmp_path / "docs" / "strength" / "strength.json").read_text())["points"] == result["points"]


def test_sample_command_with_strengths_one_shot_and_interactive(run):
    import io

    from pipeline.cli import sample

    tok = AutoTokenizer.from_pretrained(run.train_dir)
    student = AutoModelForCausalLM.from_pretrained(run.train_dir)
    text = "How do I boil an egg?"

    def expected(s):  # greedy guided decoding, straight from the guidance module
        branches = [[c] for c in guidance.branch_contexts(tok, text, ["<kind>"], True)]
        ids = guidance.sample(student, branches, guidance.branch_weights([s]), pad_id=tok.pad_token_id, eos_ids=_eos_ids(student, tok),
                              max_new_tokens=4, temperature=0.0, top_p=1.0, seeds=[0], suppress_ids=tok.convert_tokens_to_ids(["<kind>"]))[0]
        return tok.decode(ids, skip_special_tokens=True).strip()

    out = io.StringIO()
    sample.main([f"model={run.train_dir}", f"text={text}", "tags=[<kind>:2]", "compare=true", "max_new_tokens=4", "temperature=0"], out=out)
    assert out.getvalue().splitlines()[-1] == f"[<kind>:2] {expected(2.0)}"
    out = io.StringIO()
    sample.main([f"model={run.train_dir}", "tags=<kind>", "strength=-1", "interactive=true", "max_new_tokens=4", "temperature=0"],
                stream=io.StringIO(f"{text}\n/tags <kind>:3\n{text}\n/tags <kind>\n{text}\n"), out=out)
    printed = out.getvalue()
    assert f"[<kind>:-1] {expected(-1.0)}" in printed and f"[<kind>:3] {expected(3.0)}" in printed
    # /tags without a strength falls back to strength=-1 given on the command line
    assert printed.count("[<kind>:-1]") == 2
