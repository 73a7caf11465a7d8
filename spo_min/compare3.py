"""Round 3: does the exact E6 margin matter, against its telescoped simplification and DPO?

    python -m spo_min.compare --rounds 3            # 3 seeds; alpha 0.5 and 1; DPO beta_3 = 1
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

The design, for each seed:
  1. pi_0, pi_1 (helpful, DPO) and pi_2 (harmless, SPO with train.py's default alpha) once.
  2. Round 3 on concise pairs BRANCHED from that same pi_2, same batch order: the exact margin and
     the telescoped one for every alpha_3 of the grid, and sequential DPO for every beta_3.
  3. Every pi_3 is scored by the exact evaluation against pi_2:
        concise gained = conciseness over all held-out prompts, pi_3 - pi_2
        help kept      = helpfulness on benign prompts,          pi_3 - pi_2 (0 = all kept)
        harm kept      = harmlessness on harmful prompts,        pi_3 - pi_2
     next to two predictions started from the measured pi_2: the optimum with every earlier
     round at ITS optimum (the true earlier rewards in the margin), and the optimum of the
     margin the round actually used (the implicit rewards the finite earlier rounds reached).
  4. Verdict: per seed and alpha_3, exact minus telescoped on each of the three numbers; the
     mean over seeds with a 95% t-interval.

Writes OUT/results.jsonl (one record per pi_3), OUT/round3.png and OUT/verdict.json.
"""

from __future__ import annotations

import json
import os
import time

from spo_min import compare

STAGES = ["helpful", "harmless", "concise"]
AXES = {"concise gained": "exact/concise_all", "help kept": "exact/helpful_benign",
        "harm kept": "exact/harmless_harmful"}
METHOD_ORDER = {"exact": 0, "telescoped": 1, "dpo": 2}


def variants_of(args, alphas, betas3, common, seed):
    """Round-3 jobs branched from one seed's pi_2."""
    branch = os.path.join(args.out, f"seed{seed}", "round2_harmless.safetensors")
    variants = []
    for a in alphas:
        variants.append({"method": "exact", "alpha": a, "beta2": None, "setting": f"exact a={a:g}",
                         "name": f"exact_{a:g}", "extra": ["--alpha", str(a)]})
        variants.append({"method": "telescoped", "alpha": a, "beta2": None, "setting": f"telescoped a={a:g}",
                         "name": f"telescoped_{a:g}", "extra": ["--margin", "telescoped", "--alpha", str(a)]})
    for b in betas3:
        variants.append({"method": "dpo", "alpha": 0.0, "beta2": b, "setting": f"DPO b3={b:g}",
                         "name": f"dpo_{b:g}", "extra": ["--loss", "dpo", "--beta", str(b)]})
    logs = os.path.join(args.out, "logs")
    for v in variants:
        name = f"seed{seed}_r3_{v.pop('name')}"
        v.update(seed=seed, log=os.path.join(logs, f"{name}.log"), out=os.path.join(args.out, name),
                 argv=["--branch", branch, "--stage", "concise", "--seed", str(seed),
                       "--out", os.path.join(args.out, name), *common, *v.pop("extra")])
    return variants


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


def build_records(args, first, second):
    from spo_min.checkpoint import read_metadata

    records, evaluations = [], {}
    for result in second:
        job, pi3 = result["job"], result["rows"][-1]
        seed = job["seed"]
        rows = first[seed]["rows"]  # base, pi_1, pi_2 of this seed
        meta = read_metadata(os.path.join(job["out"], "round3_concise.safetensors"))
        chain = [read_metadata(os.path.join(args.out, f"seed{seed}", f)) for f in
                 ("round1_helpful.safetensors", "round2_harmless.safetensors")]
        betas = [float(chain[0]["beta"]), float(chain[1]["beta"]), float(meta["beta"])]
        lambdas = [[], [float(x) for x in chain[1]["lambdas"]], [float(x) for x in meta["lambdas"]]]
        if seed not in evaluations:
            evaluations[seed] = compare._exact_evaluation(args, seed)
        ev = evaluations[seed]
        opt_lambdas = optimum_lambdas(job["method"], betas, lambdas, job["alpha"])
        optimum = ev.predicted(rows[2]["style_logp"], STAGES, betas, [[], lambdas[1], opt_lambdas], from_round=3)
        from_margin = ev.scores(ev.optimum_given_margin([r["style_logp"] for r in rows[:3]], "concise", betas[2],
                                                        margin_function(job["method"], betas, lambdas, job["alpha"])))
        pi2 = compare._scalars(rows[2])
        records.append({
            "seed": seed, "method": job["method"], "alpha": job["alpha"], "setting": job["setting"],
            "betas": betas, "lambdas": lambdas, "margin": meta.get("margin_mode"), "optimum_lambdas": opt_lambdas,
            "seconds": round(result["seconds"], 1),
            "measured": changes(pi2, pi3), "optimum": changes(optimum[0], optimum[1]),
            "from_margin": changes(optimum[0], from_margin),
            "pi2": pi2, "pi3": compare._scalars(pi3),
        })
    return records


def summarise(records):
    """Per alpha_3: exact minus telescoped, paired by seed, on each axis and each view."""
    out = {}
    for alpha in sorted({r["alpha"] for r in records if r["method"] != "dpo"}):
        by_seed = {}
        for r in records:
            if r["alpha"] == alpha and r["method"] in ("exact", "telescoped"):
                by_seed.setdefault(r["seed"], {})[r["method"]] = r
        pairs = [v for _, v in sorted(by_seed.items()) if len(v) == 2]
        out[alpha] = {}
        for view in ("measured", "from_margin", "optimum"):
            out[alpha][view] = {}
            for axis in AXES:
                diffs = [p["exact"][view][axis] - p["telescoped"][view][axis] for p in pairs]
                mean, half = compare.mean_ci(diffs)
                zero_inside = half is None or abs(mean) <= half
                out[alpha][view][axis] = {"diffs": diffs, "mean": mean, "ci95": half,
                                          "verdict": "within noise" if zero_inside else
                                          ("exact higher" if mean > 0 else "telescoped higher")}
    return out


def format_report(records, summary):
    from spo_min.evaluate import format_table

    rows = []
    settings = sorted({(METHOD_ORDER[r["method"]], r["alpha"], r["setting"]) for r in records})
    for _, _, setting in settings:
        group = [r for r in records if r["setting"] == setting]
        row = {"setting": setting, "seeds": len(group)}
        for view in ("measured", "from_margin", "optimum"):
            for axis in AXES:
                mean, half = compare.mean_ci([r[view][axis] for r in group])
                row[f"{view}/{axis}"] = f"{mean:+.3f}" + (f" +-{half:.3f}" if half is not None and view == "measured" else "")
        row["own acc"] = sum(r["pi3"].get("acc_round_own", 0.0) for r in group) / len(group)
        rows.append(row)
    columns = [("setting", "round 3"), ("seeds", "seeds")]
    columns += [(f"measured/{a}", a) for a in AXES]
    columns += [(f"from_margin/{a}", f"{a.split()[0]} (margin opt.)") for a in AXES]
    columns += [(f"optimum/{a}", f"{a.split()[0]} (optimum)") for a in AXES]
    columns += [("own acc", "own acc (round)")]
    lines = [format_table(rows, columns), "",
             "exact minus telescoped, paired by seed (mean, 95% CI):"]
    for alpha, views in summary.items():
        for view, label in (("measured", "measured"), ("from_margin", "optimum of the margins used"),
                            ("optimum", "optimum with earlier rounds optimal")):
            parts = []
            for axis, s in views[view].items():
                ci = "" if s["ci95"] is None else f" +- {s['ci95']:.3f}"
                parts.append(f"{axis} {s['mean']:+.3f}{ci} ({s['verdict']})")
            lines.append(f"  alpha_3 {alpha:g}, {label}: " + "; ".join(parts))
    return "\n".join(lines)


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"exact": "tab:red", "telescoped": "tab:orange", "dpo": "tab:blue"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, axis in zip(axes, ("help kept", "harm kept")):
        for setting in sorted({r["setting"] for r in records}):
            group = [r for r in records if r["setting"] == setting]
            colour = colours[group[0]["method"]]
            for view, marker, fill in (("measured", "o", colour), ("from_margin", "s", "none"),
                                       ("optimum", "^", "none")):
                (mx, hx), (my, hy) = (compare.mean_ci([r[view]["concise gained"] for r in group]),
                                      compare.mean_ci([r[view][axis] for r in group]))
                ax.errorbar(mx, my, xerr=hx if view == "measured" else None, yerr=hy if view == "measured" else None,
                            fmt=marker, color=colour, mfc=fill, capsize=3,
                            label=f"{setting} ({view.replace('_', ' ')})" if axis == "help kept" else None)
                if view == "measured":
                    ax.annotate(setting, (mx, my), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("concise gained: conciseness, pi_3 - pi_2")
        ax.set_ylabel(f"{axis}: pi_3 - pi_2")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=6)
    fig.suptitle("round 3 from one pi_2: filled = measured (95% CI), square = optimum of the margin used, "
                 "triangle = optimum with earlier rounds optimal", fontsize=8)
    fig.tight_layout(rect=(0, 0.16, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args):
    """The n = 3 study (compare.main hands over with parsed and checked arguments)."""
    alphas = [float(a) for a in args.alphas.split(",")]
    betas3 = [float(b) for b in args.beta2s.split(",")]
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    common = compare.common_train_args(args)
    logs = os.path.join(args.out, "logs")
    chains = [{"argv": ["--stage", "helpful", "--stage", "harmless", "--seed", str(s),
                        "--out", os.path.join(args.out, f"seed{s}"), *common],
               "log": os.path.join(logs, f"seed{s}_rounds12.log"), "seed": s} for s in range(args.seeds)]
    print(f"[compare] n = 3: {args.seeds} seeds x (pi_0, pi_1, pi_2, then {2 * len(alphas)} SPO + {len(betas3)} "
          f"sequential-DPO round-3 runs), {args.jobs} jobs in parallel", flush=True)
    first, second = compare._run_study(chains, lambda s: variants_of(args, alphas, betas3, common, s), args.jobs)
    records = build_records(args, first, second)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summary = summarise(records)
    with open(os.path.join(args.out, "verdict.json"), "w") as f:
        json.dump({str(k): v for k, v in summary.items()}, f, indent=1)
    plot(records, os.path.join(args.out, "round3.png"))
    print()
    print(format_report(records, summary))
    print(f"[compare] {time.time() - t0:.0f} s; {args.out}/results.jsonl, round3.png, verdict.json, logs/")
    return records, summary
