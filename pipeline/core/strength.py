"""A tag at several strengths (classifier-free guidance, pipeline/guidance.py): KL to the teacher, the tag's
behaviour probe and the fluency of the guided answers, on the held-out inputs.

    python -m pipeline stage=evaluate metatoken=pirate evaluate.strengths=[-1,0,0.5,1,1.5,2,3]  # a section of the report
    python -m pipeline.strength from=outputs/train/pirate-1a2b3c4d5e                          # an existing output -> docs/strength.md

At each strength s, with the guided distribution log_softmax(untagged + s (tagged - untagged)):
- KL(teacher || guided) per token, teacher-forced on the teacher's held-out answers, full vocabulary, and
  recovery = 1 - KL(teacher || guided) / KL(teacher || base) (base: the base model without prompt, as in evaluate);
- the tag's probe (its metatoken YAML) on guided answers to the held-out inputs (generate's sampling settings,
  one seed per input, the same seeds at every strength), beside the base model's and the teacher's answers;
- fluency: mean NLL per token of the guided answers under the base model without prompt and under the teacher
  (the base model reading the full prompt), beside the same for the teacher's and the base model's own answers.
All intervals: 95% bootstrap over inputs. The untagged branch is the student's context with the tag removed (an
empty system message), so at s = 0 the student is not the base model and its recovery need not be 0.

The standalone command reads the trained output's manifest (its config), its generate folder beside it
(read only), caches guided samples under `work=` (default outputs/strength/; a rerun resumes), and writes
`out=` (default docs/strength.md) with docs/strength/strength.png and strength.json beside it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from matplotlib.figure import Figure

from pipeline.core import guidance, scoring
from pipeline.core.formats import context_ids
from pipeline.core.losses import bootstrap_interval, full_kl, pooled_mean
from pipeline.core.models import load_model, load_tokenizer
from pipeline.core.probes import answer_terms, probe_report
from pipeline.core.sampling import _eos_ids
from pipeline.errors import ConfigError
from pipeline.runtime import outputs

log = logging.getLogger(__name__)
DEFAULT_STRENGTHS = [-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
EXAMPLES = 2  # held-out inputs whose guided answers are shown at every strength


def check(cfg, job) -> list[float]:
    """`evaluate.strengths` as finite floats, for a run whose first evaluated set is one tag (before any model loads)."""
    strengths = [guidance.check_strength(s, f"evaluate.strengths[{i}]") for i, s in enumerate(cfg.evaluate.strengths or [])]
    if strengths and len(job.eval_sets[0]) != 1:
        raise ConfigError(
            f"evaluate.strengths: the first evaluated set is {'+'.join(job.eval_sets[0])}, not one tag; a strength sweep "
            "guides one tag. Fix: leave evaluate.strengths empty for this run, or evaluate a single-tag run."
        )
    return strengths


def _interval(sums, counts, eval_cfg) -> list[float]:
    return list(bootstrap_interval(pooled_mean, sums, counts, resamples=eval_cfg.resamples, seed=eval_cfg.seed))


def nll_figures(model, tok, contexts, answers, eval_cfg, desc: str) -> dict:
    """Mean NLL per token of `answers` after `contexts` (token-weighted over inputs) and its 95% interval."""
    logits = scoring.continuation_logits(model, contexts, answers, tok.pad_token_id, eval_cfg.batch_size, desc)
    sums = [float(-torch.log_softmax(l, -1).gather(-1, torch.tensor(a).unsqueeze(-1)).sum()) for l, a in zip(logits, answers)]
    counts = [len(a) for a in answers]
    return {"nll": sum(sums) / sum(counts), "nll_ci": _interval(sums, counts, eval_cfg)}


def probe_figures(probe, tag: str, rows: list[dict], texts: list[str], eval_cfg) -> dict:
    """The probe on the guided answers (with its own interval) beside base and teacher, and its retention."""
    figures = probe_report(probe, tag, {"base": [r["base_output"] for r in rows], "teacher": [r["output"] for r in rows],
                                        "student": texts}, eval_cfg.resamples, eval_cfg.seed)
    figures["student_ci"] = _interval(*answer_terms(probe, texts), eval_cfg)
    return figures


def _cached_samples(path: Path | None, make) -> list[list[int]]:
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    sampled = make()
    if path is not None:
        outputs.write_json(path, sampled)  # atomic: a killed sweep resumes from the strengths it finished
    return sampled


def score_fluency(cfg, job, tag: str, rows: list[dict], base_path: str, points: list[dict], sampled: dict, texts: dict,
                  eos_ids, with_base: bool) -> dict:
    """Each strength's fluency (NLL under the base model and the teacher), length and probe, filled into `points`;
    returns the same NLLs for the teacher's and the base model's own answers (the reference rows)."""
    eval_cfg, chat, probe = cfg.evaluate, cfg.model.chat, job.metatokens[tag].probe
    answers = [r["output_ids"] for r in rows]
    base_tok = load_tokenizer(base_path)
    base = load_model(base_path, cfg.model.dtype, cfg.model.device)
    plain = [context_ids(base_tok, r["input"], None, chat) for r in rows]
    teacher = [context_ids(base_tok, r["input"], job.reference_prompt((tag,)), chat) for r in rows]
    for point in points:
        s = point["strength"]
        point["fluency"] = {
            "base": nll_figures(base, base_tok, plain, sampled[s], eval_cfg, f"NLL base s={s:g}"),
            "teacher": nll_figures(base, base_tok, teacher, sampled[s], eval_cfg, f"NLL teacher s={s:g}"),
        }
        point["words"] = sum(len(t.split()) for t in texts[s]) / len(rows)
        point["ended"] = sum(bool(ids) and ids[-1] in eos_ids for ids in sampled[s]) / len(rows)
        if with_base:
            point["probe"] = probe_figures(probe, tag, rows, texts[s], eval_cfg)
    reference = {"teacher answers": {"base": nll_figures(base, base_tok, plain, answers, eval_cfg, "NLL base, teacher answers"),
                                     "teacher": nll_figures(base, base_tok, teacher, answers, eval_cfg, "NLL teacher, teacher answers")}}
    if all(r["base_output_ids"] for r in rows):
        own = [r["base_output_ids"] for r in rows]
        reference["base answers"] = {"base": nll_figures(base, base_tok, plain, own, eval_cfg, "NLL base, base answers"),
                                     "teacher": nll_figures(base, base_tok, teacher, own, eval_cfg, "NLL teacher, base answers")}
    del base
    return reference


def sweep(cfg, job, rows: list[dict], ref: dict, base_path: str, student_dir: Path, tag_ids: list[int],
          strengths: list[float], work_dir: Path | None = None) -> dict:
    """The sweep's figures for the first evaluated set (one tag) on its held-out `rows`.

    `ref` is that set's `evaluate.reference_scores` entry (the teacher's logits and the effect per token).
    With `work_dir`, each strength's guided samples are kept there and read back on a rerun.
    """
    (tag,) = job.eval_sets[0]
    gen, eval_cfg, chat = cfg.generate, cfg.evaluate, cfg.model.chat
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    tok, student = scoring.load_scored_model(student_dir, job, cfg)
    contexts = [guidance.branch_contexts(tok, r["input"], [tag], chat) for r in rows]
    branches = [[c[k] for c in contexts] for k in range(2)]  # [untagged, tagged], one context per input each
    answers = [r["output_ids"] for r in rows]
    # Teacher-forced: the two branches' logits do not depend on s, so they are computed once for every strength.
    branch_logits = [scoring.continuation_logits(student, b, answers, tok.pad_token_id, eval_cfg.batch_size, f"strength {name}", tag_ids)
                     for b, name in zip(branches, ("untagged", "tagged"))]
    seeds = [eval_cfg.seed * 1_000_003 + i for i in range(len(rows))]  # per input, the same at every strength
    settings = dict(pad_id=tok.pad_token_id, eos_ids=_eos_ids(student, tok), max_new_tokens=gen.max_new_tokens,
                    temperature=gen.temperature, top_p=gen.top_p, suppress_ids=tag_ids)
    points, sampled = [], {}
    for s in strengths:
        weights = guidance.branch_weights([s])
        residual = [full_kl(t, guidance.combine([u, g], weights)) for t, u, g in zip(ref["teacher"], *branch_logits)]
        points.append({"strength": s, **scoring.kl_figures(ref["effect_tokens"], residual, eval_cfg)})
        log.info("strength %g: recovery %.3f; sampling %d answers", s, points[-1]["recovery"], len(rows))
        path = work_dir / f"samples_{s:g}.json" if work_dir is not None else None
        sampled[s] = _cached_samples(path, lambda: guidance.sample_batched(student, branches, weights, gen.batch_size, seeds, **settings))  # noqa: F821  (called at once, before the del below)
    del student, branch_logits

    texts = {s: [tok.decode(ids, skip_special_tokens=True) for ids in sampled[s]] for s in strengths}
    probe = job.metatokens[tag].probe
    with_base = probe is not None and all(r["base_output_ids"] for r in rows)
    reference = score_fluency(cfg, job, tag, rows, base_path, points, sampled, texts, settings["eos_ids"], with_base)
    return {
        "tag": tag,
        "strengths": list(strengths),
        "heldout_examples": len(rows),
        "effect_kl": torch.cat(ref["effect_tokens"]).mean().item(),
        "untagged_context": "the tagged context with the tag removed (chat: an empty system message)",
        "sampling": {"temperature": gen.temperature, "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens,
                     "seeds": f"{eval_cfg.seed} * 1000003 + input index"},
        "points": points,
        "reference": reference,
        "probe_pattern": probe.pattern if with_base else None,
        "examples": [{"input": rows[i]["input"], "answers": {f"{s:g}": texts[s][i] for s in strengths}}
                     for i in range(min(EXAMPLES, len(rows)))],
    }


# ---------------------------------------------------------------- report: a table, a plot


def _num(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(bounds, digits: int) -> str:
    return "n/a" if not bounds or None in bounds or any(b != b for b in bounds) else f"{bounds[0]:.{digits}f} – {bounds[1]:.{digits}f}"


TABLE_HEADERS = ["strength", "KL to teacher", "recovery", "recovery 95% interval", "probe", "probe 95% interval",
                 "retention", "NLL under base", "95% interval", "NLL under teacher", "95% interval", "words"]


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for p in result["points"]:
        probe, flu = p.get("probe") or {}, p["fluency"]
        rows.append([f"{p['strength']:g}", _num(p["residual_kl"], 4), _num(p["recovery"], 3), _ci(p["recovery_ci"], 3),
                     _num(probe.get("student"), 2), _ci(probe.get("student_ci"), 2), _num(probe.get("retention"), 2),
                     _num(flu["base"]["nll"], 3), _ci(flu["base"]["nll_ci"], 3),
                     _num(flu["teacher"]["nll"], 3), _ci(flu["teacher"]["nll_ci"], 3), f"{p['words']:.0f}"])
    return rows


def reference_text(result: dict) -> str:
    """The yardsticks: the probe of base and teacher answers, and the NLL of their own answers."""
    first = (result["points"][0].get("probe") or {}) if result["points"] else {}
    parts = [f"effect KL(teacher || base) {result['effect_kl']:.4f} nats/token"]
    if first:
        parts.append(f"probe ({first['measures']}): base {_num(first['base'], 2)}, teacher {_num(first['teacher'], 2)}")
    for name, figures in result["reference"].items():
        parts.append(f"NLL of the {name}: under base {figures['base']['nll']:.3f} ({_ci(figures['base']['nll_ci'], 3)}), "
                     f"under teacher {figures['teacher']['nll']:.3f} ({_ci(figures['teacher']['nll_ci'], 3)})")
    return "; ".join(parts) + "."


def plot(result: dict, path: Path) -> Path:
    """Three panels over s: recovery, the probe, NLL of the guided answers (95% intervals as bars)."""
    fig = Figure(figsize=(12, 3.8), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3)
    s = [p["strength"] for p in result["points"]]

    def bars(ax, values, bounds, **style):
        low = [v - b[0] if b and None not in b else 0.0 for v, b in zip(values, bounds)]
        high = [b[1] - v if b and None not in b else 0.0 for v, b in zip(values, bounds)]
        ax.errorbar(s, values, yerr=[[max(0.0, x) for x in low], [max(0.0, x) for x in high]], marker="o", capsize=3, **style)

    ax = axes[0]
    bars(ax, [p["recovery"] for p in result["points"]], [p["recovery_ci"] for p in result["points"]], color="C0", label="guided")
    ax.axhline(1.0, color="C2", ls="--", lw=1, label="teacher (full prompt)")
    ax.axhline(0.0, color="black", lw=0.8, label="base, no prompt")
    ax.set(xlabel="strength s", ylabel="recovery 1 - KL(teacher||guided) / KL(teacher||base)", title="Recovery")
    ax.legend(fontsize=7)
    ax = axes[1]
    if all(p.get("probe") for p in result["points"]):
        first = result["points"][0]["probe"]
        bars(ax, [p["probe"]["student"] for p in result["points"]], [p["probe"]["student_ci"] for p in result["points"]], color="C1", label="guided")
        ax.axhline(first["teacher"], color="C2", ls="--", lw=1, label="teacher")
        ax.axhline(first["base"], color="black", lw=0.8, label="base")
        ax.set(ylabel=first["measures"], title=f"Probe: {result['tag']}")
        ax.legend(fontsize=7)
    else:
        ax.set_title("no probe for this tag")
    ax.set_xlabel("strength s")
    ax = axes[2]
    for key, color in (("base", "C0"), ("teacher", "C3")):
        bars(ax, [p["fluency"][key]["nll"] for p in result["points"]], [p["fluency"][key]["nll_ci"] for p in result["points"]],
             color=color, label=f"under {key}")
    own = result["reference"].get("base answers")
    if own:
        ax.axhline(own["base"]["nll"], color="C0", ls=":", lw=1, label="base answers under base")
    ax.axhline(result["reference"]["teacher answers"]["teacher"]["nll"], color="C3", ls=":", lw=1, label="teacher answers under teacher")
    ax.set(xlabel="strength s", ylabel="NLL per token (nats)", title="Fluency of guided answers")
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def report_blocks(reports: list[dict]) -> list[tuple]:
    """The report section (evaluate's report.py blocks) for every report that holds a sweep."""
    out = []
    for r in reports:
        result = r.get("strength")
        if not result:
            continue
        out.append(("h2", f"Tag strength (`{result['tag']}`)"))
        out.append(("table", TABLE_HEADERS, table_rows(result)))
        out.append(("p", EXPLANATION + " " + reference_text(result)))
    return out


EXPLANATION = (
    "Each row applies the tag at strength s by classifier-free guidance: next-token logits = untagged + s (tagged - "
    "untagged), where untagged is the student's context with the tag removed. **KL to teacher**: KL(teacher || guided) "
    "per token, teacher-forced on the teacher's held-out answers, full vocabulary; **recovery** = 1 - that / KL(teacher "
    "|| base without prompt). **probe**: the tag's behaviour probe on guided answers to the held-out inputs; "
    "**retention** = (guided - base) / (teacher - base). **NLL**: mean per-token negative log-likelihood of the guided "
    "answers under the base model without prompt and under the teacher (fluency: high values mean text neither model "
    "would write). **words**: per answer. Intervals: 95% bootstrap over inputs."
)


USAGE = """## Using a strength

```
python -m pipeline.sample tags="[<pirate>]" strength=2 text="How do I boil an egg?"          # more of the tag
python -m pipeline.sample tags="[<pirate>:-1]" text="How do I boil an egg?" compare=true      # its opposite, beside no tag
python -m pipeline.sample tags="[<pirate>:1.5,<nice>:-1]" text="Hi"                           # several tags, each its own strength
python -m pipeline stage=evaluate metatoken=pirate evaluate.strengths=[-1,0,0.5,1,1.5,2,3]    # this sweep in the evaluate report
```

Each tag is read in its own context and combined at every step (pipeline/guidance.py), so a strength costs one
more forward pass per tag; when every strength is 1 the tags are read together in one context, as without
strengths. A sweep re-run with the same command reads its cached answers (outputs/strength/)."""


# ---------------------------------------------------------------- the standalone command

