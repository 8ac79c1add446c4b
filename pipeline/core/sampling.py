"""Sampling from a model: batched samples with their top-k log-probs (the teacher data generate records), and
one answer to one context (what evaluate shows and `python -m pipeline.sample` prints).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from pipeline.core import vllm_backend  # imports vllm itself only when it runs
from pipeline.core.teacher import prompt_kv, reading_prompt, shared_prefix_length
from pipeline.runtime import distributed, faults, outputs
from pipeline.runtime.progress import tqdm  # bars only when someone watches (progress=...)


@torch.no_grad()
def sample_with_logprobs(
    model, tokenizer, contexts: list[list[int]], gen_cfg, seed: int, prompt=None, suppress_ids: list[int] | None = None
) -> list[dict]:
    """Sample one continuation per context and keep the top-k log-probs at every generated position.

    With `prompt` (a `teacher.PromptKV`), the first `len(prompt)` tokens, the same in every context,
    are read from its keys and values instead of being computed again. The rest of each context is left-padded
    after that prefix; padding is masked and position ids skip it, so every row sees exactly its
    own context. A continuation ends at (and includes) the first EOS, so the student also learns
    where the teacher stops. `suppress_ids` (a student's tags) are never sampled.
    """
    device = model.device
    pad_id = tokenizer.pad_token_id
    prefix_len = len(prompt) if prompt is not None else 0
    suffixes = [c[prefix_len:] for c in contexts]
    width = max(len(s) for s in suffixes)
    length = prefix_len + width
    input_ids = torch.full((len(contexts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, (ctx, suffix) in enumerate(zip(contexts, suffixes)):
        input_ids[b, :prefix_len] = torch.tensor(ctx[:prefix_len], dtype=torch.long)
        attention_mask[b, :prefix_len] = 1
        input_ids[b, length - len(suffix) :] = torch.tensor(suffix)
        attention_mask[b, length - len(suffix) :] = 1
    reading = reading_prompt(model, prompt, len(contexts)) if prefix_len else contextlib.nullcontext(None)
    torch.manual_seed(seed)
    with reading as past:
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            past_key_values=past,
            do_sample=True,
            temperature=gen_cfg.temperature,
            top_p=gen_cfg.top_p,
            top_k=0,
            max_new_tokens=gen_cfg.max_new_tokens,
            pad_token_id=pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            **({"suppress_tokens": list(suppress_ids)} if suppress_ids else {}),
        )
    new_tokens = generated.sequences[:, length:].cpu()
    # Raw logits (before temperature / top-p), so the recorded distribution is the model's own.
    logprobs = torch.log_softmax(torch.stack(generated.logits, dim=1).float(), dim=-1).cpu()
    top_logprobs, top_ids = logprobs.topk(gen_cfg.logprobs_top_k, dim=-1)
    eos_ids = set(_eos_ids(model, tokenizer))
    results = []
    for b in range(len(contexts)):
        ids = new_tokens[b].tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))
        results.append(
            {
                "output_ids": ids[:end],
                "topk_ids": top_ids[b, :end].tolist(),
                "topk_logprobs": top_logprobs[b, :end].tolist(),
            }
        )
    return results


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted(set(eos) | {tokenizer.eos_token_id})


def sample_all(
    model, tokenizer, contexts, gen_cfg, desc: str, shard_dir: Path | None = None, dtype: str = "float32"
) -> list[dict]:
    """Batch the contexts (longest first, to waste little padding) and sample them all.

    With `gen_cfg.backend=vllm`, a "batch" is one engine call of `gen_cfg.vllm_shard_size` inputs.
    With `shard_dir`, each finished batch is written there at once (atomically), and batches whose
    shard exists are read back instead of sampled: a killed job restarted with the same command
    continues where it stopped, without losing or repeating a record. The batch plan and seeds do
    not depend on what was done before, so the result equals an uninterrupted run's.

    With `gen_cfg.prompt_cache`, the prefix all contexts share (the prompt) is run through the
    model once, and every batch reads its keys and values (shared, not copied: see teacher.py). Under several ranks the
    batches (planned the same way on every rank) are dealt round-robin, so each batch, its seed
    included, is exactly what one rank would have sampled.
    """
    prefix_len = shared_prefix_length(contexts) if gen_cfg.prompt_cache else 0
    prompt = None  # computed on the first batch that needs sampling (none, when resuming a finished group)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    vllm = gen_cfg.backend == "vllm"  # the engine batches and caches the shared prompt itself; we shard its calls
    size = gen_cfg.vllm_shard_size if vllm else gen_cfg.batch_size
    if shard_dir is not None:
        shard_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = [None] * len(contexts)
    bar = tqdm(total=len(contexts), desc=desc, unit="sample", disable=not distributed.is_main())
    for batch_index, start in enumerate(range(0, len(order), size)):
        if not distributed.owns_batch(batch_index):  # several ranks: each samples its own batches
            continue
        chunk = order[start : start + size]
        shard = shard_dir / f"batch-{batch_index:05d}.json" if shard_dir is not None else None
        if shard is not None and shard.is_file():
            sampled = json.loads(shard.read_text())
        else:
            # The seed depends on the batch's first input, not on the order batches run in.
            seed = gen_cfg.seed * 1_000_003 + chunk[0]
            if vllm:  # `model` is the model's path: vLLM loads it itself; one seed per request, by input index
                seeds = [gen_cfg.seed * 1_000_003 + i for i in chunk]
                sampled = vllm_backend.sample_all(model, [contexts[i] for i in chunk], gen_cfg, seeds, dtype)
            else:
                if prefix_len and prompt is None:
                    prompt = prompt_kv(model, contexts[0][:prefix_len])
                sampled = sample_with_logprobs(model, tokenizer, [contexts[i] for i in chunk], gen_cfg, seed, prompt)
            if shard is not None:
                outputs.write_json(shard, sampled)
                faults.reached("generate.shard")
        for i, r in zip(chunk, sampled):
            results[i] = r
        bar.update(len(chunk))
    bar.close()
    return distributed.merge_shards(results)  # by input index: the same records whatever the number of ranks


@torch.no_grad()
def sample_answer(
    model, tokenizer, context: list[int], temperature: float, top_p: float, max_new_tokens: int, seed: int,
    suppress_ids: list[int] | None = None, streamer=None,
) -> list[int]:
    """One answer to one context: the new token ids (temperature 0: greedy). The one path that evaluate's
    shown samples and `python -m pipeline.sample` take; `suppress_ids` (tags) are never written."""
    ids = torch.tensor([context], device=model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        # Explicit, not only from the saved generation config: an adapter folder or a copied model may lack it.
        **({"suppress_tokens": list(suppress_ids)} if suppress_ids else {}),
        **(sampling if temperature > 0 else {"do_sample": False}),
    )
    return out[0, ids.shape[1] :].tolist()


def sample_student(student, tok, contexts, gen_cfg, eval_cfg) -> list[str]:
    """The student's own answers with the tags (its generation config suppresses tags: it never writes one)."""
    return [
        tok.decode(
            sample_answer(student, tok, context, gen_cfg.temperature, gen_cfg.top_p, eval_cfg.sample_max_new_tokens, eval_cfg.seed),
            skip_special_tokens=True,
        )
        for context in contexts
    ]


@torch.no_grad()
def sample_answers(model, tok, contexts, gen_cfg, tag_ids: list[int]) -> tuple[list[str], list[list[int]]]:
    """The model's answers with generate's sampling settings (temperature, top-p, length, per-batch seeds),
    so a probe compares it with the teacher's and the base model's answers like for like; tags are never sampled.

    Returns (decoded answers, their token ids), in the order of `contexts`.
    """
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # longest first, as generate batches
    ids: list = [None] * len(contexts)
    for start in tqdm(range(0, len(order), gen_cfg.batch_size), desc="student answers", unit="batch", leave=False):
        chunk = order[start : start + gen_cfg.batch_size]
        seed = gen_cfg.seed * 1_000_003 + chunk[0]
        sampled = sample_with_logprobs(model, tok, [contexts[i] for i in chunk], gen_cfg, seed, suppress_ids=tag_ids)
        for i, record in zip(chunk, sampled):
            ids[i] = record["output_ids"]
    return [tok.decode(i, skip_special_tokens=True) for i in ids], ids
