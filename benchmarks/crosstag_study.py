"""The cross-tag study: what makes trained tags as distinct as their prompts (issue 18, item 2).

Runs the trio (`<nice>`, `<authoritative_tone>`, `<correct>`) at a size two CPU cores can afford, with and
without paired training inputs (`mixture.paired=true`: every input answered under every tag, so the tag is the
only difference between the examples of one input), at equal examples and compute, after 1 and 3 epochs.
Every run reads the same held-out inputs. Results (the report's cross-tag figures, stage times, the command)
go to `benchmarks/crosstag_results.json`; `table` writes docs/crosstag/study.md and the plot.

    python benchmarks/crosstag_study.py list
    python benchmarks/crosstag_study.py run unpaired-120 paired-40
    python benchmarks/crosstag_study.py table

Stage outputs are cached by config, so a killed study continues where it stopped.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import fmt_ci, pipeline, run_study, stage_seconds  # noqa: E402  (one runner for both studies)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "crosstag_results.json"
DOCS = ROOT / "docs" / "crosstag"
# The trio experiment, smaller: no untagged share (so both arms hold exactly the same kinds of example),
# 32 held-out inputs per tag, no fit-on-training-inputs pass (the matrix is what is compared).
COMMON = ["experiment=trio", "mixture.untagged=0", "inputs.max_heldout=32", "evaluate.train_examples=0"]
UNPAIRED = ["inputs.max_train=120"]  # 120 inputs, each under one of the three tags: 120 examples
PAIRED = ["inputs.max_train=40", "mixture.paired=true"]  # 40 inputs, each under all three tags: 120 examples

# name -> (paired?, epochs, overrides)
RUNS: dict[str, tuple[bool, int, list[str]]] = {
    "unpaired-120": (False, 3, UNPAIRED),
    "paired-40": (True, 3, PAIRED),
    "unpaired-120-e1": (False, 1, UNPAIRED + ["train.epochs=1"]),
    "paired-40-e1": (True, 1, PAIRED + ["train.epochs=1"]),
    "unpaired-240": (False, 3, ["inputs.max_train=240"]),  # twice the data (and the compute)
    "unpaired-120-e6": (False, 6, UNPAIRED + ["train.epochs=6"]),
    "paired-40-e6": (True, 6, PAIRED + ["train.epochs=6"]),
}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def run_one(name: str) -> dict:
    paired, epochs, overrides = RUNS[name]
    started = time.time()
    folders = pipeline(name, [*COMMON, *overrides])
    report = json.loads((folders["evaluate"] / "report.json").read_text())
    train_manifest = json.loads((Path(report["inputs"]["train"]) / "manifest.json").read_text())
    return {
        "paired": paired,
        "epochs": epochs,
        "command": "python -m pipeline " + " ".join(COMMON + overrides),
        "recovery": {k: report["metrics"].get(k) for k in ("recovery", "recovery_ci")},
        "crosstag": report["crosstag"],
        "train_examples": train_manifest.get("examples"),
        "seconds": {stage: stage_seconds(f) for stage, f in folders.items() if stage != "evaluate"},
        "wall_seconds_this_call": round(time.time() - started, 1),
        "evaluate_dir": str(folders["evaluate"].relative_to(ROOT)),
    }


def run(names: list[str]) -> None:
    run_study("crosstag_study", names, RUNS, run_one, RESULTS)


def table() -> None:
    results = load_results()
    DOCS.mkdir(parents=True, exist_ok=True)
    lines = ["| run | paired | epochs | examples | recovery | margin retention per tag | nearest own (all) | train s | command |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for name, r in sorted(results.items(), key=lambda kv: (kv[1]["paired"], kv[1]["epochs"])):
        margins = "; ".join(f"{t['tag']} {fmt_ci(t, 'margin_retention')}" for t in r["crosstag"]["per_tag"])
        lines.append(f"| {name} | {'yes' if r['paired'] else 'no'} | {r['epochs']} | {r['train_examples']} | "
                     f"{fmt_ci(r['recovery'], 'recovery')} | {margins} | {fmt_ci(r['crosstag'], 'nearest_own')} | "
                     f"{r['seconds'].get('train') or '–'} | `{r['command']}` |")
    (DOCS / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results)


def plot(results: dict) -> None:
    """Mean margin retention over the three tags (and nearest-own share) against epochs, paired vs not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    for r in (r for r in results.values() if r["train_examples"] != 120):  # more data: a point of its own
        margin = sum(t["margin_retention"] for t in r["crosstag"]["per_tag"]) / len(r["crosstag"]["per_tag"])
        left.plot([r["epochs"]], [margin], "*", color="tab:green", markersize=11, label=f"unpaired, {r['train_examples']} inputs")
        ci = r["crosstag"]["nearest_own_ci"]
        right.errorbar([r["epochs"]], [r["crosstag"]["nearest_own"]], yerr=[[r["crosstag"]["nearest_own"] - ci[0]], [ci[1] - r["crosstag"]["nearest_own"]]],
                       fmt="*", color="tab:green", markersize=11, capsize=3)
    for paired, color in ((False, "tab:blue"), (True, "tab:orange")):
        curve = sorted((r for r in results.values() if r["paired"] == paired and r["train_examples"] == 120), key=lambda r: r["epochs"])
        if not curve:
            continue
        xs = [r["epochs"] for r in curve]
        label = "paired (40 inputs x 3 tags)" if paired else "unpaired (120 inputs, 1 tag each)"
        margins = [sum(t["margin_retention"] for t in r["crosstag"]["per_tag"]) / len(r["crosstag"]["per_tag"]) for r in curve]
        left.plot(xs, margins, "-o", color=color, label=label)
        ys = [r["crosstag"]["nearest_own"] for r in curve]
        cis = [r["crosstag"]["nearest_own_ci"] for r in curve]
        right.errorbar(xs, ys, yerr=[[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]],
                       fmt="-o", color=color, capsize=3, label=label)
    left.set(xlabel="epochs", ylabel="margin retention (mean of 3 tags)", title="tags as distinct as prompts = 1")
    right.set(xlabel="epochs", ylabel="nearest-own share (95% CI)", title="samples nearest their own tag")
    left.axhline(0.8, color="grey", linestyle=":", linewidth=1)
    right.axhline(0.98, color="grey", linestyle=":", linewidth=1)
    left.legend(fontsize=8)
    fig.suptitle("trio on SmolLM2-135M-Instruct, 120 examples (lines), 32 held-out inputs per tag", fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "margin_vs_epochs.png", dpi=120)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("list", "run", "table"):
        raise SystemExit(__doc__)
    if argv[0] == "list":
        done = load_results()
        for name, (paired, epochs, overrides) in RUNS.items():
            print(f"{'done' if name in done else '    '}  {name:17s} {' '.join(overrides)}")
    elif argv[0] == "run":
        run(argv[1:])
    else:
        table()


if __name__ == "__main__":
    main(sys.argv[1:])
