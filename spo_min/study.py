"""What the studies share: running train.py jobs in parallel, and reading their results.

The studies (spo_min.compare for round 2, spo_min.compare3 for round 3, spo_min.convergence for
training length) never copy the training loop: each run is `train.main(argv)`, the same code a
user runs, in a worker process with one thread. A study is a set of jobs, each of which may
wait for another (round 2 branches from the round-1 checkpoint its parent job wrote), and
`run_jobs` starts each job as soon as its parent is done, so no core waits for the slowest seed.

Each seed is also its own world: train.py builds the built-in world from --seed, so seed s means
world s, SFT base s and batch order s. Methods compared within a seed share all three (a branch
with --seed s replays round n's batch order s * 1000 + n); that is what makes a comparison paired.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

# train.py is at the repository root, beside this package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --quick: a nano model and short rounds, for the test suite (plumbing and bookkeeping, not findings).
QUICK_TRAIN_ARGS = ["--model", "nano", "--sft-steps", "30", "--sft-lr", "1e-2", "--steps", "8", "--batch-size", "8",
                    "--eval-pairs", "24", "--lr", "2e-3", "--warmup", "2"]


def common_train_args(quick=False, samples=2, extra=""):
    """train.py arguments shared by every run of a study; train.py's own defaults otherwise.

    Evaluation settings never change training. --logits full: on a CPU, full logits with glibc's
    freed memory kept are faster per step than the chunked path, and the tiny model's logits fit.
    """
    common = ["--eval-samples", str(samples), "--no-grad-check", "--logits", "full", "--save-every", "100000"]
    return common + (QUICK_TRAIN_ARGS if quick else []) + extra.split()


def matched_beta1(beta1, beta2, lam):
    """E10: the round-1 beta whose sequential-DPO chain shares SPO(beta_1, beta_2, lambda)'s optimum,
    beta_1' = beta_1 beta_2 / (beta_2 + lambda beta_1), i.e. 1/beta_1' = 1/beta_1 + lambda/beta_2."""
    return beta1 * beta2 / (beta2 + lam * beta1)


def objective_weights(beta1, beta2, lam):
    """E10: the weights of R_1 and R_2 in J(pi) = E_pi[w_1 R_1 + w_2 R_2] - KL(pi || pi_0) that
    SPO(beta_1, beta_2, lambda) maximises; lam = 0 gives plain sequential DPO's own."""
    return {"helpful": 1 / beta1 + lam / beta2, "harmless": 1 / beta2}


def train_module():
    """train.py, imported as a module (the studies call train.main and train.parse_args)."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import train

    return train


def seed_count(args, default):
    """--seeds, or the study's default; --quick caps it at 2 (the test suite's plumbing check)."""
    seeds = default if args.seeds is None else args.seeds
    if seeds < 1:
        raise SystemExit(f"error: --seeds must be >= 1, got {seeds}")
    return min(seeds, 2) if args.quick else seeds


def fresh_out(path):
    """A study writes into a folder of its own: refuse one that already holds anything, since a
    study's runs must never mix with (or overwrite) another study's."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise SystemExit(f"error: --out {path} is not empty: delete it or give another --out "
                         "(a study never reuses or overwrites earlier runs)")
    os.makedirs(path, exist_ok=True)


def job(name, argv, out, after=None, **info):
    """One train.py run: `argv` with `--out OUT/name` appended, started once job `after` is done."""
    folder = os.path.join(out, name)
    return {"name": name, "argv": [*argv, "--out", folder], "folder": folder, "after": after,
            "log": os.path.join(out, "logs", f"{name}.log"), **info}


def _run_train(task):
    """One train.py run in this (worker) process, its output in a log file; returns its rows."""
    import torch

    torch.set_num_threads(1)  # one process per core: two single-threaded runs beat one two-threaded
    train = train_module()
    os.makedirs(os.path.dirname(task["log"]), exist_ok=True)
    t0 = time.time()
    with open(task["log"], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            rows = train.main(task["argv"])
        except Exception as err:  # noqa: BLE001 - reported with the job's log, then raised in the parent
            print(f"error: {type(err).__name__}: {err}")
            return {"name": task["name"], "error": f"{type(err).__name__}: {err}"}
    return {"name": task["name"], "rows": rows, "seconds": round(time.time() - t0, 1)}


def run_jobs(jobs, n_workers):
    """Run every job, each after its parent; returns {name: {"rows", "seconds"}} (see load_runs).

    A failed run stops the study with one line naming its log; nothing is dropped silently.
    """
    names = [j["name"] for j in jobs]
    if len(set(names)) != len(names) or any(j["after"] not in (None, *names) for j in jobs):
        raise ValueError("job names must be unique and every 'after' must name another job")
    results, waiting = {}, list(jobs)

    def ready():
        now = [j for j in waiting if j["after"] is None or j["after"] in results]
        for j in now:
            waiting.remove(j)
        return now

    def check(result):
        if "error" in result:
            log = next(j["log"] for j in jobs if j["name"] == result["name"])
            raise SystemExit(f"error: {result['error']} (in the run logged at {log})")
        results[result["name"]] = result

    if n_workers <= 1:
        while waiting:
            for j in ready():
                check(_run_train(j))
        return results
    # spawn, not fork: a forked child of a process that already started torch's threads can hang.
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_run_train, j) for j in ready()}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    check(future.result())
                pending |= {pool.submit(_run_train, j) for j in ready()}
        except SystemExit:  # a run failed: do not wait for the others
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def run_or_load(args, jobs, what):
    """Train every job into a fresh --out, or with --report-only read the finished runs back;
    either way the report is built from the files (load_runs). `what` describes the study."""
    done = {}
    if getattr(args, "resume", False):
        todo = unfinished_jobs(jobs)
        print(f"[{what}] resuming: {len(jobs) - len(todo)} runs already finished, {len(todo)} to train, "
              f"{args.jobs} in parallel; logs in {args.out}/logs", flush=True)
        done = run_jobs(todo, args.jobs) if todo else {}
    elif not args.report_only:
        fresh_out(args.out)
        print(f"[{what}] {len(jobs)} train.py runs, {args.jobs} in parallel; logs in {args.out}/logs", flush=True)
        done = run_jobs(jobs, args.jobs)
    return load_runs(jobs, done)


def unfinished_jobs(jobs):
    """--resume after a crash or a killed machine: the jobs whose run never wrote its metrics.jsonl.

    train.py appends one metrics.jsonl row per round, so a run is finished when its last row is its
    last --stage's; any other folder holds a half-finished run: it is deleted and trained again from
    the start (train.py refuses a non-empty --out). A job whose parent already finished starts at
    once. The same options must be given as the first time.
    """
    import shutil

    finished = {j["name"] for j in jobs if _finished(j)}
    todo = []
    for j in jobs:
        if j["name"] in finished:
            continue
        if os.path.isdir(j["folder"]):
            shutil.rmtree(j["folder"])
        todo.append({**j, "after": None if j["after"] in finished else j["after"]})
    return todo


def _finished(job):
    """Did this job's run write its last round's metrics row? (A cut last line: not finished.)"""
    path = os.path.join(job["folder"], "metrics.jsonl")
    last_stage = [a for i, a in enumerate(job["argv"]) if i and job["argv"][i - 1] == "--stage"][-1]
    try:
        rows = _read_jsonl(path)
    except (OSError, ValueError):
        return False
    return bool(rows) and rows[-1].get("stage") == last_stage


def wall_record(args, name, wall):
    """The wall time a study's JSON records: this training's, an earlier one's for --report-only,
    and for --resume only the resumed part's, marked as such (the first part's time was lost)."""
    if args.report_only:
        return {"wall_seconds": earlier_wall_seconds(args.out, name)}
    if getattr(args, "resume", False):
        return {"wall_seconds": round(wall), "wall_seconds_covers": "the resumed runs only"}
    return {"wall_seconds": round(wall)}


def earlier_wall_seconds(out, name):
    """The wall time an earlier (training) run of this study recorded in OUT/name, or None."""
    import json

    try:
        with open(os.path.join(out, name), encoding="utf-8") as f:
            return json.load(f).get("wall_seconds")
    except (OSError, ValueError):
        return None


def _read_jsonl(path):
    import json

    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_runs(jobs, seconds=None):
    """{name: {"rows", "seconds"}} read back from each job's metrics.jsonl: the evaluation rows as
    train.main returns them, each round's per-step record (steps.jsonl) attached as row["steps"].

    Reports are built from these files, not from memory, so `--report-only` can rebuild a study's
    report from its folder (after a crash in the report, or to read an old study again).
    """
    runs = {}
    for j in jobs:
        path = os.path.join(j["folder"], "metrics.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} is missing: the run {j['name']} did not finish (see {j['log']})")
        rows = _read_jsonl(path)
        steps = os.path.join(j["folder"], "steps.jsonl")
        for record in _read_jsonl(steps) if os.path.isfile(steps) else []:
            next(r for r in rows if r["round"] == record["round"])["steps"] = record
        # A whole run's time when this process ran it; else the last round's (training + evaluation).
        took = (seconds or {}).get(j["name"], {}).get("seconds", rows[-1].get("seconds"))
        runs[j["name"]] = {"rows": rows, "seconds": took}
    return runs


def exact_evaluation(seed, base_path, train_args):
    """The ExactEvaluation that train.py built for this seed (same world, prompts and templates)."""
    from spo_min.checkpoint import read_config
    from spo_min.evaluate import ExactEvaluation
    from spo_min.tokenizer import get_tokenizer

    from spo_min.stages import make_world

    targs = train_module().parse_args(["--stage", "helpful", "--seed", str(seed), *train_args])
    world = make_world(targs)
    return ExactEvaluation(world, world.prompts["heldout"][: targs.eval_prompts], get_tokenizer(),
                           read_config(base_path).block_size)


def scalars(row):
    """The numbers of an evaluation row (no lists, strings or flags)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
