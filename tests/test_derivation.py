"""The derivation itself, checked on a tabular problem (E3, E4, E8; summarised in spo_min/losses.py).

3 prompts x 6 responses, random true rewards R_1..R_3, tabular softmax policies. Round n's
labels follow Bradley-Terry on the TRUE reward of dimension n only: p(y_w > y_l) = sigmoid(Delta R_n).
The expected loss over all ordered pairs is minimised (L-BFGS, float64) from pi_{n-1}.

Why the optimum is E3: per unordered pair the expected loss is
    p * -log sigmoid(h - M) + (1 - p) * -log sigmoid(-(h - M)),
minimised at sigmoid(h - M) = p = sigmoid(Delta R_n), i.e. h - M = Delta R_n. With the exact
margin M = sum_i lambda_i Delta R_i (E6) that is beta_n Delta log(pi/pi_{n-1}) = Delta(R_n + sum_i
lambda_i R_i), i.e. beta_n log(pi/pi_{n-1}) = R_n + sum_i lambda_i R_i + c(x): the E3 policy.

The E3 references below are written out directly from the formulas (softmax of log pi_prev plus
reward / beta), not taken from spo_min.tabular, so the library's closed form is checked too.

Tolerances: the spec asks max |prob diff| <= 1e-4. The optimiser actually reaches ~1e-8 (the
loss is convex and L-BFGS in float64 converges superlinearly), so 1e-4 is a safe bound, while
every wrong variant below (no margin, telescoped margin) misses E3 by > 1e-2.
"""

import pytest
import torch

from spo_min import tabular
from spo_min.losses import spo_margin, spo_margin_telescoped

SPEC_TOL = 1e-4  # max |pi - pi*| required by E8 (see module docstring)
BETAS = [0.5, 0.8, 1.0]
LAMBDAS = [[], [0.6], [0.3, 1.2]]  # round 3's lambdas differ from each other and from round 2's


def softmax_e3(prev_logp, reward, beta):
    """E3 written out: pi* = pi_prev exp(reward / beta) / Z(x)."""
    unnorm = prev_logp.exp() * torch.exp(reward / beta)
    return (unnorm / unnorm.sum(-1, keepdim=True)).log()


@pytest.fixture(scope="module")
def problem():
    return tabular.make_problem(n_prompts=3, n_responses=6, n_dims=3, seed=0)


@pytest.fixture(scope="module")
def e3_chain(problem):
    """pi_0, pi_1*, pi_2*, pi_3* by E3, written out here."""
    R1, R2, R3 = problem.rewards
    pi1 = softmax_e3(problem.ref_logp, R1, BETAS[0])
    pi2 = softmax_e3(pi1, R2 + LAMBDAS[1][0] * R1, BETAS[1])
    pi3 = softmax_e3(pi2, R3 + LAMBDAS[2][0] * R1 + LAMBDAS[2][1] * R2, BETAS[2])
    return [problem.ref_logp, pi1, pi2, pi3]


def test_library_closed_form_matches(problem, e3_chain):
    for mine, ref in zip(tabular.optimal_chain(problem, BETAS, LAMBDAS), e3_chain):
        assert tabular.max_prob_diff(mine, ref) < 1e-14  # same formula, float64 rounding only
    # E3, composed: pi_2* ∝ pi_0 exp(R_1/beta_1 + (R_2 + lambda R_1)/beta_2)
    R1, R2, _ = problem.rewards
    composed = softmax_e3(problem.ref_logp, BETAS[1] * R1 / BETAS[0] + R2 + LAMBDAS[1][0] * R1, BETAS[1])
    assert tabular.max_prob_diff(composed, e3_chain[2]) < 1e-14


def test_round1_is_the_dpo_optimum(problem, e3_chain):
    pi1 = tabular.train_round(problem, [problem.ref_logp], 1, BETAS, LAMBDAS)
    assert tabular.max_prob_diff(pi1, e3_chain[1]) <= SPEC_TOL


def test_round2_exact_margin_recovers_e3(problem, e3_chain):
    pi2 = tabular.train_round(problem, e3_chain, 2, BETAS, LAMBDAS)
    assert tabular.max_prob_diff(pi2, e3_chain[2]) <= SPEC_TOL
    # The same statement in reward space: beta_2 log(pi/pi_1) - (R_2 + lambda R_1) = c(x), constant
    # over responses. 1e-5: the tiniest probabilities (~1e-5) carry the largest relative error.
    R1, R2, _ = problem.rewards
    c = BETAS[1] * (pi2 - e3_chain[1]) - (R2 + LAMBDAS[1][0] * R1)
    assert (c - c.mean(-1, keepdim=True)).abs().max() < 1e-5


def test_round3_distinct_lambdas_recovers_e3(problem, e3_chain):
    pi3 = tabular.train_round(problem, e3_chain, 3, BETAS, LAMBDAS)
    assert tabular.max_prob_diff(pi3, e3_chain[3]) <= SPEC_TOL


def test_whole_learned_chain_recovers_e3(problem, e3_chain):
    """Each round starts from the previous LEARNED policy and reads its margin from learned policies."""
    learned = tabular.train_chain(problem, BETAS, LAMBDAS)
    for n in (1, 2, 3):
        assert tabular.max_prob_diff(learned[n], e3_chain[n]) <= SPEC_TOL, n


@pytest.mark.parametrize("n", [2, 3])
def test_alpha_zero_lands_on_plain_dpo_optimum(problem, e3_chain, n):
    """No margin = sequential DPO: pi_{n-1} exp(R_n / beta_n) / Z, which forgets the earlier dimensions."""
    learned = tabular.train_round(problem, e3_chain, n, BETAS, LAMBDAS, kind="none")
    dpo_optimum = softmax_e3(e3_chain[n - 1], problem.rewards[n - 1], BETAS[n - 1])
    assert tabular.max_prob_diff(learned, dpo_optimum) <= SPEC_TOL
    assert tabular.max_prob_diff(learned, e3_chain[n]) > 1e-2  # so the E3 checks above can fail


def test_telescoped_margin_equals_exact_at_two_rounds(problem, e3_chain):
    pairs = tabular.ordered_pairs(3, 6)
    chosen, rejected = zip(*(tabular.on_pairs(p, pairs) for p in e3_chain[:2]))
    exact = spo_margin(list(chosen), list(rejected), BETAS[:1], LAMBDAS[:2])
    telescoped = spo_margin_telescoped(list(chosen), list(rejected), alpha=LAMBDAS[1][0] * BETAS[0])
    assert (exact - telescoped).abs().max() < 1e-12  # float64 rounding of the same sum


def test_telescoped_margin_misses_e3_at_three_rounds(problem, e3_chain):
    """The telescoped option (alpha = lambda_2^(3) beta_2, matching the last round) is not E6 at n = 3:
    it weights Delta r_1 by alpha / beta_1 = 1.92 where E6 uses lambda_1^(3) - lambda_2^(3) lambda^(2) = -0.42.
    It lands on the E3-shaped policy of a DIFFERENT combined reward, R_3 + alpha log(pi_2 / pi_0)."""
    alpha = LAMBDAS[2][1] * BETAS[1]
    learned = tabular.train_round(problem, e3_chain, 3, BETAS, LAMBDAS, kind="telescoped", alpha=alpha)
    assert tabular.max_prob_diff(learned, e3_chain[3]) > 1e-2
    wrong_target = softmax_e3(e3_chain[2], problem.rewards[2] + alpha * (e3_chain[2] - e3_chain[0]), BETAS[2])
    assert tabular.max_prob_diff(learned, wrong_target) <= SPEC_TOL


def test_implicit_rewards_recover_true_rewards(problem, e3_chain):
    """E4: A applied to the E3 chain's implicit rewards gives R_1..R_3 up to a per-prompt constant."""
    recovered = tabular.recover_true_rewards(e3_chain, BETAS, LAMBDAS)
    diff = recovered - problem.rewards
    # float64 rounding of log-softmax on O(10) values: ~1e-14.
    assert (diff - diff[..., :1]).abs().max() < 1e-12
