"""Benchmark: generation and distillation under long prompts, the prompt paid for once.

    make bench                      # = python benchmarks/bench.py; writes bench.json, prints a table
    python benchmarks/bench.py --prompt-tokens 1000 4000 --samples 64 --new-tokens 48

Every case runs in its own subprocess (so each peak-memory figure is that case's own) and all
cases run in one invocation, side by side, so the ratios hold on a noisy machine. Model loading
is not timed; building the prompt cache is (it is part of the work), and its one-time cost is also
reported on its own (`prefill_seconds`).

Generation cases, per prompt length (tokens/s = generated tokens / wall seconds), each isolating
one effect (all record logits, as we do, and sample exactly `--new-tokens` per input):
- naive:         Hugging Face `generate` per sample on the full prompt;
- naive_batched: Hugging Face `generate` on batches of 8 (as ours), the full prompt repeated in
                 every row, left padding, batches longest first (as ours);
- cached:        this project: the prompt's keys/values computed once and shared by every row;
- no_prompt:     the same batched sampler with no prompt at all.
So batching alone = naive_batched / naive, sharing the prompt alone = cached / naive_batched.
Training cases (LoRA student, the same teacher samples, batch 4, `--epochs` passes over
`--train-examples` examples; tokens/s = continuation tokens trained / wall seconds; the seconds of
each epoch are kept, so the first epoch, where the online teacher runs on every example, is seen
on its own):
- kl_online:   teacher distributions computed during training from the prompt cache (and kept
               per example, so later epochs read them back);
- kl_recorded: the top-k recorded at generation;
- sft:         plain cross-entropy on the teacher's samples.
These three train without the untagged term, as this benchmark always did. At the longest prompt
only, also (the online teacher's cost, issue 15):
- kl_online_full_head, sft_full_head: as above, but the LM head at every position and the online
  teacher's too (the computation before `pipeline/scoring.py`);
- kl_online_untagged, sft_untagged: with the pipeline's default untagged term (weight 1), its
  reference kept per example (`train.reference_memo_mb`); sft_untagged_no_memo: recomputed every step.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from any checkout, installed or not
MODEL = ROOT / "models" / "smollm2-135m-instruct"


def processor() -> str:
    """The CPU's model name (Linux), for the record."""
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def long_prompt(tokenizer, n_tokens: int) -> str:
    """A system prompt of exactly about n tokens, made from the shipped metatoken prompts."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "data" / "prompts").glob("*.txt")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (n_tokens // len(ids) + 1))[:n_tokens]
    return tokenizer.decode(ids)


def requests(n: int) -> list[str]:
    lines = (ROOT / "data" / "inputs" / "requests.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def run_case(case: str, prompt_tokens: int, samples: int, new_tokens: int, epochs: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    from pipeline.core.formats import context_ids
    from pipeline.core.models import ensure_default_model, load_model, load_tokenizer
    from pipeline.core.sampling import sample_all

    torch.manual_seed(0)
    path = str(ensure_default_model(MODEL))
    tok, model = load_tokenizer(path), load_model(path)
    prompt = long_prompt(tok, prompt_tokens)
    texts = requests(samples)
    from pipeline.config import GenerateConfig

    gen_cfg = OmegaConf.structured(
        GenerateConfig(temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, logprobs_top_k=32, batch_size=8, seed=0)
    )
    contexts = [context_ids(tok, t, prompt, chat=True) for t in texts]
    if case.startswith("gen_"):
        start = time.perf_counter()
        if case == "gen_naive_batched":
            produced = naive_batched(model, tok, contexts, new_tokens, gen_cfg.batch_size)
        elif case == "gen_naive":
            produced = 0
            for ctx in contexts:
                out = model.generate(
                    torch.tensor([ctx]), do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                )
                produced += out.sequences.shape[1] - len(ctx)
        else:
            if case == "gen_cached":  # the one-time prefill on its own (untimed above: measured separately)
                from pipeline.core.teacher import prompt_kv, shared_prefix_length

                t0 = time.perf_counter()
                prompt_kv(model, contexts[0][: shared_prefix_length(contexts)])
                prefill = time.perf_counter() - t0
                start += prefill  # not part of this case's timed work
            if case == "gen_no_prompt":
                contexts = [context_ids(tok, t, None, chat=True) for t in texts]
            model.generation_config.min_new_tokens = new_tokens  # same token count in every case
            results = sample_all(model, tok, contexts, gen_cfg, case)
            produced = sum(len(r["output_ids"]) for r in results)
        seconds = time.perf_counter() - start
        result = {"tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}
        if case == "gen_cached":
            result["prefill_seconds"] = prefill
        return result

    # Training cases: a LoRA student on the teacher's samples (made untimed, with the cached sampler).
    from pipeline.core import teacher as teacher_module
    from pipeline.core import trainer as trainer_module
    from pipeline.core.metatokens import Metatoken
    from pipeline.core.scoring import ReferenceMemo
    from pipeline.core.teacher import CachedPromptTeacher
    from pipeline.core.trainer import DistillCollator, build_examples, distill_loss, preserve_loss
    from pipeline.stages.extend import extend_model
    from pipeline.stages.train import frozen_start, prepare_trainable

    if case.endswith("_full_head"):  # the computation before the head-at-scored-positions saving: logits everywhere
        trainer_module.batch_logits = full_head_continuation_logits
        teacher_module.scored_logits = full_head_scored_logits

    data = ROOT / "outputs" / "bench" / f"teacher-samples-{prompt_tokens}-{samples}-{new_tokens}.json"
    if data.is_file():  # the three training cases train on the same samples; make them once
        samples_out = json.loads(data.read_text())
    else:
        model.generation_config.min_new_tokens = new_tokens
        samples_out = sample_all(model, tok, contexts, gen_cfg, "teacher samples")
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps(samples_out))
    tag_ids = list(extend_model(model, tok, [Metatoken("<bench>", prompt, "bench")], "name_mean").values())
    records = [{"input": t, "tags": ["<bench>"], **s} for t, s in zip(texts, samples_out)]
    from pipeline.config import TrainConfig

    train_cfg = OmegaConf.structured(TrainConfig(params="lora", report_to="none"))  # the defaults: LoRA r=16 + tag row
    model, groups = prepare_trainable(model, train_cfg, tag_ids)
    optimizer = torch.optim.AdamW(groups)
    start = time.perf_counter()
    teacher = None
    frozen = frozen_start(model, "lora", None, None)
    untagged = "_untagged" in case
    memo = ReferenceMemo(train_cfg.reference_memo_mb) if untagged and not case.endswith("_no_memo") else None
    if case.startswith("train_kl_online"):
        teacher = CachedPromptTeacher(frozen_start(model, "lora", None, None), tok, prompt, chat=True, memo_mb=train_cfg.teacher_memo_mb)
    prefill = time.perf_counter() - start
    examples = build_examples(records, tok, True, teacher)
    collate = DistillCollator(tok.pad_token_id)
    objective = "sft" if case.startswith("train_sft") else "kl"
    trained, epoch_seconds = 0, []
    for epoch in range(epochs):
        epoch_start = time.perf_counter()
        for first in range(0, len(examples), 4):
            batch = collate(examples[first : first + 4])
            loss = distill_loss(model, batch, objective, tag_ids, teacher)
            if untagged:  # the pipeline's default untagged term, weight 1 (train.untagged_weight)
                loss = loss + preserve_loss(model, frozen, batch, tag_ids, memo)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            trained += int(batch["output_mask"].sum())
        epoch_seconds.append(time.perf_counter() - epoch_start)
    seconds = time.perf_counter() - start
    return {"tokens": trained, "seconds": seconds, "tokens_per_s": trained / seconds, "final_loss": loss.item(),
            "epoch_seconds": epoch_seconds, "prefill_seconds": prefill}


def naive_batched(model, tok, contexts: list[list[int]], new_tokens: int, batch_size: int) -> int:
    """What a user who batches does: HF `generate` on batches with the full prompt in every row, left-padded."""
    import torch

    order = sorted(contexts, key=len, reverse=True)  # longest first, as our sampler batches
    produced = 0
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, output_logits=True,
            return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
        )
        produced += (out.sequences.shape[1] - width) * len(rows)
    return produced


def full_head_scored_logits(model, positions, **inputs):
    """pipeline.scoring.scored_logits as it was: logits at every position, the scored ones picked afterwards."""
    from pipeline.core.data import gather_positions

    return gather_positions(model(**inputs).logits, positions)


def full_head_continuation_logits(model, batch: dict, tag_ids: list[int], prefix: str = ""):
    """core/scoring.batch_logits without the saving: the LM head at every position."""
    from pipeline.core.losses import suppress

    positions = batch[prefix + "output_positions"]
    inputs = {"input_ids": batch[prefix + "input_ids"], "attention_mask": batch[prefix + "attention_mask"]}
    return suppress(full_head_scored_logits(model, positions, **inputs), tag_ids)


CASES = ["gen_naive", "gen_naive_batched", "gen_cached", "gen_no_prompt", "train_kl_online", "train_kl_recorded", "train_sft"]
LONGEST_ONLY = ["train_kl_online_full_head", "train_sft_full_head", "train_kl_online_untagged", "train_sft_untagged",
                "train_sft_untagged_no_memo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--samples", type=int, default=64, help="inputs sampled per generation case")
    parser.add_argument("--naive-samples", type=int, default=4, help="fewer for the slow naive path")
    parser.add_argument("--naive-batched-samples", type=int, default=8,
                        help="one batch of 8 by default: under a 4k prompt it prefills 8 full prompts (minutes on 2 cores)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--train-examples", type=int, default=16, help="examples per training case (batch 4)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over them per training case")
    parser.add_argument("--out", default=str(ROOT / "bench.json"))
    parser.add_argument("--fresh", action="store_true", help="ignore the cases a killed run with these settings finished")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:  # child process: one case, one JSON line
        import torch

        result = run_case(args.case, args.prompt_tokens[0], args.samples, args.new_tokens, args.epochs)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["torch_threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(result))
        return

    # Each finished case is appended here at once; a killed run with the same settings continues after it.
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "fresh", "case")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    partial = ROOT / "outputs" / "bench" / f"partial-{key}.jsonl"
    partial.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        partial.unlink(missing_ok=True)
    done = [json.loads(l) for l in partial.read_text().splitlines()] if partial.is_file() else []
    started = time.time()
    results = []
    for n in args.prompt_tokens:
        for case in CASES + (LONGEST_ONLY if n == max(args.prompt_tokens) else []):
            samples = {"gen_naive": args.naive_samples, "gen_naive_batched": args.naive_batched_samples,
                       "gen_cached": args.samples, "gen_no_prompt": args.samples}.get(case, args.train_examples)
            kept = next((r for r in done if r["case"] == case and r["prompt_tokens"] == n), None)
            if kept is None:
                cmd = [sys.executable, __file__, "--case", case, "--prompt-tokens", str(n), "--samples", str(samples),
                       "--new-tokens", str(args.new_tokens), "--epochs", str(args.epochs)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"case {case} at {n} tokens failed:\n{proc.stderr[-3000:]}")
                kept = {"case": case, "prompt_tokens": n, "samples": samples, **json.loads(line[7:])}
                with partial.open("a") as f:
                    f.write(json.dumps(kept) + "\n")
            results.append(kept)
            print(f"  {case:28s} prompt {n:5d}: {results[-1]['tokens_per_s']:8.1f} tok/s", flush=True)

    def result(case, n):
        return next(r for r in results if r["case"] == case and r["prompt_tokens"] == n)

    def rate(case, n):
        return result(case, n)["tokens_per_s"]

    ratios = {}
    for n in args.prompt_tokens:
        ratios[f"gen_batching_alone@{n}"] = rate("gen_naive_batched", n) / rate("gen_naive", n)
        ratios[f"gen_sharing_alone@{n}"] = rate("gen_cached", n) / rate("gen_naive_batched", n)
        ratios[f"gen_cached_over_naive@{n}"] = rate("gen_cached", n) / rate("gen_naive", n)  # both effects
        ratios[f"gen_cached_over_no_prompt@{n}"] = rate("gen_cached", n) / rate("gen_no_prompt", n)
        ratios[f"train_online_time_over_sft@{n}"] = rate("train_sft", n) / rate("train_kl_online", n)
        # The first epoch alone (the teacher runs on every example; its prefill counted too).
        online, sft = result("train_kl_online", n), result("train_sft", n)
        ratios[f"train_online_first_epoch_time_over_sft@{n}"] = (
            (online["prefill_seconds"] + online["epoch_seconds"][0]) / sft["epoch_seconds"][0])
        ratios[f"train_recorded_time_over_sft@{n}"] = rate("train_sft", n) / rate("train_kl_recorded", n)
    n = max(args.prompt_tokens)
    ratios[f"train_online_time_over_sft_full_head@{n}"] = rate("train_sft_full_head", n) / rate("train_kl_online_full_head", n)
    ratios[f"train_online_untagged_time_over_sft_untagged@{n}"] = rate("train_sft_untagged", n) / rate("train_kl_online_untagged", n)
    ratios[f"train_head_saving_online@{n}"] = rate("train_kl_online", n) / rate("train_kl_online_full_head", n)
    ratios[f"train_head_saving_sft@{n}"] = rate("train_sft", n) / rate("train_sft_full_head", n)
    ratios[f"train_reference_memo_saving_sft@{n}"] = rate("train_sft_untagged", n) / rate("train_sft_untagged_no_memo", n)
    import os

    import torch

    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": processor(),
                    "torch": torch.__version__, "device": "cpu",
                    "torch_threads": sorted({r.get("torch_threads") for r in results} - {None}),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_minutes": round((time.time() - started) / 60, 1),  # this invocation (cases read back cost nothing)
        "settings": settings,
        "results": results,
        "ratios": ratios,
    }
    quality = ROOT / "benchmarks" / "time_to_quality.json"
    if quality.is_file():  # its own run (`make bench-quality`); its summary is repeated here
        report["time_to_quality"] = {"file": str(quality.relative_to(ROOT)), **json.loads(quality.read_text())["summary"]}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("\n| case | prompt tokens | tokens/s | peak RSS MB |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['prompt_tokens']} | {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    print("\n| ratio | value |\n|---|---:|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
