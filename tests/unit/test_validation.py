"""Bad configs fail before any compute, with the file, the field and the fix in the message."""
import json

import pytest

import pipeline.core.trainer as trainer_module
from pipeline.__main__ import run_stages
from pipeline.core import trainer
from pipeline.errors import ConfigError
from pipeline.stages import paths


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


CASES = [
    # (overrides, files to write under data/, expected message)
    (["metatoken.tag=nice"], {}, r"field 'tag' is 'nice', which is not a single well-formed tag.*Fix: write it as '<name>'"),
    (["metatoken.tag='<two words>'"], {}, r"field 'tag' is '<two words>'"),
    (["metatoken.tag='<|im_end|>'"], {}, r"field 'tag' is '<\|im_end\|>', which is not a single well-formed tag"),
    (["metatoken.tag='<kind>'", "metatoken.prompt_file=prompts/empty.txt"], {"prompts/empty.txt": "  \n"}, r"the prompt of <kind> is empty"),
    (["metatoken.prompt_file=prompts/nope.txt"], {}, r"field 'prompt_file' points to .*prompts/nope.txt, which does not exist"),
    (["metatoken.prompt_file=prompts/long.txt"], {"prompts/long.txt": "be kind " * 600}, r"needs \d+ tokens .* \d+ more than the model's window of 1024.*Fix: shorten the prompt by at least"),
    (["metatoken.prompt_file=null", "metatoken.prompt='<nosuch> and more'"], {}, r"mentions <nosuch>, which no file in conf/metatoken defines"),
    (["inputs.file=${paths.data}/inputs/bad.jsonl"], {"inputs/bad.jsonl": '{"id": "a", "text": "x"}\n{"id": "b", "text": ""}\n'}, r"bad.jsonl:2: field 'text' is missing or empty"),
    (["inputs.file=${paths.data}/inputs/nofile.jsonl"], {}, r"inputs.file: .*nofile.jsonl does not exist"),
    (["model.path=/no/such/model"], {}, r"model.path: /no/such/model is not a Hugging Face model folder"),
]


@pytest.mark.parametrize("overrides, files, message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_config_fails_before_weights_load(tiny_cfg, tiny_data, no_weights, overrides, files, message):
    for rel, text in files.items():
        write(tiny_data / rel, text)
    with pytest.raises(ConfigError, match=message):
        run_stages(tiny_cfg(*overrides))


def test_tag_already_in_tokenizer(tiny_cfg, tiny_model, no_weights):
    # <|im_end|> is not a well-formed tag; make a well-formed one the tokenizer already knows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    known = [t for t in tok.get_vocab() if t.startswith("<") and t.endswith(">") and t[1:-1].replace("_", "").isalnum()]
    if not known:
        tok.add_tokens(["<known>"])
        target = tiny_model.parent / "with-known"
        tok.save_pretrained(target)
        for f in tiny_model.iterdir():
            if not (target / f.name).exists():
                (target / f.name).symlink_to(f)
        tiny_model, known = target, ["<known>"]
    with pytest.raises(ConfigError, match=rf"field 'tag' is {known[0]}, which the tokenizer of .* already has"):
        run_stages(tiny_cfg(f"model.path={tiny_model}", f"metatoken.tag='{known[0]}'"))


def test_unknown_config_key_is_rejected_by_the_schema():
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose

    with pytest.raises(ConfigCompositionException, match="generate.max_tokens"):
        compose(["generate.max_tokens=3"])


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_cfg, monkeypatch):
    from pipeline.core.job import job_from_config

    real_loss, calls = trainer_module.distill_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer_module, "distill_loss", poisoned)
    cfg = tiny_cfg("train.max_steps=4", "train.save_steps=2")
    with pytest.raises(trainer.TrainingDiverged, match=r"loss became nan at step 3.*checkpoints saved so far are kept"):
        run_stages(cfg)
    out = paths.output_dir("train", cfg, job_from_config(cfg))
    partial = out.with_name(f".{out.name}.partial")
    assert not out.exists()  # nothing half-written in place of a result
    assert [p.name for p in (partial / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(trainer_module, "distill_loss", real_loss)
    run_stages(cfg)  # the same command resumes from checkpoint-2 and finishes
    assert (out / "manifest.json").exists()


def test_same_config_and_seed_give_the_same_dataset_and_model(tiny_cfg, tmp_path):
    import torch
    from datasets import load_from_disk
    from safetensors.torch import load_file

    from pipeline.core.job import job_from_config

    runs = []
    for name in ("first", "second"):
        cfg = tiny_cfg(f"paths.outputs={tmp_path / name}", "stage=train", "train.max_steps=3")
        for stage in ("generate", "extend", "train"):
            run_stages(tiny_cfg(f"paths.outputs={tmp_path / name}", f"stage={stage}", "train.max_steps=3"))
        job = job_from_config(cfg)
        runs.append((paths.output_dir("generate", cfg, job), paths.output_dir("train", cfg, job)))
    (gen_a, train_a), (gen_b, train_b) = runs
    assert gen_a.name == gen_b.name and train_a.name == train_b.name  # same config, same key
    assert load_from_disk(str(gen_a / "dataset")).to_list() == load_from_disk(str(gen_b / "dataset")).to_list()
    weights_a, weights_b = load_file(train_a / "model.safetensors"), load_file(train_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    manifest = json.loads((train_a / "manifest.json").read_text())
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"]) and manifest["key"]["train"]["seed"] == 0


def test_bootstrap_prompt_whose_expansion_does_not_fit_is_rejected(tiny_cfg, tiny_data, tiny_model, no_weights):
    """The bootstrap teacher reads the short prompt, but held-out samples and evaluation read the expanded one."""
    conf = tiny_data / "metatokens"
    write(conf / "long.yaml", 'tag: "<long>"\nprompt: "' + "be kind " * 600 + '"\n')
    from transformers import AutoTokenizer

    teacher = tiny_data.parent / "knows-long"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_tokens(["<long>"], special_tokens=True)
    tok.save_pretrained(teacher)
    (teacher / "config.json").write_text((tiny_model / "config.json").read_text())
    cfg = tiny_cfg(f"paths.metatokens={conf}", "metatoken.prompt_file=null", "metatoken.tag='<outer>'",
                   "metatoken.prompt='<long> Short.'", "generate.teacher_mode=bootstrap", f"generate.bootstrap_model={teacher}")
    with pytest.raises(ConfigError, match=r"the reference teacher .*'s context needs \d+ tokens.*must fit the window"):
        run_stages(cfg)
