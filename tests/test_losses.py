"""Unit tests of spo_min/losses.py against hand computations and the closed forms of E4-E7, E9.

Everything runs in float64, so "exact" comparisons use 1e-12: the formulas involve a handful of
additions, exp and log1p on O(1) numbers, whose float64 rounding error is ~1e-15; 1e-12 leaves
three orders of magnitude of headroom yet catches any real mistake (a wrong sign, a missing beta
or factor, which show up at >= 1e-3).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from spo_min.losses import (
    HyperparameterError,
    LossInputError,
    dpo_loss,
    implicit_to_true_reward_matrix,
    pair_weights,
    sequence_logps,
    spo_loss,
    spo_margin,
    spo_margin_telescoped,
)

F64 = torch.float64
TOL = 1e-12  # see the module docstring


def rand_logps(g, *shape):
    """Plausible sequence log-probs: negative, O(10)."""
    return -10.0 * torch.rand(*shape, generator=g, dtype=F64) - 1.0


def four_logps(seed=0, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [rand_logps(g, batch) for _ in range(4)]


# ---------------------------------------------------------------- E9: sequence log-probs


def test_sequence_logps_sums_response_tokens_only():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -8.0, -9.0]], dtype=F64)
    labels = torch.tensor([[-100, 7, 8, -100], [3, 4, -100, -100]])
    # Ignored positions hold garbage (NaN/inf): they must not leak into the result.
    token_logps[0, 0], token_logps[1, 3] = float("nan"), float("-inf")
    token_logps.requires_grad_(True)
    summed = sequence_logps(token_logps, labels)
    torch.testing.assert_close(summed, torch.tensor([-2.0 - 3.0, -0.5 - 0.25], dtype=F64), rtol=0, atol=TOL)
    averaged = sequence_logps(token_logps, labels, average=True)
    torch.testing.assert_close(averaged, torch.tensor([-5.0 / 2, -0.75 / 2], dtype=F64), rtol=0, atol=TOL)
    summed.sum().backward()
    expected_grad = (labels != -100).to(F64)  # d(sum)/d(token) is 1 on response tokens, 0 elsewhere
    assert torch.equal(token_logps.grad, expected_grad)


def test_averaging_changes_the_effective_beta():
    """Averaging divides the implicit reward by |y|: DPO on averaged log-probs with beta equals DPO on
    summed log-probs with beta/|y| (all responses of length 4 here)."""
    g = torch.Generator().manual_seed(1)
    tok = [-3.0 * torch.rand(5, 4, generator=g, dtype=F64) for _ in range(4)]
    labels = torch.zeros(5, 4, dtype=torch.long)
    avg_loss, _ = dpo_loss(*(sequence_logps(t, labels, average=True) for t in tok), beta=0.4)
    sum_loss, _ = dpo_loss(*(sequence_logps(t, labels) for t in tok), beta=0.4 / 4)
    assert abs(avg_loss.item() - sum_loss.item()) < TOL


def test_sequence_logps_bad_input():
    with pytest.raises(LossInputError, match="same \\(B, T\\) shape"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(LossInputError, match="no response tokens"):
        sequence_logps(torch.zeros(2, 3), torch.tensor([[1, 2, 3], [-100, -100, -100]]), average=True)
    with pytest.raises(LossInputError, match="NaN/inf at a response position"):
        sequence_logps(torch.tensor([[0.0, float("nan")]]), torch.tensor([[1, 2]]))


# ---------------------------------------------------------------- DPO, pinned by hand


def test_dpo_loss_pinned_by_hand():
    # beta = 0.1, two pairs (policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    #   pair 1: (-10, -12, -11, -11): h = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.1 * 2 = 0.2
    #           loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693
    #   pair 2: (-5, -4, -5, -5):     h = 0.1 * ((-5 + 5) - (-4 + 5)) = -0.1
    #           loss = log(1 + e^0.1) = log(2.1051709181) = 0.7443966600
    #   mean = (0.5981388693 + 0.7443966600) / 2 = 0.6712677647
    # rewards: chosen 0.1*[1, 0] -> mean 0.05; rejected 0.1*[-1, 1] -> mean 0; margins [0.2, -0.1] -> 0.05;
    # accuracy: [0.1 > -0.1, 0 > 0.1] = [1, 0] -> 0.5; pair weight sigmoid(-h) = [0.4501660027, 0.5249791875].
    t = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    loss, m = dpo_loss(t(-10, -5), t(-12, -4), t(-11, -5), t(-11, -5), beta=0.1)
    # 5e-11: the hand values above are rounded to 10 decimals.
    assert abs(loss.item() - 0.6712677647) < 5e-11
    expected = {"rewards/chosen": 0.05, "rewards/rejected": 0.0, "rewards/margins": 0.05,
                "rewards/accuracies": 0.5, "logps/chosen": -7.5, "logps/rejected": -8.0,
                "spo/margin": 0.0, "spo/pair_weight": (0.4501660027 + 0.5249791875) / 2}
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key].dim() == 0 and not m[key].requires_grad
        assert abs(m[key].item() - value) < 5e-11, key


# ---------------------------------------------------------------- step-0 invariants


def test_step0_dpo_is_ln2_with_zero_rewards():
    g = torch.Generator().manual_seed(2)
    chosen, rejected = rand_logps(g, 16), rand_logps(g, 16)
    loss, m = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1)
    assert abs(loss.item() - math.log(2)) < TOL
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert m[key].item() == 0.0, key  # beta * (x - x) is exactly 0
    assert m["rewards/accuracies"].item() == 0.0  # ties are not "correct"
    assert m["spo/pair_weight"].item() == 0.5


def test_step0_spo_pair_weight_is_sigmoid_margin():
    g = torch.Generator().manual_seed(3)
    chosen, rejected = rand_logps(g, 16), rand_logps(g, 16)
    margin = torch.randn(16, generator=g, dtype=F64) * 2
    w = pair_weights(chosen, rejected, chosen, rejected, margin, beta=0.3)
    torch.testing.assert_close(w, torch.sigmoid(margin), rtol=0, atol=TOL)
    loss, m = spo_loss(chosen, rejected, chosen, rejected, margin, beta=0.3)
    assert abs(m["spo/pair_weight"].item() - torch.sigmoid(margin).mean().item()) < TOL
    assert abs(m["spo/margin"].item() - margin.mean().item()) < TOL
    # E6 at h = 0: -log sigmoid(-M)
    assert abs(loss.item() - (-F.logsigmoid(-margin)).mean().item()) < TOL


# ---------------------------------------------------------------- E7 gradient


@pytest.mark.parametrize("with_margin", [False, True])
def test_autograd_matches_E7(with_margin):
    pc, pr, rc, rr = four_logps(seed=4)
    pc.requires_grad_(True), pr.requires_grad_(True), rc.requires_grad_(True), rr.requires_grad_(True)
    beta = 0.7
    g = torch.Generator().manual_seed(5)
    margin = torch.randn(8, generator=g, dtype=F64) if with_margin else torch.zeros(8, dtype=F64)
    assert not with_margin or margin.abs().min() > 1e-3  # the margin really is nonzero
    if with_margin:
        loss, _ = spo_loss(pc, pr, rc, rr, margin, beta)
    else:
        loss, _ = dpo_loss(pc, pr, rc, rr, beta)
    loss.backward()
    # E7 with the mean over B pairs: dL/dlogpi(y_w) = -beta sigmoid(-z) / B, dL/dlogpi(y_l) = +beta sigmoid(-z) / B
    with torch.no_grad():
        z = beta * ((pc - rc) - (pr - rr)) - margin
        weight = torch.sigmoid(-z)
    torch.testing.assert_close(pc.grad, -beta * weight / 8, rtol=0, atol=TOL)
    torch.testing.assert_close(pr.grad, beta * weight / 8, rtol=0, atol=TOL)
    assert rc.grad is None and rr.grad is None  # the reference pi_{n-1} is frozen


def test_gradcheck():
    pc, pr, rc, rr = four_logps(seed=6, batch=5)
    margin = torch.randn(5, generator=torch.Generator().manual_seed(7), dtype=F64)
    pc.requires_grad_(True), pr.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: spo_loss(a, b, rc, rr, margin, 0.5)[0], (pc, pr))
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, 0.5)[0], (pc, pr))
    assert torch.autograd.gradcheck(lambda a, b: spo_loss(a, b, rc, rr, margin, 0.5, reduction="none")[0], (pc, pr))
    tok = torch.randn(3, 6, dtype=F64, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3, -100, -100], [-100, -100, 5, 6, 7, 8], [1, 1, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda t: sequence_logps(t, labels, average=True), (tok,))


def test_extreme_margins_are_stable():
    """logsigmoid keeps the loss finite and exact where log(sigmoid(z)) would give -inf/NaN."""
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    zero = torch.zeros(2, dtype=F64)
    losses, _ = spo_loss(x, zero, zero, zero, torch.tensor([1000.0, -1000.0], dtype=F64), 1.0, reduction="none")
    assert losses[0].item() == pytest.approx(1000.0, abs=TOL) and losses[1].item() < 1e-300
    losses.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- E4-E6 margins


def test_margin_zero_is_exactly_dpo():
    pc, pr, rc, rr = four_logps(seed=8)
    dpo, dpo_m = dpo_loss(pc, pr, rc, rr, 0.2)
    spo, spo_m = spo_loss(pc, pr, rc, rr, torch.zeros(8, dtype=F64), 0.2)
    assert dpo.item() == spo.item() and all(dpo_m[k].item() == spo_m[k].item() for k in dpo_m)
    # Round 1 has no earlier dimensions: its margin is 0 (E1).
    assert torch.equal(spo_margin([pc], [pr], [], [[]]), torch.zeros(8, dtype=F64))


def test_two_round_margin_is_E5_and_telescoped_agrees():
    g = torch.Generator().manual_seed(9)
    c0, c1, r0, r1 = (rand_logps(g, 8) for _ in range(4))
    beta1, lam = 0.25, 0.6
    exact = spo_margin([c0, c1], [r0, r1], [beta1], [[], [lam]])
    # E5: M = alpha * Delta log(pi_1 / pi_0) with alpha = lambda * beta_1
    by_hand = lam * beta1 * ((c1 - c0) - (r1 - r0))
    torch.testing.assert_close(exact, by_hand, rtol=0, atol=TOL)
    torch.testing.assert_close(spo_margin_telescoped([c0, c1], [r0, r1], lam * beta1), by_hand, rtol=0, atol=TOL)


def test_three_round_margin_matches_hand_expansion_and_differs_from_telescoped():
    g = torch.Generator().manual_seed(10)
    c = [rand_logps(g, 8) for _ in range(3)]
    r = [rand_logps(g, 8) for _ in range(3)]
    b1, b2, lam2, l1, l2 = 0.25, 0.5, 0.6, 0.3, 1.2
    M = spo_margin(c, r, [b1, b2], [[], [lam2], [l1, l2]])
    d = [ci - ri for ci, ri in zip(c, r)]
    dr1, dr2 = b1 * (d[1] - d[0]), b2 * (d[2] - d[1])  # E4 implicit reward differences
    dR1, dR2 = dr1, dr2 - lam2 * dr1                  # E4: R_1 = r_1, R_2 = r_2 - lambda r_1
    torch.testing.assert_close(M, l1 * dR1 + l2 * dR2, rtol=0, atol=TOL)  # E6
    # The telescoped simplification with alpha = lambda_2^(3) beta_2 weights Delta r_1 by
    # alpha / beta_1 = 1.92 instead of l1 - l2 * lam2 = -0.42: a different margin.
    telescoped = spo_margin_telescoped(c, r, l2 * b2)
    assert (telescoped - M).abs().max() > 1.0


def test_A_recursion_equals_triangular_solve():
    g = torch.Generator().manual_seed(11)
    for K in range(1, 6):
        lambdas = [(2 * torch.rand(k, generator=g, dtype=F64)).tolist() for k in range(K)]
        # E3/E4: r = L R with L_kk = 1, L_ki = lambda_i^(k) (i < k); then R = L^-1 r.
        L = torch.eye(K, dtype=F64)
        for k in range(K):
            L[k, :k] = torch.tensor(lambdas[k], dtype=F64)
        direct = torch.linalg.solve_triangular(L, torch.eye(K, dtype=F64), upper=False)
        A = implicit_to_true_reward_matrix(lambdas)
        # entries can grow like (1 + max lambda)^K ~ 3^5, hence a relative tolerance.
        torch.testing.assert_close(A, direct, rtol=1e-12, atol=1e-12)
    assert implicit_to_true_reward_matrix([[], [0.5]]).tolist() == [[1.0, 0.0], [-0.5, 1.0]]  # R_2 = r_2 - lambda r_1


# ---------------------------------------------------------------- bad input: one clear message


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), True, "0.1x", None])
def test_bad_beta(beta):
    pc, pr, rc, rr = four_logps()
    with pytest.raises(HyperparameterError, match=r"beta = .*must be a finite number > 0"):
        dpo_loss(pc, pr, rc, rr, beta)


def test_bad_margin_hyperparameters():
    c, r = [torch.zeros(3, dtype=F64)] * 3, [torch.zeros(3, dtype=F64)] * 3
    with pytest.raises(HyperparameterError, match=r"lambda_1\^\(3\) = -0.1: must be a finite number >= 0"):
        spo_margin(c, r, [0.1, 0.1], [[], [0.5], [-0.1, 0.2]])
    with pytest.raises(HyperparameterError, match=r"lambdas\[2\] \(round 3\) has 1 values, needs 2"):
        spo_margin(c, r, [0.1, 0.1], [[], [0.5], [0.2]])
    with pytest.raises(HyperparameterError, match=r"round 3 needs 2 betas .* and 3 lambda lists .* got 1 and 3"):
        spo_margin(c, r, [0.1], [[], [0.5], [0.1, 0.2]])
    with pytest.raises(HyperparameterError, match=r"round 3 needs 2 betas .* got 2 and 2"):
        spo_margin(c, r, [0.1, 0.1], [[], [0.5]])
    with pytest.raises(HyperparameterError, match=r"beta_2 = 0.0"):
        spo_margin(c, r, [0.1, 0.0], [[], [0.5], [0.1, 0.2]])
    with pytest.raises(HyperparameterError, match=r"alpha = -1.0"):
        spo_margin_telescoped(c, r, -1.0)
    with pytest.raises(HyperparameterError, match=r"reduction = 'max'"):
        spo_loss(c[0], c[0], c[0], c[0], 0.0, 0.1, reduction="max")


def test_bad_logps():
    ok = torch.zeros(4, dtype=F64)
    with pytest.raises(LossInputError, match=r"need log-probs of pi_0..pi_\(n-1\) .* got 3 and 2"):
        spo_margin([ok] * 3, [ok] * 2, [0.1, 0.1], [[], [0.5], [0.1, 0.2]])
    with pytest.raises(LossInputError, match=r"rejected_logps\[1\]: expected shape \(4,\)"):
        spo_margin([ok, ok], [ok, torch.zeros(5, dtype=F64)], [0.1], [[], [0.5]])
    with pytest.raises(LossInputError, match=r"policy_rejected contains NaN or inf"):
        dpo_loss(ok, torch.tensor([0.0, 0.0, float("nan"), 0.0], dtype=F64), ok, ok, 0.1)
    with pytest.raises(LossInputError, match=r"ref_chosen: expected shape \(4,\) .* got \(4, 1\)"):
        dpo_loss(ok, ok, ok[:, None], ok, 0.1)
    with pytest.raises(LossInputError, match=r"margin: expected shape \(4,\) .* got \(3,\)"):
        spo_loss(ok, ok, ok, ok, torch.zeros(3, dtype=F64), 0.1)
    with pytest.raises(LossInputError, match=r"margin contains NaN or inf"):
        spo_loss(ok, ok, ok, ok, float("inf"), 0.1)
