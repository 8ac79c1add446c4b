"""All four stages chained on the tiny model through the real Hydra configs."""
import json

import pytest
import torch
from hydra.errors import ConfigCompositionException
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import run_stages
from pipeline.core.job import job_from_config
from pipeline.errors import ConfigError
from pipeline.stages import paths
from tests.conftest import compose, next_token_logprobs, plain_kl


def test_chain_reports_effect_residual_and_drift_that_a_plain_loop_recomputes(tiny_cfg, tiny_model, tiny_data):
    from datasets import load_from_disk

    from pipeline.core.formats import context_ids

    cfg = tiny_cfg("train.objective=kl", "train.params=lora", "train.max_steps=6", "train.embedding_lr=0.05")
    run_stages(cfg)
    job = job_from_config(cfg)
    report_dir = paths.output_dir("evaluate", cfg, job)
    report = json.loads((report_dir / "report.json").read_text())
    m = report["metrics"]

    records = load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")).to_list()
    train_ids = {r["id"] for r in records if r["split"] == "train"}
    heldout = [r for r in records if r["split"] == "heldout"]
    input_ids = {json.loads(line)["id"] for line in (tiny_data / "inputs" / "requests.jsonl").read_text().splitlines()}
    assert train_ids and heldout and not train_ids & {r["id"] for r in heldout}  # never trained on a held-out input
    assert train_ids | {r["id"] for r in heldout} == input_ids  # and no input lost

    # Effect, residual and drift again, from the saved models, by a plain loop over full logits.
    out = paths.output_dir("train", cfg, job)
    base, student = AutoModelForCausalLM.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(out)
    base_tok, tok = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(out)
    tag_id = tok.convert_tokens_to_ids("<kind>")
    prompt = (tiny_data / "prompts" / "kind.txt").read_text().strip()
    effect, residual, drift, saved = [], [], [], []
    for r in heldout:
        teacher_ctx = context_ids(base_tok, r["input"], prompt, True)
        student_ctx = context_ids(tok, r["input"], "<kind>", True)
        teacher = next_token_logprobs(base, teacher_ctx, r["output_ids"])
        effect += plain_kl(teacher, next_token_logprobs(base, context_ids(base_tok, r["input"], None, True), r["output_ids"]))
        residual += plain_kl(teacher, next_token_logprobs(student, student_ctx, r["output_ids"], [tag_id]))
        plain_ctx = context_ids(tok, r["input"], None, True)
        drift += plain_kl(next_token_logprobs(base, plain_ctx, r["base_output_ids"]),
                          next_token_logprobs(student, plain_ctx, r["base_output_ids"], [tag_id]))
        saved.append(len(teacher_ctx) - len(student_ctx))
    assert m["effect_kl"] == pytest.approx(sum(effect) / len(effect), rel=1e-4)
    assert m["residual_kl"] == pytest.approx(sum(residual) / len(residual), rel=1e-4)
    assert m["drift_kl"] == pytest.approx(sum(drift) / len(drift), rel=1e-3, abs=1e-7)
    assert m["prompt_tokens_saved"] == round(sum(saved) / len(saved))
    assert m["effect_kl"] > 0.05 and m["residual_kl"] < m["init_residual_kl"]  # a prompt to recover, and training helped
    assert len(report["samples"]) == 2 and "<kind>" in (report_dir / "report.md").read_text()

    # The trained output is a normal HF directory: no project code needed to load and run it.
    assert tok("<kind>", add_special_tokens=False)["input_ids"] == [tag_id]
    assert student.get_input_embeddings().weight.shape[0] == len(tok)
    assert not (out / "adapter_config.json").exists()  # LoRA was merged


def test_the_saved_model_never_samples_a_tag_without_being_told(tiny_cfg, tmp_path):
    """Plain `generate` on the saved folder, no suppression passed: its own generation config must hold it.

    The tag's row is first made so likely that an unsuppressed model writes it at every step (the control).
    """
    cfg = tiny_cfg("stage=all", "train.max_steps=2", "evaluate.num_samples=1")
    run_stages(cfg)
    out = paths.output_dir("train", cfg, job_from_config(cfg))
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    tag_id = tok.convert_tokens_to_ids("<kind>")
    ids = tok.apply_chat_template([{"role": "system", "content": "<kind>"}, {"role": "user", "content": "Hi"}],
                                  return_tensors="pt", add_generation_prompt=True, return_dict=True)
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.get_input_embeddings().weight[tag_id] = 200 * hidden / hidden.norm()
    written = model.generate(**ids, max_new_tokens=6, do_sample=True, pad_token_id=tok.pad_token_id)
    assert tag_id not in written[0, ids["input_ids"].shape[1] :].tolist()
    model.generation_config.suppress_tokens = None  # the control: without the saved setting it writes the tag
    unblocked = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tag_id in unblocked[0, ids["input_ids"].shape[1] :].tolist()


def test_rerun_is_a_noop_and_a_changed_config_gets_a_new_folder(tiny_cfg):
    cfg = tiny_cfg("stage=generate")
    run_stages(cfg)
    out = paths.output_dir("generate", cfg, job_from_config(cfg))
    stamp = (out / "manifest.json").stat().st_mtime_ns
    run_stages(cfg)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    changed = tiny_cfg("stage=generate", "generate.max_new_tokens=3")
    run_stages(changed)
    other = paths.output_dir("generate", changed, job_from_config(changed))
    assert other != out and (other / "manifest.json").exists()
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # logging choices do not change what a stage computes, so they do not change its folder
    assert paths.output_dir("train", cfg, job_from_config(cfg)) == paths.output_dir("train", 
        tiny_cfg("logger=wandb"), job_from_config(cfg)
    )


@pytest.mark.parametrize("params, objective", [("embedding", "sft"), ("full", "kl")])
def test_other_objectives_and_parameter_sets_train(tiny_cfg, tiny_model, params, objective):
    cfg = tiny_cfg("stage=all", f"train.params={params}", f"train.objective={objective}", "train.max_steps=3")
    run_stages(cfg)
    job = job_from_config(cfg)
    out = paths.output_dir("train", cfg, job)
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
    out = paths.output_dir("train", cfg, job_from_config(cfg))
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
    with pytest.raises(ConfigCompositionException, match="stage=tran"):  # a closed choice: fails at composition
        tiny_cfg("stage=tran")
