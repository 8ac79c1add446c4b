"""Benchmark: generation and distillation under long prompts, the prompt paid for once.

    make bench                      # = python benchmarks/bench.py; writes bench.json, prints a table
    python benchmarks/bench.py --prompt-tokens 1000 4000 --samples 64 --new-tokens 48

Every case runs in its own subprocess (so each peak-memory figure is that case's own) and all
cases run in one invocation, side by side, so the ratios hold on a noisy machine. Model loading
is not timed; building the prompt cache is (it is part of the work), and its one-time cost is also
reported on its own (`prefill_seconds`).

Generation cases, per prompt length (tokens/s = generated tokens / wall seconds):
- naive:     Hugging Face `generate` per sample on the full prompt (recording logits, as we do);
- cached:    this project: the prompt's keys/values computed once, batched sampling;
- no_prompt: the same batched sampler with no prompt at all.
Training cases (LoRA student, the same teacher samples, batch 4, `--epochs` passes over
`--train-examples` examples; tokens/s = continuation tokens trained / wall seconds; the seconds of
each epoch are kept, so the first epoch, where the online teacher runs on every example, is seen
on its own):
- kl_online:   teacher distributions computed during training from the prompt cache (and kept
               per example, so later epochs read them back);
- kl_recorded: the top-k recorded at generation;
- sft:         plain cross-entropy on the teacher's samples.
"""
from __future__ import annotations

import argparse
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
        if case == "gen_naive":
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
    from pipeline.core.metatokens import Metatoken
    from pipeline.core.teacher import CachedPromptTeacher
    from pipeline.core.trainer import DistillCollator, build_examples, distill_loss
    from pipeline.stages.extend import extend_model
    from pipeline.stages.train import frozen_start, prepare_trainable

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
    if case == "train_kl_online":
        teacher = CachedPromptTeacher(frozen_start(model, "lora", None, None), tok, prompt, chat=True, memo_mb=train_cfg.teacher_memo_mb)
    prefill = time.perf_counter() - start
    examples = build_examples(records, tok, True, teacher)
    collate = DistillCollator(tok.pad_token_id)
    objective = "sft" if case == "train_sft" else "kl"
    trained, epoch_seconds = 0, []
    for epoch in range(epochs):
        epoch_start = time.perf_counter()
        for first in range(0, len(examples), 4):
            batch = collate(examples[first : first + 4])
            loss = distill_loss(model, batch, objective, tag_ids, teacher)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            trained += int(batch["output_mask"].sum())
        epoch_seconds.append(time.perf_counter() - epoch_start)
    seconds = time.perf_counter() - start
    return {"tokens": trained, "seconds": seconds, "tokens_per_s": trained / seconds, "final_loss": loss.item(),
            "epoch_seconds": epoch_seconds, "prefill_seconds": prefill}


CASES = ["gen_naive", "gen_cached", "gen_no_prompt", "train_kl_online", "train_kl_recorded", "train_sft"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--samples", type=int, default=64, help="inputs sampled per generation case")
    parser.add_argument("--naive-samples", type=int, default=4, help="fewer for the slow naive path")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--train-examples", type=int, default=16, help="examples per training case (batch 4)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over them per training case")
    parser.add_argument("--out", default=str(ROOT / "bench.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:  # child process: one case, one JSON line
        result = run_case(args.case, args.prompt_tokens[0], args.samples, args.new_tokens, args.epochs)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return

    results = []
    for n in args.prompt_tokens:
        for case in CASES:
            samples = {"gen_naive": args.naive_samples, "gen_cached": args.samples, "gen_no_prompt": args.samples}.get(
                case, args.train_examples)
            cmd = [sys.executable, __file__, "--case", case, "--prompt-tokens", str(n), "--samples", str(samples),
                   "--new-tokens", str(args.new_tokens), "--epochs", str(args.epochs)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"case {case} at {n} tokens failed:\n{proc.stderr[-3000:]}")
            results.append({"case": case, "prompt_tokens": n, "samples": samples, **json.loads(line[7:])})
            print(f"  {case:18s} prompt {n:5d}: {results[-1]['tokens_per_s']:8.1f} tok/s", flush=True)

    def result(case, n):
        return next(r for r in results if r["case"] == case and r["prompt_tokens"] == n)

    def rate(case, n):
        return result(case, n)["tokens_per_s"]

    ratios = {}
    for n in args.prompt_tokens:
        ratios[f"gen_cached_over_naive@{n}"] = rate("gen_cached", n) / rate("gen_naive", n)
        ratios[f"gen_cached_over_no_prompt@{n}"] = rate("gen_cached", n) / rate("gen_no_prompt", n)
        ratios[f"train_online_time_over_sft@{n}"] = rate("train_sft", n) / rate("train_kl_online", n)
        # The first epoch alone (the teacher runs on every example; its prefill counted too).
        online, sft = result("train_kl_online", n), result("train_sft", n)
        ratios[f"train_online_first_epoch_time_over_sft@{n}"] = (
            (online["prefill_seconds"] + online["epoch_seconds"][0]) / sft["epoch_seconds"][0])
        ratios[f"train_recorded_time_over_sft@{n}"] = rate("train_sft", n) / rate("train_kl_recorded", n)
    import torch

    report = {
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": "cpu"},
        "settings": vars(args),
        "results": results,
        "ratios": ratios,
    }
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
