"""The convergence arm: does the SPO-vs-matched gap shrink as training converges, as E10 says?

    python -m spo_min.convergence            # seed 0, alpha 0.5, lr 2e-4 and 5e-4, 700 steps a round
    python -m spo_min.convergence --quick    # a nano model: the end-to-end test

E10: SPO(beta_1, beta_2, lambda) and the matched sequential DPO (round 1 at beta_1' = beta_1 beta_2 /
(beta_2 + lambda beta_1)) share one population optimum pi_2*. spo_min.compare measures them after
train.py's default 100 steps a round (0.7 epoch): early training, where E7's per-pair weight can
make them differ. Here both chains (and plain sequential DPO from SPO's pi_1) train much longer,
every round of every chain for the same number of steps (700 = 4.9 epochs of 16 pairs), at two
learning rates, and each round is evaluated every --trace-every steps (train.py --trace-every):

    J* - J(pi)        the distance to the shared optimum in E10's objective (nats; DPO: its own J)
    progress          (J(pi) - J(pi_0)) / (J* - J(pi_0)): the share of the way to the optimum
    held-out loss     the round's own loss on held-out pairs, with its frozen margin
    dlogp(y_w)        likelihood displacement of the held-out preferred responses vs pi_0
    end-of-text       samples that end (2 per held-out prompt), and the off-style mass

A round's trajectory at step k is not a k-step run (the cosine schedule is set by the round's
length), but its best point by held-out loss is what early stopping would keep: the tables report
each round-2 run at that point, at its end, and where degeneration begins (the first point that
misses train.py's health criteria: dlogp(y_w) < -5 nats or end-of-text < 0.95).

Writes OUT/convergence.json (every trace point, and the summary), OUT/convergence.png, OUT/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from spo_min import evaluate, study

METHODS = ("spo", "matched", "dpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..K-1")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lrs", default="2e-4,5e-4", help="peak learning rates, comma separated")
    p.add_argument("--steps", type=int, default=700, help="steps of every round (16 pairs each)")
    p.add_argument("--trace-every", type=int, default=50)
    p.add_argument("--out", default="convergence_out", help="a new or empty folder")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    p.add_argument("--quick", action="store_true", help="nano model, short rounds: for the test suite")
    p.add_argument("--train-args", default="", help="extra train.py arguments for every run, quoted")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted study in --out: keep its finished runs, train the rest (same options)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the report from the runs already in --out (same options)")
    return p.parse_args(argv)


def common_train_args(args):
    return study.common_train_args(args.quick, 2, args.train_args)


def build_jobs(args, lrs, beta):
    common = common_train_args(args)
    b1m = study.matched_beta1(beta, beta, args.alpha / beta)
    jobs = []
    for s in range(args.seeds):
        seed = ["--seed", str(s)]
        # train.py makes pi_0 as round 0 of any run; this job's 1-step round 1 is not used.
        jobs.append(study.job(f"seed{s}", ["--stage", "helpful", "--steps", "1", "--warmup", "0", *seed, *common],
                              args.out, seed=s, role="base"))
        base = os.path.join(args.out, f"seed{s}", "base.safetensors")
        for lr in lrs:
            run = [*seed, *common, "--steps", str(args.steps), "--lr", repr(lr), "--trace-every", str(args.trace_every)]
            tag = f"seed{s}_lr{lr:g}"
            for chain, beta1 in (("spo", beta), ("matched", b1m)):
                jobs.append(study.job(f"{tag}_{chain}_r1", ["--branch", base, "--stage", "helpful", *run,
                                                            "--beta", repr(beta1)],
                                      args.out, after=f"seed{s}", seed=s, lr=lr, method=chain, round=1))
            spo_pi1 = os.path.join(args.out, f"{tag}_spo_r1", "round1_helpful.safetensors")
            matched_pi1 = os.path.join(args.out, f"{tag}_matched_r1", "round1_helpful.safetensors")
            for method, parent, extra in (("spo", spo_pi1, ["--alpha", repr(args.alpha)]),
                                          ("dpo", spo_pi1, ["--loss", "dpo"]),
                                          ("matched", matched_pi1, ["--loss", "dpo"])):
                jobs.append(study.job(f"{tag}_{method}_r2", ["--branch", parent, "--stage", "harmless", *run, *extra,
                                                             "--beta", repr(beta)],
                                      args.out, after=f"{tag}_{'matched' if method == 'matched' else 'spo'}_r1",
                                      seed=s, lr=lr, method=method, round=2))
    return jobs


def healthy(point):
    """train.py's health criteria on one trace point (own accuracy aside: it is a round-end check)."""
    ok = point["dlogp_yw"] >= -evaluate.MAX_DISPLACEMENT
    return ok and (point.get("eot_rate") is None or point["eot_rate"] >= evaluate.MIN_EOT_RATE)


def build_curves(args, jobs, results, beta):
    """Per (seed, lr, method, round): the trace points with J, the gap and the progress added."""
    curves, evaluations = [], {}
    for j in jobs:
        if j.get("role") == "base":
            continue
        s = j["seed"]
        pi0 = results[f"seed{s}"]["rows"][0]
        if s not in evaluations:
            evaluations[s] = study.exact_evaluation(s, os.path.join(args.out, f"seed{s}", "base.safetensors"),
                                                    common_train_args(args))
        ev = evaluations[s]
        row = results[j["name"]]["rows"][-1]
        # Round 1 is scored on its own objective (pi_1* = pi_0 exp(R_1 / beta_1)), round 2 on E10's J
        # of the chain (SPO and matched: the shared one; plain DPO: its own).
        beta1_used = beta if j["method"] != "matched" else study.matched_beta1(beta, beta, args.alpha / beta)
        if j["round"] == 1:
            weights = {"helpful": 1 / beta1_used}
        else:
            weights = study.objective_weights(beta, beta, args.alpha / beta if j["method"] != "dpo" else 0.0)
        points = []
        for point in row["steps"]["trace"]:
            obj = ev.objective(point["style_logp"], pi0["style_logp"], weights)
            start = ev.objective(pi0["style_logp"], pi0["style_logp"], weights)["J"]
            points.append({**{k: v for k, v in point.items() if k != "style_logp"}, "J": obj["J"], "gap": obj["gap"],
                           "progress": (obj["J"] - start) / (obj["J*"] - start)})
        best = min(points, key=lambda p: p["heldout_loss"])
        sick = next((p["step"] for p in points if not healthy(p)), None)
        curves.append({"seed": s, "lr": j["lr"], "method": j["method"], "round": j["round"], "weights": weights,
                       "points": points, "best_step": best["step"], "degenerates_at": sick,
                       "end": study.scalars(row), "seconds": results[j["name"]]["seconds"]})
    return curves


def summarise(curves):
    """Round 2 of every chain: at the held-out-loss minimum and at the end; SPO - matched in J."""
    rows = []
    for c in curves:
        if c["round"] != 2:
            continue
        best = next(p for p in c["points"] if p["step"] == c["best_step"])
        end = c["points"][-1]
        rows.append({"seed": c["seed"], "lr": c["lr"], "method": c["method"], "best_step": c["best_step"],
                     "degenerates_at": c["degenerates_at"],
                     **{f"best/{k}": best.get(k) for k in ("gap", "progress", "heldout_loss", "dlogp_yw", "eot_rate",
                                                          "exact/off_style", "exact/helpful_benign",
                                                          "exact/harmless_harmful")},
                     **{f"end/{k}": end.get(k) for k in ("gap", "progress", "heldout_loss", "dlogp_yw", "eot_rate",
                                                        "exact/off_style", "exact/helpful_benign",
                                                        "exact/harmless_harmful")}})
    gaps = []
    for c in curves:
        if c["round"] == 2 and c["method"] == "spo":
            m = next(x for x in curves if x["round"] == 2 and x["method"] == "matched" and x["seed"] == c["seed"]
                     and x["lr"] == c["lr"])
            gaps.append({"seed": c["seed"], "lr": c["lr"],
                         "steps": [p["step"] for p in c["points"]],
                         "spo_minus_matched_J": [p["J"] - q["J"] for p, q in zip(c["points"], m["points"])]})
    return rows, gaps


def format_report(rows, gaps, curves):
    from spo_min.evaluate import format_table

    columns = [("seed", "seed"), ("lr", "lr"), ("method", "round 2"), ("best_step", "best step"),
               ("best/gap", "J*-J (best)"), ("best/progress", "progress (best)"), ("best/heldout_loss", "loss (best)"),
               ("end/gap", "J*-J (end)"), ("end/progress", "progress (end)"), ("end/heldout_loss", "loss (end)"),
               ("end/dlogp_yw", "dlogp(y_w) end"), ("end/eot_rate", "eot end"), ("end/exact/off_style", "off-style end"),
               ("degenerates_at", "degenerates at")]
    shown_rows = [{**r, "lr": f"{r['lr']:g}"} for r in rows]  # 2e-4, not the table's 0.000
    lines = [format_table(shown_rows, columns), "", "round 1 (own objective, pi_1* = pi_0 exp(R_1/beta_1)):"]
    r1 = [{"seed": c["seed"], "lr": f"{c['lr']:g}", "method": c["method"], "best_step": c["best_step"],
           "gap": c["points"][-1]["gap"], "progress": c["points"][-1]["progress"],
           "dlogp": c["points"][-1]["dlogp_yw"], "sick": c["degenerates_at"]} for c in curves if c["round"] == 1]
    lines.append(format_table(r1, [("seed", "seed"), ("lr", "lr"), ("method", "chain"), ("best_step", "best step"),
                                   ("gap", "J1*-J1 end"), ("progress", "progress end"), ("dlogp", "dlogp(y_w) end"),
                                   ("sick", "degenerates at")]))
    lines += ["", "SPO - matched, J of pi_2 (nats) along round 2:"]
    for g in gaps:
        shown = ", ".join(f"{s}: {d:+.3f}" for s, d in zip(g["steps"], g["spo_minus_matched_J"]))
        lines.append(f"  seed {g['seed']} lr {g['lr']:g}: {shown}")
    return "\n".join(lines)


def plot(curves, gaps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"spo": "tab:red", "matched": "tab:blue", "dpo": "tab:grey"}
    styles = {}
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    panels = [("gap", "J* - J(pi_2) (nats; DPO: its own J)"), ("progress", "progress to the optimum"),
              ("heldout_loss", "held-out loss of round 2"), ("dlogp_yw", "dlogp(y_w) vs pi_0 (nats)"),
              ("eot_rate", "end-of-text rate")]
    for c in curves:
        if c["round"] != 2:
            continue
        ls = styles.setdefault(c["lr"], ["-", "--", ":", "-."][len(styles) % 4])
        for ax, (key, title) in zip(axes.flat, panels):
            pts = [(p["step"], p[key]) for p in c["points"] if p.get(key) is not None]
            ax.plot(*zip(*pts), ls, color=colours[c["method"]], marker=".",
                    label=f"{c['method']} lr {c['lr']:g} seed {c['seed']}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("round-2 step")
            ax.grid(alpha=0.3)
            if c["best_step"] is not None:
                best = next(p for p in c["points"] if p["step"] == c["best_step"])
                if best.get(key) is not None:
                    ax.scatter([best["step"]], [best[key]], s=40, facecolor="none", edgecolor=colours[c["method"]])
    ax = axes.flat[5]
    for g in gaps:
        ax.plot(g["steps"], g["spo_minus_matched_J"], styles[g["lr"]], marker=".", color="k",
                label=f"lr {g['lr']:g} seed {g['seed']}")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_title("J(SPO) - J(matched DPO) along round 2 (nats)", fontsize=9)
    ax.set_xlabel("round-2 step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, handlelength=4)  # long handles: the learning rates differ by line style
    axes.flat[0].legend(fontsize=6, handlelength=4)
    fig.suptitle("convergence arm: open circles = held-out loss minimum (early stopping)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        raise SystemExit(f"error: --lrs {args.lrs!r}: expected comma-separated numbers") from None
    if args.seeds < 1 or args.steps < 1 or args.trace_every < 1 or not lrs or min(lrs) <= 0 or args.alpha <= 0:
        raise SystemExit("error: need --seeds, --steps, --trace-every >= 1 and positive --lrs and --alpha")
    t0 = time.time()
    beta = float(study.train_module().parse_args(common_train_args(args)).beta)
    jobs = build_jobs(args, lrs, beta)
    results = study.run_or_load(args, jobs, f"convergence: {args.steps} steps a round, trace every {args.trace_every}")
    curves = build_curves(args, jobs, results, beta)
    rows, gaps = summarise(curves)
    wall = time.time() - t0
    wall_seconds = study.wall_record(args, "convergence.json", wall)  # before "w" empties the file it reads
    with open(os.path.join(args.out, "convergence.json"), "w") as f:
        json.dump({"seeds": args.seeds, "alpha": args.alpha, "lrs": lrs, "steps": args.steps, "beta": beta,
                   "train_args": common_train_args(args),
                   **wall_seconds,
                   "summary": rows, "spo_minus_matched": gaps, "curves": curves}, f, indent=1)
    plot(curves, gaps, os.path.join(args.out, "convergence.png"))
    print()
    print(format_report(rows, gaps, curves))
    print(f"[convergence] {wall:.0f} s; {args.out}/convergence.json, convergence.png, logs/")
    return curves, rows, gaps


if __name__ == "__main__":
    main()
