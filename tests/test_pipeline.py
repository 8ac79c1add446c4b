"""All four stages chained on the tiny model through the real Hydra configs."""
import json

import pytest
import torch
from hydra.errors import ConfigCompositionException
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import evaluate, generate, train
from pipeline.__main__ import run_stages
from pipeline.job import job_from_config
from pipeline.metatokens import ConfigError
from tests.conftest import compose


def test_chain_runs_reports_and_outputs_load_with_plain_transformers(tiny_cfg):
    cfg = tiny_cfg("train.objective=kl", "train.params=lora", "train.max_steps=6", "train.embedding_lr=0.05")
    run_stages(cfg)
    job = job_from_config(cfg)
    report_dir = evaluate.output_dir(cfg, job)
    report = json.loads((report_dir / "report.json").read_text())
    m = report["metrics"]
    assert m["effect_kl"] > 0.01  # the prompt changes the tiny model measurably
    assert m["recovery"] == pytest.approx(1 - m["residual_kl"] / m["effect_kl"])
    assert m["residual_kl"] < m["init_residual_kl"]  # training moved the student towards the teacher
    assert m["drift_kl"] >= 0 and m["prompt_tokens_saved"] > 5
    assert len(report["samples"]) == 2 and "<kind>" in (report_dir / "report.md").read_text()

    dataset_rows = json.loads((generate.output_dir(cfg, job) / "manifest.json").read_text())["counts"]
    assert dataset_rows["train <kind>"] > 0 and dataset_rows["heldout <kind>"] > 0

    # The trained output is a normal HF directory: no project code needed to load and run it.
    out = train.output_dir(cfg, job)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    tag_id = tok.convert_tokens_to_ids("<kind>")
    assert tok("<kind>", add_special_tokens=False)["input_ids"] == [tag_id]
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert not (out / "adapter_config.json").exists()  # LoRA was merged
    ids = tok.apply_chat_template([{"role": "system", "content": "<kind>"}, {"role": "user", "content": "Hi"}], return_tensors="pt", add_generation_prompt=True, return_dict=True)
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False, bad_words_ids=[[tag_id]], pad_token_id=tok.pad_token_id)
    assert tag_id not in generated[0, ids["input_ids"].shape[1] :].tolist()


def test_rerun_is_a_noop_and_a_changed_config_gets_a_new_folder(tiny_cfg):
    cfg = tiny_cfg("stage=generate")
    run_stages(cfg)
    out = generate.output_dir(cfg, job_from_config(cfg))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    run_stages(cfg)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    changed = tiny_cfg("stage=generate", "generate.max_new_tokens=3")
    run_stages(changed)
    other = generate.output_dir(changed, job_from_config(changed))
    assert other != out and (other / "manifest.json").exists()
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # logging choices do not change what a stage computes, so they do not change its folder
    assert train.output_dir(cfg, job_from_config(cfg)) == train.output_dir(
        tiny_cfg("logger=wandb"), job_from_config(cfg)
    )


@pytest.mark.parametrize("params, objective", [("embedding", "sft"), ("full", "kl")])
def test_other_objectives_and_parameter_sets_train(tiny_cfg, tiny_model, params, objective):
    cfg = tiny_cfg("stage=all", f"train.params={params}", f"train.objective={objective}", "train.max_steps=3")
    run_stages(cfg)
    job = job_from_config(cfg)
    out = train.output_dir(cfg, job)
    student = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tag_id = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<kind>")
    old = base.get_input_embeddings().weight
    new = student.get_input_embeddings().weight
    if params == "embedding":  # only the tag row moved; every other weight is bit-identical
        assert torch.equal(new[:tag_id], old)
        assert all(torch.equal(a, b) for (n, a), (_, b) in zip(student.model.layers.named_parameters(), base.model.layers.named_parameters()))
    else:
        assert not all(torch.equal(a, b) for a, b in zip(student.model.layers.parameters(), base.model.layers.parameters()))


def test_unmerged_lora_saves_an_adapter_that_peft_loads(tiny_cfg):
    from peft import AutoPeftModelForCausalLM

    cfg = tiny_cfg("stage=all", "train.merge_lora=false", "train.max_steps=2", "evaluate.num_samples=1")
    run_stages(cfg)
    out = train.output_dir(cfg, job_from_config(cfg))
    assert (out / "adapter_config.json").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(out))


def test_typo_in_config_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="train.epoch"):
        compose(["train.epoch=3"])
    with pytest.raises(ConfigCompositionException):
        compose(["metatoken=no_such_tag"])


def test_bad_metatoken_fails_before_any_model_loads(no_weights, tiny_cfg):

    with pytest.raises(ConfigError, match="field 'tag'"):
        run_stages(tiny_cfg("metatoken.tag=nice"))
    with pytest.raises(ConfigError, match="stage='tran' is not a stage"):
        run_stages(tiny_cfg("stage=tran"))
