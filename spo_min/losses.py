"""DPO and SPO losses, exactly as derived (equations E1..E10). The one place the loss math lives.

The derivation in brief (Lou et al., "SPO", arXiv 2405.12739; E-numbers are cited below and
in the tests). Dimensions 1..N, each with a latent reward R_k; round n turns pi_{n-1} into pi_n:

  E1  max E[R_n]  s.t.  KL(pi_n || pi_{n-1}) <= H_0  and  E[R_i] >= H_i for every i < n
  E2  Lagrangian: max E[R_n + sum_i lambda_i^(n) R_i] - beta_n KL(pi || pi_{n-1})
  E3  optimum: pi_n* = pi_{n-1} exp((R_n + sum_i lambda_i^(n) R_i) / beta_n) / Z_n(x)
  E4  implicit reward r_k = beta_k log(pi_k / pi_{k-1}) = R_k + sum_{i<k} lambda_i^(k) R_i - c(x);
      inverting the triangular system: R_k = sum_{j<=k} A_kj r_j, A_kk = 1,
      A_kj = -sum_{i=j}^{k-1} lambda_i^(k) A_ij
  E5  two rounds: L = -E log sigmoid(beta_2 Delta log(pi/pi_1) - alpha Delta log(pi_1/pi_0)),
      alpha = lambda beta_1, Delta f = f(x, y_w) - f(x, y_l)
  E6  n rounds: L = -E log sigmoid(beta_n Delta log(pi/pi_{n-1}) - M_n),
      M_n = sum_{i<n} lambda_i^(n) Delta R_i (frozen during round n)
  E7  dL/dlog pi(y_w) = -beta_n sigmoid(M_n - h), h = beta_n Delta log(pi/pi_{n-1}): each pair
      is weighted by sigmoid(M_n - h); at initialisation that is sigmoid(M_n), not DPO's 1/2
  E8  the population minimiser of E6 is E3's policy (checked in tests/test_derivation.py)
  E9  log pi(y|x) = sum of response-token log-probs (prompt and padding excluded)
  E10 two rounds chained from pi_0 (E3 twice): SPO reaches
          pi_2* = pi_0 exp((1/beta_1 + lambda/beta_2) R_1 + R_2/beta_2) / Z,
      sequential DPO (lambda = 0) the same without lambda/beta_2: at the optimum SPO re-weights
      the dimensions, it adds no information. Matched baseline: sequential DPO whose round 1 uses
      beta_1' = beta_1 beta_2 / (beta_2 + lambda beta_1), i.e. 1/beta_1' = 1/beta_1 + lambda/beta_2,
      has exactly SPO's optimum; both maximise
          J(pi) = E_pi[(1/beta_1 + lambda/beta_2) R_1 + R_2/beta_2] - KL(pi || pi_0),
      so a measured difference between them is a finite-training effect (E7). Code:
      study.matched_beta1, study.objective_weights, evaluate.ExactEvaluation.objective.

Everything here works on *sequence* log-probabilities: one number log pi(y|x) per response
(E9), shape (B,) per argument, where row b of every tensor belongs to the same preference pair.

Naming: "policy" is pi_theta (being trained in round n), "ref" is pi_{n-1} (the previous
round's policy; pi_0 in round 1), "margin" is the frozen SPO margin M_n of E6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of prompt and padding positions (see the batch convention)


class HyperparameterError(ValueError):
    """A beta, lambda or alpha that the derivation does not allow (E2: beta > 0, lambda >= 0)."""


class LossInputError(ValueError):
    """Log-probabilities with the wrong shape, or NaN/inf values."""


def _check_real(name: str, value, minimum: float, strict: bool) -> float:
    ok = not isinstance(value, bool)
    try:
        value = float(value)
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if ok and math.isfinite(value) and (value > minimum if strict else value >= minimum):
        return value
    need = f"> {minimum}" if strict else f">= {minimum}"
    raise HyperparameterError(f"{name} = {value!r}: must be a finite number {need} (E2); fix it in the run config")


def _check_logps(**tensors: torch.Tensor) -> None:
    """Every tensor 1-D with one shared shape, every value finite."""
    shape = None  # set by the first tensor; all others must match it
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape != (shape or t.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            want = f"shape {tuple(shape)}" if shape else "a 1-D tensor"
            raise LossInputError(f"{name}: expected {want} (one value per pair), got {got}")
        shape = t.shape
    # One host sync for all tensors (on a GPU each .item()-like check would stall the queue).
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    for name, ok in zip(tensors, finite):
        if not ok:
            raise LossInputError(f"{name} contains NaN or inf: check the model outputs / cached reference log-probs")


def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """E9: log pi(y|x) = sum of the per-token log-probs over response tokens -> (B,).

    Positions whose label is IGNORE_INDEX (prompt, padding) are excluded. average=True divides by
    the number of response tokens instead. Beware: the implicit reward beta * log(pi/pi_ref) then
    becomes (beta / |y|) * (summed log-ratio), i.e. the effective beta shrinks by the response
    length and differs from pair to pair. Sum (the default) is what the derivation assumes.
    """
    if token_logps.shape != labels.shape or token_logps.dim() != 2:
        raise LossInputError(f"token_logps {tuple(token_logps.shape)} and labels {tuple(labels.shape)} must be the same (B, T) shape")
    mask = labels != IGNORE_INDEX
    # where(), not multiply: a NaN/inf at an ignored position must not leak into the sum.
    logps = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1)
    if average:
        n_tokens = mask.sum(-1)
        if (n_tokens == 0).any():
            raise LossInputError("average=True but some rows have no response tokens (all labels are -100)")
        logps = logps / n_tokens
    if not torch.isfinite(logps).all():
        raise LossInputError("token_logps is NaN/inf at a response position: check the model outputs")
    return logps


def scored_sequence_logps(scored_token_logps: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """E9 from the log-probs of the scored tokens alone -> (B,).

    scored_token_logps: (N,) one value per position whose label is not IGNORE_INDEX, in row-major
    order of labels (B, T) (what `token_logps[labels != IGNORE_INDEX]` lists). They are put back at
    their (row, position), so that sequence_logps applies E9 in one place.
    """
    scored = labels != IGNORE_INDEX
    full = torch.zeros(labels.shape, dtype=scored_token_logps.dtype, device=scored_token_logps.device)
    return sequence_logps(full.masked_scatter(scored, scored_token_logps), labels, average=average)


def implicit_to_true_reward_matrix(lambdas: list[list[float]]) -> torch.Tensor:
    """E4: the lower-triangular (K, K) matrix A with Delta R_k = sum_{j<=k} A_kj Delta r_j.

    lambdas[k-1] = [lambda_1^(k), ..., lambda_{k-1}^(k)] for rounds k = 1..K (lambdas[0] == []).
    E3 gives r = L R (+ c(x)) with L_kk = 1, L_ki = lambda_i^(k); A = L^-1, built by the recursion
        A_kk = 1,   A_kj = - sum_{i=j}^{k-1} lambda_i^(k) A_ij   (j < k).
    Returned in float64 (it is tiny; callers cast).
    """
    K = len(lambdas)
    for k, lam in enumerate(lambdas, start=1):
        if len(lam) != k - 1:
            raise HyperparameterError(f"lambdas[{k - 1}] (round {k}) has {len(lam)} values, needs {k - 1}: one lambda per earlier round")
        for i, value in enumerate(lam, start=1):
            _check_real(f"lambda_{i}^({k})", value, 0.0, strict=False)
    A = [[0.0] * K for _ in range(K)]
    for k in range(K):  # 0-based: A[k][j] is A_{k+1, j+1}, lambdas[k][i] is lambda_{i+1}^{(k+1)}
        A[k][k] = 1.0
        for j in range(k):
            A[k][j] = -sum(float(lambdas[k][i]) * A[i][j] for i in range(j, k))  # E4 recursion
    return torch.tensor(A, dtype=torch.float64)


def spo_margin(chosen_logps: list[torch.Tensor], rejected_logps: list[torch.Tensor],
               betas: list[float], lambdas: list[list[float]]) -> torch.Tensor:
    """E6: the exact frozen margin M_n = sum_{i<n} lambda_i^(n) Delta R_i for round n -> (B,).

    chosen_logps[j] / rejected_logps[j]: sequence log-probs of pi_j (j = 0..n-1) on round n's pairs.
    betas[k-1] = beta_k for rounds k = 1..n-1.  lambdas[k-1] = [lambda_1^(k)..lambda_{k-1}^(k)] for
    rounds k = 1..n (lambdas[0] == [], the last entry is round n's own). Round 1 gives M = 0.
    """
    n = len(chosen_logps)
    if n < 1 or len(rejected_logps) != n:
        raise LossInputError(f"need log-probs of pi_0..pi_(n-1) for chosen and rejected: got {n} and {len(rejected_logps)} policies")
    if len(betas) != n - 1 or len(lambdas) != n:
        raise HyperparameterError(f"round {n} needs {n - 1} betas (rounds 1..{n - 1}) and {n} lambda lists "
                                  f"(rounds 1..{n}); got {len(betas)} and {len(lambdas)}: read them from the checkpoint chain")
    _check_logps(**{f"chosen_logps[{j}]": t for j, t in enumerate(chosen_logps)},
                 **{f"rejected_logps[{j}]": t for j, t in enumerate(rejected_logps)})
    betas = [_check_real(f"beta_{k}", b, 0.0, strict=True) for k, b in enumerate(betas, start=1)]
    A = implicit_to_true_reward_matrix(lambdas).tolist()  # validates every lambda too
    delta_logp = [c - r for c, r in zip(chosen_logps, rejected_logps)]  # Delta log pi_j
    # E4: implicit reward differences Delta r_j = beta_j Delta log(pi_j / pi_{j-1}), j = 1..n-1.
    delta_r = [betas[j - 1] * (delta_logp[j] - delta_logp[j - 1]) for j in range(1, n)]
    margin = torch.zeros_like(delta_logp[0])
    for i in range(1, n):
        delta_R_i = sum(A[i - 1][j - 1] * delta_r[j - 1] for j in range(1, i + 1))  # E4/E6: Delta R_i
        margin = margin + float(lambdas[n - 1][i - 1]) * delta_R_i                   # E6: M_n
    return margin


def spo_margin_telescoped(chosen_logps: list[torch.Tensor], rejected_logps: list[torch.Tensor],
                          alpha: float) -> torch.Tensor:
    """A NAMED SIMPLIFICATION of E6, not E6: M = alpha * Delta log(pi_{n-1} / pi_0) -> (B,).

    It uses implicit rewards in place of true rewards with one shared alpha; the sum telescopes.
    In terms of Delta r_j it weights round j by alpha / beta_j, while E6 weights it by
    sum_i lambda_i^(n) A_ij. At n = 2 with alpha = lambda * beta_1 both are lambda * Delta r_1, so
    this equals E5 exactly. At n >= 3 it generally differs (e.g. whenever the lambdas differ
    between rounds), and its optimum is then NOT the E3 policy (tests/test_derivation.py shows it).
    """
    alpha = _check_real("alpha", alpha, 0.0, strict=False)
    if len(chosen_logps) < 1 or len(rejected_logps) != len(chosen_logps):
        raise LossInputError(f"need log-probs of pi_0..pi_(n-1): got {len(chosen_logps)} chosen and {len(rejected_logps)} rejected")
    _check_logps(chosen_first=chosen_logps[0], chosen_last=chosen_logps[-1],
                 rejected_first=rejected_logps[0], rejected_last=rejected_logps[-1])
    return alpha * ((chosen_logps[-1] - rejected_logps[-1]) - (chosen_logps[0] - rejected_logps[0]))


def _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin, beta):
    """Validated inputs -> (r(y_w), r(y_l), M), the reference and margin detached (they are frozen)."""
    beta = _check_real("beta", beta, 0.0, strict=True)
    if isinstance(policy_chosen, torch.Tensor):  # a number margin (e.g. 0.0) means the same M for every pair
        margin = torch.as_tensor(margin, dtype=policy_chosen.dtype, device=policy_chosen.device)
        margin = margin.expand_as(policy_chosen) if margin.dim() == 0 else margin
    _check_logps(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                 ref_chosen=ref_chosen, ref_rejected=ref_rejected, margin=margin)
    # E4: implicit reward of round n, r_n = beta_n log(pi_theta / pi_{n-1}), on each response.
    chosen_rewards = beta * (policy_chosen - ref_chosen.detach())
    rejected_rewards = beta * (policy_rejected - ref_rejected.detach())
    return chosen_rewards, rejected_rewards, margin.detach()


def pair_weights(policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin, beta) -> torch.Tensor:
    """E7: each pair's gradient weight sigmoid(M_n - h_theta) -> (B,), detached.

    At initialisation (policy == ref) this is sigmoid(M_n); for DPO (M = 0) it is 1/2.
    """
    chosen_r, rejected_r, margin = _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin, beta)
    return torch.sigmoid(margin - (chosen_r - rejected_r)).detach()


def spo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin, beta, reduction: str = "mean"):
    """E5/E6: L = -log sigmoid(beta_n Delta log(pi_theta / pi_{n-1}) - M_n) -> (loss, metrics).

    margin: the frozen M_n of spo_margin (a (B,) tensor or a number). margin = 0 is exactly DPO
    with pi_{n-1} as the reference ("sequential DPO", the alpha = 0 baseline of E5).
    Gradients flow into the policy log-probs only; ref and margin are treated as constants.
    reduction: "mean" (a scalar loss), "sum" (a scalar: the sum of the per-pair losses; the fused
    path of spo_min/pair_loss.py sums chunks of a batch and divides by the batch's pair count) or
    "none" (one loss per pair, e.g. for expected losses).
    """
    if reduction not in ("mean", "sum", "none"):
        raise HyperparameterError(f"reduction = {reduction!r}: use 'mean', 'sum' or 'none'")
    chosen_r, rejected_r, margin = _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin, beta)
    h = chosen_r - rejected_r  # E6/E7: h_theta = beta_n Delta log(pi_theta / pi_{n-1})
    # E6: the Bradley-Terry NLL. logsigmoid, never log(sigmoid(z)): exact for large |z|.
    losses = -F.logsigmoid(h - margin)
    with torch.no_grad():
        metrics = {
            "rewards/chosen": chosen_r.mean(),
            "rewards/rejected": rejected_r.mean(),
            "rewards/margins": h.mean(),
            "rewards/accuracies": (chosen_r > rejected_r).to(h.dtype).mean(),  # ties (step 0) count as wrong
            "logps/chosen": policy_chosen.mean(),
            "logps/rejected": policy_rejected.mean(),
            "spo/margin": margin.mean(),
            "spo/pair_weight": torch.sigmoid(margin - h).mean(),  # E7
        }
    metrics = {k: v.detach() for k, v in metrics.items()}
    if reduction == "none":
        return losses, metrics
    return (losses.mean() if reduction == "mean" else losses.sum()), metrics


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al. 2023): L = -log sigmoid(beta Delta log(pi_theta / pi_ref)) -> (loss, metrics).

    Literally spo_loss with margin 0, so DPO and SPO cannot drift apart.
    """
    return spo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.0, beta)
