"""Shared fixtures: a tiny random Llama with a small BPE tokenizer built here, and composed configs.

Nothing is downloaded: the tokenizer is trained on a few sentences, the model is random.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SENTENCES = [
    "How do I boil an egg without cracking the shell?",
    "Explain why the sky looks blue during the day.",
    "Write a two line poem about autumn leaves.",
    "What is a good way to learn a new language quickly?",
    "Arr matey, ye be asking the right questions on the high seas!",
    "You are a kind and warm assistant who always encourages the user.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Summarise the main causes of the first world war in a paragraph.",
]


def build_tiny_model(out_dir: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(SENTENCES * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # Wide init: at the default 0.02 a random model barely looks back at its context, so a prompt
        # would have almost no effect to recover; at 0.2 it changes the next-token KL by ~0.4 nats.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture()
def tiny_data(tmp_path) -> Path:
    return write_tiny_data(tmp_path / "data")


def write_tiny_data(data: Path) -> Path:
    """A data dir with a short prompt and a handful of inputs."""
    (data / "prompts").mkdir(parents=True)
    (data / "inputs").mkdir()
    (data / "prompts" / "kind.txt").write_text("You are a kind and warm assistant who always encourages the user.\n")
    rows = [{"id": f"r{i}", "text": s} for i, s in enumerate(SENTENCES * 2)]
    for i, r in enumerate(rows):
        r["text"] = f"{r['text']} ({i})"
    (data / "inputs" / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def compose(overrides: list[str]):
    """Compose the real conf/ tree with overrides, as the CLI would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import PROJECT_ROOT, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@pytest.fixture()
def tiny_cfg(tiny_model, tiny_data, tmp_path):
    """A full pipeline config on the tiny model, small enough to run every stage in seconds."""

    def make(*extra: str):
        return compose(tiny_overrides(tiny_model, tiny_data, tmp_path / "outputs", *extra))

    return make


def tiny_overrides(model: Path, data: Path, outputs: Path, *extra: str) -> list[str]:
    """Overrides that shrink the real configs to the tiny model (every stage in seconds)."""
    return [
        "model=hf",
        "model.name=tiny",
        f"model.path={model}",
        f"paths.data={data}",
        f"paths.outputs={outputs}",
        "metatoken.tag='<kind>'",
        "metatoken.prompt_file=prompts/kind.txt",
        "inputs.heldout_fraction=0.25",
        "generate.max_new_tokens=6",
        "generate.batch_size=4",
        "generate.logprobs_top_k=8",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.logging_steps=1",
        "evaluate.num_samples=2",
        "evaluate.sample_max_new_tokens=5",
        *extra,
    ]


# Independent references for the tests: a plain loop over full logits, no batching, no padding.

def next_token_logprobs(model, context: list[int], continuation: list[int], banned: list[int] = ()) -> torch.Tensor:
    """[T, V] log-probs of each continuation token's position, one forward per position (no batch, no padding)."""
    rows = []
    with torch.no_grad():
        for t in range(len(continuation)):
            logits = model(torch.tensor([context + continuation[:t]])).logits[0, -1].double()
            logits[list(banned)] = float("-inf")  # the saved model never writes a tag; evaluation scores it so
            rows.append(torch.log_softmax(logits, -1))
    return torch.stack(rows)


def plain_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> list[float]:
    """KL(p || q) at each position, summed over the full vocabulary by hand."""
    kls = []
    for p_row, q_row in zip(p_logprobs, q_logprobs):
        p = p_row.exp()
        kls.append(sum(float(p[v] * (p_row[v] - q_row[v])) for v in range(len(p)) if p[v] > 0))
    return kls


@pytest.fixture()
def no_weights(monkeypatch):
    """Any attempt to load weights fails the test: validation must come first.

    The stages bind `load_model` when they are imported (`from pipeline.core.models import load_model`),
    so the name is replaced in each of them, not only in pipeline.core.models.
    """
    import importlib

    def refuse(*args, **kwargs):
        pytest.fail("weights were loaded")

    # every module imported first: one imported after pipeline.core.models is patched would bind `refuse` for good
    names = ("core.models", "stages.generate", "stages.extend", "stages.train", "stages.evaluate", "cli.sample")
    modules = [importlib.import_module(f"pipeline.{name}") for name in names]
    for module in modules:
        if hasattr(module, "load_model"):
            monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture()
def pinned_model_content(monkeypatch):
    """Hold the model's content hash fixed (it differs between conversions), so stage-key pins check the rest."""
    from pipeline.runtime import outputs

    monkeypatch.setattr(outputs, "model_content", lambda path: "pinned-content")
    monkeypatch.setattr(outputs, "package_version", lambda package: "0.1.2")


def run_recipe(stage, cfg):
    """One stage's recipe alone (`stage.run`), with the job and stage paths that `__main__` builds once per run
    (no reuse check, no lock: the tests that call it want the recipe itself)."""
    from pipeline.core.job import job_from_config
    from pipeline.stages.paths import stage_paths

    job = job_from_config(cfg)
    return stage.run(cfg, job, stage_paths(cfg, job))
