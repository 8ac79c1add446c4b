"""Time to quality: wall-clock minutes until `<pirate>` recovers 50/70/80/90% of its prompt's effect.

    make bench-quality          # = python benchmarks/time_to_quality.py; ~35 min on 2 CPU cores
    python benchmarks/time_to_quality.py --train-inputs 128 --heldout 24 --epochs 3 --eval-every 4

Two recipes on the default model, the same training inputs, the same hyperparameters where both
have them (LoRA r=16 / alpha 32 on the same modules, lr 1e-3, batch 8, cosine schedule, 5% warmup,
`--epochs` epochs, float32, no gradient checkpointing):
- ours: the pipeline's default recipe, run through its own stages (`generate`, `extend`, `train`):
  teacher samples batched under a shared prompt cache with the top-k recorded, the tag row
  initialised from its name, `kl` on the recorded top-k plus the untagged term, LoRA + the tag row.
  The generate stage also samples the held-out inputs and the base model's answers (for
  evaluate): that work is counted in our minutes too.
- peer: what a user writes without us: Hugging Face `generate` per input under the prompt, the tag
  added as a special token (`resize_token_embeddings`: whatever initial row that gives), then TRL's
  `SFTTrainer` with a LoRA `peft_config` on the tagged prompt/completion texts. TRL (through peft)
  trains LoRA only: with tied embeddings the new token's row cannot be trained under LoRA, so the
  peer's tag row stays at its initial value (checked and recorded: `tag_row_trained`).

Each recipe runs in its own process; its clock starts after the base model is loaded and counts
generation and training (and for ours, the stages' own loading and saving). Every `--eval-every`
optimizer steps the trainable weights are written to disk (that pause is not counted). Afterwards
one evaluator scores every snapshot the same way, as `pipeline.evaluate` does: held-out inputs,
teacher-forced on the reference teacher's samples (from our generate stage), full-vocabulary KL,
recovery = 1 - residual / effect with a 95% bootstrap interval over inputs.

Results: benchmarks/time_to_quality.json (summary and every point), docs/benchmarks/time_to_quality.png.
Every step leaves its results on disk (outputs/time_to_quality/): a killed run continues with
what is missing; a recipe killed mid-run is run again from its start (its clock would be wrong).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "outputs" / "time_to_quality"
RESULTS = ROOT / "benchmarks" / "time_to_quality.json"
PLOT = ROOT / "docs" / "benchmarks" / "time_to_quality.png"
TAG = "<pirate>"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9)
RECIPES = ("ours", "peer", "peer_low_lr")
PEER_LOW_LR = 2e-4  # the peer again at a learning rate usual for LoRA SFT (ours, 1e-3, overfits its hard labels)


def overrides(args) -> list[str]:
    """The pipeline config of our recipe: the demo's settings at this benchmark's scale."""
    return [
        "experiment=demo",
        f"inputs.max_train={args.train_inputs}",
        f"inputs.max_heldout={args.heldout}",
        f"generate.max_new_tokens={args.new_tokens}",
        f"train.epochs={args.epochs}",
        f"paths.outputs={WORK / 'pipeline'}",
        "progress=false",
    ]


def compose(args, stage: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import PROJECT_ROOT, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"stage={stage}", *overrides(args)])


def snapshot_callback(folder: Path, tag_id: int, every: int, clock):
    """A TrainerCallback writing the trainable state (LoRA weights, the tag's row) every `every` steps."""
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    folder.mkdir(parents=True, exist_ok=True)

    class Snapshots(TrainerCallback):
        def save(self, model, step: int) -> None:
            paused = time.perf_counter()
            elapsed = clock.elapsed()
            state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
            state["tag_row"] = model.get_input_embeddings().weight[tag_id].detach().cpu().clone()
            save_file(state, str(folder / f"step-{step:05d}.safetensors"))
            with (folder / "points.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "wall_seconds": elapsed}) + "\n")
            clock.pause(time.perf_counter() - paused)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            clock.mark("train_start")
            self.save(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self.save(model, state.global_step)

    return Snapshots()


class Clock:
    """Wall seconds since the recipe started, less the snapshot pauses."""

    def __init__(self):
        self.start, self.paused, self.marks = time.perf_counter(), 0.0, {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def mark(self, name: str) -> None:
        self.marks[name] = self.elapsed()


def run_ours(args, folder: Path) -> dict:
    """Our default recipe through the pipeline's own stages; a callback added to its Trainer snapshots."""
    from pipeline.__main__ import run_stages
    from pipeline.core.job import job_from_config
    from pipeline.core.models import ensure_default_model
    from pipeline.runtime import progress
    from pipeline.stages import paths

    ensure_default_model(ROOT / "models" / "smollm2-135m-instruct")
    shutil.rmtree(WORK / "pipeline", ignore_errors=True)  # stages must run, not be read back
    clock = Clock()
    run_stages(compose(args, "generate"))
    clock.mark("generate")
    cfg = compose(args, "extend")
    run_stages(cfg)
    clock.mark("extend")
    from pipeline.core.models import load_tokenizer

    tag_id = load_tokenizer(str(paths.output_dir("extend", cfg, job_from_config(cfg)))).convert_tokens_to_ids(TAG)
    callback = snapshot_callback(folder / "snapshots", tag_id, args.eval_every, clock)
    attach = progress.attach
    progress.attach = lambda trainer: (attach(trainer), trainer.add_callback(callback))  # the train stage calls it
    run_stages(compose(args, "train"))
    progress.attach = attach
    clock.mark("train")
    return {"marks": clock.marks, "tag_id": tag_id, "tag_row_trained": True}


def train_rows(args) -> list[dict]:
    """The training inputs our generate stage uses (the same split and cap)."""
    from pipeline.core.data import load_inputs, split_inputs

    cfg = compose(args, "generate")
    rows, _ = split_inputs(load_inputs(cfg.inputs.file), cfg.inputs.heldout_fraction, cfg.inputs.max_train, cfg.inputs.max_heldout)
    return rows


def peer_lora(train_cfg):
    from peft import LoraConfig

    return LoraConfig(r=train_cfg.lora_r, lora_alpha=train_cfg.lora_alpha, lora_dropout=train_cfg.lora_dropout,
                      target_modules=list(train_cfg.lora_targets), task_type="CAUSAL_LM")


def add_peer_tag(tokenizer, model) -> int:
    """What a user does: the tag as a new special token, the embeddings resized (transformers' default init)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [TAG]})
    model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(TAG)


def run_peer(args, folder: Path, lr: float | None = None) -> dict:
    """Per-input `generate` under the prompt, then TRL SFTTrainer + LoRA on the tagged texts.

    With `lr` (peer_low_lr), the peer's own samples are reused and its generation minutes are counted again."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from pipeline.core.formats import context_ids
    from pipeline.core.models import ensure_default_model, load_model, load_tokenizer

    cfg = compose(args, "train")
    path = str(ensure_default_model(ROOT / "models" / "smollm2-135m-instruct"))
    tok, model = load_tokenizer(path), load_model(path)
    from pipeline.core.job import job_from_config

    job = job_from_config(cfg)
    prompt = job.teacher_prompt(job.train_sets[0])  # the very prompt our teacher reads
    rows = train_rows(args)
    torch.manual_seed(0)
    clock = Clock()
    texts = []
    if lr is not None:
        first = WORK / "peer"
        texts = [s["output"] for s in json.loads((first / "samples.json").read_text())]
        clock.start -= json.loads((first / "timeline.json").read_text())["marks"]["generate"]
    for row in rows if lr is None else []:
        ids = torch.tensor([context_ids(tok, row["text"], prompt, chat=True)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=cfg.generate.temperature,
                             top_p=cfg.generate.top_p, top_k=0, max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    clock.mark("generate")
    (folder / "samples.json").write_text(json.dumps([{"input": r["text"], "output": t} for r, t in zip(rows, texts)], indent=1))
    tag_id = add_peer_tag(tok, model)
    start_row = model.get_input_embeddings().weight[tag_id].detach().clone()
    data = Dataset.from_list([
        {"prompt": [{"role": "system", "content": TAG}, {"role": "user", "content": r["text"]}],
         "completion": [{"role": "assistant", "content": t}]}
        for r, t in zip(rows, texts)
    ])
    t = cfg.train
    sft = SFTConfig(
        output_dir=str(folder / "trl"), per_device_train_batch_size=t.batch_size, num_train_epochs=t.epochs,
        # warmup as our train stage counts it (int of the ratio times the steps; transformers would round up)
        learning_rate=t.lr if lr is None else lr, lr_scheduler_type="cosine", weight_decay=t.weight_decay,
        warmup_steps=int(t.warmup_ratio * math.ceil(len(rows) / t.batch_size) * t.epochs),
        bf16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to=[], logging_steps=5,
        seed=t.seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = snapshot_callback(folder / "snapshots", tag_id, args.eval_every, clock)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=data, processing_class=tok, peft_config=peer_lora(t),
                         callbacks=[callback])
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    trainer.train()
    clock.mark("train")
    row_moved = not torch.equal(trainer.model.get_input_embeddings().weight[tag_id].detach(), start_row)
    return {"marks": clock.marks, "tag_id": tag_id, "tag_row_trained": row_moved,
            "trainable_tensors": len(trainable), "trainable_non_lora": [n for n in trainable if "lora_" not in n],
            "steps": trainer.state.global_step, "final_loss": trainer.state.log_history[-1].get("train_loss")}


def run_recipe(args, recipe: str) -> None:
    folder = WORK / recipe
    if (folder / "timeline.json").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)  # a recipe killed mid-run starts over: its clock must be whole
    folder.mkdir(parents=True)
    info = run_ours(args, folder) if recipe == "ours" else run_peer(args, folder, PEER_LOW_LR if recipe == "peer_low_lr" else None)
    points = [json.loads(l) for l in (folder / "snapshots" / "points.jsonl").read_text().splitlines()]
    import torch

    info.update(points=points, torch_threads=torch.get_num_threads(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"))
    (folder / "timeline.json").write_text(json.dumps(info, indent=1))


def evaluator(args):
    """The fixed held-out set: the reference teacher's samples, its logits and the prompt's effect per token."""
    from datasets import load_from_disk

    from pipeline.core.formats import context_ids
    from pipeline.core.job import job_from_config
    from pipeline.core.models import load_model, load_tokenizer
    from pipeline.core.scoring import continuation_logits, token_kls
    from pipeline.stages import paths

    cfg = compose(args, "evaluate")
    job = job_from_config(cfg)
    data = load_from_disk(str(paths.output_dir("generate", cfg, job) / "dataset"))
    rows = [r for r in data if r["split"] == "heldout"][: args.heldout]
    path = str(ROOT / "models" / "smollm2-135m-instruct")
    tok, base = load_tokenizer(path), load_model(path)
    outs = [r["output_ids"] for r in rows]
    teacher_ctx = [context_ids(tok, r["input"], job.reference_prompt((TAG,)), True) for r in rows]
    plain_ctx = [context_ids(tok, r["input"], None, True) for r in rows]
    teacher = continuation_logits(base, teacher_ctx, outs, tok.pad_token_id, 8, "teacher")
    effect = token_kls(teacher, continuation_logits(base, plain_ctx, outs, tok.pad_token_id, 8, "base"))
    return cfg, job, rows, outs, teacher, effect


def student_model(args, recipe: str, cfg, job):
    """A fresh model shaped like the recipe's trained one, into which snapshots are loaded."""
    from pipeline.core.models import load_model, load_tokenizer
    from pipeline.stages import paths

    if recipe == "ours":
        from pipeline.stages.train import prepare_trainable

        ext = str(paths.output_dir("extend", cfg, job))
        tok, model = load_tokenizer(ext), load_model(ext)
        model, _ = prepare_trainable(model, cfg.train, [tok.convert_tokens_to_ids(TAG)])
        return tok, model
    from peft import get_peft_model

    path = str(ROOT / "models" / "smollm2-135m-instruct")
    tok, model = load_tokenizer(path), load_model(path)
    add_peer_tag(tok, model)
    return tok, get_peft_model(model, peer_lora(cfg.train))


def evaluate_recipes(args) -> dict:
    import torch
    from safetensors.torch import load_file

    from pipeline.core.formats import context_ids
    from pipeline.core.losses import bootstrap_interval, pooled_recovery
    from pipeline.core.scoring import continuation_logits, token_kls

    cfg, job, rows, outs, teacher, effect = evaluator(args)
    effect_sums = [t.sum().item() for t in effect]
    scored = {}
    for recipe in RECIPES:
        folder = WORK / recipe
        timeline = json.loads((folder / "timeline.json").read_text())
        cache = folder / "evals.json"
        evals = json.loads(cache.read_text()) if cache.is_file() else {}
        tok, model = student_model(args, recipe, cfg, job)
        model.eval()
        tag_id = tok.convert_tokens_to_ids(TAG)
        assert tag_id == timeline["tag_id"], (recipe, tag_id, timeline["tag_id"])
        contexts = [context_ids(tok, r["input"], TAG, True) for r in rows]  # the tag in place of the prompt, both recipes
        params = dict(model.named_parameters())
        for point in timeline["points"]:
            key = str(point["step"])
            if key not in evals:
                state = load_file(str(folder / "snapshots" / f"step-{point['step']:05d}.safetensors"))
                with torch.no_grad():
                    model.get_input_embeddings().weight[tag_id] = state.pop("tag_row")
                    missing = set(state) - set(params)
                    assert not missing, f"{recipe}: snapshot names not in the model: {sorted(missing)[:3]}"
                    for name, value in state.items():
                        params[name].copy_(value)
                student = continuation_logits(model, contexts, outs, tok.pad_token_id, 8, f"{recipe} {key}", [tag_id])
                residual = [t.sum().item() for t in token_kls(teacher, student)]
                low, high = bootstrap_interval(pooled_recovery, residual, effect_sums, resamples=1000, seed=0)
                evals[key] = {"recovery": float(pooled_recovery(residual, effect_sums)), "recovery_ci": [float(low), float(high)],
                              "residual_kl": sum(residual) / sum(map(len, outs))}
                cache.write_text(json.dumps(evals, indent=1))
                print(f"  {recipe} step {key}: recovery {evals[key]['recovery']:.3f} [{low:.3f}, {high:.3f}]", flush=True)
        scored[recipe] = {**timeline, "points": [{**p, **evals[str(p["step"])]} for p in timeline["points"]]}
        if recipe == "ours":  # an independent check of the snapshots: the train stage's saved (merged) student
            from pipeline.core.models import load_model
            from pipeline.stages import paths

            saved = load_model(str(paths.output_dir("train", cfg, job)))
            student = continuation_logits(saved, contexts, outs, tok.pad_token_id, 8, "saved student", [tag_id])
            residual = [t.sum().item() for t in token_kls(teacher, student)]
            scored[recipe]["saved_model_recovery"] = float(pooled_recovery(residual, effect_sums))
            last = scored[recipe]["points"][-1]["recovery"]
            print(f"  ours: saved student {scored[recipe]['saved_model_recovery']:.4f}, last snapshot {last:.4f}", flush=True)
    return scored, {"effect_kl": sum(effect_sums) / sum(map(len, outs)), "heldout_inputs": len(rows),
                    "heldout_tokens": sum(map(len, outs))}


def time_to(points: list[dict], threshold: float):
    """Minutes at the first evaluated point whose recovery reaches `threshold`, or None."""
    hit = next((p for p in points if p["recovery"] >= threshold), None)
    return None if hit is None else hit["wall_seconds"] / 60


def summarise(scored: dict, heldout: dict, args) -> dict:
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("only", "work")}, "heldout": heldout, "recipes": {}}
    for recipe, s in scored.items():
        total = s["marks"]["train"] / 60
        best = max(s["points"], key=lambda p: p["recovery"])
        summary["recipes"][recipe] = {
            "minutes_to": {str(t): time_to(s["points"], t) for t in THRESHOLDS},
            "total_minutes": total,
            "generate_minutes": s["marks"]["generate"] / 60,
            "final_recovery": s["points"][-1]["recovery"], "final_recovery_ci": s["points"][-1]["recovery_ci"],
            "best_recovery": best["recovery"], "best_recovery_ci": best["recovery_ci"],
            "tag_row_trained": s["tag_row_trained"],
        }
    return summary


def plot(scored: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = {"ours": "ours (pipeline default: cached batched sampling, top-k KL + tag row)",
              "peer": "peer (per-input HF generate, TRL SFTTrainer + LoRA, lr 1e-3 as ours)",
              "peer_low_lr": f"peer, lr {PEER_LOW_LR:g} (its samples reused)"}
    for recipe, s in scored.items():
        x = [p["wall_seconds"] / 60 for p in s["points"]]
        y = [p["recovery"] for p in s["points"]]
        lo = [p["recovery_ci"][0] for p in s["points"]]
        hi = [p["recovery_ci"][1] for p in s["points"]]
        line, = ax.plot(x, y, marker="o", markersize=3, label=labels[recipe])
        ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
        ax.axvline(s["marks"]["generate"] / 60, color=line.get_color(), linestyle=":", linewidth=1)
    for t in THRESHOLDS:
        ax.axhline(t, color="grey", linewidth=0.5, linestyle="--")
    ax.set_xlabel("wall-clock minutes (generation + training), 2 CPU cores; dotted: generation done")
    ax.set_ylabel("held-out recovery (95% interval)")
    ax.set_title("<pirate> on SmolLM2-135M-Instruct: time to quality")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-inputs", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=4, help="optimizer steps between snapshots")
    parser.add_argument("--work", help="where runs and results go (default: outputs/time_to_quality, results in benchmarks/, docs/)")
    parser.add_argument("--only", choices=RECIPES, help=argparse.SUPPRESS)  # child process: one recipe
    args = parser.parse_args()
    if args.work:  # e.g. a quick trial run: nothing of the real run's results is touched
        global WORK, RESULTS, PLOT
        WORK = Path(args.work).resolve()
        RESULTS, PLOT = WORK / "time_to_quality.json", WORK / "time_to_quality.png"
    if args.only:
        run_recipe(args, args.only)
        return
    try:
        import trl  # noqa: F401  (the peer recipe's trainer; checked before any work)
    except ImportError:
        sys.exit("time_to_quality: the peer recipe needs TRL. Fix: pip install -e '.[bench]' (trl==1.16.0).")
    settings = WORK / "settings.json"
    if settings.is_file() and json.loads(settings.read_text()) != vars(args):
        sys.exit(f"{WORK} holds a run with other settings ({settings}). Fix: remove {WORK}, or run with those settings.")
    WORK.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(vars(args)))
    for recipe in RECIPES:  # each in its own process: its clock and memory are its own
        if not (WORK / recipe / "timeline.json").is_file():
            cmd = [sys.executable, __file__, "--only", recipe] + [a for a in sys.argv[1:]]
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                sys.exit(f"time_to_quality: recipe {recipe} failed")
    scored, heldout = evaluate_recipes(args)
    summary = summarise(scored, heldout, args)
    RESULTS.write_text(json.dumps({"summary": summary, "recipes": scored}, indent=1) + "\n")
    plot(scored, PLOT)
    bench = ROOT / "bench.json"
    if bench.is_file() and not args.work:  # bench.json repeats the summary (and `make bench` copies it from here too)
        report = json.loads(bench.read_text())
        report["time_to_quality"] = {"file": "benchmarks/time_to_quality.json", **summary}
        bench.write_text(json.dumps(report, indent=2) + "\n")
    for recipe, r in summary["recipes"].items():
        reached = ", ".join(f"{t}: {'%.1f min' % m if m is not None else 'not reached within %.1f min' % r['total_minutes']}"
                            for t, m in r["minutes_to"].items())
        print(f"{recipe}: {reached}; final recovery {r['final_recovery']:.3f} {r['final_recovery_ci']}")
    print(f"wrote {RESULTS} and {PLOT}")


if __name__ == "__main__":
    main()
