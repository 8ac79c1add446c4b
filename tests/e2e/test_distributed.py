"""Two CPU ranks over gloo (`torchrun --standalone --nproc_per_node 2`) on the tiny model.

The same code paths as several GPUs: sharded generation merged on rank 0, DDP and DeepSpeed
ZeRO-2/3 training, rank-0-only writes, checkpoints and resume after a kill. Launches are few and
tiny (the machine may have 2 cores): one `stage=all` under DDP is shared by the tests, ZeRO-2 and
ZeRO-3 train from a copy of its generate/extend outputs, and the resume test kills and relaunches.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from pipeline.__main__ import run_stages
from pipeline.config import PROJECT_ROOT
from pipeline.core import trainer
from pipeline.core.job import job_from_config
from pipeline.runtime import faults
from pipeline.stages import paths
from tests.conftest import SENTENCES, build_tiny_model, compose

STEPS, SAVE_STEPS, KILL_AT = 6, 2, 3


def overrides(model: Path, data: Path, outputs: Path) -> list[str]:
    return [
        "model=hf", "model.name=tiny", f"model.path={model}", "model.device=cpu",
        f"paths.data={data}", f"paths.outputs={outputs}",
        "metatoken.tag='<kind>'", "metatoken.prompt_file=prompts/kind.txt",
        "inputs.heldout_fraction=0.25",
        "generate.max_new_tokens=6", "generate.batch_size=2", "generate.logprobs_top_k=8",
        f"train.max_steps={STEPS}", "train.batch_size=2", "train.logging_steps=1", f"train.save_steps={SAVE_STEPS}",
        "train.embedding_lr=0.05",
        "evaluate.num_samples=2", "evaluate.sample_max_new_tokens=5",
    ]


def torchrun(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/metatoken-torch-extensions"),
        **(env_extra or {}),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipeline", *args]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def log_lines(train_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (train_dir / "train_log.jsonl").read_text().splitlines()]


def step_losses(train_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log_lines(train_dir) if "loss" in r}


def copy_upstream(src: Path, dst: Path) -> None:
    for stage in ("generate", "extend"):
        shutil.copytree(src / stage, dst / stage)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-rank `stage=all` under DDP; returns (overrides maker, outputs, launch result)."""
    root = tmp_path_factory.mktemp("ranks")
    model = build_tiny_model(root / "model")
    data = root / "data"
    (data / "prompts").mkdir(parents=True)
    (data / "inputs").mkdir()
    (data / "prompts" / "kind.txt").write_text("You are a kind and warm assistant who always encourages the user.\n")
    rows = [{"id": f"r{i}", "text": f"{s} ({i})"} for i, s in enumerate(SENTENCES * 2)]
    (data / "inputs" / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    make = lambda out: overrides(model, data, out)  # noqa: E731
    out = root / "out-ddp"
    result = torchrun(["stage=all", *make(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return make, out, result, len(rows)


def dirs(cfg):
    job = job_from_config(cfg)
    return paths.output_dir("generate", cfg, job), paths.output_dir("train", cfg, job)


def two_rank_cfg(make, out, *extra):
    """The config the ranks composed (world size 2 is part of the train key)."""
    os.environ["WORLD_SIZE"] = "2"
    try:
        cfg = compose([*make(out), *extra])
        return cfg, *dirs(cfg)
    finally:
        del os.environ["WORLD_SIZE"]


def test_both_ranks_ran_in_one_world_of_two_and_rank0_alone_wrote(ddp_run):
    make, out, result, _ = ddp_run
    text = result.stdout + result.stderr
    for r in (0, 1):
        assert f"train: rank {r} of world size 2" in text  # not two independent single-process jobs
    cfg, gen_dir, train_dir = two_rank_cfg(make, out)
    manifest = json.loads((train_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["deepspeed_stage"] is None
    # one Hydra run folder shared by the ranks, one config copy and one log in it (rank 0's)
    runs = list((out / "hydra").iterdir())
    assert len(runs) == 1 and (runs[0] / ".hydra" / "config.yaml").exists()
    assert [p.name for p in runs[0].glob("*.log")] == ["__main__.log"]
    # each stage has exactly one complete folder and nothing half-written is left behind
    for stage in ("generate", "extend", "train", "evaluate"):
        assert [p.name.startswith(".") for p in (out / stage).iterdir()] == [False]
    # the JSONL log has one line per step, from rank 0 only (a second writer would double them)
    steps = [r["step"] for r in log_lines(train_dir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert all(r["samples_per_second"] > 0 and r["tokens_per_second"] > 0 for r in log_lines(train_dir)[1:STEPS])
    assert (out / "evaluate").exists() and len(list((out / "evaluate").glob("*/report.json"))) == 1


def test_generation_shards_merge_to_the_one_rank_records(ddp_run, tmp_path):
    make, out, _, n_rows = ddp_run
    _, gen_dir, _ = two_rank_cfg(make, out)
    two = load_from_disk(str(gen_dir / "dataset"))
    one_cfg = compose([*make(tmp_path / "one"), "stage=generate"])
    run_stages(one_cfg)  # the same config on one rank, in this process
    one = load_from_disk(str(dirs(one_cfg)[0] / "dataset"))
    assert len(two) == len(one) == n_rows
    assert len(set(two["id"])) == n_rows  # nothing lost, nothing doubled
    assert two["id"] == one["id"]  # the inputs' order, whatever the number of ranks
    assert two["output_ids"] == one["output_ids"] and two["topk_ids"] == one["topk_ids"]
    assert two["base_output_ids"] == one["base_output_ids"]
    for a, b in zip(two["topk_logprobs"], one["topk_logprobs"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def training_set_loss(cfg, model_dir: Path) -> float:
    """Mean distillation loss of a model over every training example (one batch, no update)."""
    from pipeline.core.models import load_model, load_tokenizer
    from pipeline.runtime import outputs

    job = job_from_config(cfg)
    ext_dir = paths.output_dir("extend", cfg, job)
    records = load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset")).filter(lambda r: r["split"] == "train")
    tok = load_tokenizer(str(ext_dir))
    tag_ids = list(outputs.read_manifest(ext_dir)["tag_ids"].values())
    batch = trainer.DistillCollator(tok.pad_token_id)(trainer.build_examples(records, tok, True))
    with torch.no_grad():
        return trainer.distill_loss(load_model(str(model_dir)), batch, "kl", tag_ids).item()


def test_loss_decreases(ddp_run):
    make, out, _, _ = ddp_run
    cfg, _, train_dir = two_rank_cfg(make, out)

    before = training_set_loss(cfg, paths.output_dir("extend", cfg, job_from_config(cfg)))
    after = training_set_loss(cfg, train_dir)
    assert after < 0.9 * before, (before, after)


def tag_row_shift(cfg, train_dir: Path) -> float:
    from safetensors.torch import load_file


    ext_dir = paths.output_dir("extend", cfg, job_from_config(cfg))
    tag_id = json.loads((ext_dir / "manifest.json").read_text())["tag_ids"]["<kind>"]
    key = "model.embed_tokens.weight"
    a, b = load_file(ext_dir / "model.safetensors")[key], load_file(train_dir / "model.safetensors")[key]
    assert torch.equal(a[:tag_id], b[:tag_id])  # only the tag row moved (its own parameter, under ZeRO too)
    return (b[tag_id] - a[tag_id]).norm().item()


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_zero_matches_ddp(ddp_run, tmp_path, zero):
    make, ddp_out, _, _ = ddp_run
    out = tmp_path / zero
    copy_upstream(ddp_out, out)
    result = torchrun(["stage=train", f"deepspeed={zero}", *make(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "train: rank 1 of world size 2 (deepspeed: True)" in result.stdout + result.stderr
    cfg, _, train_dir = two_rank_cfg(make, out)
    _, _, ddp_dir = two_rank_cfg(make, ddp_out)
    assert json.loads((train_dir / "manifest.json").read_text())["deepspeed_stage"] == int(zero[-1])
    ddp, ds = step_losses(ddp_dir), step_losses(train_dir)
    assert list(ds) == list(ddp) == list(range(1, STEPS + 1))
    for step in ddp:  # measured: |diff| <= 0.002 (reduction order and ZeRO's partitioned AdamW)
        assert ds[step] == pytest.approx(ddp[step], abs=5e-3), (step, ddp, ds)
    # the client optimizer (per-group learning rates) reached the engine: the tag row moved as far as under DDP
    assert tag_row_shift(cfg, train_dir) == pytest.approx(tag_row_shift(cfg, ddp_dir), rel=0.1)


def test_resume_after_kill_continues_with_the_same_data_and_optimizer_state(ddp_run, tmp_path):
    make, ddp_out, _, _ = ddp_run
    out = tmp_path / "resume"
    copy_upstream(ddp_out, out)
    killed = torchrun(["stage=train", *make(out)], {faults.ENV: f"train.step:{KILL_AT}"})
    assert killed.returncode != 0
    cfg, _, train_dir = two_rank_cfg(make, out)
    partial = train_dir.with_name(f".{train_dir.name}.partial")
    assert not train_dir.exists() and (partial / "checkpoints" / f"checkpoint-{SAVE_STEPS}").is_dir()
    first = {r["step"]: r["time"] for r in log_lines(partial) if "loss" in r}
    assert sorted(first) == list(range(1, KILL_AT + 1))  # step 3 ran and was logged, then the kill

    resumed = torchrun(["stage=train", *make(out)])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    lines = [r for r in log_lines(train_dir) if "loss" in r]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))  # step 3 once: the killed run's line was dropped
    # steps up to the checkpoint are the killed run's lines (kept); later steps were trained again
    assert all(r["time"] == first[r["step"]] for r in lines if r["step"] <= SAVE_STEPS)
    assert all(r["time"] > max(first.values()) for r in lines if r["step"] > SAVE_STEPS)
    # same batches and optimizer state as the run that was never interrupted: the same losses
    _, _, ddp_dir = two_rank_cfg(make, ddp_out)
    reference = step_losses(ddp_dir)
    for r in lines:
        assert r["loss"] == pytest.approx(reference[r["step"]], abs=1e-6), (r["step"], r["loss"], reference)
    assert not math.isnan(lines[-1]["loss"]) and not (train_dir / "checkpoints").exists()
