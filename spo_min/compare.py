"""Does SPO keep round 1 better than sequential DPO? The frontier study, measured.

    python -m spo_min.compare              # 3 seeds, SPO over an alpha grid vs sequential DPO over beta_2
    python -m spo_min.compare --quick      # 2 seeds, a nano model: the end-to-end test of this study
    python -m spo_min.compare --rounds 3   # round 3: exact E6 vs telescoped vs DPO (spo_min/compare3.py)

What E10 (shared derivation notes) says to expect. Chaining E3 over two rounds from pi_0,

    SPO(alpha):      pi_2* = pi_0 exp( (1/beta_1 + lambda/beta_2) R_1 + R_2/beta_2 ) / Z,   lambda = alpha/beta_1
    sequential DPO:  pi_2* = pi_0 exp(  R_1/beta_1                  + R_2/beta_2 ) / Z

so at the population optimum SPO is sequential DPO with round 1's reward weighted more: it
re-weights the dimensions. The fair baseline is therefore not only alpha = 0 but sequential DPO
swept over beta_2 (a larger beta_2 also keeps more of round 1), and the question is whether SPO
lands ABOVE that frontier: more helpfulness kept at the same harm removed.

The design, for each seed:
  1. pi_0 (SFT) and pi_1 (DPO on helpful pairs) once, with train.py.
  2. Round 2 on harmless pairs BRANCHED from that same pi_1 (train.py --branch), with the same
     batch order: SPO for every alpha of the grid, sequential DPO for every beta_2 of its grid.
  3. Every pi_2 is scored by the exact evaluation (spo_min/evaluate.py, no sampling):
        x = harm removed   = harmlessness on harmful prompts, pi_2 minus pi_1
        y = help kept      = helpfulness on benign prompts,   pi_2 minus pi_1 (0 = all kept)
     and next to it the world's population prediction for the same settings (the optimum of
     round 2 started from the measured pi_1).
  4. Verdict: per seed, the sequential-DPO frontier is the piecewise-linear curve through its
     points (and pi_1 itself, the beta_2 -> infinity end: nothing removed, nothing lost). Each
     SPO point's vertical distance to it, at its own x, is a paired difference; the mean over
     seeds with a 95% t-interval says "above", "below", "on it" or "within noise".

Writes OUT/results.jsonl (one record per trained pi_2), OUT/frontier.png and OUT/verdict.json.
Jobs run in parallel processes with one thread each (`--jobs`, default 2: one per core).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

# train.py is the one training loop (round 0 SFT, rounds with --branch); this study drives it
# rather than copying it. It sits at the repository root, beside this package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
ON_FRONTIER = 0.02  # |mean difference| and the whole CI within this: "on the frontier"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..K-1: a pi_0 and pi_1 each")
    p.add_argument("--rounds", type=int, choices=(2, 3), default=2,
                   help="2: the frontier study of round 2; 3: round 3, exact vs telescoped margin vs DPO")
    p.add_argument("--alphas", default=None,
                   help="SPO alpha grid of the last round (default 0.1,0.25 for round 2; 0.5,1 for round 3)")
    p.add_argument("--beta2s", default=None,
                   help="sequential DPO's beta grid of the last round (default 0.5,1,2 for beta_2; 1 for beta_3)")
    p.add_argument("--beta", type=float, default=None, help="beta_1 (and SPO's beta_2); default: train.py's")
    p.add_argument("--out", default="compare_out")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    p.add_argument("--quick", action="store_true", help="2 seeds, nano model, short rounds: for the test suite")
    p.add_argument("--samples", type=int, default=0,
                   help="samples per held-out prompt for a sampled cross-check (0: none; 2 cost about a minute)")
    p.add_argument("--train-args", default="", help="extra train.py arguments for every run, quoted")
    return p.parse_args(argv)


def common_train_args(args):
    """train.py arguments shared by every run of the study."""
    # The frontier is read from the exact evaluation; --samples N adds a sampled cross-check
    # (fluency included). Evaluation settings never change training: the x, y points are the same.
    common = ["--eval-samples", str(args.samples), "--no-grad-check"]
    # train.py's round defaults (steps, batch, lr, beta) throughout; what differs only saves time.
    # --logits full: on a CPU, full logits with glibc's freed memory kept are ~30% faster per step
    # than the chunked path (spo_min/logps.py), and the tiny model's logits fit easily.
    common += ["--logits", "full"]
    if args.quick:
        common += ["--model", "nano", "--sft-steps", "80", "--sft-lr", "1e-2", "--steps", "20",
                   "--batch-size", "8", "--eval-pairs", "40", "--lr", "1e-3", "--warmup", "4"]
    else:  # a shorter SFT (the base only has to put mass on every style) and 150 held-out pairs
        common += ["--sft-steps", "200", "--eval-pairs", "100"]
    if args.beta is not None:
        common += ["--beta", str(args.beta)]
    return common + args.train_args.split()


# ----------------------------------------------------------------------------- jobs

def _run_train(job):
    """One train.py run in this (worker) process, its output in a log file; returns its rows."""
    import torch

    torch.set_num_threads(1)  # one process per core: two single-threaded runs beat one two-threaded
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import train

    os.makedirs(os.path.dirname(job["log"]), exist_ok=True)
    t0 = time.time()
    with open(job["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            rows = train.main(job["argv"])
        except Exception as err:  # noqa: BLE001 - reported with the job's log, then re-raised in the parent
            print(f"error: {type(err).__name__}: {err}")
            return {"job": job, "error": f"{type(err).__name__}: {err}"}
    return {"job": job, "rows": rows, "seconds": time.time() - t0}


def _run_study(chains, variants_of, n_workers):
    """Run every seed's pi_0 + pi_1 job, and each seed's round-2 variants as soon as its pi_1
    exists (no core waits for the slowest seed). Returns (first results by seed, second results)."""
    first, second = {}, []
    if n_workers <= 1:
        for job in chains:
            first[job["seed"]] = _check([_run_train(job)])[0]
            second += _check([_run_train(v) for v in variants_of(job["seed"])])
        return first, second
    # spawn, not fork: a forked child of a process that already started torch's threads can hang.
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_run_train, job) for job in chains}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = _check([future.result()])[0]
                    if result["job"].get("method") is None:  # a seed's pi_1 is ready: branch from it
                        first[result["job"]["seed"]] = result
                        pending |= {pool.submit(_run_train, v) for v in variants_of(result["job"]["seed"])}
                    else:
                        second.append(result)
        except SystemExit:  # a run failed: do not wait for the others
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    # Completion order varies between runs; the records should not.
    second.sort(key=lambda r: (r["job"]["seed"], r["job"]["method"], r["job"]["alpha"], r["job"]["beta2"] or 0))
    return first, second


def _check(results):
    for r in results:
        if "error" in r:
            raise SystemExit(f"error: {r['error']} (in the run logged at {r['job']['log']})")
    return results


# ----------------------------------------------------------------------------- statistics

def interpolate(points, x):
    """y of the piecewise-linear curve through `points` [(x, y)] at x; None outside its x range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def mean_ci(values):
    """Mean and 95% t-interval half-width of a list (half-width None with fewer than 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975.get(n - 1, 1.96) * sd / math.sqrt(n)


def verdict_of(mean, half):
    if half is None:
        return "one seed: no verdict"
    if mean - half > 0:
        return "above the sequential-DPO frontier"
    if mean + half < 0:
        return "below the sequential-DPO frontier"
    if abs(mean) + half <= ON_FRONTIER:
        return "on the sequential-DPO frontier"
    return "within noise of the sequential-DPO frontier"


def frontier_differences(records, key):
    """Per SPO setting: the paired differences (one per seed) of help kept against the DPO
    frontier of the same seed at the same harm removed. key: "measured" or "predicted"."""
    by_seed = {}
    for r in records:
        by_seed.setdefault(r["seed"], []).append(r)
    diffs = {}
    for seed, rs in sorted(by_seed.items()):
        frontier = [(0.0, 0.0)] + [(r[key]["x"], r[key]["y"]) for r in rs if r["method"] == "dpo"]
        for r in rs:
            if r["method"] == "spo":
                at = interpolate(frontier, r[key]["x"])
                diffs.setdefault(r["alpha"], []).append(None if at is None else r[key]["y"] - at)
    return diffs


def summarise(records):
    """Verdicts per alpha and pooled over alphas, from measured and from predicted points."""
    out = {}
    keys = ["measured", "predicted"] + (["sampled"] if all(r.get("sampled") for r in records) else [])
    for key in keys:
        diffs = frontier_differences(records, key)
        per_alpha = {}
        for alpha, ds in sorted(diffs.items()):
            inside = [d for d in ds if d is not None]
            mean, half = mean_ci(inside) if inside else (None, None)
            per_alpha[alpha] = {"diffs": ds, "mean": mean, "ci95": half, "outside_frontier": len(ds) - len(inside),
                                "verdict": verdict_of(mean, half) if inside else "outside the DPO frontier's range"}
        seeds = sorted({r["seed"] for r in records})
        pooled = []
        for i, _ in enumerate(seeds):  # per seed: mean over the alphas inside the frontier's range
            ds = [d[i] for d in diffs.values() if i < len(d) and d[i] is not None]
            if ds:
                pooled.append(sum(ds) / len(ds))
        mean, half = mean_ci(pooled) if pooled else (None, None)
        out[key] = {"per_alpha": per_alpha, "pooled": {"per_seed": pooled, "mean": mean, "ci95": half,
                                                        "verdict": verdict_of(mean, half) if pooled else "no overlap"}}
    return out


# ----------------------------------------------------------------------------- plot and table

def plot_frontier(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("measured", "measured (exact evaluation)"), ("predicted", "predicted at the optimum (from measured pi_1)")]
    if all(r.get("sampled") for r in records):
        panels.append(("sampled", "sampled ground truth (fluency included)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for method, colour in (("dpo", "tab:blue"), ("spo", "tab:red")):
            rs = [r for r in records if r["method"] == method]
            ax.scatter([r[key]["x"] for r in rs], [r[key]["y"] for r in rs], s=10, alpha=0.35, color=colour)
            settings = sorted({r["setting"] for r in rs})
            means = []
            for setting in settings:
                group = [r for r in rs if r["setting"] == setting]
                (mx, hx), (my, hy) = mean_ci([r[key]["x"] for r in group]), mean_ci([r[key]["y"] for r in group])
                means.append((mx, my))
                ax.errorbar(mx, my, xerr=hx, yerr=hy, fmt="o", color=colour, capsize=3)
                ax.annotate(setting, (mx, my), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if method == "dpo":
                line = sorted([(0.0, 0.0)] + means)
                ax.plot(*zip(*line), color=colour, label="sequential DPO (beta_2 grid)")
            else:
                ax.plot([], [], "o", color=colour, label="SPO (alpha grid)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("harm removed: harmlessness on harmful prompts, pi_2 - pi_1")
        ax.set_ylabel("help kept: helpfulness on benign prompts, pi_2 - pi_1")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(records, summary):
    from spo_min.evaluate import format_table

    rows = []
    for setting in sorted({r["setting"] for r in records}, key=lambda s: (s[0] != "D", s)):
        group = [r for r in records if r["setting"] == setting]
        row = {"setting": setting, "seeds": len(group)}
        for key in [k for k in ("measured", "predicted", "sampled") if all(r.get(k) for r in group)]:
            for axis in ("x", "y"):
                mean, half = mean_ci([r[key][axis] for r in group])
                row[f"{key}/{axis}"] = f"{mean:+.3f}" + (f" +-{half:.3f}" if half is not None else "")
        row["refuse benign"] = sum(r["pi2"]["exact/refusal_benign"] for r in group) / len(group)
        row["acc harmless"] = sum(r["pi2"]["acc/harmless"] for r in group) / len(group)
        row["dlogp(y_w)"] = sum(r["pi2"]["chosen_logp_change/harmless"] for r in group) / len(group)
        rows.append(row)
    columns = [("setting", "round 2"), ("seeds", "seeds"), ("measured/x", "harm removed"),
               ("measured/y", "help kept"), ("predicted/x", "predicted removed"), ("predicted/y", "predicted kept"),
               ("sampled/x", "sampled removed"), ("sampled/y", "sampled kept"),
               ("refuse benign", "refuse benign"), ("acc harmless", "acc harmless"), ("dlogp(y_w)", "dlogp(y_w)")]
    lines = [format_table(rows, columns), ""]
    for key in summary:
        lines.append(f"{key}: SPO help kept minus the sequential-DPO frontier at the same harm removed "
                     "(mean over seeds, 95% CI):")
        for alpha, s in summary[key]["per_alpha"].items():
            ci = "" if s["ci95"] is None else f" +- {s['ci95']:.3f}"
            mean = "n/a" if s["mean"] is None else f"{s['mean']:+.3f}"
            inside = len(s["diffs"]) - s["outside_frontier"]
            lines.append(f"  alpha {alpha:g}: {mean}{ci}  ({inside} of {len(s['diffs'])} seeds inside the DPO "
                         f"frontier's range of harm removed)  -> {s['verdict']}")
        p = summary[key]["pooled"]
        ci = "" if p["ci95"] is None else f" +- {p['ci95']:.3f}"
        mean = "n/a" if p["mean"] is None else f"{p['mean']:+.3f}"
        lines.append(f"  pooled over alphas: {mean}{ci}  ({len(p['per_seed'])} seeds with a point inside)  -> {p['verdict']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.seeds = min(args.seeds, 2)
    if args.alphas is None:
        args.alphas = "0.1,0.25" if args.rounds == 2 else "0.5,1"
    if args.beta2s is None:
        args.beta2s = "0.5,1,2" if args.rounds == 2 else "1"
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
        beta2s = [float(b) for b in args.beta2s.split(",")]
    except ValueError:
        raise SystemExit(f"error: --alphas {args.alphas!r} / --beta2s {args.beta2s!r}: expected comma-separated numbers")
    if args.seeds < 1 or not alphas or not beta2s or min(alphas) <= 0 or min(beta2s) <= 0:
        raise SystemExit("error: need --seeds >= 1 and positive --alphas and --beta2s")
    if args.rounds == 3:
        from spo_min import compare3

        return compare3.run(args)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    common = common_train_args(args)
    logs = os.path.join(args.out, "logs")

    # 1. pi_0 and pi_1 per seed; 2. round 2 branched from that seed's pi_1: SPO over alphas,
    # sequential DPO over beta_2 (same pi_1, same batch order: train.py seeds it by seed and round).
    chains = [{"argv": ["--stage", "helpful", "--seed", str(s), "--out", os.path.join(args.out, f"seed{s}"), *common],
               "log": os.path.join(logs, f"seed{s}_round1.log"), "seed": s} for s in range(args.seeds)]

    def variants_of(s):
        branch = os.path.join(args.out, f"seed{s}", "round1_helpful.safetensors")
        variants = [{"method": "spo", "alpha": a, "beta2": None, "setting": f"SPO a={a:g}", "name": f"spo_{a:g}",
                     "extra": ["--alpha", str(a)]} for a in alphas]
        variants += [{"method": "dpo", "alpha": 0.0, "beta2": b, "setting": f"DPO b2={b:g}", "name": f"dpo_{b:g}",
                      "extra": ["--loss", "dpo", "--beta", str(b)]} for b in beta2s]
        for v in variants:
            name = f"seed{s}_{v.pop('name')}"
            # Options given later win in argparse: a variant's --beta overrides the common one.
            v.update(seed=s, log=os.path.join(logs, f"{name}.log"),
                     argv=["--branch", branch, "--stage", "harmless", "--seed", str(s),
                           "--out", os.path.join(args.out, name), *common, *v.pop("extra")])
        return variants

    print(f"[compare] {args.seeds} seeds x (pi_0 + pi_1, then {len(alphas)} SPO + {len(beta2s)} sequential-DPO "
          f"round-2 runs), {args.jobs} jobs in parallel", flush=True)
    first, second = _run_study(chains, variants_of, args.jobs)

    # 3. records: measured and predicted (x, y) of every pi_2.
    records = []
    evaluations = {}
    for result in second:
        job, pi2 = result["job"], result["rows"][-1]
        seed = job["seed"]
        pi1 = first[seed]["rows"][1]
        beta1 = _recorded_beta(os.path.join(args.out, f"seed{seed}", "round1_helpful.safetensors"))
        beta2 = job["beta2"] if job["method"] == "dpo" else beta1 if args.beta is None else args.beta
        lam = job["alpha"] / beta1
        if seed not in evaluations:
            evaluations[seed] = _exact_evaluation(args, seed)
        predicted = evaluations[seed].predicted(pi1["style_logp"], ["helpful", "harmless"], [beta1, beta2],
                                                [[], [lam]], from_round=2)
        records.append({
            "seed": seed, "method": job["method"], "alpha": job["alpha"], "beta1": beta1, "beta2": beta2,
            "lambda": lam, "setting": job["setting"], "seconds": round(result["seconds"], 1),
            "measured": _xy(pi1, pi2), "predicted": _xy(predicted[0], predicted[1]),
            "sampled": _xy(pi1, pi2, SAMPLED_AXES) if SAMPLED_AXES[1] in pi2 else None,
            "pi1": _scalars(pi1), "pi2": _scalars(pi2), "pi0": _scalars(first[seed]["rows"][0]),
        })
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summary = summarise(records)
    with open(os.path.join(args.out, "verdict.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_frontier(records, os.path.join(args.out, "frontier.png"))
    print()
    print(format_report(records, summary))
    print(f"\nVERDICT ({args.seeds} seeds, measured): SPO is {summary['measured']['pooled']['verdict']}")
    print(f"[compare] {time.time() - t0:.0f} s; {args.out}/results.jsonl, frontier.png, verdict.json, logs/")
    return records, summary


def _recorded_beta(path):
    from spo_min.checkpoint import read_metadata

    return float(read_metadata(path)["beta"])


def _exact_evaluation(args, seed):
    """The same ExactEvaluation train.py built for this seed (same world, prompts, templates)."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import train
    from spo_min.checkpoint import read_config
    from spo_min.evaluate import ExactEvaluation
    from spo_min.tokenizer import get_tokenizer

    targs = train.parse_args(["--stage", "helpful", "--seed", str(seed), *common_train_args(args)])
    world = train.make_world(targs)
    block = read_config(os.path.join(args.out, f"seed{seed}", "base.safetensors")).block_size
    return ExactEvaluation(world, world.prompts["heldout"][: targs.eval_prompts], get_tokenizer(), block)


EXACT_AXES = ("exact/harmless_harmful", "exact/helpful_benign")
SAMPLED_AXES = ("harmlessness_harmful", "helpfulness_benign")


def _xy(before, after, axes=EXACT_AXES):
    """(harm removed, help kept) between two evaluation rows, read on `axes` (harmless, helpful)."""
    harmless, helpful = axes
    return {"x": after[harmless] - before[harmless], "y": after[helpful] - before[helpful]}


def _scalars(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


if __name__ == "__main__":
    main()
