"""Real processes killed with SIGKILL mid-job; the same command then finishes without losing or repeating work."""
import os
import subprocess
import sys

from datasets import load_from_disk

from pipeline.config import PROJECT_ROOT
from pipeline.core.job import job_from_config
from pipeline.runtime import faults
from pipeline.stages import paths
from tests.conftest import tiny_overrides


def launch(overrides: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "progress=false", *overrides],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_generate_killed_after_some_batches_resumes_without_loss_or_duplicates(tiny_model, tiny_data, tmp_path):
    from tests.conftest import compose

    common = tiny_overrides(tiny_model, tiny_data, tmp_path / "killed") + ["stage=generate", "generate.batch_size=2"]
    killed = launch(common, {faults.ENV: "generate.shard:3"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no cleanup ran
    cfg = compose(common)
    out = paths.output_dir("generate", cfg, job_from_config(cfg))
    shards = sorted(out.with_name(f".{out.name}.partial").glob("shards/*/batch-*.json"))
    assert len(shards) == 3 and not out.exists()  # three finished batches on disk, no half-made result

    resumed = launch(common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = tiny_overrides(tiny_model, tiny_data, tmp_path / "uninterrupted") + ["stage=generate", "generate.batch_size=2"]
    assert launch(reference).returncode == 0
    ref_cfg = compose(reference)
    a = load_from_disk(str(out / "dataset")).to_list()
    b = load_from_disk(str(paths.output_dir("generate", ref_cfg, job_from_config(ref_cfg)) / "dataset")).to_list()
    assert len(a) == len(b) and len({(r["split"], r["id"]) for r in a}) == len(a)  # nothing lost, nothing twice
    assert a == b  # and exactly what an uninterrupted run writes
    assert not out.with_name(f".{out.name}.partial").exists()
