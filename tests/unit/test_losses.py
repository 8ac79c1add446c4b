"""The KL and recovery math against hand-computed values."""
import math

import pytest
import torch

from pipeline.core.losses import (
    full_kl,
    generalized_jsd,
    masked_mean,
    recovery,
    token_cross_entropy,
    topk_bins,
    topk_kl,
)


def test_full_kl_matches_hand_computed_value():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.25, 0.5])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0) + 0.25 * math.log(0.25 / 0.5)
    assert full_kl(p.log(), q.log()).item() == pytest.approx(expected, abs=1e-6)


def test_full_kl_is_zero_for_identical_and_ignores_logit_shift():
    logits = torch.randn(4, 7, 11)
    assert torch.allclose(full_kl(logits, logits + 3.0), torch.zeros(4, 7), atol=1e-6)


def test_full_kl_with_larger_student_vocab_counts_mass_on_new_tokens():
    teacher = torch.tensor([0.0, 0.0])  # p = (0.5, 0.5)
    student = torch.tensor([0.0, 0.0, 0.0])  # q = (1/3, 1/3, 1/3): a third on the new tag row
    assert full_kl(teacher, student).item() == pytest.approx(math.log(0.5 / (1 / 3)), abs=1e-6)


def test_topk_kl_equals_full_kl_when_k_is_the_whole_vocab():
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 5, 9), torch.randn(3, 5, 9)
    logp = torch.log_softmax(teacher, -1)
    top, ids = logp.topk(9, dim=-1)
    assert torch.allclose(topk_kl(student, ids, top), full_kl(teacher, student), atol=1e-5)


def test_topk_kl_hand_computed_with_rest_bucket():
    # p = (0.6, 0.3, 0.1), q = (0.2, 0.3, 0.5); keep k=1: bins {token0}, {rest}
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    expected = 0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8)
    got = topk_kl(q.log(), torch.tensor([0]), p.log()[:1])
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_topk_kl_is_a_lower_bound_of_full_kl_and_zero_at_match():
    torch.manual_seed(1)
    teacher, student = torch.randn(50, 40), torch.randn(50, 40)
    top, ids = torch.log_softmax(teacher, -1).topk(5, dim=-1)
    assert (topk_kl(student, ids, top) <= full_kl(teacher, student) + 1e-5).all()
    assert topk_kl(teacher, ids, top).abs().max().item() < 1e-5


def test_topk_kl_has_gradient_towards_teacher():
    teacher = torch.tensor([[2.0, 0.0, -1.0, -3.0]])
    student = torch.zeros(1, 4, requires_grad=True)
    top, ids = torch.log_softmax(teacher, -1).topk(2, dim=-1)
    topk_kl(student, ids, top).sum().backward()
    assert student.grad[0, 0] < 0  # raising the teacher's favourite lowers the loss


def test_cross_entropy_and_masked_mean():
    logits = torch.tensor([[[0.0, 0.0], [10.0, -10.0]]])
    targets = torch.tensor([[0, 0]])
    ce = token_cross_entropy(logits, targets)
    assert ce[0, 0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert masked_mean(ce, torch.tensor([[True, False]])).item() == pytest.approx(math.log(2), abs=1e-6)


def test_recovery():
    assert recovery(2.0, 0.5) == pytest.approx(0.75)
    assert recovery(2.0, 2.0) == 0.0
    assert recovery(1.0, 1.5) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="no measurable effect"):
        recovery(0.0, 0.1)


def test_position_means_average_only_the_examples_that_reach_a_position():
    from pipeline.core.losses import position_means

    means, counts = position_means([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0]), torch.tensor([])])
    assert means == pytest.approx([2.0, 2.0, 3.0]) and counts == [2, 1, 1]
    assert position_means([]) == ([], [])


def brute_force_jsd(student_row: list[float], teacher_row: list[float], beta: float) -> float:
    """The generalised JSD of one position with plain Python loops (GKD eq. 1, TRL's end points)."""

    def probs(logits):
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        return [w / sum(weights) for w in weights]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    q, p = probs(student_row), probs(teacher_row)
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("beta", [0.0, 1e-3, 0.1, 0.5, 0.9, 1 - 1e-3, 1.0])
def test_generalized_jsd_equals_a_brute_force_loop(beta):
    torch.manual_seed(2)
    student, teacher = 2 * torch.randn(2, 3, 7), 2 * torch.randn(2, 3, 7)
    student[..., 6] = -1e4  # a suppressed tag column on both sides: no mass, no NaN
    teacher[..., 6] = -1e4
    got = generalized_jsd(student, teacher, beta)
    assert got.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            expected = brute_force_jsd(student[b, t].tolist(), teacher[b, t].tolist(), beta)
            assert got[b, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_generalized_jsd_end_points_are_the_limits_of_the_scaled_mixture():
    """beta=0 / beta=1 are forward / reverse KL: what JSD_beta / beta and JSD_beta / (1 - beta) tend to."""
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 9), torch.randn(5, 9)
    forward, reverse = full_kl(teacher, student), full_kl(student, teacher)
    assert torch.allclose(generalized_jsd(student, teacher, 0.0), forward, atol=1e-6)
    assert torch.allclose(generalized_jsd(student, teacher, 1.0), reverse, atol=1e-6)
    assert not torch.allclose(forward, reverse, atol=1e-3)  # the two ends really differ here
    assert torch.allclose(generalized_jsd(student, teacher, 1e-4) / 1e-4, forward, rtol=2e-3)
    assert torch.allclose(generalized_jsd(student, teacher, 1 - 1e-4) / 1e-4, reverse, rtol=2e-3)
    assert generalized_jsd(teacher, teacher, 0.5).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="beta is 1.5"):
        generalized_jsd(student, teacher, 1.5)


def test_generalized_jsd_gradient_moves_the_student_towards_the_teacher():
    teacher = torch.tensor([[3.0, 0.0, -2.0]])
    for beta in (0.0, 0.5, 1.0):
        student = torch.zeros(1, 3, requires_grad=True)
        generalized_jsd(student, teacher, beta).sum().backward()
        assert student.grad[0, 0] < 0 < student.grad[0, 2]  # up on the teacher's favourite, down on its last


def test_topk_bins_are_the_recorded_distribution_coarsened():
    # p = (0.6, 0.3, 0.1), q = (0.2, 0.3, 0.5); k=1: bins {token0}, {rest}
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    student_bins, teacher_bins = topk_bins(q.log(), torch.tensor([0]), p.log()[:1])
    assert torch.allclose(student_bins.exp(), torch.tensor([0.2, 0.8]), atol=1e-6)
    assert torch.allclose(teacher_bins.exp(), torch.tensor([0.6, 0.4]), atol=1e-6)
    torch.manual_seed(4)
    teacher, student = torch.randn(4, 6, 30), torch.randn(4, 6, 30)
    top, ids = torch.log_softmax(teacher, -1).topk(5, dim=-1)
    s_bins, t_bins = topk_bins(student, ids, top)
    assert torch.allclose(generalized_jsd(s_bins, t_bins, 0.0), topk_kl(student, ids, top), atol=1e-5)  # same bins


def test_pooled_recovery_weights_inputs_by_their_tokens():
    from pipeline.core.losses import pooled_recovery

    # input A: residual 1 of effect 2 (recovery 0.5); input B: residual 1 of effect 8 (0.875).
    # Pooled: 1 - 2/10 = 0.8, not the mean of the two ratios (0.6875).
    assert pooled_recovery([1.0, 1.0], [2.0, 8.0]) == pytest.approx(0.8)


def test_bootstrap_interval_of_two_inputs_spans_the_two_pure_resamples():
    """Two inputs: a resample is AA, AB/BA or BB (probabilities 1/4, 1/2, 1/4), so the statistic takes
    three values: 0.5 (AA), 0.8 (AB), 0.875 (BB). Of 1,000 resamples about 250 are AA and 250 BB,
    so the 2.5th and 97.5th percentiles are exactly the AA and BB values."""
    from pipeline.core.losses import bootstrap_interval, pooled_recovery

    low, high = bootstrap_interval(pooled_recovery, [1.0, 1.0], [2.0, 8.0], resamples=1000, seed=0)
    assert (low, high) == (pytest.approx(0.5), pytest.approx(0.875))
    assert bootstrap_interval(pooled_recovery, [1.0, 1.0], [2.0, 8.0], seed=0) == (low, high)  # seeded: repeatable


def test_bootstrap_interval_of_a_known_mean():
    """Many inputs of one token each with values 0/1 (p = 0.3, n = 400): the interval of the mean
    is close to the normal one, 0.3 +- 1.96 sqrt(0.3 * 0.7 / 400) = [0.255, 0.345]."""
    import numpy as np

    from pipeline.core.losses import bootstrap_interval, pooled_mean

    values = np.array([1.0] * 120 + [0.0] * 280)
    low, high = bootstrap_interval(pooled_mean, values, np.ones_like(values), resamples=1000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert low == pytest.approx(0.3 - half, abs=0.008) and high == pytest.approx(0.3 + half, abs=0.008)


def test_bootstrap_interval_drops_undefined_resamples_and_handles_no_inputs():
    from pipeline.core.losses import bootstrap_interval, pooled_mean

    # input B has no tokens: resamples of only B are undefined (0/0) and left out; the rest give 2.0.
    assert bootstrap_interval(pooled_mean, [2.0, 0.0], [1.0, 0.0], seed=0) == (pytest.approx(2.0), pytest.approx(2.0))
    assert all(math.isnan(v) for v in bootstrap_interval(pooled_mean, [], []))


def test_paired_difference_on_cases_with_known_answers():
    from pipeline.core.losses import paired_difference

    # A recovers 0.5 on each of two inputs; B recovers 1 on the first and 0 on the second. Resamples:
    # (1,1) -> +0.5 (p 1/4), (2,2) -> -0.5 (p 1/4), one of each -> 0 (p 1/2): the interval is [-0.5, 0.5].
    diff, low, high = paired_difference([1, 1], [2, 2], [0, 2], [2, 2], resamples=2000)
    assert (diff, low, high) == (pytest.approx(0.0), pytest.approx(-0.5), pytest.approx(0.5))
    # B is 1 nat better than A on every input: the difference is 0.25 in every resample, although each
    # run on its own swings between 0.25 and 0.75 (A) or 0.5 and 1 (B) as the inputs are resampled.
    diff, low, high = paired_difference([1, 3], [4, 4], [0, 2], [4, 4])
    assert (diff, low, high) == (pytest.approx(0.25), pytest.approx(0.25), pytest.approx(0.25))


def test_recovery_by_position_bins_the_answer_and_matches_a_hand_count():
    """Bins [0,1), [1,4), [4,16), [16,...): each bin's recovery is 1 - its residual sum / its effect sum over
    every input, its share the bin's effect over all; a bin no answer reaches is left out."""
    from pipeline.core.losses import bootstrap_interval, pooled_recovery, recovery_by_position

    gen = torch.Generator().manual_seed(0)
    effect = [torch.rand(n, generator=gen) for n in (20, 3, 9)]
    residual = [e * torch.rand(len(e), generator=gen) for e in effect]
    bins = recovery_by_position(effect, residual, resamples=200, seed=1)
    assert [(b["start"], b["end"]) for b in bins] == [(0, 1), (1, 4), (4, 16), (16, None)]
    total = sum(e.sum().item() for e in effect)
    for b, (lo, hi) in zip(bins, [(0, 1), (1, 4), (4, 16), (16, 99)]):
        e_sum = [sum(e[t].item() for t in range(lo, min(hi, len(e)))) for e in effect]
        r_sum = [sum(r[t].item() for t in range(lo, min(hi, len(r)))) for r in residual]
        assert b["tokens"] == sum(max(0, min(hi, len(e)) - lo) for e in effect)
        assert b["recovery"] == pytest.approx(1 - sum(r_sum) / sum(e_sum), rel=1e-6)
        assert b["effect_share"] == pytest.approx(sum(e_sum) / total, rel=1e-6)
        # inputs that do not reach the bin add zeros to it, and resample like any other
        assert b["recovery_ci"] == pytest.approx(list(bootstrap_interval(pooled_recovery, r_sum, e_sum, resamples=200, seed=1)))
    assert sum(b["effect_share"] for b in bins) == pytest.approx(1.0)
    assert [b["start"] for b in recovery_by_position([e[:3] for e in effect], [r[:3] for r in residual])] == [0, 1]


def test_lm_kl_loss_is_kl_on_recorded_rows_and_cross_entropy_elsewhere():
    """Against a loop over positions in float64: binned KL (top-k + the rest) where a position has a row,
    cross-entropy elsewhere, tags suppressed, label -100 skipped, the mean over every labelled position."""
    import numpy as np

    from pipeline.core.losses import IGNORE, lm_kl_loss

    torch.manual_seed(0)
    B, L, V, k, tag = 2, 7, 12, 4, 11
    logits = torch.randn(B, L, V, requires_grad=True)
    labels = torch.randint(0, tag, (B, L))
    labels[0, 0] = labels[1, 0] = labels[0, 3] = IGNORE
    soft_mask = torch.zeros(B, L, dtype=torch.bool)
    soft_mask[0, 2:5] = soft_mask[1, 4:] = True  # [0, 3] has a row but no label: it must not count
    topk_ids = torch.stack([torch.randperm(tag)[:k] for _ in range(B * L)]).view(B, L, k)
    raw = torch.randn(B, L, k)
    topk_logprobs = torch.log_softmax(raw, -1) + torch.log(torch.tensor(0.9))  # 0.1 of the mass left for the rest
    topk_logprobs[~soft_mask] = 0.0  # placeholders, as the stream writes them
    loss = lm_kl_loss(logits, labels, topk_ids, topk_logprobs, soft_mask, [tag])

    total, count = 0.0, 0
    x = logits.detach().double().numpy()
    for b in range(B):
        for t in range(1, L):
            if labels[b, t] == IGNORE:
                continue
            z = x[b, t - 1].copy()
            z[tag] = -1e4
            q = np.exp(z - z.max())
            q /= q.sum()
            if soft_mask[b, t]:
                ids, p = topk_ids[b, t].numpy(), np.exp(topk_logprobs[b, t].double().numpy())
                p_bins, q_bins = np.append(p, 1 - p.sum()), np.append(q[ids], 1 - q[ids].sum())
                total += float((p_bins * np.log(p_bins / q_bins)).sum())
            else:
                total -= float(np.log(q[labels[b, t]]))
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, -1].abs().sum() == 0  # the last logits predict nothing
