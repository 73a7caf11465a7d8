"""A tiny tabular world in which the SPO derivation can be checked exactly (E3, E4, E8).

Every prompt x has a handful of responses y, so a policy is just a table of log-probabilities
log pi(y|x) of shape (P, Y) (P prompts, Y responses), and true rewards R_1..R_N are random tables.
Because every ordered pair of responses can be enumerated, the *expected* loss over
Bradley-Terry preference labels is an exact finite sum: no sampling noise. Minimising it to
machine precision and comparing with the closed form of E3 tests the derivation itself.

All loss math comes from spo_min.losses (this file only enumerates pairs and optimises), with
the same conventions: betas[k-1] = beta_k and lambdas[k-1] = [lambda_1^(k), .., lambda_{k-1}^(k)]
for rounds k = 1..N (lambdas[0] == []). Tables are float64 throughout.

Typical use (also what tests/test_derivation.py and the walkthrough notebook do):

    problem = make_problem(n_prompts=3, n_responses=6, n_dims=3, seed=0)
    betas, lambdas = [0.5, 0.8, 1.0], [[], [0.6], [0.3, 1.2]]
    target = optimal_chain(problem, betas, lambdas)      # pi_0..pi_3 from E3
    learned = train_chain(problem, betas, lambdas)        # pi_0..pi_3 by minimising E6
    max_prob_diff(learned[3], target[3])                  # ~1e-9
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spo_min.losses import HyperparameterError, implicit_to_true_reward_matrix, spo_loss, spo_margin, spo_margin_telescoped


@dataclass
class TabularProblem:
    ref_logp: torch.Tensor  # (P, Y) log pi_0(y|x), the starting (SFT) policy
    rewards: torch.Tensor   # (N, P, Y) true rewards R_1..R_N, one table per dimension

    @property
    def n_dims(self) -> int:
        return self.rewards.shape[0]


def make_problem(n_prompts: int = 3, n_responses: int = 6, n_dims: int = 3, seed: int = 0,
                 reward_scale: float = 1.0, ref_scale: float = 0.5) -> TabularProblem:
    """Random pi_0 (logits ~ N(0, ref_scale^2)) and random true rewards R_k ~ N(0, reward_scale^2)."""
    g = torch.Generator().manual_seed(seed)
    ref_logits = ref_scale * torch.randn(n_prompts, n_responses, generator=g, dtype=torch.float64)
    rewards = reward_scale * torch.randn(n_dims, n_prompts, n_responses, generator=g, dtype=torch.float64)
    return TabularProblem(F.log_softmax(ref_logits, dim=-1), rewards)


def combined_reward(rewards: torch.Tensor, n: int, lambdas_n: list[float]) -> torch.Tensor:
    """E2: the reward round n maximises, R_n + sum_{i<n} lambda_i^(n) R_i -> (P, Y)."""
    total = rewards[n - 1].clone()
    for i, lam in enumerate(lambdas_n, start=1):
        total = total + lam * rewards[i - 1]
    return total


def optimal_policy(prev_logp: torch.Tensor, rewards: torch.Tensor, n: int, beta: float,
                   lambdas_n: list[float]) -> torch.Tensor:
    """E3: log pi_n* = log pi_{n-1} + (R_n + sum_i lambda_i^(n) R_i) / beta_n - log Z_n(x)."""
    return F.log_softmax(prev_logp + combined_reward(rewards, n, lambdas_n) / beta, dim=-1)


def optimal_chain(problem: TabularProblem, betas: list[float], lambdas: list[list[float]]) -> list[torch.Tensor]:
    """[log pi_0, log pi_1*, .., log pi_N*], each round's E3 optimum from the previous one."""
    chain = [problem.ref_logp]
    for n in range(1, len(betas) + 1):
        chain.append(optimal_policy(chain[-1], problem.rewards, n, betas[n - 1], lambdas[n - 1]))
    return chain


def ordered_pairs(n_prompts: int, n_responses: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ordered pair (x, y_w, y_l) with y_w != y_l, as index tensors (prompt, winner, loser)."""
    x, w, l = torch.meshgrid(torch.arange(n_prompts), torch.arange(n_responses), torch.arange(n_responses), indexing="ij")
    keep = w != l
    return x[keep], w[keep], l[keep]


def on_pairs(logp: torch.Tensor, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """A (P, Y) table read at each pair's chosen and rejected response -> ((B,), (B,))."""
    x, w, l = pairs
    return logp[x, w], logp[x, l]


def round_margin(chain: list[torch.Tensor], n: int, pairs, betas: list[float], lambdas: list[list[float]],
                 kind: str = "exact", alpha: float | None = None) -> torch.Tensor:
    """The frozen margin M_n of round n on `pairs`, from log pi_0..pi_{n-1} = chain[:n].

    kind: "exact" (E6), "telescoped" (the named simplification, needs alpha), "none" (M = 0,
    sequential DPO: the alpha = 0 baseline of E5).
    """
    chosen, rejected = zip(*(on_pairs(logp, pairs) for logp in chain[:n]))
    if kind == "exact":
        return spo_margin(list(chosen), list(rejected), betas[:n - 1], lambdas[:n])
    if kind == "telescoped":
        return spo_margin_telescoped(list(chosen), list(rejected), alpha)
    if kind == "none":
        return torch.zeros_like(chosen[0])
    raise HyperparameterError(f"kind = {kind!r}: use 'exact', 'telescoped' or 'none'")


def expected_loss(logits: torch.Tensor, prev_logp: torch.Tensor, pairs, pref_prob: torch.Tensor,
                  margin: torch.Tensor, beta: float) -> torch.Tensor:
    """The population SPO loss (E6) of the tabular policy softmax(logits), a scalar.

    Each unordered pair {a, b} appears twice in `pairs` (a over b and b over a). Weighting each
    ordered pair's loss by its probability of being the observed label, pref_prob = p(y_w > y_l),
    gives the expected NLL of one labelled comparison per unordered pair, summed over pairs.
    """
    policy_chosen, policy_rejected = on_pairs(F.log_softmax(logits, dim=-1), pairs)
    ref_chosen, ref_rejected = on_pairs(prev_logp, pairs)
    losses, _ = spo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin, beta, reduction="none")
    return (pref_prob * losses).sum()


def minimise(loss_fn, init_logits: torch.Tensor, max_iter: int = 200) -> torch.Tensor:
    """Minimise loss_fn(logits) with L-BFGS in float64 from init_logits -> log-probs (P, Y).

    The expected loss is convex in the logits (a sum of -log sigmoid of linear functions), so a
    quasi-Newton method with a strong-Wolfe line search reaches machine-precision optima in a few
    dozen iterations, where plain gradient descent would need many thousands.
    """
    logits = init_logits.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=max_iter, history_size=50, tolerance_grad=1e-13,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(logits)
        loss.backward()
        return loss

    opt.step(closure)
    return F.log_softmax(logits.detach(), dim=-1)


def train_round(problem: TabularProblem, chain: list[torch.Tensor], n: int, betas: list[float],
                lambdas: list[list[float]], kind: str = "exact", alpha: float | None = None) -> torch.Tensor:
    """Round n: minimise the expected SPO loss on dimension-n preferences, starting at pi_{n-1}.

    E8's data model: round n's labels come from round n's TRUE reward only,
    p(y_w > y_l) = sigmoid(R_n(y_w) - R_n(y_l)). The margin recovers the earlier dimensions.
    """
    pairs = ordered_pairs(*problem.ref_logp.shape)
    reward_w, reward_l = on_pairs(problem.rewards[n - 1], pairs)
    pref_prob = torch.sigmoid(reward_w - reward_l)  # Bradley-Terry on R_n
    margin = round_margin(chain, n, pairs, betas, lambdas, kind, alpha)
    prev_logp = chain[n - 1]
    return minimise(lambda logits: expected_loss(logits, prev_logp, pairs, pref_prob, margin, betas[n - 1]), prev_logp)


def train_chain(problem: TabularProblem, betas: list[float], lambdas: list[list[float]],
                kind: str = "exact", alpha: float | None = None) -> list[torch.Tensor]:
    """[log pi_0, log pi_1, .., log pi_N], each round trained from the previous LEARNED policy."""
    chain = [problem.ref_logp]
    for n in range(1, len(betas) + 1):
        chain.append(train_round(problem, chain, n, betas, lambdas, kind, alpha))
    return chain


def recover_true_rewards(chain: list[torch.Tensor], betas: list[float], lambdas: list[list[float]]) -> torch.Tensor:
    """E4 backwards: true rewards from a chain's implicit rewards, R_k = sum_j A_kj r_j -> (K, P, Y).

    r_j = beta_j log(pi_j / pi_{j-1}). Exact up to a per-prompt constant c_k(x), which pair
    differences (and hence every loss) never see.
    """
    K = len(chain) - 1
    r = torch.stack([betas[j - 1] * (chain[j] - chain[j - 1]) for j in range(1, K + 1)])
    A = implicit_to_true_reward_matrix(lambdas[:K]).to(r.dtype)
    return torch.einsum("kj,jpy->kpy", A, r)


def max_prob_diff(logp_a: torch.Tensor, logp_b: torch.Tensor) -> float:
    """max over (x, y) of |pi_a(y|x) - pi_b(y|x)|."""
    return (logp_a.exp() - logp_b.exp()).abs().max().item()
