"""Benchmark: seconds per training step of the demo's recipe, by how the tag row trains and the precision.

    python benchmarks/train_step.py            # writes benchmarks/train_step.json, prints a table (~3 min, 2 cores)
    python benchmarks/train_step.py --steps 20 --batch-size 8

The step is the demo's (LoRA r16 on every projection, KL on the recorded top-32, the untagged term with its
reference kept per example, AdamW), on the default model, batch 2, requests from data/inputs with
48-token continuations. Four cases, all in one invocation so the ratios hold on a noisy machine:
- in_place:      the tag row trained inside the (tied) embedding matrix under a gradient mask, as the
                 pipeline did before core/tag_rows.py: the full matrix's gradient and Adam state every step;
- tag_rows:      the pipeline now: the tag rows as their own [n_tags x d] parameter, the matrix frozen;
- *_bf16:        each with `train.bf16=true` (bf16 autocast; weights, optimizer and losses float32).
The first `--warmup` steps (the untagged term's reference is computed there) are not timed, so the figure is
what later epochs cost. `loss_first_step` is the same in every case up to bf16 rounding: one computation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "smollm2-135m-instruct"
OUT = ROOT / "benchmarks" / "train_step.json"


def in_place_attach(embedding, tag_ids):
    """The tag row trained in place (the computation before core/tag_rows.py): the matrix under a row mask."""
    weight = embedding.weight.requires_grad_(True)
    keep = weight.new_zeros(weight.shape[0], 1)
    keep[tag_ids] = 1.0
    weight.register_hook(lambda grad: grad * keep)
    return weight


def run_case(case: str, steps: int, warmup: int, batch_size: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    from pipeline.config import TrainConfig
    from pipeline.core import tag_rows
    from pipeline.core.metatokens import Metatoken
    from pipeline.core.models import load_model, load_tokenizer
    from pipeline.core.scoring import ReferenceMemo
    from pipeline.core.trainer import DistillCollator, build_examples, distill_loss, preserve_loss
    from pipeline.stages import train as train_stage
    from pipeline.stages.extend import extend_model

    torch.manual_seed(0)
    tok, model = load_tokenizer(str(MODEL)), load_model(str(MODEL))
    tag = Metatoken(tag="<pirate>", prompt=(ROOT / "data" / "prompts" / "pirate.txt").read_text(), source="bench")
    tag_ids = list(extend_model(model, tok, [tag], "name_mean").values())
    if case.startswith("in_place"):
        tag_rows.attach = in_place_attach  # prepare_trainable builds its groups from what attach returns
    cfg = OmegaConf.structured(TrainConfig(params="lora", report_to="none"))
    model, groups = train_stage.prepare_trainable(model, cfg, tag_ids)
    optimizer = torch.optim.AdamW(groups)
    frozen = train_stage.frozen_start(model, "lora", None, None)
    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "inputs" / "requests.jsonl").read_text().splitlines()]
    gen = torch.Generator().manual_seed(0)
    n = batch_size * (steps + warmup)
    records = []
    for text in texts[:n]:
        out = torch.randint(3, len(tok) - 1, (48,), generator=gen).tolist()
        top = torch.randn(48, 64, generator=gen).log_softmax(-1).topk(32)
        records.append({"input": text, "tags": [tag.tag], "output_ids": out,
                        "topk_ids": top.indices.tolist(), "topk_logprobs": top.values.tolist()})
    examples = build_examples(records, tok, True)
    collate, memo = DistillCollator(tok.pad_token_id), ReferenceMemo(2048)
    batches = [collate(examples[i : i + batch_size]) for i in range(0, n, batch_size)]
    for batch in batches[:warmup]:  # the untagged term's reference for the timed batches too: as in epochs 2+
        preserve_loss(model, frozen, batch, tag_ids, memo)
    model.zero_grad()
    bf16 = case.endswith("bf16")
    seconds, first_loss = [], None
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = distill_loss(model, batch, "kl", tag_ids) + preserve_loss(model, frozen, batch, tag_ids, memo)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first_loss = first_loss if first_loss is not None else float(loss)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return {"case": case, "seconds_per_step": round(sum(seconds) / len(seconds), 3),
            "steps_timed": len(seconds), "loss_first_step": round(first_loss, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in its own process (called by main)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.warmup, args.batch_size)))
        return
    import subprocess

    import torch

    from pipeline.stages.train import cpu_has_bf16

    results = []
    for case in ("in_place", "tag_rows", "in_place_bf16", "tag_rows_bf16"):
        command = [sys.executable, __file__, "--case", case, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size)]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    base = results[0]["seconds_per_step"]
    for r in results:
        r["speedup_vs_in_place"] = round(base / r["seconds_per_step"], 2)
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "cpu_bf16": cpu_has_bf16()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size},
        "results": results,
    }
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(OUT)
    print(f"{'case':<16}{'s/step':>8}{'speedup':>9}")
    for r in results:
        print(f"{r['case']:<16}{r['seconds_per_step']:>8}{r['speedup_vs_in_place']:>9}")


if __name__ == "__main__":
    main()
