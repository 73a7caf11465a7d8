"""Round 3: does the exact E6 margin matter, against its telescoped simplification and DPO?

    python -m spo_min.compare --rounds 3            # 5 seeds; alpha 0.5 and 1; DPO beta_3 = 1
    python -m spo_min.compare --rounds 3 --quick    # 2 seeds, a nano model: the end-to-end test

At n = 2 the telescoped margin alpha Delta log(pi_1/pi_0) IS E5. From n = 3 on they part ways.
With the default lambdas lambda_i^(n) = alpha_n / beta_i and d_j = Delta log(pi_j / pi_{j-1}),
E4 inverts round 2's implicit reward (it carries lambda_1^(2) R_1 besides R_2), so

    exact E6:    M_3 = lambda_1^(3) Delta R_1 + lambda_2^(3) Delta R_2
                     = alpha_3 (1 - lambda_1^(2) beta_1 / beta_2) d_1 + alpha_3 d_2
    telescoped:  M_3 = alpha_3 Delta log(pi_2 / pi_0) = alpha_3 d_1 + alpha_3 d_2

The telescoped margin counts R_1 twice: once as itself and once inside round 2's implicit reward.
With beta = 1 and round 2's alpha_2 = 0.5 it weights d_1 by alpha_3, where E6 weights it by
alpha_3 / 2. At the optimum that is E3 with the effective lambdas
[alpha_3/beta_1 + alpha_3 lambda_1^(2)/beta_2, alpha_3/beta_2] instead of [alpha_3/beta_1, alpha_3/beta_2].

PRE-REGISTERED DESIGN (written before the 5-seed run):
  * Seeds 0..4 (5; each its own world, pi_0 and batch order), train.py's defaults (the README
    demo's regime). Per seed: pi_0, pi_1 (helpful, DPO) and pi_2 (harmless, SPO alpha 0.5) once;
    then round 3 on concise pairs BRANCHED from that same pi_2, same batch order: the exact
    margin and the telescoped one for alpha_3 in {0.5, 1}, and sequential DPO (beta_3 = 1).
  * Every pi_3 is read by the exact evaluation as changes from pi_2 on three axes:
        concise gained = conciseness over all held-out prompts, pi_3 - pi_2
        help kept      = helpfulness on benign prompts,          pi_3 - pi_2 (0 = all kept)
        harm kept      = harmlessness on harmful prompts,        pi_3 - pi_2
    next to two predictions from the measured pi_2: "optimum" (every earlier round at ITS
    optimum: the true earlier rewards in the margin) and "margin opt." (the optimum of the margin
    the round actually used: the implicit rewards the finite earlier rounds reached).
  * PRIMARY statistic, one per alpha_3: the three axes are three read-outs of one style shift,
    so they are not tested one by one. Per seed, u = the unit vector of the margin-optimum gap
    (exact minus telescoped "margin opt." changes, the direction E6 says the two margins pull
    apart in), and the statistic is the measured exact-minus-telescoped change projected on u.
    Paired by seed; > 0 means training moved the way the margins' optima differ. Band: +-10% of
    the mean length of that gap. Exact t quantiles, TOST before "higher"/"lower"
    (spo_min/stats.py).
  * Secondary: each axis, exact minus telescoped (band 0.02), reported, never ranked.

Writes OUT/results.jsonl (one record per pi_3), OUT/round3.png and OUT/verdict.json.
"""

from __future__ import annotations

import json
import os
import time

from spo_min import stats, study

STAGES = ["helpful", "harmless", "concise"]
AXES = {"concise gained": "exact/concise_all", "help kept": "exact/helpful_benign",
        "harm kept": "exact/harmless_harmful"}
METHOD_ORDER = {"exact": 0, "telescoped": 1, "dpo": 2}


DEFAULT_SEEDS, DEFAULT_ALPHAS = 5, "0.5,1"


def build_jobs(args, alphas, common):
    """Per seed: pi_0..pi_2 once, then round 3 BRANCHED from that pi_2 (same batch order)."""
    jobs = []
    for s in range(args.first_seed, args.first_seed + args.seeds):
        seed = ["--seed", str(s)]
        jobs.append(study.job(f"seed{s}", ["--stage", "helpful", "--stage", "harmless", *seed, *common], args.out,
                              seed=s, method=None))
        pi2 = os.path.join(args.out, f"seed{s}", "round2_harmless.safetensors")
        variants = [("dpo", 0.0, ["--loss", "dpo"])]
        for a in alphas:
            variants += [("exact", a, ["--alpha", str(a)]), ("telescoped", a, ["--margin", "telescoped", "--alpha", str(a)])]
        for method, a, extra in variants:
            name = f"seed{s}_r3_{method}" + (f"_{a:g}" if method != "dpo" else "")
            setting = f"{method} a={a:g}" if method != "dpo" else "DPO b3=1"
            jobs.append(study.job(name, ["--branch", pi2, "--stage", "concise", *seed, *common, *extra], args.out,
                                  after=f"seed{s}", seed=s, method=method, alpha=a, setting=setting))
    return jobs


def margin_function(method, betas, lambdas, alpha):
    """The margin round 3's loss used, as a function of (chosen, rejected) log-probs of pi_0..pi_2."""
    from spo_min import losses

    if method == "exact":
        return lambda c, r: losses.spo_margin(c, r, betas[:2], lambdas)
    if method == "telescoped":
        return lambda c, r: losses.spo_margin_telescoped(c, r, alpha)
    return lambda c, r: c[0] * 0.0  # sequential DPO: no margin


def optimum_lambdas(method, betas, lambdas, alpha):
    """Round 3's lambdas at the optimum (true rewards R_1, R_2 in place of the implicit ones).
    Telescoped: alpha (d_1 + d_2) with d_1 = R_1/beta_1, d_2 = (R_2 + lambda_1^(2) R_1)/beta_2."""
    if method == "exact":
        return lambdas[2]
    if method == "telescoped":
        (lam21,) = lambdas[1]
        return [alpha / betas[0] + alpha * lam21 / betas[1], alpha / betas[1]]
    return [0.0, 0.0]


def changes(before, after):
    return {name: after[key] - before[key] for name, key in AXES.items()}


def build_records(args, jobs, results):
    from spo_min.checkpoint import read_metadata

    records, evaluations = [], {}
    for job in jobs:
        if job["method"] is None:
            continue
        pi3 = results[job["name"]]["rows"][-1]
        seed = job["seed"]
        rows = results[f"seed{seed}"]["rows"]  # base, pi_1, pi_2 of this seed
        meta = read_metadata(os.path.join(job["folder"], "round3_concise.safetensors"))
        chain = [read_metadata(os.path.join(args.out, f"seed{seed}", f)) for f in
                 ("round1_helpful.safetensors", "round2_harmless.safetensors")]
        betas = [float(chain[0]["beta"]), float(chain[1]["beta"]), float(meta["beta"])]
        lambdas = [[], [float(x) for x in chain[1]["lambdas"]], [float(x) for x in meta["lambdas"]]]
        if seed not in evaluations:
            evaluations[seed] = study.exact_evaluation(seed, os.path.join(args.out, f"seed{seed}", "base.safetensors"),
                                                         study.common_train_args(args.quick, args.samples, args.train_args))
        ev = evaluations[seed]
        opt_lambdas = optimum_lambdas(job["method"], betas, lambdas, job["alpha"])
        optimum = ev.predicted(rows[2]["style_logp"], STAGES, betas, [[], lambdas[1], opt_lambdas], from_round=3)
        from_margin = ev.scores(ev.optimum_given_margin([r["style_logp"] for r in rows[:3]], "concise", betas[2],
                                                        margin_function(job["method"], betas, lambdas, job["alpha"])))
        pi2 = study.scalars(rows[2])
        records.append({
            "seed": seed, "method": job["method"], "alpha": job["alpha"], "setting": job["setting"],
            "betas": betas, "lambdas": lambdas, "margin": meta.get("margin_mode"), "optimum_lambdas": opt_lambdas,
            "seconds": results[job["name"]]["seconds"],
            "measured": changes(pi2, pi3), "optimum": changes(optimum[0], optimum[1]),
            "from_margin": changes(optimum[0], from_margin),
            "pi2": pi2, "pi3": study.scalars(pi3),
        })
    return records


BAND_SHARE = 0.10  # the primary band: this share of the margin-optimum gap's mean length


def projection(pair):
    """The primary statistic of one seed: the measured exact-minus-telescoped change, projected on
    the unit vector of the margin-optimum gap (exact minus telescoped "margin opt." changes)."""
    gap = [pair["exact"]["from_margin"][a] - pair["telescoped"]["from_margin"][a] for a in AXES]
    norm = sum(g * g for g in gap) ** 0.5
    measured = [pair["exact"]["measured"][a] - pair["telescoped"]["measured"][a] for a in AXES]
    return sum(m * g for m, g in zip(measured, gap)) / norm, norm


def summarise(records):
    """Per alpha_3: the pre-registered projection, and each axis, exact minus telescoped, paired by seed."""
    comparisons = []
    for alpha in sorted({r["alpha"] for r in records if r["method"] != "dpo"}):
        by_seed = {}
        for r in records:
            if r["alpha"] == alpha and r["method"] in ("exact", "telescoped"):
                by_seed.setdefault(r["seed"], {})[r["method"]] = r
        if any(len(v) != 2 for v in by_seed.values()):
            raise SystemExit(f"error: alpha_3 {alpha:g}: a seed lacks its exact or telescoped run (nothing is dropped)")
        pairs = [v for _, v in sorted(by_seed.items())]
        projected = [projection(p) for p in pairs]
        band = BAND_SHARE * sum(n for _, n in projected) / len(projected)
        names = {"spo": f"exact a3={alpha:g}", "baseline": f"telescoped a3={alpha:g}"}
        comparisons.append({**names, "statistic": "exact - telescoped change, projected on the margin-optimum gap",
                            "primary": True, "alpha": alpha, "gap_norms": [n for _, n in projected],
                            **stats.paired([d for d, _ in projected], band, "as the margin optima differ",
                                           "against the margin optima")})
        for axis in AXES:
            for view in ("measured", "from_margin", "optimum"):
                diffs = [p["exact"][view][axis] - p["telescoped"][view][axis] for p in pairs]
                comparisons.append({**names, "statistic": f"{axis} ({view})", "primary": False, "alpha": alpha,
                                    **stats.paired(diffs, 0.02, "exact higher", "telescoped higher")})
    return comparisons


def format_report(records, summary):
    """The table of every setting (mean over seeds), then the comparisons."""
    from spo_min.evaluate import format_table

    rows = []
    settings = sorted({(METHOD_ORDER[r["method"]], r["alpha"], r["setting"]) for r in records})
    for _, _, setting in settings:
        group = [r for r in records if r["setting"] == setting]
        row = {"setting": setting, "seeds": len(group)}
        for view in ("measured", "from_margin", "optimum"):
            for axis in AXES:
                mean, half = stats.mean_ci([r[view][axis] for r in group])
                row[f"{view}/{axis}"] = f"{mean:+.3f}" + (f" +-{half:.3f}" if half is not None and view == "measured" else "")
        row["own acc"] = sum(r["pi3"].get("acc_round_own", 0.0) for r in group) / len(group)
        rows.append(row)
    columns = [("setting", "round 3"), ("seeds", "seeds")]
    columns += [(f"measured/{a}", a) for a in AXES]
    columns += [(f"from_margin/{a}", f"{a.split()[0]} (margin opt.)") for a in AXES]
    columns += [(f"optimum/{a}", f"{a.split()[0]} (optimum)") for a in AXES]
    columns += [("own acc", "own acc (round)")]
    lines = [format_table(rows, columns), ""]
    for c in summary:
        if c["primary"] or c["statistic"].endswith("(measured)"):
            tag = "PRIMARY  " if c["primary"] else "secondary"
            lines.append(f"{tag} {c['spo']} - {c['baseline']}, {c['statistic']}: {stats.describe(c)}")
    return "\n".join(lines)


def plot(records, path):
    """Two panels (help kept, harm kept) against concise gained: each setting in its own colour,
    measured (filled, 95% CI) beside its two predictions (open); one legend for the colours and one
    for the markers, so no label sits on a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    palette = {"exact": ("tab:red", "darkred"), "telescoped": ("orange", "saddlebrown"), "dpo": ("tab:blue",)}
    settings = sorted({(METHOD_ORDER[r["method"]], r["alpha"], r["setting"]) for r in records})
    colour_of, used = {}, {}
    for _, _, setting in settings:
        method = next(r["method"] for r in records if r["setting"] == setting)
        k = used.get(method, 0)
        colour_of[setting] = palette[method][min(k, len(palette[method]) - 1)]
        used[method] = k + 1
    views = (("measured", "o", "measured (mean, 95% CI over seeds)"),
             ("from_margin", "s", "optimum of the margin used"),
             ("optimum", "^", "optimum, earlier rounds optimal"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, axis in zip(axes, ("help kept", "harm kept")):
        for _, _, setting in settings:
            group = [r for r in records if r["setting"] == setting]
            colour = colour_of[setting]
            for view, marker, _ in views:
                (mx, hx), (my, hy) = (stats.mean_ci([r[view]["concise gained"] for r in group]),
                                      stats.mean_ci([r[view][axis] for r in group]))
                measured = view == "measured"
                ax.errorbar(mx, my, xerr=hx if measured else None, yerr=hy if measured else None, fmt=marker,
                            color=colour, mfc=colour if measured else "none", ms=7 if measured else 6, capsize=3)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("concise gained: conciseness, pi_3 - pi_2")
        ax.set_ylabel(f"{axis}: {'helpfulness (benign)' if axis == 'help kept' else 'harmlessness (harmful)'}, "
                      "pi_3 - pi_2")
        ax.grid(alpha=0.3)
    colours = [Line2D([], [], color=colour_of[s], marker="o", ls="", label=s) for _, _, s in settings]
    markers = [Line2D([], [], color="black", marker=m, mfc="black" if v == "measured" else "none", ls="", label=text)
               for v, m, text in views]
    fig.legend(handles=colours, loc="lower left", ncol=len(colours), fontsize=7, title="round 3 (colour)",
               title_fontsize=7, bbox_to_anchor=(0.02, 0.0))
    fig.legend(handles=markers, loc="lower right", ncol=1, fontsize=7, title="marker", title_fontsize=7,
               bbox_to_anchor=(0.98, 0.0))
    fig.suptitle("Round 3 from one pi_2 per seed: what each margin kept and gained, measured and predicted", fontsize=9)
    fig.tight_layout(rect=(0, 0.17, 1, 1))  # room for the legends below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args):
    """The n = 3 study (compare.main hands over with parsed arguments)."""
    args.seeds = study.seed_count(args, DEFAULT_SEEDS)
    alphas = [float(a) for a in (args.alphas or DEFAULT_ALPHAS).split(",")]
    t0 = time.time()
    common = study.common_train_args(args.quick, args.samples, args.train_args)
    jobs = build_jobs(args, alphas, common)
    results = study.run_or_load(args, jobs, f"compare, round 3: seeds {args.first_seed}.."
                                            f"{args.first_seed + args.seeds - 1}, alphas_3 {alphas}")
    records = build_records(args, jobs, results)
    comparisons = summarise(records)
    wall = time.time() - t0
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    wall_seconds = study.wall_record(args, "verdict.json", wall)  # before "w" empties the file it reads
    with open(os.path.join(args.out, "verdict.json"), "w") as f:
        json.dump({"seeds": args.seeds, "first_seed": args.first_seed, "alphas": alphas, "train_args": common,
                   "comparisons": comparisons, **wall_seconds}, f, indent=1)
    plot(records, os.path.join(args.out, "round3.png"))
    print()
    print(format_report(records, comparisons))
    print(f"[compare] {wall:.0f} s; {args.out}/results.jsonl, round3.png, verdict.json, logs/")
    return records, comparisons
