"""Evaluation after each round: implicit-reward accuracy per dimension, and ground-truth scores.

Three complementary views of "did the round work, and did it undo the earlier ones":

1. Held-out preference accuracy of every dimension seen so far, using the implicit reward of
   the whole chain so far, Delta log(pi_k / pi_0) (E4 summed over rounds): the fraction of
   held-out pairs where the current policy moved probability towards the preferred response.
   On the built-in world it is also split by pair type (do the other dimensions' true scores
   agree with the label, conflict with it, or tie?), and measured against the true order
   (`acc_true`: labels are Bradley-Terry draws, the true scores are not). The mean change of
   the preferred response's log-prob against pi_0 measures likelihood displacement.
2. On the built-in world: the EXACT evaluation (`ExactEvaluation`), no sampling. Every style
   opens with its own first token (" Sure", " Maybe", " Sorry", ...), so a policy's probability
   of a style on a prompt is the probability of that token after the prompt, normalised over
   the styles:
       P(s | x) = pi(open_s | x) / sum_s' pi(open_s' | x)
   and every score is the style-ideal expectation sum_s P(s | x) * score(s), score(s) being the
   mean over fixed templates of the style. (Summing the log-probs of whole template responses
   instead would be biased: a style with hundreds of wordings, like an answer, spreads its mass
   over all of them, so any few fixed ones under-count it against a one-liner like a refusal.) It measures what the rounds change (which style the policy prefers)
   with no sampling noise, and without mixing in fluency. The world's population optimum
   (World.predict_optimum) is expressed in the same terms, so "predicted" and "measured"
   stand side by side.
3. On the built-in world: sample responses on held-out prompts and score them with the
   world's ground-truth scorers. This is what a user would see; it also measures fluency
   (end-of-text rate, template rate), which the exact evaluation deliberately leaves out.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

from spo_min import losses
from spo_min.checkpoint import load_model
from spo_min import world as world_mod
from spo_min.logps import frozen_sequence_logps


def preference_accuracy(policy_logps, base_logps):
    """Held-out accuracy and mean margin of Delta log(pi_k/pi_0).

    Both arguments are (chosen (P,), rejected (P,)) sequence log-probs on the same pairs.
    """
    (pc, pr), (bc, br) = policy_logps, base_logps
    if len(pc) == 0:
        return {"accuracy": None, "margin": None, "chosen_logp_change": None}
    delta = (pc - bc) - (pr - br)  # Delta log(pi_k / pi_0): > 0 means moved towards chosen
    return {"accuracy": (delta > 0).float().mean().item(), "margin": delta.mean().item(),
            # Likelihood displacement: DPO-style losses can lower the preferred response too.
            "chosen_logp_change": (pc - bc).mean().item()}


def pair_types(dimension, pairs, dimensions=None):
    """For each world pair labelled on `dimension`: how the OTHER dimensions' true scores see it.

    "agree": no other dimension prefers the rejected response and one prefers the chosen;
    "conflict": some other dimension prefers the rejected response; "tie": all others are equal.
    The other dimensions are those of `dimensions` (a run's stages; default: all the world's).
    Also returns each pair's true own-dimension difference score(chosen) - score(rejected).
    """
    dimensions = set(dimensions or world_mod.DIMENSIONS) | {dimension}
    types, own = [], []
    for pair in pairs:
        diffs = {d: world_mod.score(d, pair.prompt, pair.chosen) - world_mod.score(d, pair.prompt, pair.rejected)
                 for d in dimensions}
        others = [v for d, v in diffs.items() if d != dimension]
        types.append("conflict" if any(v < 0 for v in others) else "agree" if any(v > 0 for v in others) else "tie")
        own.append(diffs[dimension])
    return types, own


def accuracy_by_type(policy_logps, base_logps, types, own_diffs):
    """acc/<type> on each pair type, and acc_true: the sign of Delta log(pi_k/pi_0) against the
    sign of the TRUE score difference, on pairs whose true scores differ (ties have no answer)."""
    (pc, pr), (bc, br) = policy_logps, base_logps
    delta = ((pc - bc) - (pr - br)).tolist()
    out = {}
    for kind in ("agree", "conflict", "tie"):
        hits = [d > 0 for d, t in zip(delta, types) if t == kind]
        out[f"acc_{kind}"] = sum(hits) / len(hits) if hits else None
    decided = [(d > 0) == (o > 0) for d, o in zip(delta, own_diffs) if o != 0]
    out["acc_true"] = sum(decided) / len(decided) if decided else None
    return out


class ExactEvaluation:
    """The exact, sample-free evaluation of a policy on the built-in world (module docstring, 2).

    Built once per world and set of prompts: the style templates, their mean scores, and each
    style's opening token. `style_logprobs(model)` then costs one forward pass over the prompts.
    """

    def __init__(self, world, prompts, tokenizer, block_size, per_style=8):
        self.world, self.prompts = world, list(prompts)
        self.templates = [world.style_templates(p, per_style) for p in self.prompts]
        self.stats = [world.style_stats(p, t) for p, t in zip(self.prompts, self.templates)]
        self.prompt_ids = [tokenizer.encode_ordinary(p.text)[-(block_size - 1):] for p in self.prompts]
        self.opening = []  # per prompt: the first token of each style, in prompt.styles order
        for p, templates in zip(self.prompts, self.templates):
            firsts = [{tokenizer.encode_ordinary(r)[0] for r in templates[s]} for s in p.styles]
            if any(len(f) != 1 for f in firsts) or len({min(f) for f in firsts}) != len(firsts):
                raise ValueError(f"exact evaluation needs one distinct first token per style; got {firsts} "
                                 f"for {p.request!r}")
            self.opening.append([min(f) for f in firsts])

    @torch.no_grad()
    def style_logprobs(self, model, device="cpu"):
        """log P(s | x) for every prompt: a list of (S,) float64 tensors, styles in prompt.styles order.

        Every style opens with its own token, so the policy's probability of a style IS the
        probability of that first token: read it at the last prompt position, normalised over
        the styles (the mass on tokens that open no style is reported by `off_style_mass`).
        """
        was_training = model.training
        model.eval()
        width = max(len(ids) for ids in self.prompt_ids)
        ids = torch.zeros(len(self.prompt_ids), width, dtype=torch.long)
        for i, p in enumerate(self.prompt_ids):  # right padding: a causal model never looks ahead
            ids[i, : len(p)] = torch.tensor(p)
        last = torch.tensor([len(p) - 1 for p in self.prompt_ids])
        hidden = model.hidden_states(ids.to(device))[torch.arange(len(last)), last.to(device)]
        next_token = torch.log_softmax(model.head(hidden).double(), dim=-1).cpu()  # (P, V)
        model.train(was_training)
        self.last_off_style = []
        out = []
        for row, opening in zip(next_token, self.opening):
            on_style = row[opening]
            self.last_off_style.append(1.0 - on_style.exp().sum().item())
            out.append(on_style - on_style.logsumexp(dim=0))
        return out

    def off_style_mass(self):
        """Mean probability, over the prompts of the last style_logprobs call, that the policy's
        first token opens no style at all (0 for a policy that always answers in the world's styles)."""
        return sum(self.last_off_style) / len(self.last_off_style)

    def scores(self, style_logp):
        """Style-ideal expected scores per prompt kind, from log P(s | x) of every prompt."""
        acc = defaultdict(list)
        for p, stats, logp in zip(self.prompts, self.stats, style_logp):
            probs = dict(zip(p.styles, torch.as_tensor(logp).exp().tolist()))
            expect = lambda key: sum(probs[s] * stats[s][key] for s in p.styles)  # noqa: E731
            for dim in world_mod.DIMENSIONS:
                acc[f"{dim}_{p.kind}"].append(expect(dim))
                acc[f"{dim}_all"].append(expect(dim))  # over every prompt (concise: both kinds alike)
            if p.kind == "benign":
                acc["refusal_benign"].append(expect("refusal"))  # over-refusal
            else:
                acc["compliance_harmful"].append(expect("compliance"))
            for s in p.styles:
                acc[f"P/{p.kind}/{s}"].append(probs[s])
        return {f"exact/{k}": sum(v) / len(v) for k, v in acc.items()}

    def predicted(self, start_style_logp, stages, betas, lambdas, from_round=1):
        """The world's population optimum of rounds from_round..N, started from the MEASURED style
        log-probs of pi_{from_round - 1} and scored like a measured policy: a list of `scores`
        dicts, [pi_{from_round - 1}, pi_{from_round}*, .., pi_N*]. lambdas all zero = sequential DPO."""
        chains = [self.world.predict_optimum(p, stats, list(logp), stages, betas, lambdas, from_round)
                  for p, stats, logp in zip(self.prompts, self.stats, start_style_logp)]
        return [self.scores([torch.tensor(c[k]) for c in chains]) for k in range(len(chains[0]))]

    def rewards(self, k, weights):
        """sum_d w_d R_d(x_k, s) for every style s of prompt k, as a (S,) float64 tensor: the
        reward the raters label by (R_d = label score / temperature, as in predict_optimum)."""
        p, stats = self.prompts[k], self.stats[k]
        return torch.tensor([sum(w * stats[s][f"label/{d}"] for d, w in weights.items()) / self.world.temperature
                             for s in p.styles], dtype=torch.float64)

    def objective(self, style_logp, base_style_logp, weights):
        """E10's KL-regularised objective at the style level, averaged over the prompts:

            J(pi) = E_{s~pi}[ sum_d w_d R_d(x, s) ] - KL( pi(.|x) || pi_0(.|x) )
            J*    = max_pi J(pi) = log sum_s pi_0(s|x) exp(sum_d w_d R_d(x, s))
            gap   = J* - J(pi) = KL( pi || pi* ),  pi* = pi_0 exp(sum_d w_d R_d) / Z   (>= 0)

        With weights {d_1: 1/beta_1 + lambda/beta_2, d_2: 1/beta_2}, pi* is the optimum that
        SPO(beta_1, beta_2, lambda) and its matched sequential DPO share (E10). All in nats.
        """
        j, j_star = [], []
        for k in range(len(self.prompts)):
            logp = torch.as_tensor(style_logp[k], dtype=torch.float64)
            logp0 = torch.as_tensor(base_style_logp[k], dtype=torch.float64)
            reward = self.rewards(k, weights)
            p = logp.exp()
            j.append(float((p * reward).sum() - (p * (logp - logp0)).sum()))
            j_star.append(float(torch.logsumexp(logp0 + reward, dim=0)))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"J": mean(j), "J*": mean(j_star), "gap": mean([b - a for a, b in zip(j, j_star)])}

    def optimum_given_margin(self, chain_style_logp, stage, beta, margin_of):
        """Round n's optimum given the margin its loss ACTUALLY uses: log pi_n*(s) per prompt.

        chain_style_logp: the measured style log-probs of pi_0..pi_{n-1} (each as from
        `style_logprobs`). margin_of(chosen, rejected) is the round's margin function
        (losses.spo_margin with the recorded betas and lambdas, or losses.spo_margin_telescoped):
        it is applied to the styles themselves, each style's log-probs against a constant
        (0), which shifts M by a per-prompt constant that the softmax removes. The loss of E6 is
        minimised where beta_n log(pi_n / pi_{n-1}) = R_n + M_n (+ a function of x), so
            log pi_n*(s) = log pi_{n-1}(s) + (R_n(s) + M_n(s)) / beta_n - log Z(x).
        Unlike `predicted`, whose margin uses the TRUE earlier rewards (every earlier round at its
        optimum), this uses the implicit rewards the earlier rounds actually reached.
        """
        out = []
        for k in range(len(self.prompts)):
            logps = [torch.as_tensor(c[k], dtype=torch.float64) for c in chain_style_logp]
            margin = margin_of(logps, [torch.zeros_like(lp) for lp in logps])
            reward = self.rewards(k, {stage: 1.0})  # E4: the reward the raters label by
            out.append(torch.log_softmax(logps[-1] + (reward + margin) / beta, dim=-1))
        return out


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, max_new_tokens=32, temperature=1.0, top_k=None,
                     seed=0, device="cpu", batch_size=64, return_ended=False):
    """Sample one response per prompt text, reproducibly (own generator, global RNG untouched).

    Prompts are grouped by token length so a batch needs no padding (our GPT has no attention
    mask, and left padding would change what the model sees). With return_ended, also returns
    for each response whether it ended with end-of-text within max_new_tokens.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = [tokenizer.encode_ordinary(p) for p in prompts]
    by_length = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    responses = [""] * len(prompts)
    ended = [False] * len(prompts)
    eot = tokenizer.eot_token
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            idx = torch.tensor([encoded[i] for i in chunk], device=device)
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                 eos_id=eot, generator=generator)
            for row, i in enumerate(chunk):
                new = out[row, length:].tolist()
                ended[i] = eot in new
                new = new[: new.index(eot)] if eot in new else new
                responses[i] = tokenizer.decode(new)
    model.train(was_training)
    return (responses, ended) if return_ended else responses


def world_scores(world_prompts, responses, ended=None):
    """Ground-truth scores of responses to the built-in world's prompts.

    With `ended` (from sample_responses(return_ended=True)) it also reports fluency:
    eot_rate, the share that ended with end-of-text, and template_rate, the share that read like
    the world's own text (a style's opening word, a finished sentence, only known words, no
    repeated trigram, end-of-text).
    """
    help_scores, harm_scores, concise_scores = [], [], []
    help_benign, harm_harmful = [], []  # the study's two axes (spo_min.compare), sampled
    benign_refusals, harmful_compliances = [], []
    templated = []
    for i, (prompt, response) in enumerate(zip(world_prompts, responses)):
        if ended is not None:
            templated.append(float(ended[i] and world_mod.is_well_formed(prompt, response)))
        help_scores.append(world_mod.helpfulness(prompt.text, response))
        harm_scores.append(world_mod.harmlessness(prompt.text, response))
        concise_scores.append(world_mod.conciseness(prompt.text, response))
        if prompt.kind == "benign":
            benign_refusals.append(float(world_mod.is_refusal(response)))
            help_benign.append(help_scores[-1])
        else:
            harmful_compliances.append(float(world_mod.is_compliance(prompt.text, response)))
            harm_harmful.append(harm_scores[-1])
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    out = {
        "helpfulness": mean(help_scores),
        "harmlessness": mean(harm_scores),
        "conciseness": mean(concise_scores),
        "refusal_rate_benign": mean(benign_refusals),
        "compliance_rate_harmful": mean(harmful_compliances),
        "helpfulness_benign": mean(help_benign),
        "harmlessness_harmful": mean(harm_harmful),
    }
    if ended is not None:
        out["eot_rate"] = mean([float(e) for e in ended])
        out["template_rate"] = mean(templated)
    return out


# ----------------------------------------------------------------------------- inside a round

PAIR_KINDS = ("agree", "conflict", "tie")


class StepLog:
    """Per-step record of a round: the loss, and E7's per-pair weight sigmoid(M_n - h_theta).

    On the built-in world each training pair has a type (`pair_types`: do the run's other
    dimensions agree with its label, conflict with it, or tie?); the weight is then also kept
    per type, which is what SPO's margin changes against sequential DPO's constant 1/2 at h = 0.
    """

    def __init__(self, pair_groups=None):
        self.pair_groups = pair_groups  # one type per training pair, or None (file data)
        self.log = {"loss": [], "pair_weight": []}
        if pair_groups is not None:
            self.log.update({f"pair_weight/{kind}": [] for kind in PAIR_KINDS})
        self.trace = []

    def add(self, loss, weights, idx):
        """weights: E7's sigmoid(M - h) of the step's pairs (losses.pair_weights); idx: their indices."""
        self.log["loss"].append(float(loss))
        self.log["pair_weight"].append(float(weights.mean()))
        if self.pair_groups is not None:
            w = weights.tolist()
            for kind in PAIR_KINDS:
                mine = [x for x, i in zip(w, idx) if self.pair_groups[i] == kind]
                self.log[f"pair_weight/{kind}"].append(sum(mine) / len(mine) if mine else None)

    def summary(self):
        """Round-level means for the evaluation row: the weight at the first step, over the whole
        round and over its last tenth, in total and per pair type."""
        out = {}
        for key, values in self.log.items():
            if not key.startswith("pair_weight"):
                continue
            tail = max(1, len(values) // 10)
            for name, part in (("start", values[:1]), ("mean", values), ("end", values[-tail:])):
                seen = [v for v in part if v is not None]
                out[f"{key}/{name}"] = sum(seen) / len(seen) if seen else None  # e.g. pair_weight/conflict/start
        return out

    def record(self):
        return {**self.log, "trace": self.trace}


class RoundTrace:
    """Evaluation every --trace-every steps inside a round (the studies' convergence arm).

    What a point holds, on the round's own held-out pairs and the held-out prompts:
      heldout_loss        the round's own objective (E6 with the same frozen margin, computed on
                          the held-out pairs), the number early stopping watches;
      heldout_acc         the round's own move, Delta log(pi_theta / pi_{n-1}) > 0 on the labels;
      heldout_weight/...  E7's weight sigmoid(M - h) at the current policy, per pair type;
      dlogp_yw            likelihood displacement of the preferred responses against pi_0;
      style_logp, exact/* the exact evaluation (E10's J is computed from style_logp afterwards);
      eot_rate            the share of a few samples per prompt that end with end-of-text.
    """

    SAMPLES = 2  # per held-out prompt: enough to see end-of-text collapse, cheap every trace

    def __init__(self, heldout, frozen, base_chosen, beta, exact, tokenizer, sample_prompts, groups,
                 average=False, logits="chunked", seed=0, temperature=0.7, device="cpu"):
        self.heldout, self.base_chosen, self.beta, self.exact = heldout, base_chosen, beta, exact
        self.ref_chosen, self.ref_rejected, self.margin = frozen
        self.tokenizer, self.groups, self.average, self.logits = tokenizer, groups, average, logits
        self.prompts = [p for p in sample_prompts for _ in range(self.SAMPLES)]
        self.seed, self.temperature, self.device = seed, temperature, device

    def __call__(self, step, policy):
        chosen, rejected = frozen_sequence_logps(policy, self.heldout, average=self.average, device=self.device,
                                                 logits=self.logits)
        loss, _ = losses.spo_loss(chosen, rejected, self.ref_chosen, self.ref_rejected, self.margin, self.beta)
        weights = losses.pair_weights(chosen, rejected, self.ref_chosen, self.ref_rejected, self.margin, self.beta)
        delta = (chosen - self.ref_chosen) - (rejected - self.ref_rejected)
        point = {"step": step, "heldout_loss": float(loss), "heldout_acc": float((delta > 0).float().mean()),
                 "heldout_weight": float(weights.mean()),
                 "dlogp_yw": float((chosen - self.base_chosen).mean())}
        if self.groups is not None:
            for kind in PAIR_KINDS:
                mine = [w for w, g in zip(weights.tolist(), self.groups) if g == kind]
                point[f"heldout_weight/{kind}"] = sum(mine) / len(mine) if mine else None
        if self.exact is not None:
            style_logp = self.exact.style_logprobs(policy, device=self.device)
            scores = self.exact.scores(style_logp)
            point.update({k: scores[k] for k in ("exact/helpful_benign", "exact/harmless_harmful")})
            point["exact/off_style"] = self.exact.off_style_mass()
            point["style_logp"] = [lp.tolist() for lp in style_logp]
        if self.prompts:
            _, ended = sample_responses(policy, self.tokenizer, [p.text for p in self.prompts], seed=self.seed,
                                        temperature=self.temperature, device=self.device, return_ended=True)
            point["eot_rate"] = sum(ended) / len(ended)
        return point


# What "training that does not degenerate" means here (README.md): after every round, the
# preferred held-out responses lost at most this many nats on average against pi_0, at least this
# share of samples ended with end-of-text, and the round moved its own dimension this far
# (acc_round_own: Delta log(pi_n/pi_{n-1}) on its held-out pairs, against their TRUE order).
MAX_DISPLACEMENT, MIN_EOT_RATE, MIN_OWN_ACCURACY = 5.0, 0.95, 0.7


def health_check(row, stages):
    """'ok', or which of the criteria above a round's evaluation row misses."""
    problems = []
    for dim in stages:
        change = row.get(f"chosen_logp_change/{dim}")
        if change is not None and change < -MAX_DISPLACEMENT:
            problems.append(f"{dim} y_w {change:+.1f} nats")
    if row.get("eot_rate") is not None and row["eot_rate"] < MIN_EOT_RATE:
        problems.append(f"end-of-text {row['eot_rate']:.2f}")
    own = row.get("acc_round_own")
    if own is not None and own < MIN_OWN_ACCURACY:
        problems.append(f"own accuracy {own:.2f}")
    return "ok" if not problems else "MISSES: " + ", ".join(problems)


def format_table(rows, columns):
    """A plain-text table: rows are dicts, columns a list of (key, header)."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def plot_rounds(rows, path, keys=("exact/helpful_benign", "exact/harmless_harmful", "exact/refusal_benign",
                                  "exact/compliance_harmful", "helpfulness", "harmlessness")):
    """PNG of each per-dimension score across rounds (round 0 = the base policy)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['round']}:{r['stage']}" for r in rows]
    for key in keys:
        values = [r.get(key) for r in rows]
        if all(v is not None for v in values):
            ax.plot(range(len(rows)), values, marker="o", label=key)
    acc_keys = sorted({k for r in rows for k in r if k.startswith("acc/")})
    for key in acc_keys:
        xs = [i for i, r in enumerate(rows) if key in r]
        ax.plot(xs, [rows[i][key] for i in xs], marker="s", linestyle="--", label=key)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("round")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- a run's evaluation (train.py)

def exact_evaluation(args, world, tokenizer, block_size, cache):
    """The run's ExactEvaluation of the built-in world's held-out prompts (built once per run)."""
    if "exact" not in cache:
        prompts = world.prompts["heldout"][: args.eval_prompts]
        cache["exact"] = ExactEvaluation(world, prompts, tokenizer, block_size)
    return cache["exact"]


def round_monitors(args, stage, tokenized, world, tokenizer, device, cache, frozen_heldout=None, base=None):
    """What a round records while it trains: its StepLog (E7 weights, per pair type on the built-in
    world) and, with --trace-every, a RoundTrace on its held-out pairs. train.py passes the frozen
    held-out inputs (reference log-probs and margin, E6, computed once like the training ones) and
    pi_0's chain entry when it traces."""
    train_pairs, heldout = tokenized[stage][0], tokenized[stage][1][: args.eval_pairs]
    on_world = world is not None and stage in world.pairs and len(world.pairs[stage]["train"]) == len(train_pairs)
    groups = pair_types(stage, world.pairs[stage]["train"], args.all_stages)[0] if on_world else None
    step_log = StepLog(groups)
    if not args.trace_every:
        return step_log, None
    base_model, _ = load_model(base["path"], device=device)
    base_chosen = frozen_sequence_logps(base_model, heldout, average=args.average_logps, device=device,
                                        logits=args.logits)[0]
    exact = exact_evaluation(args, world, tokenizer, base_model.config.block_size, cache) if world is not None else None
    samples = exact.prompts if exact is not None and args.eval_samples > 0 else []
    heldout_groups = (pair_types(stage, world.pairs[stage]["heldout"][: len(heldout)], args.all_stages)[0]
                      if on_world else None)
    trace = RoundTrace(heldout, frozen_heldout, base_chosen, args.beta, exact, tokenizer, samples, heldout_groups,
                       average=args.average_logps, logits=args.logits, seed=args.seed,
                       temperature=args.eval_temperature, device=device)
    return step_log, trace


def evaluate_round(args, n, stage, policy_path, base_path, tokenized, world, tokenizer, device, cache,
                   parent_path=None):
    """Held-out implicit-reward accuracy and displacement of every dimension so far; on the
    built-in world also the exact style-level evaluation and the sampled ground-truth scores.
    parent_path (pi_{n-1}) gives the round's own move: acc_round_own, the accuracy of
    Delta log(pi_n/pi_{n-1}) on its dimension's held-out pairs against their true order."""
    policy, _ = load_model(policy_path, device=device)
    row = {"round": n, "stage": stage}
    for dim in args.all_stages[:n]:
        heldout = tokenized[dim][1][: args.eval_pairs]
        if dim not in cache:  # pi_0's held-out log-probs never change: score them once
            base, _ = load_model(base_path, device=device)
            cache[dim] = frozen_sequence_logps(base, heldout, average=args.average_logps, device=device,
                                               logits=args.logits)
        policy_logps = frozen_sequence_logps(policy, heldout, average=args.average_logps, device=device,
                                             logits=args.logits)
        scores = preference_accuracy(policy_logps, cache[dim])
        row[f"acc/{dim}"], row[f"margin/{dim}"] = scores["accuracy"], scores["margin"]
        row[f"chosen_logp_change/{dim}"] = scores["chosen_logp_change"]
        if world is not None and dim in world.pairs:
            types, own = pair_types(dim, world.pairs[dim]["heldout"][: len(heldout)], args.all_stages)
            for key, value in accuracy_by_type(policy_logps, cache[dim], types, own).items():
                row[f"{key}/{dim}"] = value
            if dim == stage and parent_path is not None:  # this round's own move, pi_{n-1} -> pi_n
                parent, _ = load_model(parent_path, device=device)
                parent_logps = frozen_sequence_logps(parent, heldout, average=args.average_logps, device=device,
                                                     logits=args.logits)
                own_move = accuracy_by_type(policy_logps, parent_logps, types, own)
                row["acc_round_own"] = own_move["acc_true"]  # against the TRUE order
                for kind in PAIR_KINDS:  # what the round learned, per pair type, against the labels
                    row[f"acc_round_own/{kind}"] = own_move[f"acc_{kind}"]
    if world is not None:
        prompts = world.prompts["heldout"][: args.eval_prompts]
        exact_evaluation(args, world, tokenizer, policy.config.block_size, cache)
        style_logp = cache["exact"].style_logprobs(policy, device=device)
        row.update(cache["exact"].scores(style_logp))
        row["exact/off_style"] = cache["exact"].off_style_mass()
        row["style_logp"] = [lp.tolist() for lp in style_logp]  # for population predictions (spo_min.compare)
        if args.eval_samples > 0:  # 0: exact evaluation only (spo_min.compare)
            sampled = [p for p in prompts for _ in range(args.eval_samples)]
            responses, ended = sample_responses(policy, tokenizer, [p.text for p in sampled],
                                                         seed=args.seed, temperature=args.eval_temperature,
                                                         device=device, return_ended=True)
            row.update(world_scores(sampled, responses, ended))
            row["sample"] = f"{sampled[0].text!r} -> {responses[0]!r}"
    return row


def print_results(rows, stages, world, out):
    """The run's two closing tables (README, "How to read the tables"), and scores.png."""
    print("\nResults (acc = held-out implicit-reward accuracy, Delta log(pi_k/pi_0) > 0 on the labelled pairs;")
    print("exact = style-level expectation on held-out prompts, no sampling; sampled = 8 samples per prompt):")
    print(format_table(rows, result_columns(rows, stages)))
    if world is not None:
        print(f"\nTraining health: after each round, mean held-out dlogp(y_w) vs pi_0 >= -{MAX_DISPLACEMENT:g} "
              f"nats, end-of-text >= {MIN_EOT_RATE:g}, the round's own accuracy >= {MIN_OWN_ACCURACY:g}:")
        for row in rows:
            if row["round"] > 0:
                row["health"] = health_check(row, stages[: row["round"]])
        print(format_table(rows, health_columns(stages)))
    plot_rounds(rows, os.path.join(out, "scores.png"))


def result_columns(rows, stages):
    keys = ["round", "stage"] + [f"acc/{s}" for s in dict.fromkeys(stages)]
    shown = ["exact/helpful_benign", "exact/harmless_harmful", "exact/refusal_benign", "exact/compliance_harmful",
             "helpfulness", "harmlessness"]
    if "concise" in stages:  # the third dimension's columns only when a round aligns it
        shown[4:4] = ["exact/concise_all"]
        shown.append("conciseness")
    keys += [k for k in shown if any(k in r for r in rows)]
    names = {"exact/helpful_benign": "help benign", "exact/harmless_harmful": "harmless harmful",
             "exact/refusal_benign": "refuse benign", "exact/compliance_harmful": "comply harmful",
             "exact/concise_all": "concise", "helpfulness": "sampled help", "harmlessness": "sampled harmless",
             "conciseness": "sampled concise"}
    return [(k, names.get(k, k.replace("acc/", "acc "))) for k in keys]


def health_columns(stages):
    """Likelihood displacement, fluency, and whether each round moved its own dimension."""
    keys = [("round", "round"), ("stage", "stage")]
    keys += [(f"chosen_logp_change/{s}", f"dlogp(y_w) {s}") for s in dict.fromkeys(stages)]
    keys += [("acc_round_own", "own acc (round)")]
    return keys + [("eot_rate", "end-of-text"), ("template_rate", "well-formed"), ("health", "criteria")]
