"""The evaluation report, rendered from `report.json`: `report.md`, a self-contained `report.html`, PNG plots.

Evaluate writes one report into its own folder; `python -m pipeline.report` (pipeline/cli/report.py) gathers
every finished evaluation into one report, or re-renders one after the renderer changed.

Inputs: `report.json` (metrics, samples, per-position KL) and, when it is still there, the training log
`train_log.json` in the train folder the report names. The HTML embeds its images (base64), so it opens
from disk with no server. Plots use matplotlib's object API with the Agg canvas (no display needed).
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.config import PROJECT_ROOT
from pipeline.core import contexts, crosstag, strength
from pipeline.runtime.formatting import interval, label, number
from pipeline.runtime.outputs import write_text

log = logging.getLogger(__name__)
PLOTS = "plots"
FIGURES = {  # file stem -> (title, caption)
    "recovery": ("Recovery per tag", "Recovery per tag: the share of the prompt's effect the tag reproduces (1 = all "
                 "of it, 0 = no more than no prompt), before and after training, with 95% bootstrap intervals over "
                 "the held-out inputs; diamonds: the trained tag on training inputs."),
    "kl_per_position": ("Per-position KL to the teacher", "KL to the teacher (the model reading the full prompt) at "
                        "each position of its held-out answers: the base model without prompt (dashed), the untrained "
                        "tag (dotted) and the student with the tag (solid). Where the solid line is below the dashed "
                        "one, the tag does what the prompt did."),
    "loss": ("Training loss", "Training loss per logged step."),
    "strength": ("Tag strength", "The tag applied at strength s by guidance (untagged + s (tagged - untagged)): recovery, "
                 "its behaviour probe and the NLL of the guided answers under the base model and the teacher, with 95% "
                 "bootstrap intervals over the held-out inputs (pipeline/strength.py)."),
}
MIN_SHARE = 0.25  # the per-position plot stops where fewer than this share of samples are still that long


# ---------------------------------------------------------------- data


def load(report_dir: str | Path) -> dict:
    """report.json plus where it came from and, if still on disk, the training log."""
    report_dir = Path(report_dir)
    path = report_dir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Fix: point to an evaluate output folder (outputs/evaluate/...).")
    report = json.loads(path.read_text())
    report["folder"] = str(report_dir)
    train_log = Path(report.get("inputs", {}).get("train", "")) / "train_log.json"
    report["train_log"] = json.loads(train_log.read_text()) if train_log.is_file() else []
    return report


TABLE_HEADERS = [
    "tag",
    "effect KL",
    "residual KL",
    "recovery",
    "recovery 95% interval",
    "drift KL",
    "prompt tokens saved",
    "recovery, untrained tag",
    "recovery on training inputs",
]


def table_row(report: dict) -> list[str]:
    """The numbers of one evaluation as the table shows them (KL in nats/token)."""
    m = report["metrics"]
    return [
        label(report),
        number(m["effect_kl"], 4),
        number(m["residual_kl"], 4),
        number(m["recovery"], 3),
        interval(m.get("recovery_ci"), 3),
        number(m.get("drift_kl"), 5),
        str(m["prompt_tokens_saved"]),
        number(m.get("init_recovery"), 3),
        number(m.get("train_recovery"), 3),
    ]


PROBE_HEADERS = ["tag", "probe", "base", "teacher", "student", "retention", "retention 95% interval"]


def probe_rows(report: dict) -> list[list[str]]:
    """One row per probe of every evaluated set: the three models' values and the student's retention."""
    rows = []
    for s in report.get("sets") or [{"tags": report.get("tags"), **report["metrics"]}]:
        for p in s.get("probes", []):
            where = "" if "".join(s["tags"]) == p["tag"] else f" in {''.join(s['tags'])}"
            rows.append([p["tag"] + where, p["measures"], number(p["base"], 2), number(p["teacher"], 2),
                         number(p["student"], 2), number(p["retention"], 2), interval(p["retention_ci"], 2)])
    return rows


def loss_curve(train_log: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, losses) from a Trainer log history (the final summary entry has no 'loss')."""
    points = [(e["step"], e["loss"]) for e in train_log if "loss" in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


# ---------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 3.6):
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def plot_recovery(reports: list[dict], path: Path) -> Path:
    """Grouped bars per tag: recovery of the untrained tag and of the trained student."""
    fig, ax = _figure(max(5.5, 1.4 * len(reports) + 2.5))
    x = np.arange(len(reports))
    floor = -1.0  # bars below are cut here (the label keeps the true value), so one bad init can't hide the rest
    for offset, key, name, color in ((-0.2, "init_recovery", "untrained tag", "#b0b0b0"), (0.2, "recovery", "trained", "C0")):
        values = [r["metrics"].get(key, float("nan")) for r in reports]
        shown = [max(v, floor) for v in values]
        bars = ax.bar(x + offset, shown, width=0.38, label=name, color=color)
        bounds = [r["metrics"].get(key + "_ci") or [None, None] for r in reports]
        if any(None not in b for b in bounds):  # 95% intervals over held-out inputs (reports from before have none)
            # (a ratio's percentile interval can sit beside its point estimate, and bars are cut at the floor)
            low = [max(0.0, v - max(b[0], floor)) if None not in b else 0.0 for v, b in zip(shown, bounds)]
            high = [max(0.0, max(b[1], floor) - v) if None not in b else 0.0 for v, b in zip(shown, bounds)]
            ax.errorbar(x + offset, shown, yerr=[low, high], fmt="none", ecolor="black", elinewidth=1, capsize=3)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 3 if bar.get_height() >= 0 else -11), textcoords="offset points",
                        ha="center", fontsize=8)
    fit = [r["metrics"].get("train_recovery") for r in reports]
    if any(v is not None for v in fit):  # the same scorer on training inputs: fit beside generalisation
        ax.scatter([xi + 0.2 for xi, v in zip(x, fit) if v is not None], [max(v, floor) for v in fit if v is not None],
                   marker="D", color="C1", zorder=3, label="trained, on training inputs")
    ax.axhline(1.0, color="C2", lw=1, ls="--", label="full prompt")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, [label(r) for r in reports])
    ax.set_ylabel("recovery (1 - residual / effect)")
    lows = [(r["metrics"].get(k + "_ci") or [None])[0] for r in reports for k in ("init_recovery", "recovery")]
    lows += [r["metrics"].get(k, 0.0) for r in reports for k in ("init_recovery", "recovery")]
    lowest = min(max(v, floor) for v in lows if v is not None)
    ax.set_ylim(min(0.0, lowest) - 0.1, 1.45)  # room above 1 for the legend
    ax.legend(loc="upper left", fontsize=7, ncols=2)
    ax.set_title("Recovery per tag")
    fig.savefig(path)
    return path


def plot_kl_by_position(reports: list[dict], path: Path) -> Path | None:
    """Mean KL to the teacher per position: base (no prompt) dashed, student solid, untrained tag dotted."""
    with_data = [r for r in reports if r.get("per_position", {}).get("count")]
    if not with_data:
        return None
    fig, ax = _figure()
    for i, r in enumerate(with_data):
        pp, color = r["per_position"], f"C{i}"
        keep = [c >= max(1, MIN_SHARE * max(pp["count"])) for c in pp["count"]]
        n = sum(keep)  # counts only shrink along the sequence, so the kept positions are a prefix
        tag = f"{label(r)}: " if len(with_data) > 1 else ""
        ax.plot(range(n), pp["effect_kl"][:n], ls="--", color=color, label=f"{tag}base, no prompt")
        if "init_residual_kl" in pp:
            ax.plot(range(n), pp["init_residual_kl"][:n], ls=":", color=color, alpha=0.7, label=f"{tag}untrained tag")
        ax.plot(range(n), pp["residual_kl"][:n], ls="-", color=color, lw=2, label=f"{tag}student with {label(r)}")
    ax.set_xlabel("position in the teacher's answer (tokens)")
    ax.set_ylabel("KL to teacher (nats)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Per-position KL to the teacher")
    fig.savefig(path)
    return path


def plot_loss(reports: list[dict], path: Path) -> Path | None:
    curves = [(r, *loss_curve(r["train_log"])) for r in reports]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig, ax = _figure()
    for i, (r, steps, losses) in enumerate(curves):
        train = r.get("train", {})
        ax.plot(steps, losses, marker="o", ms=3, color=f"C{i}",
                label=f"{label(r)} ({train.get('objective', '?')}, {train.get('params', '?')})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    fig.savefig(path)
    return path


def make_plots(reports: list[dict], out_dir: Path) -> dict[str, Path]:
    """Write the PNGs under out_dir/plots; returns stem -> path for those there was data for."""
    plots = out_dir / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    made = {
        "recovery": plot_recovery(reports, plots / "recovery.png"),
        "kl_per_position": plot_kl_by_position(reports, plots / "kl_per_position.png"),
        "loss": plot_loss(reports, plots / "loss.png"),
    }
    swept = [r for r in reports if r.get("strength")]
    if swept:  # the tag-strength sweep (evaluate.strengths), first report holding one
        made["strength"] = strength.plot(swept[0]["strength"], plots / "strength.png")
    for i, r in enumerate(reports):  # one cross-tag heatmap per run with two or more tags
        if r.get("crosstag"):
            made[f"crosstag-{i}"] = crosstag.plot(r["crosstag"], plots / f"crosstag-{i}.png")
    return {k: v for k, v in made.items() if v is not None}


# ---------------------------------------------------------------- document


def headline_blocks(reports: list[dict]) -> list[tuple]:
    title = f"Metatoken report: `{label(reports[0])}`" if len(reports) == 1 else f"Metatoken report: {len(reports)} evaluations"
    return [("h1", title), ("table", TABLE_HEADERS, [table_row(r) for r in reports]), (
        "p",
        "KL in nats per token, teacher-forced on the teacher's held-out answers. **effect** = KL(teacher with prompt "
        "|| base model without prompt); **residual** = KL(teacher with prompt || student with the tag); "
        "**recovery** = 1 - residual / effect (1: the tag does all the prompt did; 0: no more than no prompt); "
        "**drift** = KL(base || student) on untagged held-out inputs (what training cost elsewhere); "
        "**prompt tokens saved** per call. **recovery, untrained tag**: the same for the freshly added tag; "
        "**on training inputs**: the trained tag on inputs it was trained on (fit, beside the held-out generalisation). "
        f"Intervals: 95% bootstrap over the inputs ({_resamples(reports)} resamples, each recomputing the token-weighted ratio).",
    )]


def probe_blocks(reports: list[dict]) -> list[tuple]:
    probes = [row for r in reports for row in probe_rows(r)]
    if not probes:
        return []
    out = [("h2", "Behaviour probes"), ("table", PROBE_HEADERS, probes)]
    out.append(("p", "Each probe counts one visible trait of the prompt in sampled answers to the held-out inputs "
                     "(the base model without prompt, the teacher with it, the student with the tag; same sampling "
                     "settings). **retention** = (student - base) / (teacher - base): 1 = as much as the teacher, "
                     "0 = no more than the base model, above 1 = more than the teacher (a caricature)."))
    patterns = {p["tag"]: p["pattern"] for r in reports for s in r.get("sets", []) for p in s.get("probes", []) if p.get("pattern")}
    if patterns:
        out.append(("p", "Patterns (case-insensitive): " + "; ".join(f"`{t}` `{pat}`" for t, pat in patterns.items()) + "."))
    return out


def set_blocks(reports: list[dict], figures: dict[str, Path]) -> list[tuple]:
    """Every tag set of a remix run (trained together or not), and a pretrain run's plain-text drift."""
    out = []
    for r in reports:
        if len(r.get("sets", [])) > 1:  # a remix run: every tag set, trained together or not
            out.append(("h2", f"Every tag set evaluated (`{label(r)}`)"))
            out.append(("table", ["tags", "in training", "effect", "residual", "recovery", "95% interval", "untrained recovery",
                                  "on training inputs", "prompt tokens saved"], [
                ["".join(s["tags"]), "yes" if s["in_training"] else "**no**", number(s["effect_kl"], 4),
                 number(s["residual_kl"], 4), number(s["recovery"], 3), interval(s.get("recovery_ci"), 3),
                 number(s["init_recovery"], 3), number(s.get("train_recovery"), 3), str(s["prompt_tokens_saved"])]
                for s in r["sets"]
            ]))
    for i, r in enumerate(reports):
        out += crosstag.blocks(r, f"{PLOTS}/crosstag-{i}.png" if f"crosstag-{i}" in figures else None)
        out += contexts.blocks(r)
    for r in reports:
        m = r["metrics"]
        if "plain_drift_kl" in m:  # continued pretraining: the plain-text half of the mixture
            out.append((
                "p",
                f"Held-out plain text (`{label(r)}`, {m['plain_heldout_docs']} documents, {m['plain_tokens']} tokens, never "
                f"trained on): drift KL(base || student) **{m['plain_drift_kl']:.4f}** nats/token; NLL base "
                f"{m['plain_nll_base']:.4f} -> student {m['plain_nll_student']:.4f} nats/token.",
            ))
    return out


def detail_blocks(r: dict, several: bool) -> list[tuple]:
    """One evaluation's settings, context sizes and side-by-side samples."""
    m, train = r["metrics"], r.get("train", {})
    out = [("h2", f"`{label(r)}`" if several else "Details")]
    out.append((
        "p",
        f"Model `{r['model']}`, {r['heldout_examples']} held-out inputs, {r['scored_tokens']} scored tokens. "
        f"Training: {'continued pretraining (LM loss on packed tagged + plain documents)' if train.get('mode') == 'pretrain' else 'objective `' + str(train.get('objective')) + '`'}, params `{train.get('params')}`, "
        f"epochs {train.get('epochs')}, max_steps {train.get('max_steps')}, lr {train.get('lr')}, "
        f"embedding_lr {train.get('embedding_lr')}. Context per call: teacher "
        f"{m['teacher_context_tokens']:.0f} tokens on average, student {m['student_context_tokens']:.0f}. "
        f"{_fit_and_drift(m)}Folder: `{_relative(r.get('output', r['folder']))}`.",
    ))
    pp = r.get("per_position", {})
    if pp.get("recovery_bins"):  # reports from before it have none
        fit = {b["start"]: b for b in pp.get("train_recovery_bins", [])}
        out.append(("p", "Recovery along the answer (the first tag set; 95% intervals over inputs):"))
        out.append(("table", ["answer", "share of the effect", "recovery, held-out", "recovery, training inputs"], [
            [answer_span(b), f"{b['effect_share']:.2f}", f"{b['recovery']:.3f} ({interval(b['recovery_ci'], 3)})",
             f"{fit[b['start']]['recovery']:.3f} ({interval(fit[b['start']]['recovery_ci'], 3)})" if b["start"] in fit else "–"]
            for b in pp["recovery_bins"]
        ]))
    out.append(("h3", "Samples (held-out inputs)"))
    for s in r["samples"]:
        out.append(("sample", s["input"], [
            ("base, no prompt", s["base"]),
            ("teacher, full prompt", s["teacher"]),
            (f"student, `{''.join(s.get('tags', [])) or label(r)}`", s["student"]),
        ]))
    return out


def blocks(reports: list[dict], figures: dict[str, Path]) -> list[tuple]:
    """The report as a list of blocks that both the Markdown and the HTML writers render.

    Block kinds: ("h1"|"h2"|"h3"|"p", text with **bold** and `code`), ("table", headers, rows),
    ("img", title, caption, path relative to the report), ("sample", input, [(heading, text), ...])
    where headings may hold `code` and texts are shown verbatim.
    """
    out = headline_blocks(reports) + probe_blocks(reports) + set_blocks(reports, figures)
    out += strength.report_blocks(reports)  # evaluate.strengths: a table per sweep
    out.append(("h2", "Plots"))
    out += [("img", *FIGURES[stem], f"{PLOTS}/{path.name}") for stem, path in figures.items() if stem in FIGURES]
    if "loss" not in figures:
        out.append(("p", "No training loss curve: the train folder's `train_log.json` was not found."))
    for r in reports:
        out += detail_blocks(r, len(reports) > 1)
    return out


def _resamples(reports: list[dict]) -> str:
    counts = sorted({r.get("intervals", {}).get("resamples", 1000) for r in reports})
    return " or ".join(f"{c:,}" for c in counts)


def _fit_and_drift(m: dict) -> str:
    """The details sentence on training-input recovery and drift's interval (empty for older reports)."""
    text = ""
    if m.get("train_examples"):
        text += (f"On {m['train_examples']} training inputs (same scorer): effect {m['train_effect_kl']:.4f}, residual "
                 f"{m['train_residual_kl']:.4f}, recovery {m['train_recovery']:.3f} ({interval(m.get('train_recovery_ci'), 3)}), "
                 f"against {m['recovery']:.3f} held out. ")
    if m.get("drift_kl_ci"):
        text += f"Drift 95% interval {interval(m['drift_kl_ci'], 5)}. "
    return text


def answer_span(b: dict) -> str:
    """Positions [start, end) of a recovery bin as 1-based answer tokens: "token 1", "tokens 2-4", "tokens 17 on"."""
    if b["end"] is None:
        return f"tokens {b['start'] + 1} on"
    return f"token {b['start'] + 1}" if b["end"] == b["start"] + 1 else f"tokens {b['start'] + 1}-{b['end']}"


def _relative(path: str) -> str:
    """A path inside the checkout as the user types it (outputs/...), others unchanged."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def _md_cell(text: str) -> str:
    return html.escape(str(text).strip(), quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def to_markdown(doc: list[tuple]) -> str:
    lines: list[str] = []
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|---|" + "---:|" * (len(headers) - 1))
            lines += ["| " + " | ".join([f"`{row[0]}`", *(str(c).replace("|", "\\|") for c in row[1:])]) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[1]}]({block[3]})", "", f"*{block[2]}*", ""]
        elif kind == "sample":
            columns = block[2]
            lines += [f"**Input:** {_md_cell(block[1])}", ""]
            lines.append("| " + " | ".join(h for h, _ in columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(_md_cell(t) for _, t in columns) + " |", ""]
    return "\n".join(lines).rstrip() + "\n"


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the blocks use: **bold** and `code`."""
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; } code { background: #f2f2f2; padding: 0 3px; }
table { border-collapse: collapse; margin: 0.6em 0 1em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; vertical-align: top; }
th { background: #f5f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sample { width: 100%; table-layout: fixed; } table.sample td { white-space: pre-wrap; font-size: 0.93em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } .input { margin: 1.2em 0 0.3em; }
"""


def to_html(doc: list[tuple], base_dir: Path) -> str:
    """A single HTML file: CSS inline and every image embedded as a base64 data URI."""
    title = next(b[1] for b in doc if b[0] == "h1").replace("`", "")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>"]
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            body = "".join(
                f"<tr><td><code>{html.escape(row[0])}</code></td>"
                + "".join(f"<td class='num'>{html.escape(c)}</td>" for c in row[1:]) + "</tr>"
                for row in block[2]
            )
            parts.append(f"<table class='results'><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            data = base64.b64encode((base_dir / block[3]).read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(block[1])}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{_inline(block[2])}</figcaption></figure>")
        elif kind == "sample":
            head = "".join(f"<th>{_inline(h)}</th>" for h, _ in block[2])
            cells = "".join(f"<td>{html.escape(t.strip())}</td>" for _, t in block[2])
            parts.append(f"<p class='input'><b>Input:</b> {html.escape(block[1])}</p>"
                         f"<table class='sample'><tr>{head}</tr><tr>{cells}</tr></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render(report_dirs: str | Path | list, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Render report.md, report.html and plots/*.png for one or more evaluate folders.

    Args:
        report_dirs: an evaluate folder (holding report.json) or a list of them.
        out_dir: where to write; defaults to the folder itself when there is exactly one.
    Returns: name -> path of every file written.
    """
    dirs = [Path(report_dirs)] if isinstance(report_dirs, (str, Path)) else [Path(d) for d in report_dirs]
    if not dirs:
        raise ValueError("no evaluate folders to report on")
    if out_dir is None:
        if len(dirs) > 1:
            raise ValueError("several reports need an out_dir to write the combined report to")
        out_dir = dirs[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = [load(d) for d in dirs]
    figures = make_plots(reports, out_dir)
    doc = blocks(reports, figures)
    write_text(out_dir / "report.md", to_markdown(doc))
    write_text(out_dir / "report.html", to_html(doc, out_dir))
    return {"report.md": out_dir / "report.md", "report.html": out_dir / "report.html", **figures}


def log_to_wandb(report_dir: str | Path, logger_cfg) -> None:
    """The report's figures, a samples table and the metrics, to a wandb run (offline unless told otherwise).

    Optional by design: a failure here (no network in online mode, a broken install) is a warning,
    never a lost evaluation; the files on disk are the report.
    """
    report_dir = Path(report_dir)
    try:
        import wandb

        report = load(report_dir)
        run = wandb.init(
            project=logger_cfg.project,
            name=f"evaluate-{report_dir.name}",
            job_type="evaluate",
            mode=os.environ.get("WANDB_MODE", logger_cfg.wandb_mode),
            dir=str(report_dir.parents[1]),  # outputs/wandb, beside the stage folders
            config={"tag": label(report), "model": report["model"], "train": report.get("train", {})},
            reinit="finish_previous",
        )
        table = wandb.Table(columns=["input", "base, no prompt", "teacher, full prompt", f"student, {label(report)}"])
        for s in report["samples"]:
            table.add_data(s["input"], s["base"], s["teacher"], s["student"])
        images = {f"report/{p.stem}": wandb.Image(str(p), caption=FIGURES.get(p.stem, ("",))[0])
                  for p in sorted((report_dir / PLOTS).glob("*.png"))}
        run.log({**images, "report/samples": table})
        run.summary.update({f"eval/{k}": v for k, v in report["metrics"].items()})
        run.finish()
    except Exception as err:  # noqa: BLE001 - tracking must never cost the evaluation
        log.warning("wandb: could not log the report (%s); the report files in %s are complete", err, report_dir)
