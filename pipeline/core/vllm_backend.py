"""Optional generation backend on vLLM (GPU machines): prefix caching and per-position top-k
log-probabilities are built into the engine. Selected with `generate.backend=vllm`; vLLM is imported
only then, and is not a dependency of this project (`pip install vllm` on a GPU machine).

It writes the same records as the Hugging Face path: `output_ids` (ending at EOS when the teacher
stopped), `topk_ids` and `topk_logprobs` at every generated position. vLLM's default
`logprobs_mode="raw_logprobs"` gives the model's own distribution (before temperature and top-p),
which is what the HF path records too.

    python -m pipeline stage=generate metatoken=nice generate.backend=vllm model.device=cuda
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=2)
def engine(model_path: str, dtype: str):
    """One vLLM engine per model (building one costs seconds to minutes)."""
    from vllm import LLM

    return LLM(model=model_path, dtype=dtype, enable_prefix_caching=True, logprobs_mode="raw_logprobs")


def record_from_completion(completion, k: int) -> dict:
    """One vLLM completion -> our record. Each step's logprob dict holds the top-k and, when it is not
    among them, the sampled token too; keep the k most likely, best first."""
    topk_ids, topk_logprobs = [], []
    for step in completion.logprobs:
        best = sorted(step.items(), key=lambda item: -item[1].logprob)[:k]
        topk_ids.append([token for token, _ in best])
        topk_logprobs.append([entry.logprob for _, entry in best])
    return {"output_ids": list(completion.token_ids), "topk_ids": topk_ids, "topk_logprobs": topk_logprobs}


def sample_all(model_path: str, contexts: list[list[int]], gen_cfg, seeds: list[int], dtype: str = "float32") -> list[dict]:
    """Sample every context with vLLM in one engine call (it batches and caches the shared prompt
    itself). `generate.sample_all` calls this once per shard, so a killed job resumes.

    Each request gets its own seed (`seeds[i]`, fixed by the input's index): with one seed for a whole
    call, every request would draw the same random stream. The engine loads the weights in `dtype`.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(
            temperature=gen_cfg.temperature,
            top_p=gen_cfg.top_p,
            max_tokens=gen_cfg.max_new_tokens,
            logprobs=gen_cfg.logprobs_top_k,
            seed=seed,
        )
        for seed in seeds
    ]
    results = engine(model_path, str(dtype)).generate([TokensPrompt(prompt_token_ids=c) for c in contexts], params)
    return [record_from_completion(r.outputs[0], gen_cfg.logprobs_top_k) for r in results]
