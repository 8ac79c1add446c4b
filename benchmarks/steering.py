"""A tag beside a steering vector: how much of `<pirate>`'s effect does activation addition recover, and at what cost?

Reads a finished pipeline run (by default the demo: `python -m pipeline experiment=demo`) and never
writes into it. The vector for layer L is the mean difference of the residual stream hidden_states[L]
with and without the prompt, over the run's training inputs, teacher-forced on the teacher's recorded
answers (pipeline/steering.py). It is added, times a scale, at every position of the untagged context,
and scored exactly as the evaluate stage scores the trained tag, on the same held-out inputs and the
same teacher and base answers:
- recovery = 1 - KL(teacher || X) / KL(teacher || base), full vocabulary, 95% bootstrap interval over inputs;
- KL(base || X) on the base model's own untagged answers: for the vector, the vector applied where no
  persona is wanted (its cost on plain use if it were left on); for the tag, the tag absent (evaluate's drift);
- the pirate probe on answers sampled with generate's settings (`--probe`).
Each (positions, layer, scale) cell is written to benchmarks/steering_results.json as soon as it is done,
and a finished cell is not run again, so a killed study continues where it stopped.

    python benchmarks/steering.py run --layers 8,15,22 --scales 0.5,1,2,4,8 --probe      # after `make demo`
    python benchmarks/steering.py run paths.outputs=/work/main/outputs --layers 15 --scales 4   # another checkout's run
    python benchmarks/steering.py table       # docs/steering/table.md and docs/steering/recovery.png from the JSON

Runs on the CPU with `OMP_NUM_THREADS` from the environment.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's `pipeline`, whatever the working directory
RESULTS = ROOT / "benchmarks" / "steering_results.json"
DOCS = ROOT / "docs" / "steering"
CACHE = ROOT / "outputs" / "steering"  # the vectors (git-ignored with outputs/)
PAGE_MARKS = ("<!-- table: benchmarks/steering.py table -->", "<!-- /table -->")
SAMPLES_KEPT = 2  # sampled answers stored per cell, for the page


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_results(results: dict) -> None:
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(RESULTS)  # atomic: a killed study keeps every finished cell


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import PROJECT_ROOT, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_folders(cfg, job, overrides: list[str]) -> dict[str, Path]:
    """The finished generate, train and evaluate folders of the run these overrides name (clear error if missing)."""
    from pipeline.stages import paths

    folders = {"generate": paths.output_dir("generate", cfg, job), "train": paths.output_dir("train", cfg, job), "evaluate": paths.output_dir("evaluate", cfg, job)}
    for stage, folder in folders.items():
        if not (folder / "manifest.json").is_file():
            raise SystemExit(
                f"steering: no finished {stage} output at {folder}. Fix: run the pipeline first with the same overrides "
                f"(`python -m pipeline stage=all {' '.join(overrides)}`), or pass paths.outputs=<its outputs folder>."
            )
    return folders


class Study:
    """The base model, the held-out reference logits and the rows, loaded once per `run`."""

    def __init__(self, overrides: list[str]):
        import torch
        from datasets import load_from_disk

        from pipeline.core.formats import context_ids
        from pipeline.core.job import job_from_config
        from pipeline.core.models import load_model, load_tokenizer, resolve_model_path
        from pipeline.core.scoring import continuation_logits, token_kls
        from pipeline.core.steering import Heldout

        self.overrides = overrides
        self.cfg = cfg = compose(overrides)
        self.job = job = job_from_config(cfg)
        if len(job.eval_sets) != 1 or len(job.tags) != 1:
            raise SystemExit("steering: the study is for a run of one tag (e.g. experiment=demo). Fix: drop mixture.sets.")
        self.tag_set = job.eval_sets[0]
        self.tag = self.tag_set[0]
        self.folders = run_folders(cfg, job, overrides)
        self.report = json.loads((self.folders["evaluate"] / "report.json").read_text())
        data = load_from_disk(str(self.folders["generate"] / "dataset")).remove_columns(["topk_ids", "topk_logprobs"])
        chat, bs = cfg.model.chat, cfg.evaluate.batch_size
        self.heldout_rows = [r for r in data if r["split"] == "heldout" and tuple(r["tags"]) == self.tag_set][: cfg.evaluate.max_examples]
        self.train_rows = [r for r in data if r["split"] == "train" and tuple(r["tags"]) == self.tag_set]
        self.drift_rows = [r for r in self.heldout_rows if r["base_output_ids"]]
        if not self.drift_rows:
            raise SystemExit(f"steering: {self.folders['generate']} has no base answers. Fix: run generate with generate.base_samples=true.")
        self.base_path = resolve_model_path(cfg.model)
        self.tok = tok = load_tokenizer(self.base_path)
        self.model = model = load_model(self.base_path, cfg.model.dtype, cfg.model.device)
        prompt = job.reference_prompt(self.tag_set)
        self.plain = [context_ids(tok, r["input"], None, chat) for r in self.heldout_rows]
        self.prompted = [context_ids(tok, r["input"], prompt, chat) for r in self.heldout_rows]
        self.drift_plain = [context_ids(tok, r["input"], None, chat) for r in self.drift_rows]
        self.drift_prompted = [context_ids(tok, r["input"], prompt, chat) for r in self.drift_rows]
        outs = [r["output_ids"] for r in self.heldout_rows]
        base_outs = [r["base_output_ids"] for r in self.drift_rows]
        teacher = continuation_logits(model, self.prompted, outs, tok.pad_token_id, bs, "teacher")
        effect = token_kls(teacher, continuation_logits(model, self.plain, outs, tok.pad_token_id, bs, "base"))
        base_logits = continuation_logits(model, self.drift_plain, base_outs, tok.pad_token_id, bs, "base own")
        self.heldout = Heldout(outs, teacher, effect, base_outs, base_logits)
        self.effect_kl = torch.cat(effect).mean().item()
        self.layer_count = len(model.model.layers)

    def setup(self) -> dict:
        return {
            "overrides": self.overrides,
            "model": self.cfg.model.name,
            "tag": self.tag,
            "generate": str(self.folders["generate"]),
            "train": str(self.folders["train"]),
            "evaluate": str(self.folders["evaluate"]),
            "train_examples": len(self.train_rows),
            "heldout_examples": len(self.heldout_rows),
            "drift_examples": len(self.drift_rows),
            "scored_tokens": sum(len(o) for o in self.heldout.teacher_outputs),
            "effect_kl": self.effect_kl,
            "report_effect_kl": self.report["metrics"].get("effect_kl"),
            "decoder_layers": self.layer_count,
            "intervals": {"level": 0.95, "over": "inputs", "resamples": self.cfg.evaluate.resamples, "seed": self.cfg.evaluate.seed},
        }

    def vectors(self, positions: str) -> dict:
        """Steering vectors for every layer 1..n-1 from the training rows (cached on disk: one pass makes all)."""
        import torch

        from pipeline.core.formats import context_ids
        from pipeline.core.steering import mean_differences

        path = CACHE / f"{self.folders['generate'].name}-{positions}.pt"
        if path.is_file():
            return torch.load(path)
        chat, prompt = self.cfg.model.chat, self.job.reference_prompt(self.tag_set)
        started = time.time()
        found = mean_differences(
            self.model,
            [context_ids(self.tok, r["input"], prompt, chat) for r in self.train_rows],
            [context_ids(self.tok, r["input"], None, chat) for r in self.train_rows],
            [r["output_ids"] for r in self.train_rows],
            list(range(1, self.layer_count)), self.tok.pad_token_id, self.cfg.evaluate.batch_size, positions,
        )
        found["seconds"] = round(time.time() - started, 1)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(found, path)
        return found

    def probe(self, answers: list[str]) -> dict | None:
        from pipeline.core.probes import probe_report

        probe = self.job.metatokens[self.tag].probe
        if probe is None:
            return None
        rows = self.heldout_rows
        seen = {"base": [r["base_output"] for r in rows], "teacher": [r["output"] for r in rows], "student": answers}
        return probe_report(probe, self.tag, seen, self.cfg.evaluate.resamples, self.cfg.evaluate.seed)

    def sample(self, model, tok, contexts, tag_ids=()) -> list[str]:
        from pipeline.core.sampling import sample_answers

        return sample_answers(model, tok, contexts, self.cfg.generate, list(tag_ids))[0]


def score_cell(study: Study, vectors: dict, positions: str, layer: int, scale: float, probe: bool) -> dict:
    from pipeline.core.steering import scores, steering

    cfg, tok, model = study.cfg, study.tok, study.model
    started = time.time()
    with steering(model, vectors["vectors"][layer], layer, scale):
        cell = scores(model, study.plain, study.drift_plain, study.heldout, tok.pad_token_id, cfg.evaluate, cfg.evaluate.batch_size,
                      name=f"L{layer} x{scale}")
        if probe:
            answers = study.sample(model, tok, study.plain)
            cell["probe"] = study.probe(answers)
            cell["samples"] = answers[:SAMPLES_KEPT]
    cell["seconds"] = round(time.time() - started, 1)
    return cell


def score_references(study: Study, probe: bool) -> dict:
    """The prompt and the trained tag on the same inputs: the tag recomputed here (a check on this script
    against the evaluate report), and KL(base || X) on the base answers with the persona on, for all three."""
    from pipeline.core.catalog import tags_of
    from pipeline.core.job import tagged_contexts
    from pipeline.core.models import load_model, load_tokenizer
    from pipeline.core.scoring import continuation_logits, drift_figures
    from pipeline.core.steering import scores

    cfg, tok, bs = study.cfg, study.tok, study.cfg.evaluate.batch_size
    started = time.time()
    prompt_on = drift_figures(study.heldout.base_logits, continuation_logits(study.model, study.drift_prompted, study.heldout.base_outputs,
                                                                         tok.pad_token_id, bs, "teacher on base answers"), cfg.evaluate)
    train_dir = study.folders["train"]
    student_tok = load_tokenizer(str(train_dir))
    student = load_model(str(train_dir), cfg.model.dtype, cfg.model.device)
    tag_ids = sorted(student_tok.convert_tokens_to_ids(t) for t in tags_of(train_dir))
    tagged = tagged_contexts(study.job, student_tok, study.heldout_rows, cfg.model.chat)
    tagged_drift = tagged_contexts(study.job, student_tok, study.drift_rows, cfg.model.chat)
    from pipeline.core.formats import context_ids

    untagged_drift = [context_ids(student_tok, r["input"], None, cfg.model.chat) for r in study.drift_rows]
    tag = scores(student, tagged, untagged_drift, study.heldout, student_tok.pad_token_id, cfg.evaluate, bs, tag_ids, "tag")
    tag_on = drift_figures(study.heldout.base_logits, continuation_logits(student, tagged_drift, study.heldout.base_outputs,
                                                                      student_tok.pad_token_id, bs, "tag on base answers", tag_ids), cfg.evaluate)
    tag["on_kl"], tag["on_kl_ci"] = tag_on["drift_kl"], tag_on["drift_kl_ci"]
    if probe:
        answers = study.sample(student, student_tok, tagged, tag_ids)
        tag["probe"] = study.probe(answers)
        tag["samples"] = answers[:SAMPLES_KEPT]
    del student
    report = study.report["metrics"]
    return {
        "prompt": {"on_kl": prompt_on["drift_kl"], "on_kl_ci": prompt_on["drift_kl_ci"],
                   "samples": [r["output"] for r in study.heldout_rows[:SAMPLES_KEPT]],
                   "base_samples": [r["base_output"] for r in study.heldout_rows[:SAMPLES_KEPT]]},
        "tag": {**tag, "report": {k: report.get(k) for k in ("effect_kl", "recovery", "recovery_ci", "drift_kl", "drift_kl_ci", "probes")}},
        "seconds": round(time.time() - started, 1),
    }


def command(overrides: list[str], positions: str, layers, scales, probe: bool) -> str:
    parts = ["python benchmarks/steering.py run", *overrides, f"--positions {positions}",
             f"--layers {','.join(map(str, layers))}", f"--scales {','.join(f'{s:g}' for s in scales)}"]
    return " ".join(parts + (["--probe"] if probe else []))


def run(args, overrides: list[str]) -> None:
    layers = [int(x) for x in args.layers.split(",")]
    scales = [float(x) for x in args.scales.split(",")]
    study = Study(overrides)
    for layer in layers:  # before any cell runs
        if not 1 <= layer < study.layer_count:
            raise SystemExit(f"steering: --layers has {layer}; the model has {study.layer_count} layers. Fix: use 1..{study.layer_count - 1}.")
    results = load_results()
    setup = study.setup()
    if results and (results["setup"]["generate"], results["setup"]["train"]) != (setup["generate"], setup["train"]):
        if not args.fresh:
            raise SystemExit(f"steering: {RESULTS} holds another run's cells ({results['setup']['generate']}). Fix: --fresh to start over.")
        results = {}
    results["setup"] = setup
    print(f"effect KL(teacher || base) {study.effect_kl:.4f} nats/token (evaluate report: {setup['report_effect_kl']})", flush=True)
    if "references" not in results or (args.probe and "probe" not in results["references"]["tag"]):
        results["references"] = score_references(study, args.probe)
        save_results(results)
    tag = results["references"]["tag"]
    print(f"tag: recovery {tag['recovery']:.4f} (report {tag['report']['recovery']:.4f}), drift {tag['drift_kl']:.5f} "
          f"(report {tag['report']['drift_kl']:.5f})", flush=True)
    vectors = study.vectors(args.positions)
    results.setdefault("vectors", {})[args.positions] = {
        "positions_averaged": vectors["positions"], "seconds": vectors.get("seconds"),
        "layers": {str(L): {"norm": vectors["vectors"][L].norm().item(), "residual_norm": vectors["norms"][L]} for L in vectors["vectors"]},
    }
    save_results(results)
    cells = results.setdefault("cells", {})
    for scale in scales:  # scale-major, in the order given: a study cut short has every layer at the first scales
        for layer in layers:
            name = f"{args.positions}/L{layer}/x{scale:g}"
            if name in cells and (not args.probe or "probe" in cells[name]):
                continue
            cell = score_cell(study, vectors, args.positions, layer, scale, args.probe)
            cells[name] = {"positions": args.positions, "layer": layer, "scale": scale, **cell,
                           "command": command(overrides, args.positions, [layer], [scale], args.probe)}
            save_results(results)
            probe = cell.get("probe") or {}
            print(f"{name}: recovery {cell['recovery']:.4f} {cell['recovery_ci']}, drift {cell['drift_kl']:.4f}, "
                  f"probe {probe.get('student')} ({cell['seconds']} s)", flush=True)


def fmt(value, ci=None, digits: int = 3) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci and ci[0] is not None else "")


def probe_cell(probe) -> str:
    if not probe:
        return "–"
    return f"{probe['student']:.2f} ({fmt(probe['retention'], probe['retention_ci'], 2)})"


def table() -> None:
    """docs/steering/table.md (one row per cell, the prompt and the tag first) and the plot, from the JSON."""
    results = load_results()
    if "cells" not in results:
        raise SystemExit(f"steering: no cells in {RESULTS}. Fix: `python benchmarks/steering.py run` first.")
    setup, refs = results["setup"], results["references"]
    tag, prompt = refs["tag"], refs["prompt"]
    reference_command = command(setup["overrides"], "answer", [], [], "probe" in tag).split(" --positions")[0]
    reference_command += " --probe" if "probe" in tag else ""
    teacher_probe = f"{tag['probe']['teacher']:.2f} (1 by definition)" if tag.get("probe") else "–"
    lines = [
        "| context | layer | scale | scale·‖v‖ / ‖h_L‖ | recovery [95% CI] | KL(base ‖ X), base answers, persona off | "
        "KL(base ‖ X), base answers, persona on | pirate words /100 (retention [95% CI]) | command |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| prompt (teacher) | – | – | – | 1 (by definition) | 0 | {fmt(prompt['on_kl'], prompt['on_kl_ci'], 4)} | "
        f"{teacher_probe} | `{reference_command}` |",
        f"| trained tag `{setup['tag']}` | – | – | – | {fmt(tag['recovery'], tag['recovery_ci'])} | {fmt(tag['drift_kl'], tag['drift_kl_ci'], 4)} | "
        f"{fmt(tag['on_kl'], tag['on_kl_ci'], 4)} | {probe_cell(tag.get('probe'))} | `{reference_command}` |",
    ]
    vectors = results["vectors"]
    for name, cell in sorted(results["cells"].items(), key=lambda kv: (kv[1]["positions"], kv[1]["layer"], kv[1]["scale"])):
        v = vectors[cell["positions"]]["layers"][str(cell["layer"])]
        relative = cell["scale"] * v["norm"] / v["residual_norm"]
        lines.append(
            f"| vector ({cell['positions']} positions) | {cell['layer']} | {cell['scale']:g} | {relative:.2f} | "
            f"{fmt(cell['recovery'], cell['recovery_ci'])} | 0 (not applied) | {fmt(cell['drift_kl'], cell['drift_kl_ci'], 4)} | "
            f"{probe_cell(cell.get('probe'))} | `{cell['command']}` |"
        )
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    page = DOCS.parent / "steering.md"  # the page holds the same table between its markers
    if page.is_file() and PAGE_MARKS[0] in page.read_text():
        text = page.read_text()
        head, rest = text.split(PAGE_MARKS[0], 1)
        page.write_text(head + PAGE_MARKS[0] + "\n" + "\n".join(lines) + "\n" + PAGE_MARKS[1] + rest.split(PAGE_MARKS[1], 1)[1])
    plot(results)


def plot(results: dict) -> None:
    """Recovery against scale, one line per layer, the tag as a band; beside it KL(base || X) with the persona on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup, tag, prompt = results["setup"], results["references"]["tag"], results["references"]["prompt"]
    cells = [c for c in results["cells"].values() if c["positions"] == "answer"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for layer, color in zip(sorted({c["layer"] for c in cells}), plt.cm.viridis([0.05, 0.45, 0.8, 0.95])):
        line = sorted((c for c in cells if c["layer"] == layer), key=lambda c: c["scale"])
        xs = [c["scale"] for c in line]
        for ax, key in ((left, "recovery"), (right, "drift_kl")):
            ys = [c[key] for c in line]
            err = [[y - c[key + "_ci"][0] for y, c in zip(ys, line)], [c[key + "_ci"][1] - y for y, c in zip(ys, line)]]
            ax.errorbar(xs, ys, yerr=err, fmt="-o", color=color, capsize=3, label=f"vector, layer {layer}")
    for ax, (value, ci), label in (
        (left, (tag["recovery"], tag["recovery_ci"]), "trained tag"),
        (right, (tag["on_kl"], tag["on_kl_ci"]), "trained tag (on)"),
    ):
        ax.axhline(value, color="tab:red", linewidth=1.5, label=label)
        ax.axhspan(ci[0], ci[1], color="tab:red", alpha=0.15)
    right.axhline(prompt["on_kl"], color="black", linestyle="--", linewidth=1, label="the prompt itself")
    right.axhline(tag["drift_kl"], color="tab:red", linestyle=":", linewidth=1.5, label="trained tag, absent (evaluate's drift)")
    left.axhline(0, color="grey", linewidth=0.8)
    left.set_ylim(max(-1.0, min([0.0] + [c["recovery"] for c in cells]) - 0.05), 1.0)
    left.set_ylabel("recovery: 1 - KL(teacher‖X) / KL(teacher‖base)")
    right.set_ylabel("KL(base ‖ X) on the base model's own answers")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("scale (multiples of the mean difference v_L)")
        ax.legend(fontsize=7)
    left.set_title(f"{setup['tag']}: recovery, {setup['heldout_examples']} held-out inputs, 95% CI", fontsize=9)
    right.set_title("cost on plain use: the persona applied where none is wanted", fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "recovery.png", dpi=120)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--layers", default="8,15,22", help="layers L (1..num_layers-1) whose hidden_states[L] is steered")
    parser.add_argument("--scales", default="0.5,1,2,4,8", help="multiples of the mean difference added")
    parser.add_argument("--positions", default="answer", choices=("answer", "last"), help="positions the mean is taken over")
    parser.add_argument("--probe", action="store_true", help="also sample answers and count the tag's probe (slower)")
    parser.add_argument("--fresh", action="store_true", help="discard the results of another run")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"steering: {bad} are not options or key=value overrides. Fix: see --help.")
    overrides = overrides or ["experiment=demo"]
    if args.action == "run":
        run(args, overrides)
    else:
        table()


if __name__ == "__main__":
    main(sys.argv[1:])
