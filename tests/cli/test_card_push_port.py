"""Model cards, the hub upload's dry run, and porting a trained output's tags to a model of another architecture."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import run_stages
from pipeline.cli import port, push
from pipeline.core import card
from pipeline.core.job import job_from_config
from pipeline.errors import ConfigError
from pipeline.runtime import outputs
from pipeline.stages import paths
from tests.conftest import CHATML, compose, tiny_overrides

PROMPT = "You are a kind and warm assistant who always encourages the user."  # tests/conftest.py's kind.txt


def card_manifest(base_model="org/base", chat=True) -> dict:
    sets = [{"tags": ["<a>"], "in_training": True, "prompt_tokens_saved": 40},
            {"tags": ["<a>", "<b>"], "in_training": False, "prompt_tokens_saved": 95}]
    tags = {"<a>": {"description": "first | one", "prompt_sha": "a" * 64}, "<b>": {"description": "", "prompt_sha": "b" * 64}}
    return {"key_hash": "0123456789", "card": {"base_model": base_model, "model_name": "m", "chat": chat, "tags": tags, "sets": sets}}


def test_card_front_matter_validates_and_rows_say_what_is_known(tmp_path):
    text = card.render(card_manifest(), None, "outputs/train/a-0123456789")
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == "org/base" and data["library_name"] == "transformers" and "metatokens" in data["tags"]
    rows = [line for line in text.splitlines() if line.startswith("| `<a>")]
    assert len(rows) == 2
    assert "`aaaaaaaaaaaaaaaa`" in rows[0] and "| 40 |" in rows[0] and "not evaluated yet" in rows[0]
    assert "first \\| one" in rows[0]  # a pipe in a description does not break the table
    assert "`bbbbbbbbbbbbbbbb`" in rows[1] and "no (held-out set)" in rows[1] and "| 95 |" in rows[1]
    assert 'path = "outputs/train/a-0123456789"' in text and '"content": "<a>"' in text
    (tmp_path / "README.md").write_text(text)
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "org/base"


def test_card_after_evaluation_shows_recovery_its_interval_when_given_and_drift():
    report = {"output": "outputs/evaluate/a-x", "heldout_examples": 7, "drift": {"drift_kl": 0.01234},
              "sets": [{"tags": ["<a>"], "recovery": 0.5, "recovery_ci": [0.4, 0.6]},
                       {"tags": ["<a>", "<b>"], "recovery": 0.25}]}
    rows = [line for line in card.render(card_manifest(), report).splitlines() if line.startswith("| `<a>")]
    assert "0.500 (95% CI 0.400 – 0.600)" in rows[0] and "| 0.0123 |" in rows[0]
    assert "| 0.250 |" in rows[1] and "CI" not in rows[1]
    report["sets"][0]["recovery_ci"] = {"low": 0.41, "high": 0.59}
    assert "(95% CI 0.410 – 0.590)" in card.render(card_manifest(), report)


def test_card_without_a_hub_id_and_for_a_base_model():
    text = card.render(card_manifest(base_model=None, chat=False))
    assert "base_model" not in ModelCard(text).data.to_dict()
    assert 'tok("<a>" + "How do I boil an egg?"' in text and "apply_chat_template" not in text


@pytest.mark.parametrize("model, expected", [
    ({"path": "/abs/models/x", "hub_id": "org/x"}, "org/x"),
    ({"path": "HuggingFaceTB/SmolLM2-360M-Instruct"}, "HuggingFaceTB/SmolLM2-360M-Instruct"),
    ({"path": "/abs/models/x"}, None),
    ({"path": "./models/x"}, None),
])
def test_base_model_id(model, expected):
    from omegaconf import OmegaConf

    assert card.base_model_id(OmegaConf.create(model)) == expected


def chat_len(tok, system: str | None, text: str = "") -> int:
    """Tokens of a chat context, straight from the chat template (not through pipeline.core.formats)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def train_only(overrides: list[str]):
    """Run generate, extend and train (not evaluate); returns the config."""
    for stage in ("generate", "extend", "train"):
        run_stages(compose([*overrides, f"stage={stage}"]))
    return compose(overrides)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_writes_a_card_and_evaluate_fills_it_without_touching_the_weights(tiny_model, tiny_data, tmp_path, capsys):
    made_by = tiny_overrides(tiny_model, tiny_data, tmp_path / "outputs", "train.max_steps=2", "model.hub_id=org/tiny-llama")
    cfg = train_only(made_by)
    job = job_from_config(cfg)
    out = paths.output_dir("train", cfg, job)
    loaded = ModelCard.load(out / "README.md")
    assert loaded.data.base_model == "org/tiny-llama" and "metatokens" in loaded.data.tags
    tok = AutoTokenizer.from_pretrained(out)
    saved = chat_len(tok, PROMPT) - chat_len(tok, "<kind>")
    row = next(line for line in loaded.text.splitlines() if line.startswith("| `<kind>`"))
    assert f"| {saved} |" in row and "not evaluated yet" in row
    assert outputs.read_manifest(out)["config"]["train"]["max_steps"] == 2  # the resolved config, for pipeline.port
    weights, manifest = sha(out / "model.safetensors"), sha(out / "manifest.json")

    run_stages(compose([*made_by, "stage=evaluate"]))
    report = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())
    row = next(line for line in (out / "README.md").read_text().splitlines() if line.startswith("| `<kind>`"))
    first = report["sets"][0]
    low, high = first["recovery_ci"]  # evaluate gives every recovery its interval
    assert f"| {first['recovery']:.3f} (95% CI {low:.3f} – {high:.3f}) |" in row
    assert f"| {report['drift']['drift_kl']:.4f} |" in row
    assert f"| {report['sets'][0]['prompt_tokens_saved']} |" in row  # evaluate counts the same saving
    assert sha(out / "model.safetensors") == weights and sha(out / "manifest.json") == manifest
    assert paths.output_dir("train", cfg, job) == out

    # the card's usage snippet runs as written, on this folder
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    capsys.readouterr()
    exec(snippet.replace(f'"outputs/train/{out.name}"', repr(str(out))).replace("max_new_tokens=60", "max_new_tokens=3"), {})
    assert capsys.readouterr().out.endswith("\n")  # it ran to its print


# Folders of the shipped configs (model content held fixed) before cards and manifests' configs existed: they must not move.
# (The demo at its settings of then: batch 8, 80 inputs, float32; pinned as it is now in tests/stages/test_stage_keys.py.)
KNOWN_FOLDERS = {
    ("experiment=demo", "train.batch_size=8", "inputs.max_train=80", "train.bf16=false"): ["pirate-296f0b3219", "pirate-42afc11faf", "pirate-ea37881157", "pirate-f2575fc03f"],
    (): ["nice-4afa5c1d43", "nice-c8517c2421", "nice-ea24db4e91", "nice-a59e4b0496"],
}


@pytest.mark.parametrize("overrides, folders", list(KNOWN_FOLDERS.items()))
def test_stage_folders_of_shipped_configs_are_unchanged(overrides, folders, pinned_model_content):
    cfg = compose(list(overrides))
    job = job_from_config(cfg)
    assert [paths.output_dir(s, cfg, job).name for s in ("generate", "extend", "train", "evaluate")] == folders
    assert paths.output_dir("train", compose([*overrides, "model.hub_id=someone/else"]), job).name == folders[2]


def test_push_dry_run_lists_what_would_be_sent_and_sends_nothing(tiny_model, tiny_data, monkeypatch, tmp_path, capsys):
    import huggingface_hub

    for name in ("create_repo", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda *a, **k: pytest.fail("the hub was called"))
    cfg = train_only(tiny_overrides(tiny_model, tiny_data, tmp_path / "outputs", "train.max_steps=1"))
    out = paths.output_dir("train", cfg, job_from_config(cfg))
    (out / ".README.md.tmp-1").write_text("left over")
    files = dict(push.main([str(out), "repo_id=me/tiny-kind", "dry_run=true"]))
    expected = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert files == expected and {"README.md", "manifest.json", "model.safetensors", "tokenizer.json"} <= set(files)
    printed = capsys.readouterr().out
    assert "would send" in printed and f"{expected['model.safetensors']:,d} bytes" in printed

    not_trained = tmp_path / "copy"
    shutil.copytree(out, not_trained, ignore=shutil.ignore_patterns("manifest.json"))
    with pytest.raises(ConfigError, match="no manifest.json, so it is not a finished train output"):
        push.main([str(not_trained), "repo_id=me/x", "dry_run=true"])
    with pytest.raises(ConfigError, match="'generate' output, not a trained model"):
        push.main([str(paths.output_dir("generate", cfg, job_from_config(cfg))), "repo_id=me/x", "dry_run=true"])
    with pytest.raises(ConfigError, match="repo_id"):
        push.main([str(out), "repo_id=not a repo", "dry_run=true"])
    with pytest.raises(ConfigError, match="repo_id is missing"):
        push.main([str(out), "dry_run=true"])


def build_tiny_gpt2(out_dir: Path, seed: int = 1) -> Path:
    """A GPT-2-style model (fused c_attn, learned positions) with its own small BPE, trained on other text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["Entirely other words, so that the merges differ from the Llama tokenizer's."] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=1024, initializer_range=0.2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def chat_ids(tok, system: str | None, text: str) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


@torch.no_grad()
def recovery_by_loop(base_dir: Path, student_dir: Path, rows: list[dict], tag: str) -> float:
    """1 - residual/effect, token-weighted, one example and one position at a time over full logits."""
    base, student = AutoModelForCausalLM.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(student_dir)
    base_tok, student_tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(student_dir)
    tag_id, vocab = student_tok.convert_tokens_to_ids(tag), len(base_tok)
    effect = residual = 0.0
    for row in rows:
        out = row["output_ids"]
        def logits(model, context):
            full = model(torch.tensor([context + out])).logits[0]
            return full[len(context) - 1 : len(context) - 1 + len(out)]
        teacher = logits(base, chat_ids(base_tok, PROMPT, row["input"]))
        plain = logits(base, chat_ids(base_tok, None, row["input"]))
        tagged = logits(student, chat_ids(student_tok, tag, row["input"]))
        tagged[:, tag_id] = -1e4  # the saved model never writes its tag
        for t in range(len(out)):
            p = torch.softmax(teacher[t], -1)
            effect += float((p * (p.log() - torch.log_softmax(plain[t], -1))).sum())
            residual += float((p * (p.log() - torch.log_softmax(tagged[t], -1)[:vocab])).sum())
    return 1 - residual / effect


def test_port_reruns_the_chain_on_another_architecture_and_reports_both(tiny_model, tiny_data, tmp_path):
    from datasets import load_from_disk

    gpt2 = build_tiny_gpt2(tmp_path / "gpt2")
    outs = tmp_path / "outputs"
    made_by = tiny_overrides(tiny_model, tiny_data, outs, "train.max_steps=4", "train.epochs=2")
    source = train_only(made_by)  # the source is trained, not yet evaluated
    src_train = paths.output_dir("train", source, job_from_config(source))
    model_args = ["model=hf", f"model.path={gpt2}", "model.name=tinygpt2"]

    with pytest.raises(ConfigError, match=r"lora_targets .* name no module.*c_attn"):  # before any work
        port.main([f"from={src_train}", *model_args])
    assert sorted(p.name for p in (outs / "generate").iterdir()) == [paths.output_dir("generate", source, job_from_config(source)).name]

    report_dir = port.main([f"from={src_train}", *model_args, "train.lora_targets=[c_attn]"])
    doc = json.loads((report_dir / "report.json").read_text())
    tgt_train = Path(doc["train"]["target"])
    assert json.loads((tgt_train / "config.json").read_text())["model_type"] == "gpt2"
    assert set(AutoTokenizer.from_pretrained(tgt_train).get_vocab()) == set(AutoTokenizer.from_pretrained(gpt2).get_vocab()) | {"<kind>"}

    # the same settings, with only the model (and the LoRA names of its architecture) changed
    src_cfg, tgt_cfg = outputs.read_manifest(src_train)["config"], outputs.read_manifest(tgt_train)["config"]
    for c in (src_cfg, tgt_cfg):
        c.pop("model"), c["train"].pop("lora_targets"), c.pop("stage"), c.pop("force")
    assert src_cfg == tgt_cfg

    (row,) = doc["sets"]
    assert row["tags"] == ["<kind>"] and doc["models"] == {"source": "tiny", "target": "tinygpt2"}
    for side, model_dir in (("source", tiny_model), ("target", gpt2)):
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.add_special_tokens({"additional_special_tokens": ["<kind>"]})
        assert row[side]["prompt_tokens_saved"] == chat_len(tok, PROMPT, "Hi") - chat_len(tok, "<kind>", "Hi")
    assert row["source"]["prompt_tokens_saved"] != row["target"]["prompt_tokens_saved"]  # two tokenizers

    target_cfg = compose([*made_by, *model_args, "train.lora_targets=[c_attn]"])
    rows = [r for r in load_from_disk(str(paths.output_dir("generate", target_cfg, job_from_config(target_cfg)) / "dataset")) if r["split"] == "heldout"]
    assert row["target"]["recovery"] == pytest.approx(recovery_by_loop(gpt2, tgt_train, rows, "<kind>"), abs=1e-4)
    md = (report_dir / "report.md").read_text()
    assert f"{row['source']['recovery']:.3f} | {row['target']['recovery']:.3f}" in md and "tinygpt2" in md
    assert port.main([f"from={src_train}", *model_args, "train.lora_targets=[c_attn]"]) == report_dir  # done: a no-op

    # an output whose manifest predates recorded configs: reproduced from the overrides that made it, or refused
    manifest = outputs.read_manifest(src_train)
    del manifest["config"]
    outputs.write_json(src_train / "manifest.json", manifest)
    with pytest.raises(ConfigError, match='source="experiment=demo"'):
        port.source_config(src_train, [])
    assert paths.output_dir("train", port.source_config(src_train, made_by), job_from_config(source)) == src_train
    with pytest.raises(ConfigError, match="names .*, not " + src_train.name):
        port.source_config(src_train, [*made_by, "train.max_steps=5"])
    with pytest.raises(ConfigError, match="the source's own model"):
        port.target_config(source, ["model=hf", f"model.path={tiny_model}", "model.name=again"], [])
    with pytest.raises(ConfigError, match="not a finished train output"):
        port.main([f"from={tmp_path / 'gpt2'}", *model_args])
