"""Evaluation contexts (pipeline/contexts.py): the transfer interval on a case with a known answer, the inputs
each context reads, the key (empty by default), and a tiny run whose context recovery equals a plain loop."""
import json
import shutil

import numpy as np
import pytest

from pipeline.core import contexts
from pipeline.errors import ConfigError
from pipeline.stages import paths
from tests.conftest import compose, tiny_overrides


def test_transfer_interval_on_a_case_with_a_known_answer():
    # one context input: recovery 1 - 1/2 = 0.5 in every resample. Two held-out inputs (r, e) = (1, 2), (3, 4):
    # a resample draws (1,2)x2 -> 0.5 (p 1/4), (3,4)x2 -> 0.25 (p 1/4), one of each -> 1 - 4/6 (p 1/2).
    # transfer = 0.5 / those = 1.0, 2.0, 1.5: the 95% interval's ends are 1.0 and 2.0.
    low, high = contexts.transfer_interval([1.0], [2.0], [1.0, 3.0], [2.0, 4.0], resamples=2000, seed=0)
    assert (low, high) == (pytest.approx(1.0), pytest.approx(2.0))
    # a context exactly as good as held out, every input alike: the interval is the point
    assert contexts.transfer_interval([1.0] * 5, [4.0] * 5, [2.0] * 3, [8.0] * 3) == (pytest.approx(1.0), pytest.approx(1.0))
    # the two sets are resampled on their own: a held-out set with no recovery at all leaves the ratio undefined
    assert all(np.isnan(contexts.transfer_interval([1.0], [2.0], [2.0], [2.0])))


def test_context_inputs(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.config import PROJECT_ROOT
    from pipeline.core.data import load_inputs

    cfg = compose(tiny_overrides(tiny_model, PROJECT_ROOT / "data", tmp_path / "outputs", "evaluate.context_examples=5"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    docs = contexts.context_rows("documents", cfg, tok, {"doc-0002"})
    assert [r["id"] for r in docs] == ["doc-0001", "doc-0003", "doc-0004", "doc-0005", "doc-0006"]  # the trained one is skipped
    convs = contexts.context_rows("conversations", cfg, tok, set())
    assert len(convs) == 5 and all(r["messages"][-1]["role"] == "user" for r in convs)
    long = contexts.context_rows("long", cfg, tok, set())
    requests = {r["id"]: r["text"] for r in load_inputs(PROJECT_ROOT / "data" / "inputs" / "requests.jsonl")}
    for r in long:
        request = requests[r["id"].removeprefix("long-")]
        passage = r["input"].removesuffix("\n\n" + request)
        assert passage != r["input"] and len(tok(passage, add_special_tokens=False)["input_ids"]) >= contexts.LONG_PASSAGE_TOKENS
    from pipeline.core.data import is_heldout

    assert all(is_heldout(r["id"].removeprefix("long-"), cfg.inputs.heldout_fraction) for r in long)  # held-out requests only
    late = compose(tiny_overrides(tiny_model, PROJECT_ROOT / "data", tmp_path / "o", "inputs.prompt_position=last_user"))
    assert {r["position"] for r in contexts.context_rows("documents", late, tok, set())} == {"last_user"}


def test_contexts_are_out_of_the_key_by_default_and_checked_by_name(pinned_model_content, tmp_path):
    from pipeline.core.job import job_from_config
    from pipeline.runtime import outputs

    def key(*overrides):
        cfg = compose(list(overrides))
        return outputs.key_hash(paths.stage_key("evaluate", cfg, job_from_config(cfg)))

    assert key("evaluate.contexts=[]", "evaluate.context_examples=24") == key() == "a59e4b0496"  # the pinned default
    assert key("evaluate.contexts=[documents]") != key()
    with pytest.raises(Exception, match="documentz"):  # a typo fails when the config is composed
        compose(["evaluate.contexts=[documentz]"])
    cfg = compose([f"paths.data={tmp_path}", "evaluate.contexts=[conversations]"])
    with pytest.raises(ConfigError, match=r"evaluate.contexts: conversations reads .*conversations.jsonl, which does not exist"):
        contexts.check(cfg)


def test_a_run_with_contexts_scores_them_like_a_plain_loop(tiny_cfg, tiny_data):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.__main__ import run_stages
    from pipeline.config import PROJECT_ROOT
    from pipeline.core.formats import BASE_PREFIX_SEPARATOR
    from pipeline.core.job import job_from_config
    from tests.conftest import next_token_logprobs, plain_kl

    for name in ("documents.jsonl", "conversations.jsonl"):
        shutil.copy(PROJECT_ROOT / "data" / "inputs" / name, tiny_data / "inputs" / name)
    cfg = tiny_cfg("evaluate.contexts=[documents,conversations,long,plain]", "evaluate.context_examples=3", "evaluate.train_examples=0",
                   "metatoken.probe.kind=words", "metatoken.probe.pattern=null")
    run_stages(cfg)
    job = job_from_config(cfg)
    out = paths.output_dir("evaluate", cfg, job)
    report = json.loads((out / "report.json").read_text())
    entries = {e["context"]: e for e in report["contexts"]}
    assert set(entries) == {"documents", "conversations", "long", "plain"} and all(e["examples"] == 3 for e in entries.values())
    answers = [json.loads(line) for line in (out / contexts.ANSWERS).read_text().splitlines()]
    base, tok = AutoModelForCausalLM.from_pretrained(cfg.model.path), AutoTokenizer.from_pretrained(cfg.model.path)
    train_dir = paths.output_dir("train", cfg, job)
    student, stok = AutoModelForCausalLM.from_pretrained(train_dir), AutoTokenizer.from_pretrained(train_dir)
    prompt = (tiny_data / "prompts" / "kind.txt").read_text().strip()

    def ctx(t, a, system):  # the chat template by hand; `plain` reads raw text, the prompt or tag ahead of it
        if a["context"] == "plain":
            return t(a["input"] if system is None else system + BASE_PREFIX_SEPARATOR + a["input"])["input_ids"]
        turns = ([{"role": "system", "content": system}] if system else []) + (a.get("messages") or [{"role": "user", "content": a["input"]}])
        return t(t.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    held = report["sets"][0]["recovery"]
    for name, entry in entries.items():
        effect = residual = 0.0
        with torch.no_grad():
            for a in (a for a in answers if a["context"] == name):
                p = next_token_logprobs(base, ctx(tok, a, prompt), a["output_ids"])
                effect += sum(plain_kl(p, next_token_logprobs(base, ctx(tok, a, None), a["output_ids"])))
                residual += sum(plain_kl(p, next_token_logprobs(student, ctx(stok, a, "<kind>"), a["output_ids"], [stok.convert_tokens_to_ids("<kind>")])))
        assert entry["recovery"] == pytest.approx(1 - residual / effect, abs=1e-4), name
        assert entry["heldout_recovery"] == pytest.approx(held, abs=1e-6)
        assert entry["transfer"] == pytest.approx(entry["recovery"] / held, rel=1e-6)
        # the probe (words per answer) on the answers the report saved, counted by hand
        said = [a for a in answers if a["context"] == name]
        words = {who: sum(len(a[key].split()) for a in said) / len(said)
                 for who, key in (("base", "base_output"), ("teacher", "output"), ("student", "student_output"))}
        (probe,) = entry["probes"]
        assert [probe[w] for w in words] == pytest.approx(list(words.values()))
        if words["teacher"] != words["base"]:
            assert probe["retention"] == pytest.approx((words["student"] - words["base"]) / (words["teacher"] - words["base"]))
    md = (out / "report.md").read_text()
    assert "## Evaluation contexts" in md and "| `documents` |" in md
