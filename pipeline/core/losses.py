"""The math of distillation and evaluation, as small pure functions on tensors.

Notation: p is the teacher (the model reading the full prompt), q the student (the model reading
the tag). KLs are forward KL(p || q), per position, in nats, except where a name says otherwise
(`generalized_jsd`, the on-policy objective's divergence).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def suppress(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Give `token_ids` (the tags) no probability: the student reads tags but never writes them.

    Generation does the same through `generation_config.suppress_tokens`, so every score we report
    is for the distribution the saved model actually samples from. A large finite value (not -inf)
    keeps 0 * log 0 terms at 0 instead of NaN.
    """
    if not token_ids:
        return logits
    return logits.index_fill(-1, torch.tensor(token_ids, device=logits.device), -1e4)


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from full logits.

    The student may have a larger vocabulary (its new tag rows); the teacher puts no mass there,
    so those entries only enter through the student's normalisation.
    Shapes: [..., V_teacher] and [..., V_student >= V_teacher] -> [...].
    """
    vocab = teacher_logits.shape[-1]
    p_log = F.log_softmax(teacher_logits.float(), dim=-1)
    q_log = F.log_softmax(student_logits.float(), dim=-1)[..., :vocab]
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def topk_kl(
    student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """KL(p || q) per position over k+1 bins: the teacher's top-k tokens and one bin for the rest.

    This is the exact KL between the two distributions coarsened to those bins, so it is zero
    only when the student matches the teacher on its top-k tokens and on the leftover mass, and it
    never exceeds the full KL. Shapes: [..., V], [..., k], [..., k] -> [...].
    """
    q_log = F.log_softmax(student_logits.float(), dim=-1)
    q_top = q_log.gather(-1, teacher_topk_ids)
    p_top_log = teacher_topk_logprobs.float()
    kl_top = (p_top_log.exp() * (p_top_log - q_top)).sum(-1)
    # Leftover mass: log(1 - sum exp(x)) computed stably from the log-sum-exp.
    p_rest_log = _log1m_sumexp(p_top_log)
    q_rest_log = _log1m_sumexp(q_top)
    kl_rest = torch.where(p_rest_log > -30, p_rest_log.exp() * (p_rest_log - q_rest_log), 0.0)
    return kl_top + kl_rest


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per position (GKD, Agarwal et al. 2024, eq. 1).

    With M = beta p + (1 - beta) q, for 0 < beta < 1:
        JSD_beta(p, q) = beta KL(p || M) + (1 - beta) KL(q || M);
    and at the ends (TRL's `generalized_jsd_loss` convention): beta = 0 is forward KL(p || q),
    beta = 1 is reverse KL(q || p). JSD_beta itself tends to 0 at both ends; JSD_beta / beta tends to
    forward KL and JSD_beta / (1 - beta) to reverse KL, so the end points are the divergences
    the interpolation moves between. Reverse KL is mode-seeking: on the student's own samples it
    punishes the tokens the student writes that the teacher would not.

    Inputs are logits (any normalisation: log-probabilities work too), the same vocabulary on both
    sides. Shapes: [..., V], [..., V] -> [...].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta is {beta}; the generalised JSD needs 0 <= beta <= 1")
    q_log = F.log_softmax(student_logits.float(), dim=-1)
    p_log = F.log_softmax(teacher_logits.float(), dim=-1)
    if beta == 0.0:
        return _kl_from_logs(p_log, q_log)
    if beta == 1.0:
        return _kl_from_logs(q_log, p_log)
    m_log = torch.logaddexp(p_log + math.log(beta), q_log + math.log(1.0 - beta))
    return beta * _kl_from_logs(p_log, m_log) + (1.0 - beta) * _kl_from_logs(q_log, m_log)


def _kl_from_logs(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probabilities (0 log 0 = 0: tags at -1e4 add nothing)."""
    return (a_log.exp() * (a_log - b_log)).sum(-1)


def topk_bins(
    student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions coarsened to k+1 bins: the teacher's top-k tokens and one bin for the rest.

    Returns (student, teacher) log-probabilities [..., k+1], so any divergence between full
    distributions (`generalized_jsd`) applies to what `generate` recorded; `topk_kl` is forward KL
    on the same bins. Shapes: [..., V], [..., k], [..., k] -> ([..., k+1], [..., k+1]).
    """
    q_top = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_topk_ids)
    p_top = teacher_topk_logprobs.float()
    bins = [torch.cat([top, _log1m_sumexp(top).unsqueeze(-1)], dim=-1) for top in (q_top, p_top)]
    return bins[0], bins[1]


def _log1m_sumexp(logs: torch.Tensor) -> torch.Tensor:
    total = torch.logsumexp(logs, dim=-1).clamp(max=-1e-7)
    return torch.log(-torch.expm1(total))


def token_cross_entropy(student_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of the teacher's sampled tokens (the `sft` objective)."""
    return F.cross_entropy(student_logits.float().flatten(0, -2), target_ids.flatten(), reduction="none").view(
        target_ids.shape
    )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is true (token-weighted across the batch)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def recovery(effect: float, residual: float) -> float:
    """Share of the prompt's effect the tag recovers: 1 - residual / effect.

    1.0: the student with the tag is as close to the teacher as it can be; 0.0: the tag does no more
    than no prompt at all; negative: worse than no prompt.
    """
    if effect <= 0:
        raise ValueError(f"the prompt has no measurable effect (KL {effect}); recovery is undefined")
    return 1.0 - residual / effect


def position_means(per_example: list[torch.Tensor]) -> tuple[list[float], list[int]]:
    """Mean of per-token values at each position across examples of different lengths.

    Position t averages the examples that reach t, so `counts[t]` (how many did) shrinks along
    the sequence. Returns (means, counts), both as long as the longest example.
    """
    longest = max((len(v) for v in per_example), default=0)
    sums = torch.zeros(longest, dtype=torch.float64)
    counts = torch.zeros(longest, dtype=torch.long)
    for values in per_example:
        sums[: len(values)] += values.double()
        counts[: len(values)] += 1
    return (sums / counts.clamp_min(1)).tolist(), counts.tolist()


ANSWER_BINS = (0, 1, 4, 16)  # bin starts along the answer (tokens): its first token, the next 3, the next 12, the rest


def recovery_by_position(effect_tokens, residual_tokens, starts=ANSWER_BINS, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Where along the answer the tag recovers the prompt's effect: recovery within bins of answer positions.

    Bin i holds positions [starts[i], starts[i+1]) (the last bin runs to the end). Each bin gives its share of
    the total effect, its token-weighted recovery and that recovery's 95% bootstrap interval over inputs (each
    input's KLs summed within the bin). Bins no answer reaches are left out.
    """
    bounds = list(starts) + [None]
    total = sum(float(e.sum()) for e in effect_tokens)
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        effect = [float(e[lo:hi].sum()) for e in effect_tokens]
        residual = [float(r[lo:hi].sum()) for r in residual_tokens]
        tokens = sum(len(e[lo:hi]) for e in effect_tokens)
        if tokens == 0 or sum(effect) <= 0:
            continue
        out.append({
            "start": lo, "end": hi, "tokens": tokens, "effect_share": sum(effect) / total,
            "recovery": recovery(sum(effect), sum(residual)),
            "recovery_ci": list(bootstrap_interval(pooled_recovery, residual, effect, resamples=resamples, seed=seed)),
        })
    return out


def pooled_recovery(residual_sums, effect_sums):
    """Token-weighted recovery over inputs: 1 - sum(residual) / sum(effect).

    Each input contributes its KLs summed over its tokens, so a long answer weighs more than a
    short one, exactly as in the per-token means the report gives. Works along the last axis, so
    it takes one row of inputs [n] or a batch of resamples [B, n].
    """
    return 1.0 - np.sum(residual_sums, axis=-1) / np.sum(effect_sums, axis=-1)


def pooled_mean(value_sums, counts):
    """Token-weighted mean over inputs (e.g. drift per token): sum(values) / sum(counts), along the last axis."""
    return np.sum(value_sums, axis=-1) / np.sum(counts, axis=-1)


def bootstrap_interval(statistic, *per_input, resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of `statistic` over inputs, resampled with replacement.

    Every array in `per_input` holds one value per input (the same inputs in the same order), and
    each resample draws the same input indices for all of them, so paired quantities (an input's
    residual and its effect; base, teacher and student answers to one input) stay paired. The
    statistic is recomputed on each resample (the token-weighted ratio, not a mean of per-input
    ratios). `statistic(*arrays)` must reduce the last axis: it gets arrays of shape [resamples, n].
    Resamples where the statistic is undefined (NaN, e.g. a zero denominator) are left out.

    Returns (low, high), or (nan, nan) with no inputs or no defined resample.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in per_input]
    n = len(arrays[0]) if arrays else 0
    if n == 0:
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(statistic(*(a[picks] for a in arrays)), dtype=np.float64)
    return percentile_interval(values, level)


def paired_difference(residual_a, effect_a, residual_b, effect_b, resamples: int = 1000, seed: int = 0):
    """Recovery of run B minus run A on the same inputs, with its 95% interval (inputs resampled jointly).

    Both runs must score the same inputs in the same order (their teacher samples may differ: each run's
    effect is its own). Resampling an input moves both runs' numbers together, so what the inputs share
    cancels and the interval is narrower than the two runs' own intervals side by side.
    Returns (difference, low, high).
    """
    def statistic(ra, ea, rb, eb):
        return pooled_recovery(rb, eb) - pooled_recovery(ra, ea)

    arrays = [np.asarray(a, dtype=np.float64) for a in (residual_a, effect_a, residual_b, effect_b)]
    low, high = bootstrap_interval(statistic, *arrays, resamples=resamples, seed=seed)
    return float(statistic(*arrays)), low, high


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap values, ignoring non-finite ones (a resample with no effect)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


IGNORE = -100  # the label Hugging Face losses skip


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, tag_ids: list[int]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, tags suppressed as everywhere else.

    logits [B, L, V], labels [B, L] (Hugging Face layout: labels[t] is predicted by logits[t-1]).
    """
    targets = labels[:, 1:]
    per_token = token_cross_entropy(suppress(logits[:, :-1], tag_ids), targets.clamp_min(0))
    return masked_mean(per_token, targets != IGNORE)


def lm_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    soft_mask: torch.Tensor,
    tag_ids: list[int],
) -> torch.Tensor:
    """`lm_loss` where a target has a recorded distribution (`soft_mask`): there KL(p || q) on its top-k bins
    (`topk_kl`), elsewhere cross-entropy; the mean over every labelled position.

    The pretrain stream's `train.pretrain.loss=kl`. Soft targets sit at the position of the token they
    predict, as labels do: logits[t-1] is scored against row t. Shapes: logits [B, L, V], labels and
    soft_mask [B, L], topk_* [B, L, k]. Positions are indexed out, never masked after the fact, so the
    placeholder rows of positions without a distribution cannot reach the gradient.
    """
    student = suppress(logits[:, :-1], tag_ids)
    targets, soft = labels[:, 1:], soft_mask[:, 1:] & (labels[:, 1:] != IGNORE)
    hard = (targets != IGNORE) & ~soft
    kl = topk_kl(student[soft], topk_ids[:, 1:][soft], topk_logprobs[:, 1:][soft])
    ce = token_cross_entropy(student[hard], targets[hard])
    return (kl.sum() + ce.sum()) / (soft.sum() + hard.sum()).clamp_min(1)
