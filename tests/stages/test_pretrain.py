"""The pretrain mode end to end on the tiny model used as a base LM, resume, and its config errors."""
import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.__main__ import run_stages
from pipeline.config import PROJECT_ROOT
from pipeline.core.job import job_from_config
from pipeline.errors import ConfigError
from pipeline.stages import paths, train
from tests.conftest import run_recipe
from tests.stages.resume import uninterrupted_and_resumed

CORPUS = PROJECT_ROOT / "data" / "corpus" / "plain.jsonl"


@pytest.fixture(scope="module")
def shared_outputs(tmp_path_factory):
    """One outputs folder for the module: the tests share the (identical) generate and extend stages."""
    return tmp_path_factory.mktemp("pretrain-outputs")


@pytest.fixture()
def pretrain_cfg(tiny_cfg, shared_outputs):
    def make(*extra):
        return tiny_cfg(
            f"paths.outputs={shared_outputs}",
            "inputs.max_train=8",
            "model.chat=false",
            "train.mode=pretrain",
            f"train.pretrain.plain.data_files={CORPUS}",
            "train.pretrain.block_size=64",
            "train.pretrain.plain.heldout_docs=4",
            "train.max_steps=4",
            "train.batch_size=2",
            "train.embedding_lr=0.05",
            *extra,
        )

    return make


def test_pretrain_chain_on_a_base_model_reports_recovery_and_plain_drift(pretrain_cfg):
    cfg = pretrain_cfg("train.pretrain.tag_dropout=0.2", "train.pretrain.tag_position=random")
    run_stages(cfg)
    job = job_from_config(cfg)
    m = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())["metrics"]
    out = paths.output_dir("train", cfg, job)
    expected = plain_text_reference(cfg.model.path, out, block_size=64, heldout_docs=4)
    assert m["plain_heldout_docs"] == 4 and m["plain_tokens"] == expected["tokens"]
    assert m["plain_nll_base"] == pytest.approx(expected["nll_base"], rel=1e-4)
    assert m["plain_nll_student"] == pytest.approx(expected["nll_student"], rel=1e-4)
    assert m["plain_drift_kl"] == pytest.approx(expected["drift"], rel=1e-3)
    assert m["plain_drift_kl"] > 1e-4  # LoRA moved the model, and the drift measure sees it
    report_md = (paths.output_dir("evaluate", cfg, job) / "report.md").read_text()
    assert "continued pretraining" in report_md and "Held-out plain text" in report_md
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    from transformers import AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(AutoTokenizer.from_pretrained(out))
    # the finetune key of the same config is a different folder (and unchanged by the pretrain knobs)
    finetune = pretrain_cfg("train.mode=finetune")
    assert paths.output_dir("train", finetune, job) != out
    assert paths.output_dir("train", finetune, job) == paths.output_dir("train", 
        pretrain_cfg("train.mode=finetune", "train.pretrain.tagged_share=0.9"), job
    )
    assert paths.output_dir("train", pretrain_cfg("train.pretrain.plain_from=corpus"), job) == paths.output_dir("train", pretrain_cfg(), job)


def test_plain_share_from_the_models_own_untagged_samples(pretrain_cfg):
    """plain_from=untagged: every plain document of the stream is an untagged record (input + the model's own
    continuation without prompt), and the chain trains and evaluates on it."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from pipeline.core.formats import context_ids
    from pipeline.core.pretrain_data import document_factory

    cfg = pretrain_cfg("mixture.untagged=0.5", "train.pretrain.plain_from=untagged", "train.params=lora")
    run_stages(cfg)
    job = job_from_config(cfg)
    records = list(load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")).filter(lambda r: r["split"] == "train"))
    tok = AutoTokenizer.from_pretrained(paths.output_dir("extend", cfg, job))
    own = {tuple(context_ids(tok, r["input"], None, False) + [t for t in r["output_ids"] if t != tok.eos_token_id])
           for r in records if not r["tags"]}
    assert own and any(r["tags"] for r in records)
    make, _ = document_factory(cfg, records, tok)
    docs = list(itertools.islice(make(0), 40))
    plain = [d for d in docs if d.kind == "plain"]
    assert plain and all(tuple(d.ids) in own for d in plain)
    m = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())["metrics"]
    assert "plain_drift_kl" in m and "recovery" in m


def test_distribution_targets_train_under_their_own_key(pretrain_cfg):
    """train.pretrain.loss=kl: the chain trains on blocks whose generated tokens carry the recorded rows, under a
    train key of its own; loss=lm is the default key."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from pipeline.core.pretrain_data import training_stream

    cfg = pretrain_cfg("mixture.untagged=0.5", "train.pretrain.plain_from=untagged", "train.params=lora", "train.pretrain.loss=kl")
    run_stages(cfg)
    job = job_from_config(cfg)
    lm = pretrain_cfg("mixture.untagged=0.5", "train.pretrain.plain_from=untagged", "train.params=lora")
    assert paths.output_dir("train", cfg, job) != paths.output_dir("train", lm, job)
    assert paths.output_dir("train", pretrain_cfg("train.pretrain.loss=lm"), job) == paths.output_dir("train", pretrain_cfg(), job)
    assert paths.output_dir("train", pretrain_cfg("train.pretrain.targets=all"), job) == paths.output_dir("train", pretrain_cfg(), job)
    generated_only = pretrain_cfg("mixture.untagged=0.5", "train.pretrain.plain_from=untagged", "train.params=lora",
                                  "train.pretrain.loss=kl", "train.pretrain.targets=generated")
    assert paths.output_dir("train", generated_only, job) != paths.output_dir("train", cfg, job)
    records = list(load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")).filter(lambda r: r["split"] == "train"))
    tok = AutoTokenizer.from_pretrained(paths.output_dir("extend", cfg, job))
    stream, _ = training_stream(cfg, records, tok, [tok.convert_tokens_to_ids("<kind>")])
    rows = list(itertools.islice(stream, 4))
    generated = sum(len(r["output_ids"]) for r in records)
    assert all(len(r["topk_ids"][0]) == cfg.generate.logprobs_top_k for r in rows)
    assert 0 < sum(sum(r["soft_mask"]) for r in rows) <= generated  # tagged and own documents both carry rows
    m = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())["metrics"]
    log = json.loads((paths.output_dir("train", cfg, job) / "train_log.json").read_text())
    assert "recovery" in m and all(torch.isfinite(torch.tensor(e["loss"])) for e in log if "loss" in e)


def plain_text_reference(base_path, student_dir, block_size: int, heldout_docs: int) -> dict:
    """Held-out plain-text NLL of base and student and KL(base || student), by hand: one forward per
    document (no batch, no padding), log-softmax and the sums written out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    tag_ids = [i for i, t in tok.added_tokens_decoder.items() if t.content == "<kind>"]
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines() if line.strip()][:heldout_docs]
    docs = [tok(t, split_special_tokens=True)["input_ids"][:block_size] for t in texts if t.strip()]
    base, student = AutoModelForCausalLM.from_pretrained(base_path), AutoModelForCausalLM.from_pretrained(student_dir)
    nll = {"base": 0.0, "student": 0.0}
    drift, tokens = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            logprobs = {}
            for name, model in (("base", base), ("student", student)):
                logits = model(torch.tensor([doc])).logits[0, :-1].double()
                if name == "student":
                    logits[:, tag_ids] = float("-inf")
                logprobs[name] = torch.log_softmax(logits, -1)
                nll[name] -= sum(float(logprobs[name][t, doc[t + 1]]) for t in range(len(doc) - 1))
            p = logprobs["base"].exp()
            drift += float((p * (logprobs["base"] - logprobs["student"][:, : p.shape[-1]])).sum())  # tags: no base mass
            tokens += len(doc) - 1
    return {"tokens": tokens, "nll_base": nll["base"] / tokens, "nll_student": nll["student"] / tokens, "drift": drift / tokens}


def test_interrupted_pretraining_resumes_to_the_same_weights(pretrain_cfg, monkeypatch):
    """Stop after the step-2 checkpoint, run again: the result equals an uninterrupted run's."""
    overrides = ("train.params=full", "train.max_steps=4", "train.save_steps=2", "train.lr=0.01")
    cfg = pretrain_cfg(*overrides)
    for stage in ("generate", "extend"):
        run_stages(pretrain_cfg(*overrides, f"stage={stage}"))
    job = job_from_config(cfg)
    reference, resumed = uninterrupted_and_resumed(cfg, job, monkeypatch)
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-6) for k in reference)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.pretrain.tag_position=random", "model.chat=true"], "tag_position=random needs model.chat=false"),
        (["train.pretrain.plain.data_files=/nowhere/corpus.jsonl"], "no such file exists"),
        (["train.pretrain.tagged_share=1.5"], "train.pretrain.tagged_share is 1.5"),
        (["train.pretrain.plain_from=untagged"], r"plain_from=untagged reads the run's untagged .* mixture.untagged is 0.0"),
        (["mixture.untagged=0.5", "train.pretrain.plain_from=untagged", "train.pretrain.targets=generated"],
         r"targets=generated .* train.pretrain.loss is lm .* Fix: add train.pretrain.loss=kl"),
        (["mixture.untagged=0.5", "train.pretrain.loss=kl", "train.pretrain.targets=generated"],
         r"targets=generated .*plain_from is corpus"),
    ],
)
def test_bad_pretrain_settings_fail_before_any_model_loads(no_weights, pretrain_cfg, monkeypatch, overrides, message):

    with pytest.raises(ConfigError, match=message):
        run_stages(pretrain_cfg(*overrides))


def test_unknown_tag_in_the_mixture_is_named(pretrain_cfg):
    cfg = pretrain_cfg("train.pretrain.tags=['<nope>']")
    for stage in ("generate", "extend"):
        run_stages(pretrain_cfg("train.pretrain.tags=['<nope>']", f"stage={stage}"))
    with pytest.raises(ConfigError, match=r"train.pretrain.tags lists \['<nope>'\]"):
        run_recipe(train, cfg)


def test_pretrain_loss_is_not_multiplied_by_gradient_accumulation(pretrain_cfg, tmp_path):
    """Two micro-batches of 2 blocks must log the loss and gradient norm of one batch of 4 blocks.

    Before: batches carry `labels`, so the Trainer took the plain mean for an already normalised sum and
    did not divide by grad_accum: the logged loss and the gradients were twice as large.
    """
    logs = {}
    for name, batch, accum in (("one_batch", 4, 1), ("accumulated", 2, 2)):
        cfg = pretrain_cfg(f"paths.outputs={tmp_path / name}", "train.params=full", "train.max_steps=1",
                           f"train.batch_size={batch}", f"train.grad_accum={accum}", "train.logging_steps=1")
        run_stages(pretrain_cfg(f"paths.outputs={tmp_path / name}", "stage=generate"))
        run_stages(pretrain_cfg(f"paths.outputs={tmp_path / name}", "stage=extend"))
        run_recipe(train, cfg)
        log = json.loads((paths.output_dir("train", cfg, job_from_config(cfg)) / "train_log.json").read_text())
        logs[name] = next(e for e in log if "loss" in e)
    assert logs["accumulated"]["loss"] == pytest.approx(logs["one_batch"]["loss"], rel=0.05)
    assert logs["accumulated"]["grad_norm"] == pytest.approx(logs["one_batch"]["grad_norm"], rel=0.05)
