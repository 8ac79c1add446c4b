"""The vLLM backend's translation to our records, and its wiring, against a stand-in for the engine.

vLLM itself needs a GPU and is not installed here; these tests check everything on our side of the
engine's API (what we ask for, how its completions become records) with a fake `vllm` module.
"""
import sys
import types
from types import SimpleNamespace as NS

import pytest
from datasets import load_from_disk
from omegaconf import OmegaConf

from pipeline.__main__ import run_stages
from pipeline.config import GenerateConfig
from pipeline.core import sampling, vllm_backend
from pipeline.core.job import job_from_config
from pipeline.stages import paths


def completion(token_ids, steps):
    return NS(token_ids=token_ids, logprobs=[{t: NS(logprob=lp, rank=None) for t, lp in s.items()} for s in steps])


def test_record_keeps_the_k_most_likely_best_first():
    # step 2: the sampled token 9 is outside the top-2 and comes as an extra entry
    done = completion([5, 9], [{5: -0.1, 7: -2.5, 3: -4.0}, {9: -6.0, 1: -0.5, 2: -1.0}])
    record = vllm_backend.record_from_completion(done, k=2)
    assert record == {"output_ids": [5, 9], "topk_ids": [[5, 7], [1, 2]], "topk_logprobs": [[-0.1, -2.5], [-0.5, -1.0]]}


def fake_vllm(calls: list):
    module = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")

    class LLM:
        def __init__(self, **kwargs):
            calls.append(("engine", kwargs))

        def generate(self, prompts, params):
            calls.append(("generate", len(prompts), params))
            return [NS(outputs=[completion([11, 12], [{11: -0.2, 4: -1.9}, {12: -0.3, 4: -1.5}])]) for _ in prompts]

    module.LLM = LLM
    module.SamplingParams = lambda **kw: kw
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    module.inputs = inputs
    return module, inputs


@pytest.fixture()
def engine_calls(monkeypatch):
    """The stand-in `vllm` installed for one test; yields the list of what was asked of it."""
    calls = []
    module, inputs = fake_vllm(calls)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    vllm_backend.engine.cache_clear()  # no engine from another test (or a real one) is reused
    yield calls
    vllm_backend.engine.cache_clear()


def test_generate_with_backend_vllm_writes_the_usual_dataset(tiny_cfg, engine_calls):
    cfg = tiny_cfg("stage=generate", "generate.backend=vllm", "generate.logprobs_top_k=2")
    run_stages(cfg)
    rows = load_from_disk(str(paths.output_dir("generate", cfg, job_from_config(cfg)) / "dataset")).to_list()
    assert rows and all(r["output_ids"] == [11, 12] and r["topk_ids"] == [[11, 4], [12, 4]] for r in rows)
    engine_kwargs = next(c[1] for c in engine_calls if c[0] == "engine")
    assert engine_kwargs["enable_prefix_caching"] and engine_kwargs["logprobs_mode"] == "raw_logprobs"
    params = next(c[2] for c in engine_calls if c[0] == "generate")[0]
    assert params["logprobs"] == 2 and params["max_tokens"] == cfg.generate.max_new_tokens


def test_vllm_calls_are_sharded_and_a_restart_samples_only_the_missing_shard(tmp_path, engine_calls):
    cfg = OmegaConf.structured(GenerateConfig(backend="vllm", vllm_shard_size=2, logprobs_top_k=2))
    contexts = [[1, 2, 3], [1, 2], [4], [5, 6], [7]]
    first = sampling.sample_all("model-dir", None, contexts, cfg, "x", tmp_path)
    assert [c[1] for c in engine_calls if c[0] == "generate"] == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch-00000.json", "batch-00001.json", "batch-00002.json"]
    seeds = [[p["seed"] for p in c[2]] for c in engine_calls if c[0] == "generate"]
    (tmp_path / "batch-00001.json").unlink()  # as if killed while sampling the second shard
    engine_calls.clear()
    again = sampling.sample_all("model-dir", None, contexts, cfg, "x", tmp_path)
    assert [(c[1], [p["seed"] for p in c[2]]) for c in engine_calls if c[0] == "generate"] == [(2, seeds[1])]
    assert again == first


def test_every_vllm_request_has_its_own_seed_fixed_by_its_input_whatever_the_shard_size(tmp_path, engine_calls):
    """Before: one SamplingParams (one seed) for the whole shard, so all its requests drew the same stream."""
    contexts = [[1, 2, 3], [1, 2], [4], [5, 6], [7]]
    per_input = {}
    for size in (2, 5):
        engine_calls.clear()
        cfg = OmegaConf.structured(GenerateConfig(backend="vllm", vllm_shard_size=size, logprobs_top_k=2, seed=3))
        sampling.sample_all("model-dir", None, contexts, cfg, "x", tmp_path / str(size))
        calls = [c for c in engine_calls if c[0] == "generate"]
        assert all(isinstance(c[2], list) and len(c[2]) == c[1] for c in calls)  # one SamplingParams per request
        per_input[size] = [p["seed"] for c in calls for p in c[2]]
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # the sampler's longest-first plan
    assert per_input[2] == per_input[5] == [3 * 1_000_003 + i for i in order]
    assert len(set(per_input[2])) == len(contexts)


def test_vllm_engine_loads_the_configured_dtype(tiny_cfg, engine_calls):
    """Before: the engine was always built with dtype=float32, whatever model.dtype said."""
    run_stages(tiny_cfg("stage=generate", "generate.backend=vllm", "generate.logprobs_top_k=2", "model.dtype=bfloat16"))
    assert {c[1]["dtype"] for c in engine_calls if c[0] == "engine"} == {"bfloat16"}
