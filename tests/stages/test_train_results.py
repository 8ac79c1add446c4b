"""Training results that used to be silently wrong: the loss after a resume, checkpoints kept, and the
pretrain loss under gradient accumulation."""
import json

import pytest

import pipeline.core.trainer as trainer_module
from pipeline.__main__ import run_stages
from pipeline.core import trainer
from pipeline.core.job import job_from_config
from pipeline.runtime import outputs
from pipeline.stages import paths, train
from tests.conftest import run_recipe


def test_whole_run_loss_weights_the_two_parts_by_their_steps():
    # steps 1-2 summed to 3.0 (mean 1.5), steps 3-4 averaged 0.5: the run's mean is (3 + 1) / 4
    assert trainer.whole_run_loss(3.0, 2, 0.5, 4) == pytest.approx(1.0)
    assert trainer.whole_run_loss(0.0, 0, 0.7, 5) == pytest.approx(0.7)


def _logged_losses(out):
    return [e["loss"] for e in json.loads((out / "train_log.json").read_text()) if "loss" in e]


def test_resumed_run_reports_the_whole_runs_loss_and_keeps_two_checkpoints(tiny_cfg, tmp_path, monkeypatch):
    common = ("train.max_steps=4", "train.save_steps=1", "train.logging_steps=1")
    reference_cfg = tiny_cfg(f"paths.outputs={tmp_path / 'reference'}", *common)
    run_stages(reference_cfg)
    reference = paths.output_dir("train", reference_cfg, job_from_config(reference_cfg))
    per_step = _logged_losses(reference)
    assert len(per_step) == 4

    cfg = tiny_cfg(f"paths.outputs={tmp_path / 'resumed'}", *common)
    for stage in ("generate", "extend"):
        run_stages(tiny_cfg(f"paths.outputs={tmp_path / 'resumed'}", *common, f"stage={stage}"))
    real_loss, calls = trainer_module.distill_loss, {"n": 0}

    def stop_at_step_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated stop after the step-3 checkpoint")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "distill_loss", stop_at_step_four)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(train, cfg)
    out = paths.output_dir("train", cfg, job_from_config(cfg))
    kept = sorted(p.name for p in (out.with_name(f".{out.name}.partial") / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-3"]  # train.save_total_limit=2 (before: all three stayed)
    monkeypatch.setattr(trainer_module, "distill_loss", real_loss)
    run_recipe(train, cfg)
    final = outputs.read_manifest(out)["final_loss"]
    # Before the fix this was the mean of steps 4 alone (the part after the resume).
    assert final == pytest.approx(sum(per_step) / 4, rel=1e-4)
    assert final == pytest.approx(outputs.read_manifest(reference)["final_loss"], rel=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_trains_the_student_under_bf16_autocast_and_saves_float32_weights(tiny_cfg, tmp_path, monkeypatch, bf16):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(f"paths.outputs={tmp_path}", "train.max_steps=2", f"train.bf16={str(bf16).lower()}")
    for stage in ("generate", "extend"):
        run_stages(tiny_cfg(f"paths.outputs={tmp_path}", f"stage={stage}"))
    real_loss, dtypes = trainer_module.distill_loss, []

    def spy(model, *args, **kwargs):  # the dtype each Linear of the student computes in, during a training step
        hooks = [m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
                 for m in model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            return real_loss(model, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(trainer_module, "distill_loss", spy)
    run_recipe(train, cfg)
    assert dtypes and set(dtypes) == {torch.bfloat16 if bf16 else torch.float32}
    out = paths.output_dir("train", cfg, job_from_config(cfg))
    manifest = outputs.read_manifest(out)
    assert manifest["final_loss"] == manifest["final_loss"] and manifest["final_loss"] > 0  # finite, not NaN
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in saved.parameters()} == {torch.float32}  # autocast only; master weights stay fp32
    # the flag is in the train key only when on: float32 runs keep their folders
    assert ("bf16" in paths.train_key(cfg, job_from_config(cfg))["train"]) == bf16
