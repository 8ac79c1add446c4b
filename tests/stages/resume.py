"""A training run cut after its step-2 checkpoint and run again, beside an uninterrupted run of the same config."""
import shutil

import pytest
from transformers import AutoModelForCausalLM

from pipeline.core import trainer
from pipeline.stages import paths, train
from tests.conftest import run_recipe


def uninterrupted_and_resumed(cfg, job, monkeypatch) -> tuple[dict, dict]:
    """(state dict of an uninterrupted run, state dict of a run killed at step 3 and resumed); generate and extend
    must have run. Asserts the step-2 checkpoint was there to resume from."""
    run_recipe(train, cfg)
    out = paths.output_dir("train", cfg, job)
    reference = AutoModelForCausalLM.from_pretrained(out).state_dict()
    shutil.rmtree(out)
    calls = {"n": 0}
    original = trainer.DistillTrainer.compute_loss

    def crash_on_third_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated stop after the step-2 checkpoint")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer.DistillTrainer, "compute_loss", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(train, cfg)
    assert (out.with_name(f".{out.name}.partial") / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(trainer.DistillTrainer, "compute_loss", original)
    run_recipe(train, cfg)
    return reference, AutoModelForCausalLM.from_pretrained(out).state_dict()
