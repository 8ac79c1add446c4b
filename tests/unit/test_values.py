"""Every bad value stops before compute: closed choices at composition, ranges in one pass before any stage."""
import json

import pytest
from hydra.errors import ConfigCompositionException

import pipeline.core.models
from pipeline.__main__ import run_stages
from pipeline.errors import ConfigError
from tests.conftest import compose


@pytest.fixture()
def no_weights(monkeypatch):
    """Any attempt to load weights fails the test: validation must come first."""
    monkeypatch.setattr(pipeline.core.models, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))


CHOICES = [
    ("stage=evalute", "synthesize, generate, extend, train, evaluate, all"),
    ("train.objective=kll", "kl, sft, onpolicy"),
    ("train.onpolicy_loss=kl", "reverse_kl, jsd"),
    ("train.params=lora2", "embedding, lora, full"),
    ("train.teacher=live", "recorded, online"),
    ("train.mode=pretrian", "finetune, pretrain"),
    ("train.pretrain.tag_position=end", "start, random"),
    ("extend.init=foo", "name_mean, prompt_mean, vocab_mean, random"),
    ("generate.backend=tpu", "hf, vllm"),
    ("generate.teacher_mode=guess", "expand, bootstrap"),
    ("mixture.order=shuffled", "given, sorted, random"),
    ("model.dtype=float8", "float32, float16, bfloat16"),
]


@pytest.mark.parametrize("override, allowed", CHOICES, ids=[c[0] for c in CHOICES])
def test_a_closed_choice_fails_at_composition_naming_the_allowed_values(override, allowed):
    with pytest.raises(ConfigCompositionException) as caught:
        compose([override])
    assert f"expected one of [{allowed}]" in str(caught.value.__cause__)


RANGES = [
    (["train.lr=-1"], r"train.lr is -1.0\. Fix: use a learning rate above 0"),
    (["train.params=embedding", "train.embedding_lr=0"], r"train.embedding_lr is 0.0\. Fix"),
    (["train.max_steps=-1", "train.epochs=0"], r"train.epochs is 0.0 and train.max_steps is -1: nothing would train"),
    (["train.batch_size=0"], r"train.batch_size is 0\. Fix: it must be at least 1"),
    (["train.grad_accum=0"], r"train.grad_accum is 0\."),
    (["generate.batch_size=0"], r"generate.batch_size is 0\."),
    (["generate.max_new_tokens=0"], r"generate.max_new_tokens is 0\."),
    (["generate.temperature=0"], r"generate.temperature is 0.0\."),
    (["evaluate.batch_size=0"], r"evaluate.batch_size is 0\."),
    (["inputs.heldout_fraction=0"], r"inputs.heldout_fraction is 0.0\. Fix: it must be between 0 and 1, exclusive"),
    (["inputs.heldout_fraction=1"], r"inputs.heldout_fraction is 1.0\."),
    (["inputs.max_heldout=0"], r"inputs.max_heldout is 0\."),
    (["train.save_total_limit=0"], r"train.save_total_limit is 0\."),
    (["generate.logprobs_top_k=100000"], r"generate.logprobs_top_k is 100000, more than the \d+ tokens"),
]


# every range fails for stage=all; the ones a later stage needs fail for that stage alone too (the
# vocabulary check needs the tokenizer generate reads, so it runs with stage=all/generate/extend)
CASES = [(o, m, "all") for o, m in RANGES] + [(o, m, "train") for o, m in RANGES if "logprobs_top_k" not in o[0]]


@pytest.mark.parametrize("overrides, message, stage", CASES, ids=[f"{c[2]}: {' '.join(c[0])}" for c in CASES])
def test_a_value_out_of_range_fails_before_any_weights_load(tiny_cfg, no_weights, overrides, message, stage):
    with pytest.raises(ConfigError, match=message):
        run_stages(tiny_cfg(f"stage={stage}", *overrides))


def test_epochs_zero_no_longer_runs_a_step(tiny_cfg, no_weights):
    """Before: `train.epochs=0` reported 0 steps while the Trainer ran one (max_steps=0 means 'use epochs')."""
    with pytest.raises(ConfigError, match="nothing would train"):
        run_stages(tiny_cfg("train.max_steps=-1", "train.epochs=0"))


def _write_inputs(tiny_data, rows) -> str:
    path = tiny_data / "inputs" / "custom.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f"inputs.file={path}"


def test_one_row_file_has_no_heldout_input_and_says_so(tiny_cfg, tiny_data, no_weights):
    override = _write_inputs(tiny_data, [{"id": "only", "text": "How do I boil an egg?"}])
    with pytest.raises(ConfigError, match=r"1 input\(s\) give \d training and \d held-out .* no (held-out|training) input"):
        run_stages(tiny_cfg(override))


def test_context_window_is_checked_on_the_longest_input_in_tokens(tiny_cfg, tiny_data, tiny_model, no_weights):
    """A short row of emoji is longer in tokens than a long row of plain words: the check must see it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    words, emoji = "the quick brown fox " * 40, "\U0001F600" * 300
    assert len(words) > len(emoji)  # by characters the word row is the longest ...
    assert len(tok(emoji)["input_ids"]) > 1024 > len(tok(words)["input_ids"])  # ... by tokens the emoji row is
    override = _write_inputs(tiny_data, [{"id": f"w{i}", "text": words} for i in range(6)] + [{"id": "e", "text": emoji}])
    with pytest.raises(ConfigError, match=r"the teacher's context needs \d+ tokens .* more than the model's window of 1024"):
        run_stages(tiny_cfg(override, "inputs.heldout_fraction=0.5"))
