"""The fidelity study: what limits how much of a prompt's effect a trained tag recovers.

Each study run is a named list of pipeline overrides on top of `metatoken=pirate stage=all`. Every
stage output is cached by its config, so a run that is killed continues where it stopped and a
finished run costs nothing to repeat: the study is built up over several sessions, one run at a time.
Results (the evaluate report's numbers, the stage timings, the command) go to
`benchmarks/fidelity_results.json`; `table` renders them into the table and plot of docs/fidelity.md.

    python benchmarks/fidelity.py list                      # the runs, and which are finished
    python benchmarks/fidelity.py run data-256 data-64      # run (or reuse) named runs, in order
    python benchmarks/fidelity.py table                     # docs/fidelity/table.md + learning_curve.png
    python benchmarks/fidelity.py compare demo demo-bs2     # B - A recovery on the same inputs, paired interval
    python benchmarks/fidelity.py positions demo data-256   # recovery along the answer (tokens 1, 2-4, 5-16, 17 on)

Runs on the CPU use `OMP_NUM_THREADS` from the environment (set it to 1 on a shared machine).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "fidelity_results.json"
DOCS = ROOT / "docs" / "fidelity"
COMMON = ["stage=all", "metatoken=pirate"]
DEMO_80 = ["experiment=demo", "inputs.max_train=80", "train.bf16=false"]  # the demo before 3 December 2026 (at its batch size)


def replacing(base: list[str], overrides: list[str] | tuple[str, ...]) -> list[str]:
    """`base` then `overrides`, each key once (Hydra refuses a key given twice): an override replaces base's."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(overrides)


def demo_then(*overrides: str) -> list[str]:
    """The demo of before 3 December 2026 with `overrides` (each key once: an override replaces DEMO_80's)."""
    return replacing(DEMO_80, overrides)

# Spelled out in full (experiment=pretrain_demo now is row pretrain-own-kl-generated): each row names its loss and targets.
PRETRAIN = ["experiment=pretrain_demo", "train.params=lora", "inputs.max_train=null", "inputs.max_heldout=null",
            "mixture.paired=true", "mixture.untagged=0.99", "train.pretrain.plain_from=untagged",
            "train.pretrain.loss=lm", "train.pretrain.targets=all"]

SYNTHETIC_OPENINGS = ["inputs.synthetic.count=384", "inputs.synthetic.kind=openings", "inputs.synthetic.max_new_tokens=64",
                      "inputs.synthetic.max_words=80"]

# name -> (what it varies, x value for the plot, overrides). One generate run of all 256 shipped
# training inputs serves every `data-N` run up to 256 (train.max_examples takes the first N);
# beyond 256 the model's own synthesized requests are added (stage synthesize).
RUNS: dict[str, tuple[str, float, list[str]]] = {
    "data-32": ("training inputs", 32, ["train.max_examples=32"]),
    "data-64": ("training inputs", 64, ["train.max_examples=64"]),
    "data-128": ("training inputs", 128, ["train.max_examples=128"]),
    "data-256": ("training inputs", 256, []),
    "data-512": ("training inputs", 512, ["inputs.synthetic.count=256", "train.epochs=1"]),
    "data-768": ("training inputs", 768, ["inputs.synthetic.count=512", "train.epochs=1"]),
    "data-512-e3": ("epochs (512 inputs)", 3, ["inputs.synthetic.count=256"]),
    "epochs-1": ("epochs (256 inputs)", 1, ["train.epochs=1"]),
    # bf16 training (train.bf16, ~1.5x faster steps on this CPU): more inputs in about the old preset's time
    "data-768-e3-bf16": ("training inputs (bf16)", 768, ["inputs.synthetic.count=512", "train.bf16=true"]),
    # The learning curve one doubling past the quality preset: does +0.06 per doubling of inputs hold beyond 768?
    "data-1536-e3-bf16": ("training inputs (bf16)", 1536, ["inputs.synthetic.count=1280", "train.bf16=true"]),
    "online-256": ("teacher: online full vocabulary", 256, ["train.teacher=online"]),
    "onpolicy-256": ("objective: on-policy", 256, ["train.objective=onpolicy"]),
    "embedding-256": ("params: embedding only", 256, ["train.params=embedding", "train.embedding_lr=0.05"]),
    "untagged0-256": ("untagged weight 0", 256, ["train.untagged_weight=0"]),
    # The demo's budget (<= 15 min on 2 cores): what buys more recovery per minute. These rows hold the demo as it
    # was when they ran (80 inputs, float32; "demo" itself at batch 8); experiment=demo now trains at batch 2, in bf16,
    # on 160 inputs (row demo-bf16-160).
    "demo": ("demo recipe", 80, demo_then("train.batch_size=8")),
    "demo-bs2": ("demo: batch 2 (4x the steps)", 80, demo_then("train.batch_size=2")),
    "demo-lr3": ("demo: lr x3", 80, demo_then("train.batch_size=8", "train.lr=3e-3", "train.embedding_lr=3e-2")),
    "demo-untagged0": ("demo: untagged weight 0", 80, demo_then("train.batch_size=8", "train.untagged_weight=0")),
    "demo-e6": ("demo: 6 epochs", 80, demo_then("train.batch_size=8", "train.epochs=6")),
    "demo-160": ("demo: 160 inputs", 160, demo_then("train.batch_size=8", "inputs.max_train=160")),
    "demo-bs2-160": ("demo: batch 2, 160 inputs", 160, demo_then("train.batch_size=2", "inputs.max_train=160")),
    "demo-bs2-lr05": ("demo: batch 2, lr / 2", 80, demo_then("train.batch_size=2", "train.lr=5e-4")),
    "demo-r64": ("demo: LoRA rank 64", 80, demo_then("train.batch_size=8", "train.lora_r=64", "train.lora_alpha=128")),
    "demo-full": ("demo: full fine-tuning", 80, demo_then("train.batch_size=8", "train.params=full", "train.lr=1e-4")),
    # bf16 training (train.bf16): ~1.5x faster steps on this CPU (AVX-512 BF16), so more data or epochs fit the
    # demo's minutes. At batch 2: these rows compare with demo-bs2.
    "demo-bf16": ("demo: bf16 training", 80, demo_then("train.bf16=true")),
    "demo-bf16-160": ("demo: bf16, 160 inputs (the demo now)", 160, ["experiment=demo", "train.bf16=true", "inputs.max_train=160"]),
    "demo-bf16-e6": ("demo: bf16, 6 epochs", 80, demo_then("train.bf16=true", "train.epochs=6")),
    "demo-bf16-240": ("demo: bf16, 240 inputs", 240, ["experiment=demo", "train.bf16=true", "inputs.max_train=240"]),
    "demo-bf16-init-prompt": ("demo: bf16, tag row from the prompt's mean", 80,
                              demo_then("train.bf16=true", "extend.init=prompt_mean")),
    "demo-bf16-untagged03": ("demo: bf16, untagged weight 0.3", 80, demo_then("train.bf16=true", "train.untagged_weight=0.3")),
    "demo-bf16-elr3e-3": ("demo: bf16, tag-row lr 3e-3", 80, demo_then("train.bf16=true", "train.embedding_lr=3e-3")),
    "demo-bf16-elr3e-2": ("demo: bf16, tag-row lr 3e-2", 80, demo_then("train.bf16=true", "train.embedding_lr=3e-2")),
    # The untagged term on the model's own answers: instead of KL(start || student) on the teacher's (piratey) answers
    # read without the tag, every training input is also answered by the base model without prompt (a paired mixture),
    # and the student reading no tag learns those answers' recorded top-32: untagged behaviour is held where drift is
    # measured, on the model's own text, and the tag no longer has to undo the teacher's answer it sits before.
    "demo-own-untagged": ("demo: untagged term on the model's own answers", 160,
                          ["experiment=demo", "mixture.paired=true", "mixture.untagged=0.99", "train.untagged_weight=0"]),
    # The online full-vocabulary teacher (train.teacher=online: the teacher's whole distribution computed from the
    # prompt cache, instead of the 32 recorded log-probs) on the demo, with the per-bin figures.
    "demo-online": ("demo: online full-vocabulary teacher", 160, ["experiment=demo", "train.teacher=online"]),
    # On-policy distillation at the demo's size: half the steps sample from the student and the online teacher scores
    # its tokens (reverse KL), the other half are the recorded off-policy steps.
    "demo-onpolicy-half": ("demo: on-policy, half the steps", 160,
                           ["experiment=demo", "train.objective=onpolicy", "train.onpolicy_share=0.5"]),
    # Where the tag sits: the demo on multi-turn conversations with the prompt (teacher) and the tag (student) in the
    # system message or in the last user turn, right before the answer (docs/fidelity.md, "Where the residual is").
    "conv-system": ("demo on conversations: tag in the system message", 58,
                    ["experiment=demo", "inputs.file=${paths.data}/inputs/conversations.jsonl"]),
    "conv-last-user": ("demo on conversations: tag in the last user turn", 58,
                       ["experiment=demo", "inputs.file=${paths.data}/inputs/conversations.jsonl", "inputs.prompt_position=last_user"]),
    # The quality preset on the other shipped single tags (README's quality table): what a user types.
    **{f"quality-{tag}": ("quality preset", 768, ["experiment=quality", f"metatoken={tag}"])
       for tag in ("nice", "concise", "authoritative_tone", "correct")},
    # The nested tag with the quality recipe: <kind_expert> = <nice> + <authoritative_tone> + a sentence, the teacher
    # reading the fully expanded prompt (generate.teacher_mode=expand, the default).
    "quality-kind_expert": ("quality preset, nested tag", 768, ["experiment=quality", "metatoken=kind_expert"]),
    # Remix with the quality recipe: <nice> and <authoritative_tone> each trained alone on every input (paired, so each
    # tag gets the single-tag quality data), their pair never trained together and scored as a held-out combination.
    "quality-remix-pair": ("quality preset, remix (pair held out)", 768,
                           ["experiment=quality", "mixture.sets=[[nice],[authoritative_tone]]", "mixture.weights=[1,1]",
                            "mixture.paired=true", "mixture.order=random", "mixture.heldout_sets=[[nice,authoritative_tone]]"]),
    # Continued pretraining (train.mode=pretrain, docs/pretrain.md) on the default model as a plain LM: every shipped
    # document opening (98 train, 22 held out) continued by the teacher and, paired, by the model itself without the
    # prompt (the plain share: the model's own text). `lm` scores every token with cross-entropy on the sampled text;
    # `kl` scores the generated tokens against the distributions generate recorded. docs-finetune: fine-tuning (`kl`)
    # on the same generate output, the like-with-like reference.
    **{name: (what, 98, replacing(PRETRAIN, extra)) for name, what, extra in (
        ("pretrain-own-lm", "pretrain: LM loss, the model's own text as plain share", []),
        ("pretrain-own-kl", "pretrain: KL to the recorded distributions", ["train.pretrain.loss=kl"]),
        # only the generated tokens are targets: the openings (human text, CE under targets=all) are read, not learned
        ("pretrain-own-kl-generated", "pretrain: KL, generated tokens only", ["train.pretrain.loss=kl", "train.pretrain.targets=generated"]),
        ("pretrain-own-kl-generated-e6", "pretrain: KL, generated tokens only, 6 passes",
         ["train.pretrain.loss=kl", "train.pretrain.targets=generated", "train.epochs=6"]),
        ("pretrain-own-kl-e6", "pretrain: KL, 6 passes", ["train.pretrain.loss=kl", "train.epochs=6"]),
        ("pretrain-own-kl-embedding", "pretrain: KL, tag row only", ["train.pretrain.loss=kl", "train.params=embedding"]),
        ("docs-finetune", "fine-tuning on the same documents", ["train.mode=finetune"]),
        # 384 more openings written by the model itself (stage synthesize, kind=openings): 482 training documents
        ("pretrain-own-kl-generated-syn384", "pretrain: KL, generated tokens only, 482 openings",
         ["train.pretrain.loss=kl", "train.pretrain.targets=generated", *SYNTHETIC_OPENINGS]),
    )},
}
SUMMARY = re.compile(r"^(synthesize|generate|extend|train|evaluate): .*-> (\S+)$")


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def stage_seconds(folder: Path) -> float | None:
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()).get("seconds") if manifest.is_file() else None


def pipeline(name: str, args: list[str]) -> dict[str, Path]:
    """Run `python -m pipeline ARGS`; returns each stage's folder, from the summary lines it prints."""
    command = [sys.executable, "-m", "pipeline", *args]
    print("$", " ".join(command[1:]), flush=True)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"fidelity: run {name} failed (exit {proc.returncode})")
    folders = {}
    for line in proc.stdout.splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            print(line, flush=True)
            folder = ROOT / match.group(2)
            folders[match.group(1)] = folder.parent if folder.suffix == ".html" else folder
    return folders


def run_one(name: str) -> dict:
    """Run the pipeline for one study run (cached stages are reused) and collect its report."""
    group, x, overrides = RUNS[name]
    started = time.time()
    args = replacing(COMMON, overrides)
    folders = pipeline(name, args)
    eval_dir = folders["evaluate"]
    report = json.loads((eval_dir / "report.json").read_text())
    if "recovery_ci" not in report["metrics"] or "per_input" not in report:  # scored before these existed: score again
        rescore = replacing([a for a in args if not a.startswith("stage=")], ["stage=evaluate", "force=true"])
        eval_dir = pipeline(name, rescore)["evaluate"]
        report = json.loads((eval_dir / "report.json").read_text())
    train_dir = Path(report["inputs"]["train"])
    return {
        "group": group,
        "x": x,
        "command": "python -m pipeline " + " ".join(args),
        "metrics": report["metrics"],
        "heldout_examples": report["heldout_examples"],
        "scored_tokens": report["scored_tokens"],
        "train_examples": json.loads((train_dir / "manifest.json").read_text()).get("examples"),
        # each stage's own seconds (from its manifest; a reused stage keeps the seconds of the run that made it)
        "seconds": {stage: stage_seconds(f) for stage, f in folders.items() if stage != "evaluate"},
        "wall_seconds_this_call": round(time.time() - started, 1),
        "evaluate_dir": str(eval_dir.relative_to(ROOT)),
        "per_input": next(iter(report["per_input"].values())),  # held-out KL sums per input, for `compare`
        "by_position": answer_bins(report),  # for `positions`
    }


def answer_bins(report: dict) -> list[dict]:
    """The report's recovery along the answer; for reports from before it, pooled from the per-position means."""
    sys.path.insert(0, str(ROOT))  # for bins_from_means (the script runs from benchmarks/)
    pp = report["per_position"]
    return pp.get("recovery_bins") or bins_from_means(pp["effect_kl"], pp["residual_kl"], pp["count"])


def run_study(study: str, names: list[str], runs: dict, run_one, results_path: Path) -> None:
    """Run named study rows in order, saving each result as it finishes (shared by the studies in benchmarks/)."""
    unknown = [n for n in names if n not in runs]
    if unknown:
        raise SystemExit(f"{study}: no run named {unknown}. Fix: one of {', '.join(runs)}.")
    for name in names:
        result = run_one(name)
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results[name] = result
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(results_path)  # atomic: a killed study keeps every finished run


def run(names: list[str]) -> None:
    run_study("fidelity", names, RUNS, run_one, RESULTS)


def compare(a: str, b: str) -> None:
    """Recovery of run b minus run a, on the same held-out inputs, with the paired bootstrap interval."""
    sys.path.insert(0, str(ROOT))  # the script runs from benchmarks/; imported here so list/table need no torch
    from pipeline.core.losses import paired_difference

    results = load_results()
    missing = [n for n in (a, b) if "per_input" not in results.get(n, {})]
    if missing:
        raise SystemExit(f"fidelity: {missing} have no per-input sums. Fix: python benchmarks/fidelity.py run {' '.join(missing)}")
    ra, rb = results[a]["per_input"], results[b]["per_input"]
    if [e["id"] for e in ra] != [e["id"] for e in rb]:
        raise SystemExit(f"fidelity: {a} and {b} were scored on different held-out inputs; a paired difference needs the same ones.")
    diff, low, high = paired_difference(*([e[k] for e in rows] for rows in (ra, rb) for k in ("residual", "effect")))
    print(f"{b} - {a}: recovery {diff:+.3f} [{low:+.3f}, {high:+.3f}] (95%, {len(ra)} inputs resampled jointly)")


def positions(names: list[str]) -> None:
    """Recovery within bins of answer positions, as stored for each run (with intervals where its report had them;
    reports from before `per_position.recovery_bins` existed give the pooled figure from their per-position means)."""
    sys.path.insert(0, str(ROOT))  # imported here so list/table need no torch
    from pipeline.core.report import answer_span

    results = load_results()
    for name in names or list(results):
        bins = results[name].get("by_position")
        if bins is None:
            print(f"{name:24s} no recovery along the answer stored. Fix: python benchmarks/fidelity.py run {name}")
            continue
        cells = [f"{answer_span(b)}: {b['effect_share']:.2f} of effect, "
                 f"{b['recovery']:.3f}" + (f" [{b['recovery_ci'][0]:.3f}, {b['recovery_ci'][1]:.3f}]" if b.get("recovery_ci") else "")
                 for b in bins]
        print(f"{name:24s} {results[name]['metrics']['recovery']:.3f} | " + " | ".join(cells))


def bins_from_means(effect: list, residual: list, count: list) -> list[dict]:
    """The bins of `losses.recovery_by_position` from per-position means x counts: the inputs pooled into one
    (per-input sums were not kept), so the same recovery and share, and no interval."""
    import torch

    from pipeline.core.losses import recovery_by_position

    def pooled(means):
        return [torch.tensor([m * c for m, c in zip(means, count)], dtype=torch.float64)]

    bins = recovery_by_position(pooled(effect), pooled(residual), resamples=0)
    return [{k: b[k] for k in ("start", "end", "effect_share", "recovery")} for b in bins]


def probe_retention(metrics: dict) -> str:
    probes = metrics.get("probes") or []
    return "; ".join(fmt_ci(p, "retention") for p in probes) or "–"


def fmt_ci(metrics: dict, key: str) -> str:
    value, ci = metrics.get(key), metrics.get(key + "_ci")
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def table() -> None:
    results = load_results()
    DOCS.mkdir(parents=True, exist_ok=True)
    lines = [
        "| run | varies | train inputs | held-out inputs | recovery, held-out [95% CI] | recovery, training inputs | probe retention | drift | train s | command |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        m = r["metrics"]
        lines.append(
            f"| {name} | {r['group']} | {r['train_examples']} | {r['heldout_examples']} | {fmt_ci(m, 'recovery')} | {fmt_ci(m, 'train_recovery')} | "
            f"{probe_retention(m)} | {m.get('drift_kl', float('nan')):.4f} | {r['seconds'].get('train') or '–'} | "
            f"`{r['command']}` |"
        )
    (DOCS / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results)


def epochs_of(result: dict) -> int:
    match = re.search(r"train\.epochs=(\d+)", result["command"])
    return int(match.group(1)) if match else 3  # the default


def plot(results: dict) -> None:
    """Held-out recovery (with its interval) against training inputs, one line per epoch count, and the
    recovery on training inputs dotted: the gap between the two is what does not generalise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default_recipe = [r for r in results.values() if r["group"] == "training inputs" or r["group"].startswith("epochs")]
    bf16 = [r for r in results.values() if r["group"] == "training inputs (bf16)"]  # the same recipe, bf16 steps
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for runs, color, recipe in ((default_recipe, "tab:blue", "3 epochs"), (default_recipe, "tab:orange", "1 epoch"),
                                (bf16, "tab:green", "3 epochs, bf16")):
        epochs = int(recipe.split()[0])
        curve = sorted((r for r in runs if epochs_of(r) == epochs), key=lambda r: r["train_examples"])
        if not curve:
            continue
        xs = [r["train_examples"] for r in curve]
        for key, style, label in (("recovery", "-o", "held-out"), ("train_recovery", ":s", "training inputs")):
            ys = [r["metrics"][key] for r in curve]
            cis = [r["metrics"][key + "_ci"] for r in curve]
            err = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
            ax.errorbar(xs, ys, yerr=err, fmt=style, color=color, capsize=3, label=f"{recipe}, {label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training inputs (beyond 253: synthesized)")
    ax.set_ylabel("recovery (full-vocabulary KL)")
    ax.set_ylim(0.5, 1)
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set_title("<pirate> on SmolLM2-135M-Instruct, 67 held-out inputs, 95% CI")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(DOCS / "learning_curve.png", dpi=120)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("list", "run", "table", "compare", "positions"):
        raise SystemExit(__doc__)
    if argv[0] == "list":
        done = load_results()
        for name, (group, x, overrides) in RUNS.items():
            print(f"{'done' if name in done else '    '}  {name:15s} {group:32s} {' '.join(overrides)}")
    elif argv[0] == "run":
        run(argv[1:])
    elif argv[0] == "compare" and len(argv) == 3:
        compare(argv[1], argv[2])
    elif argv[0] == "table":
        table()
    elif argv[0] == "positions":
        positions(argv[1:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
