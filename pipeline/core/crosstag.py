"""The cross-tag matrix: does each tag stand for its own prompt, and not for the run's other prompts?

In a run with two or more tags, evaluate scores every tag against every prompt's held-out samples,
teacher-forced, full vocabulary, with the same cell everywhere:
    cell(A, X) = 1 - KL(base + prompt A || X) / KL(base + prompt A || base), on samples of prompt A;
- the student matrix: X = the trained student reading tag B (the diagonal is evaluate's own recovery);
- the prompt matrix: X = the base model reading prompt B (B != A): how much of prompt A's effect
  another prompt already gives, i.e. how close the prompts themselves are.
From those, per tag A:
- margin retention = (own-tag recovery - best other-tag recovery) / (1 - best other-prompt recovery):
  the lead a tag keeps over the nearest other tag, as a share of the lead the prompt has over the
  nearest other prompt (1 = the tags are as distinct as their prompts; 0 = the tag is no nearer to its
  prompt than another tag is);
- nearest-own share: the share of A's held-out samples on which tag A is the closest of all tags
  (lowest summed KL to the teacher; a tie counts for the own tag).
Intervals are 95% percentile bootstraps over the held-out inputs (`pipeline.losses.bootstrap_interval`).
The teacher's logits and effects are the ones evaluate already computed; only the new readers run.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from pipeline.core.formats import context_ids, row_input
from pipeline.core.losses import bootstrap_interval, pooled_mean, pooled_recovery
from pipeline.core.scoring import continuation_logits, token_kls
from pipeline.runtime.formatting import interval, label, number

FIGURE = ("Cross-tag matrix", "Recovery of prompt A's effect (rows: held-out samples of prompt A) by the student "
          "reading each tag (left) and by the base model reading each other prompt (right); the diagonal of the left "
          "matrix is each tag's own recovery. A tag that stands for its own prompt is bright on the diagonal and dark "
          "off it, at least as much as the prompts are on the right.")


# ---------------------------------------------------------------- the math (pure)


def margin_retention(own, other_tags, other_prompts):
    """(own - max(other_tags)) / (1 - max(other_prompts)), elementwise over any leading shape.

    Args:
        own: the tag's recovery on its own prompt's samples (a number or an array, e.g. [resamples]).
        other_tags: the recoveries of every other tag on the same samples (a list of such).
        other_prompts: the recoveries of every other prompt read by the base model on the same samples.
    Returns NaN where no other prompt leaves anything to lead by (best other prompt >= 1).
    """
    best_tag = np.max(np.stack([np.asarray(t, dtype=np.float64) for t in other_tags]), axis=0)
    best_prompt = np.max(np.stack([np.asarray(p, dtype=np.float64) for p in other_prompts]), axis=0)
    lead = 1.0 - best_prompt
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(lead > 0, (np.asarray(own, dtype=np.float64) - best_tag) / lead, np.nan)
    return value if value.ndim else float(value)


def nearest_own(residuals, own: int):
    """Per input, whether the own tag is nearest: residuals[own] <= every other tag's residual.

    Args:
        residuals: [tags, inputs] summed KL(teacher || student with each tag) on each input's sample.
        own: the row of the tag whose prompt wrote the samples.
    Returns a bool array [inputs].
    """
    residuals = np.asarray(residuals, dtype=np.float64)
    others = np.delete(residuals, own, axis=0)
    return residuals[own] <= others.min(axis=0)


def pooled_margin(effect, residual_by_tag, prompt_residuals, own: int):
    """Margin retention from per-input KL sums, token-weighted, along the last axis (so it bootstraps).

    Args:
        effect: [..., n] summed KL(teacher || base) per input.
        residual_by_tag: list over tags of [..., n] summed KL(teacher || student with that tag).
        prompt_residuals: list over the other prompts of [..., n] summed KL(teacher || base with that prompt).
        own: index of the own tag in residual_by_tag.
    """
    recoveries = [pooled_recovery(r, effect) for r in residual_by_tag]
    others = [r for i, r in enumerate(recoveries) if i != own]
    return margin_retention(recoveries[own], others, [pooled_recovery(p, effect) for p in prompt_residuals])


# ---------------------------------------------------------------- scoring (evaluate's hooks)


def single_sets(job) -> list[tuple]:
    """The one-tag sets evaluated: the matrix's rows and columns (pairs are in `sets`, not here)."""
    return [s for s in job.eval_sets if len(s) == 1]


def applies(job) -> bool:
    return len(single_sets(job)) >= 2


def _cells(model, tok, heldout, ref, cfg, pairs, system, desc: str, tag_ids=()) -> dict:
    """(A, B) -> per-input summed KL(teacher A || model reading system(B)), on the held-out samples of A."""
    sums = {}
    for a, b in pairs:
        rows = heldout[a]
        contexts = [context_ids(tok, row_input(r), system(b), cfg.model.chat) for r in rows]
        logits = continuation_logits(model, contexts, [r["output_ids"] for r in rows], tok.pad_token_id,
                                     cfg.evaluate.batch_size, f"{desc} {b[0]} on {a[0]}", list(tag_ids))
        sums[(a, b)] = [kl.sum().item() for kl in token_kls(ref["heldout"][a]["teacher"], logits)]
    return sums


def prompt_cells(base, tok, job, heldout, ref, cfg) -> dict:
    """(A, B) -> per-input KL(teacher A || base reading prompt B), for B != A (the diagonal is the teacher itself)."""
    pairs = [(a, b) for a in single_sets(job) for b in single_sets(job) if b != a]
    return _cells(base, tok, heldout, ref, cfg, pairs, job.reference_prompt, "base + prompt")


def tag_cells(student, tok, job, heldout, ref, cfg, tag_ids) -> dict:
    """(A, B) -> per-input KL(teacher A || student reading tag B), every B (the diagonal scored again, independently)."""
    pairs = [(a, b) for a in single_sets(job) for b in single_sets(job)]
    return _cells(student, tok, heldout, ref, cfg, pairs, job.student_tags, "student +", tag_ids)


def figures(job, heldout, ref, tag_sums: dict, prompt_sums: dict, eval_cfg) -> dict:
    """The matrices, margin retention and nearest-own shares, with 95% bootstrap intervals over inputs."""
    sets = single_sets(job)
    resample = {"resamples": eval_cfg.resamples, "seed": eval_cfg.seed}
    effect = {a: [t.sum().item() for t in ref["heldout"][a]["effect_tokens"]] for a in sets}

    def cell(a, residuals):
        if residuals is None:
            return None
        value = float(pooled_recovery(residuals, effect[a]))
        return {"recovery": value, "recovery_ci": list(bootstrap_interval(pooled_recovery, residuals, effect[a], **resample))}

    student = [[cell(a, tag_sums[(a, b)]) for b in sets] for a in sets]
    prompts = [[cell(a, prompt_sums.get((a, b))) if a != b else None for b in sets] for a in sets]
    per_tag, hits_by_input = [], {}
    for i, a in enumerate(sets):
        by_tag = [tag_sums[(a, b)] for b in sets]
        other_prompts = [prompt_sums[(a, b)] for b in sets if b != a]
        k = len(sets)

        def statistic(e, *arrays, own=i, k=k):  # arrays: k tag residuals, then k - 1 prompt residuals
            return pooled_margin(e, list(arrays[:k]), list(arrays[k:]), own)

        hits = nearest_own(by_tag, i)
        for row, hit in zip(heldout[a], hits):
            got = hits_by_input.setdefault(row["id"], [0, 0])
            got[0], got[1] = got[0] + int(hit), got[1] + 1
        others = [(b, student[i][j]["recovery"]) for j, b in enumerate(sets) if j != i]
        other_p = [(b, prompts[i][j]["recovery"]) for j, b in enumerate(sets) if j != i]
        best_tag, best_prompt = max(others, key=lambda x: x[1]), max(other_p, key=lambda x: x[1])
        per_tag.append({
            "tag": a[0],
            "examples": len(heldout[a]),
            "own_recovery": student[i][i]["recovery"],
            "best_other_tag": best_tag[0][0], "best_other_tag_recovery": best_tag[1],
            "best_other_prompt": best_prompt[0][0], "best_other_prompt_recovery": best_prompt[1],
            "margin_retention": _finite(pooled_margin(effect[a], by_tag, other_prompts, i)),
            "margin_retention_ci": list(bootstrap_interval(statistic, effect[a], *by_tag, *other_prompts, **resample)),
            "nearest_own": float(np.mean(hits)),
            "nearest_own_ci": list(bootstrap_interval(pooled_mean, hits.astype(float), np.ones(len(hits)), **resample)),
        })
    # Every input has one sample per tag: the overall share resamples inputs with all their samples.
    got = list(hits_by_input.values())
    hit_counts, sample_counts = [g[0] for g in got], [g[1] for g in got]
    return {
        "tags": [a[0] for a in sets],
        "student": student,  # [samples of prompt A][student reading tag B]
        "prompts": prompts,  # [samples of prompt A][base reading prompt B]; None on the diagonal (the teacher itself)
        "per_tag": per_tag,
        "nearest_own": sum(hit_counts) / sum(sample_counts),
        "nearest_own_ci": list(bootstrap_interval(pooled_mean, hit_counts, sample_counts, **resample)),
        "margin_retention_min": min((t["margin_retention"] for t in per_tag if t["margin_retention"] is not None), default=None),
    }


def _finite(value):
    return None if value is None or not math.isfinite(value) else float(value)


# ---------------------------------------------------------------- report (rendered by pipeline.report)


def plot(crosstag: dict, path):
    """Two heatmaps side by side: the student reading each tag, and the base model reading each other prompt."""
    tags = crosstag["tags"]
    k = len(tags)
    fig = Figure(figsize=(4.0 + 2.2 * k, 1.6 + 0.7 * k), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    grids = {key: np.array([[c["recovery"] if c else np.nan for c in row] for row in crosstag[key]]) for key in ("student", "prompts")}
    low = min(0.0, *(float(np.nanmin(g)) for g in grids.values() if np.isfinite(g).any()))  # one colour scale for both
    for ax, key, title in ((axes[0], "student", "student reading tag B"), (axes[1], "prompts", "base reading prompt B")):
        values = grids[key]
        image = ax.imshow(values, vmin=low, vmax=1.0, cmap="viridis")
        for a in range(k):
            for b in range(k):
                text = "teacher" if key == "prompts" and a == b else f"{values[a, b]:.2f}"
                dark = not np.isfinite(values[a, b]) or values[a, b] > 0.6
                ax.text(b, a, text, ha="center", va="center", fontsize=8, color="black" if dark else "white",
                        weight="bold" if a == b else "normal")
        ax.set_xticks(range(k), tags, rotation=20, fontsize=8)
        ax.set_yticks(range(k), tags, fontsize=8)
        ax.set_xlabel(title)
        ax.set_ylabel("samples of prompt A")
    fig.colorbar(image, ax=axes, shrink=0.8, label="recovery of prompt A's effect")
    fig.savefig(path)
    return path


def blocks(report: dict, figure_path: str | None) -> list[tuple]:
    """The report's cross-tag section (report.py's block kinds), empty for a run with one tag."""
    ct = report.get("crosstag")
    if not ct:
        return []
    tags = ct["tags"]
    fmt = lambda c: "–" if c is None else f"{c['recovery']:.3f} ({interval(c['recovery_ci'], 2)})"  # noqa: E731
    out = [("h2", f"Cross-tag matrix (`{label(report)}`)"),
           ("table", ["samples of prompt", *[f"student + {t}" for t in tags]], [[a, *map(fmt, row)] for a, row in zip(tags, ct["student"])]),
           ("table", ["samples of prompt", *[f"base + prompt of {t}" for t in tags]], [[a, *map(fmt, row)] for a, row in zip(tags, ct["prompts"])]),
           ("table", ["tag", "own recovery", "best other tag", "best other prompt", "margin retention", "95% interval",
                      "nearest own", "95% interval"], [
               [t["tag"], number(t["own_recovery"], 3), f"{t['best_other_tag']} {number(t['best_other_tag_recovery'], 3)}",
                f"{t['best_other_prompt']} {number(t['best_other_prompt_recovery'], 3)}", number(t["margin_retention"], 2),
                interval(t["margin_retention_ci"], 2), number(t["nearest_own"], 3), interval(t["nearest_own_ci"], 3)]
               for t in ct["per_tag"]]),
           ("p", "Each cell: 1 - KL(base + prompt A || reader) / KL(base + prompt A || base) on the held-out samples of "
                 "prompt A (rows), with its 95% bootstrap interval over inputs. **margin retention** = (own recovery - best "
                 "other tag) / (1 - best other prompt): the lead a tag keeps over the nearest other tag as a share of the "
                 "lead its prompt has over the nearest other prompt (1 = as distinct as the prompts). **nearest own**: share "
                 "of a prompt's held-out samples on which its own tag has the lowest KL to the teacher of all tags. "
                 f"Over all samples: nearest own **{ct['nearest_own']:.3f}** ({interval(ct['nearest_own_ci'], 3)}).")]
    if figure_path:
        out.append(("img", *FIGURE, figure_path))
    return out
