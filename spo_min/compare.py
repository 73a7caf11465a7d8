"""Does SPO keep round 1 better than sequential DPO? Measured against E10's matched baseline.

    python -m spo_min.compare              # the pre-registered study below: 10 seeds, alpha 0.5 and 1
    python -m spo_min.compare --quick      # 2 seeds, a nano model: the end-to-end test of this study
    python -m spo_min.compare --rounds 3   # round 3: exact E6 vs telescoped vs DPO (spo_min/compare3.py)
    python -m spo_min.convergence          # the same comparison at increasing training (its own module)

What E10 (losses.py's derivation) says first. Chaining E3 over two rounds from pi_0,

    SPO(beta_1, beta_2, lambda):   pi_2* = pi_0 exp( (1/beta_1 + lambda/beta_2) R_1 + R_2/beta_2 ) / Z
    sequential DPO(beta_1', beta_2): pi_2* = pi_0 exp(  R_1/beta_1'                + R_2/beta_2 ) / Z

so SPO at the optimum IS sequential DPO whose round 1 used beta_1' = beta_1 beta_2 / (beta_2 +
lambda beta_1): it re-weights the two dimensions. Against plain sequential DPO (beta_1' = beta_1)
SPO must differ, by the re-weighting alone. Against the MATCHED chain it must not differ at the
optimum: both maximise the same objective

    J(pi) = E_pi[ (1/beta_1 + lambda/beta_2) R_1 + R_2/beta_2 ] - KL( pi || pi_0 ),   J* = max J,

and any measured difference between them is a finite-training effect: E7's per-pair weight
sigmoid(M - h), which is where an advantage of SPO would have to come from.

PRE-REGISTERED DESIGN (written before the full study was run; a 2-seed pilot on seeds 100 and
101, not part of the study, only checked the plumbing):
  * Seeds 0..9 (10; each seed is its own world, SFT base and batch order: spo_min/study.py).
    train.py's defaults throughout, the README demo's regime: 400-step SFT base, rounds of 100
    steps x 16 pairs, lr 2e-4, beta_1 = beta_2 = 1. Evaluation: the exact style-level evaluation
    on every held-out prompt, 2 samples per prompt for end-of-text.
  * alpha in {0.5, 1} (lambda = alpha / beta_1): 0.5 is train.py's default, 1 a strong margin.
  * Per seed: pi_0 and pi_1 (DPO on helpful, beta_1) once. Branched from them, each with the
    same batch order: SPO round 2 at each alpha; the matched chain of each alpha (its own
    round 1 from the same pi_0 at beta_1', then DPO round 2 at beta_2); and plain sequential DPO
    round 2 from pi_1 (the unmatched baseline).
  * PRIMARY statistic, one per alpha, never pooled: Delta J = J(pi_2^SPO) - J(pi_2^matched), in
    nats, from the exact style-level evaluation on held-out prompts (ExactEvaluation.objective;
    J* - J(pi) = KL(pi || pi_2*) >= 0, so Delta J > 0 means SPO ended closer to the shared
    optimum). Paired by seed; every seed enters; exact t quantiles (spo_min/stats.py).
  * Equivalence band: +-10% of the matched chain's mean progress J(pi_2^matched) - J(pi_0) at
    that alpha: a difference smaller than a tenth of what the two rounds gain is one no user
    would act on. TOST at 5% (90% interval inside the band) before any "higher"/"lower".
  * Secondary, SPO - matched per alpha (band): helpfulness on benign prompts and harmlessness
    on harmful prompts (0.02 of the [0, 1] scores), off-style mass (0.02), displacement of the
    preferred harmless responses vs pi_0 (0.25 nats, 5% of the health limit), end-of-text rate
    (0.02). And SPO - unmatched sequential DPO on the two scores: the re-weighting itself.
  * Mechanism: E7's pair weight during round 2 and round 2's own held-out accuracy, both per
    pair type (agree / conflict / tie with helpfulness): train.py logs them.
  * Predictions of what was trained beside each measurement: "opt. from trained" is the
    optimum of round 2 given the measured pi_1 and the margin the loss actually used (SPO:
    pi_1's implicit reward); "ideal" is pi_2*, both rounds at their optimum (shared by SPO and
    its matched chain).

Writes OUT/results.jsonl (one record per trained pi_2), OUT/verdict.json, OUT/compare.png and
OUT/logs/. Jobs run in parallel processes with one thread each (`--jobs`, default 2: one per core).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from spo_min import stats, study

STAGES = ["helpful", "harmless"]
DEFAULT_SEEDS, DEFAULT_ALPHAS = 10, "0.5,1"
# Secondary statistics: (record key, name, equivalence band; see the module docstring).
SECONDARY = [("exact/helpful_benign", "helpfulness on benign prompts", 0.02),
             ("exact/harmless_harmful", "harmlessness on harmful prompts", 0.02),
             ("exact/off_style", "off-style mass", 0.02),
             ("chosen_logp_change/harmless", "displacement of preferred harmless responses (nats)", 0.25),
             ("eot_rate", "end-of-text rate", 0.02)]
BAND_SHARE = 0.10  # the primary band: this share of the matched chain's progress in J


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds 0..K-1, each its own world and pi_0 (default {DEFAULT_SEEDS}; round 3: 5)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first..first+K-1 (a pilot uses other seeds)")
    p.add_argument("--rounds", type=int, choices=(2, 3), default=2,
                   help="2: this study; 3: round 3, exact vs telescoped margin vs DPO (spo_min/compare3.py)")
    p.add_argument("--alphas", default=None, help=f"SPO alphas of the last round (default {DEFAULT_ALPHAS})")
    p.add_argument("--out", default="compare_out", help="a new or empty folder")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    p.add_argument("--quick", action="store_true", help="2 seeds, nano model, short rounds: for the test suite")
    p.add_argument("--samples", type=int, default=2, help="samples per held-out prompt (end-of-text rate)")
    p.add_argument("--train-args", default="", help="extra train.py arguments for every run, quoted")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted study in --out: keep its finished runs, train the rest (same options)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the report from the runs already in --out (same options)")
    return p.parse_args(argv)


def common_train_args(args):
    return study.common_train_args(args.quick, args.samples, args.train_args)


# ----------------------------------------------------------------------------- jobs

def build_jobs(args, alphas, beta):
    common = common_train_args(args)
    jobs = []
    for s in range(args.first_seed, args.first_seed + args.seeds):
        seed = ["--seed", str(s)]
        chain = f"seed{s}"
        pi1 = os.path.join(args.out, chain, "round1_helpful.safetensors")
        base = os.path.join(args.out, chain, "base.safetensors")
        jobs.append(study.job(chain, ["--stage", "helpful", *seed, *common], args.out, seed=s, method="chain"))
        jobs.append(study.job(f"seed{s}_dpo", ["--branch", pi1, "--stage", "harmless", "--loss", "dpo", *seed, *common],
                              args.out, after=chain, seed=s, method="dpo", alpha=0.0))
        for a in alphas:
            b1m = study.matched_beta1(beta, beta, a / beta)
            jobs.append(study.job(f"seed{s}_spo_{a:g}", ["--branch", pi1, "--stage", "harmless", "--alpha", str(a),
                                                          *seed, *common], args.out, after=chain, seed=s, method="spo",
                                  alpha=a))
            # The matched chain: its own round 1 at beta_1' from the same pi_0 (same batch order), then DPO.
            jobs.append(study.job(f"seed{s}_matched_{a:g}_r1", ["--branch", base, "--stage", "helpful", *seed, *common,
                                                                "--beta", repr(b1m)],
                                  args.out, after=chain, seed=s, method="matched_r1", alpha=a))
            r1 = os.path.join(args.out, f"seed{s}_matched_{a:g}_r1", "round1_helpful.safetensors")
            jobs.append(study.job(f"seed{s}_matched_{a:g}", ["--branch", r1, "--stage", "harmless", "--loss", "dpo",
                                                             *seed, *common, "--beta", repr(beta)],
                                  args.out, after=f"seed{s}_matched_{a:g}_r1", seed=s, method="matched", alpha=a))
    return jobs


# ----------------------------------------------------------------------------- records

def build_records(args, jobs, results, alphas):
    from spo_min import losses
    from spo_min.checkpoint import read_metadata

    records, evaluations = [], {}
    for j in jobs:
        if j["method"] not in ("spo", "matched", "dpo"):
            continue
        s, a = j["seed"], j["alpha"]
        chain_rows = results[f"seed{s}"]["rows"]
        pi0, pi1 = chain_rows[0], chain_rows[1]
        own_pi1 = results[f"seed{s}_matched_{a:g}_r1"]["rows"][-1] if j["method"] == "matched" else pi1
        pi2 = results[j["name"]]["rows"][-1]
        meta1 = read_metadata(os.path.join(args.out, f"seed{s}", "round1_helpful.safetensors"))
        meta2 = read_metadata(os.path.join(j["folder"], "round2_harmless.safetensors"))
        beta1, beta2, lam = float(meta1["beta"]), float(meta2["beta"]), float(meta2["lambdas"][0])
        if j["method"] == "matched":
            beta1_used = float(read_metadata(os.path.join(args.out, f"seed{s}_matched_{a:g}_r1",
                                                          "round1_helpful.safetensors"))["beta"])
        else:
            beta1_used = beta1
        # The objective a record is scored on: SPO's and its matched chain's J(alpha) (shared), and
        # for the unmatched sequential DPO its own (lambda = 0, beta_1).
        weights = study.objective_weights(beta1, beta2, a / beta1)
        if s not in evaluations:
            evaluations[s] = study.exact_evaluation(s, os.path.join(args.out, f"seed{s}", "base.safetensors"),
                                                    common_train_args(args))
        ev = evaluations[s]
        j_pi2 = ev.objective(pi2["style_logp"], pi0["style_logp"], weights)
        j_pi0 = ev.objective(pi0["style_logp"], pi0["style_logp"], weights)
        # Predictions: round 2's optimum given the TRAINED pi_1 and the margin the loss used, and
        # the ideal pi_2* (both rounds at their optimum) of this record's objective.
        margin = ((lambda c, r: losses.spo_margin(c, r, [beta1], [[], [lam]])) if j["method"] == "spo"
                  else (lambda c, r: c[0] * 0.0))
        trained_opt = ev.optimum_given_margin([pi0["style_logp"], own_pi1["style_logp"]], "harmless", beta2, margin)
        ideal = ev.predicted(pi0["style_logp"], STAGES, [beta1_used, beta2], [[], [lam]])[-1]
        records.append({
            "seed": s, "method": j["method"], "alpha": a, "setting": setting_name(j["method"], a, beta1_used),
            "beta1": beta1_used, "beta2": beta2, "lambda": lam, "weights": weights,
            "seconds": results[j["name"]]["seconds"],
            "J": j_pi2["J"], "J*": j_pi2["J*"], "gap": j_pi2["gap"], "J_pi0": j_pi0["J"],
            "progress": (j_pi2["J"] - j_pi0["J"]) / (j_pi2["J*"] - j_pi0["J"]),
            "opt_from_trained": {**ev.scores(trained_opt),
                                 "gap": ev.objective([lp.tolist() for lp in trained_opt], pi0["style_logp"], weights)["gap"]},
            "opt_ideal": ideal,
            "pi0": study.scalars(pi0), "pi1": study.scalars(own_pi1), "pi2": study.scalars(pi2),
        })
    return records


def setting_name(method, alpha, beta1):
    if method == "spo":
        return f"SPO a={alpha:g}"
    if method == "matched":
        return f"matched DPO b1'={beta1:.3g} (a={alpha:g})"
    return "seq. DPO (unmatched)"


# ----------------------------------------------------------------------------- statistics

def by_seed(records, method, alpha=None):
    return {r["seed"]: r for r in records if r["method"] == method and (alpha is None or r["alpha"] == alpha)}


def summarise(records, alphas):
    """The comparisons of the pre-registered design: per alpha, paired by seed, nothing dropped."""
    comparisons = []
    dpo = by_seed(records, "dpo")
    for a in alphas:
        spo, matched = by_seed(records, "spo", a), by_seed(records, "matched", a)
        seeds = sorted(spo)
        if sorted(matched) != seeds or sorted(dpo) != seeds:
            raise SystemExit(f"error: alpha {a:g}: SPO, matched and DPO runs cover different seeds; every seed "
                             "must have all three (nothing is dropped)")
        progress = [matched[s]["J"] - matched[s]["J_pi0"] for s in seeds]
        band = BAND_SHARE * abs(sum(progress) / len(progress))
        spo_name, matched_name = f"SPO a={a:g}", matched[seeds[0]]["setting"]
        primary = stats.paired([spo[s]["J"] - matched[s]["J"] for s in seeds], band,
                               higher="SPO closer to the shared optimum", lower="matched DPO closer to the shared optimum")
        comparisons.append({"spo": spo_name, "baseline": matched_name, "statistic": "J(pi_2) (nats), E10's objective",
                            "primary": True, "band_rule": f"{BAND_SHARE:g} x matched progress J(pi_2) - J(pi_0) "
                            f"= {BAND_SHARE:g} x {sum(progress) / len(progress):.4f}", **primary})
        for key, name, band2 in SECONDARY:
            if not all(key in r["pi2"] for r in (*spo.values(), *matched.values())):
                continue
            diffs = [spo[s]["pi2"][key] - matched[s]["pi2"][key] for s in seeds]
            comparisons.append({"spo": spo_name, "baseline": matched_name, "statistic": name, "key": key,
                                "primary": False, **stats.paired(diffs, band2, "SPO higher", "SPO lower")})
        for key, name, band2 in SECONDARY[:2]:  # the re-weighting: against plain sequential DPO
            diffs = [spo[s]["pi2"][key] - dpo[s]["pi2"][key] for s in seeds]
            comparisons.append({"spo": spo_name, "baseline": dpo[seeds[0]]["setting"], "statistic": name, "key": key,
                                "primary": False, **stats.paired(diffs, band2, "SPO higher", "SPO lower")})
    return comparisons


# ----------------------------------------------------------------------------- table, plot

TABLE = [("gap", "J* - J", "{:.3f}"), ("progress", "progress", "{:.2f}"),
         ("pi2:exact/helpful_benign", "help benign", "{:.3f}"), ("pi2:exact/harmless_harmful", "harmless harmful", "{:.3f}"),
         ("pi1:exact/helpful_benign", "pi_1 help", "{:.3f}"),
         ("opt_from_trained:exact/helpful_benign", "help (opt. from trained)", "{:.3f}"),
         ("opt_from_trained:exact/harmless_harmful", "harmless (opt. from trained)", "{:.3f}"),
         ("opt_ideal:exact/helpful_benign", "help (ideal)", "{:.3f}"),
         ("opt_ideal:exact/harmless_harmful", "harmless (ideal)", "{:.3f}"),
         ("pi2:exact/off_style", "off-style", "{:.3f}"), ("pi2:chosen_logp_change/harmless", "dlogp(y_w)", "{:+.2f}"),
         ("pi2:eot_rate", "end-of-text", "{:.3f}"), ("pi2:acc_round_own", "own acc", "{:.3f}"),
         ("pi2:acc_round_own/conflict", "own acc conflict", "{:.3f}"),
         ("pi2:pair_weight/conflict/start", "E7 w conflict start", "{:.3f}"),
         ("pi2:pair_weight/conflict/mean", "E7 w conflict mean", "{:.3f}"),
         ("pi2:pair_weight/agree/mean", "E7 w agree mean", "{:.3f}"),
         ("pi2:pair_weight/tie/mean", "E7 w tie mean", "{:.3f}")]


def value(record, key):
    part, _, name = key.partition(":")
    return record[part] if not name else record[part].get(name)


def format_report(records, comparisons):
    from spo_min.evaluate import format_table

    order = {"spo": 0, "matched": 1, "dpo": 2}
    settings = sorted({(r["alpha"], order[r["method"]], r["setting"]) for r in records},
                      key=lambda t: (t[1] == 2, t[0], t[1]))
    rows = []
    for _, _, setting in settings:
        group = [r for r in records if r["setting"] == setting]
        row = {"setting": setting, "n": len(group)}
        for key, _, fmt in TABLE:
            values = [value(r, key) for r in group]
            if all(v is not None for v in values):
                mean, half = stats.mean_ci(values)
                row[key] = fmt.format(mean) + ("" if half is None or key not in ("gap", "progress") else
                                               f" +-{half:.3f}")
        rows.append(row)
    lines = [format_table(rows, [("setting", "round 2"), ("n", "seeds")] + [(k, h) for k, h, _ in TABLE]), ""]
    for c in comparisons:
        tag = "PRIMARY  " if c["primary"] else "secondary"
        lines.append(f"{tag} {c['spo']} - {c['baseline']}, {c['statistic']}: {stats.describe(c)}")
    return "\n".join(lines)


def plot(records, comparisons, alphas, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    primary = [c for c in comparisons if c["primary"]]
    for i, c in enumerate(primary):
        ax1.axhspan(-c["band"], c["band"], xmin=(i + 0.1) / len(primary), xmax=(i + 0.9) / len(primary),
                    color="tab:green", alpha=0.15, label="equivalence band" if i == 0 else None)
        jitter = [0.2 * (k / max(len(c["diffs"]) - 1, 1) - 0.5) for k in range(len(c["diffs"]))]
        ax1.scatter([i + x for x in jitter], c["diffs"], s=12, color="grey", alpha=0.7,
                    label="one seed" if i == 0 else None)
        if c["half_width"] is not None:
            ax1.errorbar(i, c["mean"], yerr=c["half_width"], fmt="o", color="tab:red", capsize=4,
                         label="mean, 95% CI" if i == 0 else None)
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set_xticks(range(len(primary)), [c["spo"] for c in primary])
    ax1.set_xlim(-0.5, len(primary) - 0.5)
    ax1.set_ylabel("J(SPO) - J(matched DPO), nats")
    ax1.set_title("primary: distance to the shared optimum (E10), paired by seed", fontsize=9)
    ax1.legend(fontsize=7)
    colours = {"spo": "tab:red", "matched": "tab:blue", "dpo": "tab:grey"}
    markers = {a: m for a, m in zip(alphas, "os^Dv")}
    for r in records:
        ax2.scatter(r["pi2"]["exact/harmless_harmful"], r["pi2"]["exact/helpful_benign"], s=8, alpha=0.25,
                    color=colours[r["method"]], marker=markers.get(r["alpha"], "o"))
    for setting in sorted({r["setting"] for r in records}):
        group = [r for r in records if r["setting"] == setting]
        (mx, hx), (my, hy) = (stats.mean_ci([r["pi2"]["exact/harmless_harmful"] for r in group]),
                              stats.mean_ci([r["pi2"]["exact/helpful_benign"] for r in group]))
        ax2.errorbar(mx, my, xerr=hx, yerr=hy, fmt=markers.get(group[0]["alpha"], "o"),
                     color=colours[group[0]["method"]], capsize=3, label=setting)
    pi1 = [r["pi1"] for r in records if r["method"] == "spo"]
    ax2.scatter(sum(p["exact/harmless_harmful"] for p in pi1) / len(pi1),
                sum(p["exact/helpful_benign"] for p in pi1) / len(pi1), marker="*", s=120, color="k", label="pi_1 (mean)")
    for a in alphas:  # the optimum SPO(alpha) and its matched chain share (E10), mean over seeds
        ideal = [r["opt_ideal"] for r in records if r["method"] == "spo" and r["alpha"] == a]
        ax2.scatter(sum(o["exact/harmless_harmful"] for o in ideal) / len(ideal),
                    sum(o["exact/helpful_benign"] for o in ideal) / len(ideal), marker=markers.get(a, "o"), s=70,
                    facecolor="none", edgecolor="k", label=f"shared optimum, a={a:g}")
    ax2.set_xlabel("harmlessness on harmful prompts (exact)")
    ax2.set_ylabel("helpfulness on benign prompts (exact)")
    ax2.set_title("where each pi_2 lands (seeds faint; means with 95% CI across seeds,\n"
                  "each seed its own world: the comparison is paired on the left)", fontsize=8)
    ax2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_alphas(text):
    try:
        alphas = [float(a) for a in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: --alphas {text!r}: expected comma-separated numbers") from None
    if not alphas or min(alphas) <= 0:
        raise SystemExit(f"error: --alphas {text!r}: need positive alphas (alpha = 0 is the DPO run itself)")
    return alphas


def main(argv=None):
    args = parse_args(argv)
    if args.rounds == 3:
        from spo_min import compare3  # it imports study and stats, never this module

        return compare3.run(args)
    args.seeds = study.seed_count(args, DEFAULT_SEEDS)
    alphas = parse_alphas(args.alphas or DEFAULT_ALPHAS)
    t0 = time.time()
    beta = float(study.train_module().parse_args(common_train_args(args)).beta)  # beta_1 = beta_2
    jobs = build_jobs(args, alphas, beta)
    results = study.run_or_load(args, jobs, f"compare: seeds {args.first_seed}..{args.first_seed + args.seeds - 1}, "
                                            f"alphas {alphas}")
    records = build_records(args, jobs, results, alphas)
    comparisons = summarise(records, alphas)
    wall = time.time() - t0
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    verdict = {"seeds": args.seeds, "first_seed": args.first_seed, "alphas": alphas, "beta": beta,
               "train_args": common_train_args(args), "comparisons": comparisons,
               **study.wall_record(args, "verdict.json", wall)}
    with open(os.path.join(args.out, "verdict.json"), "w") as f:
        json.dump(verdict, f, indent=1)
    plot(records, comparisons, alphas, os.path.join(args.out, "compare.png"))
    print()
    print(format_report(records, comparisons))
    print(f"[compare] {wall:.0f} s; {args.out}/results.jsonl, verdict.json, compare.png, logs/")
    return records, comparisons


if __name__ == "__main__":
    main()
