"""The SPO chain on disk: pi_0 -> pi_1 -> ... -> pi_n, one safetensors file per round.

Round n's margin (E6) needs every earlier policy and every earlier round's beta and lambdas, so
each round's checkpoint records them in its metadata, together with its parent file and that
file's sha256. The whole chain can then be rebuilt and checked from the files alone.

A round in progress also writes a resumable state (policy weights, AdamW moments, step) every
--save-every steps, atomically, so `--resume` after a kill -9 continues bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spo_min.checkpoint import CheckpointError, atomic_write, load_model, read_metadata, write_safetensors
from spo_min import data
from spo_min.optim import AdamW
from spo_min.runs import check_finite, check_metrics, check_outputs, compare_settings, round_settings


class ChainError(CheckpointError):
    pass


def round_path(out_dir, n, stage):
    return os.path.join(out_dir, f"round{n}_{stage}.safetensors")


def state_path(round_checkpoint):
    """The resumable mid-round state that sits beside a round's checkpoint until it is finished."""
    return round_checkpoint.replace(".safetensors", ".state.safetensors")


def run_outputs(args):
    """{path: what it is} for every file this run may write in --out (runs.check_outputs)."""
    outputs = {}
    if not (args.init or args.branch):
        outputs[os.path.join(args.out, "base.safetensors")] = "the SFT base"
    for n, stage in enumerate(args.stage, start=first_round(args)):
        path = round_path(args.out, n, stage)
        outputs[path] = f"the round {n} checkpoint"
        outputs[state_path(path)] = f"the unfinished round {n} state"
    outputs[os.path.join(args.out, "metrics.jsonl")] = "the metrics file"
    outputs[os.path.join(args.out, "steps.jsonl")] = "the per-step record"
    outputs[os.path.join(args.out, "scores.png")] = "the plot"
    return outputs


def run_inputs(args, branch_chain, sources):
    """[(flag, path)] for every file this run reads: --init, the --branch chain, the --data files."""
    inputs = [("--init", args.init)] if args.init else []
    inputs += [("--branch", link["path"]) for link in branch_chain or []]
    inputs += [("--data", source[0]) for source in sources.values() if source != "world"]
    return inputs


def check_run_files(args, branch_chain, sources):
    """runs.check_outputs for this run; with --resume, also that metrics.jsonl and steps.jsonl can be appended to."""
    base = os.path.join(args.out, "base.safetensors")  # reused when its settings match (check_base)
    check_outputs(run_outputs(args), run_inputs(args, branch_chain, sources), args.resume, bool(args.branch),
                  reusable={base})
    if args.resume:
        for name in ("metrics.jsonl", "steps.jsonl"):  # both are appended to
            check_metrics(os.path.join(args.out, name))


def parent_links(child, parent):
    """How a round's checkpoint names its parent (parent_sha256, beside it, says which file it is).

    "parent": the path relative to the checkpoint's own folder, so a folder moved or copied with
    its chain still verifies. A parent outside that folder (an --init, a --branch source) may not
    move with it, so it is also named by "parent_abspath". Within one folder no absolute path is
    recorded: the same run gives the same bytes wherever --out is.
    """
    relative = os.path.relpath(os.path.abspath(parent), os.path.dirname(os.path.abspath(child)))
    if os.path.dirname(relative):  # outside the child's folder
        return {"parent": relative, "parent_abspath": os.path.abspath(parent)}
    return {"parent": relative}


def parent_path(child, recorded):
    """The parent file a checkpoint names (relative to its folder; older files recorded it absolute)."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(child)), recorded))


def parent_candidates(child, meta):
    """Where checkpoint `child`'s parent may be: its relative link first, then its absolute one."""
    candidates = [parent_path(child, meta["parent"])] if meta.get("parent") else []
    return candidates + ([meta["parent_abspath"]] if meta.get("parent_abspath") else [])


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def round_lambdas(args, round_chain):
    """lambda^(n) = [lambda_1^(n), ..., lambda_{n-1}^(n)] for the round that extends `round_chain`
    (pi_0..pi_{n-1}, each with its recorded metadata): E2's multipliers of the earlier rewards.

    Round 1 has none ([]). Sequential DPO (--loss dpo) records n - 1 zeros, so a later SPO round
    can follow a DPO chain: its E4 inversion needs every earlier round's lambdas.
    --alpha: lambda_i^(n) = alpha / beta_i with beta_i the beta that round i RECORDED (rounds may
    differ, e.g. after --branch); at n = 2 the margin is then alpha * Delta log(pi_1/pi_0), E5.
    --margin telescoped: the lambdas that margin amounts to in E6's form (below), so that a later
    round's E4 inversion stays right.
    """
    n = len(round_chain)
    if n == 1:
        return []
    if args.loss == "dpo":
        return [0.0] * (n - 1)
    if args.lambdas:
        return [float(x) for x in args.lambdas[n - max(2, first_round(args))].split(",")]
    scale = [args.alpha / float(meta["beta"]) for meta in round_chain[1:]]  # alpha / beta_i
    if args.margin == "telescoped":
        # The telescoped margin alpha Delta log(pi_{n-1}/pi_0) = sum_k (alpha/beta_k) Delta r_k is NOT
        # E6 with lambda_i = alpha/beta_i from round 3 on. Written in E6's form sum_i lambda_i Delta R_i
        # (Delta r_k = Delta R_k + sum_{i<k} lambda_i^(k) Delta R_i, E4), its lambdas are
        #     lambda_i = alpha/beta_i + sum_{i<k<n} lambda_i^(k) alpha/beta_k.
        # Recording these keeps E4's inversion right in any later round. At n = 2 they are alpha/beta_1.
        return [scale[i] + sum(float(round_chain[k]["lambdas"][i]) * scale[k - 1] for k in range(i + 2, n))
                for i in range(n - 1)]
    return scale


def first_round(args):
    """The number of the first round this run trains (1, or k + 1 after --branch from round k)."""
    return getattr(args, "first_round", 1)


DEFAULT_ALPHA = 0.5  # with beta = 1: lambda = 0.5, the earlier reward counts half as much as the new one


def resolve_hyperparameters(args):
    """Check the SPO hyperparameters of a run and fill in the default alpha."""
    if not (args.beta > 0 and math.isfinite(args.beta)):
        raise ChainError(f"--beta must be > 0, got {args.beta}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ChainError(f"--lr must be a positive number, got {args.lr}")
    if args.alpha is not None and args.lambdas:
        raise ChainError("give either --alpha or --lambdas, not both")
    if args.alpha is None and not args.lambdas:
        args.alpha = DEFAULT_ALPHA
    if args.alpha is not None and not (args.alpha >= 0 and math.isfinite(args.alpha)):
        raise ChainError(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if args.lambdas:
        first = first_round(args)
        rounds = [n for n in range(first, first + len(args.stage)) if n >= 2]  # the rounds that have lambdas
        if len(args.lambdas) != len(rounds):
            raise ChainError(f"--lambdas is given {len(args.lambdas)} times; rounds {first}..{first + len(args.stage) - 1} "
                             f"need {len(rounds)} (one per round from round 2 on)")
        for n, text in zip(rounds, args.lambdas):
            try:
                values = [float(x) for x in text.split(",")]
            except ValueError:
                raise ChainError(f"--lambdas '{text}' (round {n}): expected comma-separated numbers") from None
            if len(values) != n - 1 or not all(v >= 0 and math.isfinite(v) for v in values):
                raise ChainError(f"--lambdas '{text}': round {n} needs {n - 1} finite non-negative lambdas "
                                 f"(lambda_1^({n}) .. lambda_{n - 1}^({n}))")


def rebuild_chain(path):
    """The chain pi_0..pi_k that ends at checkpoint `path`, from the files' own metadata.

    Each round records where its parent is (parent_links) and its sha256. A link holds if one of
    those places has a file with that sha256, so a chain whose files were replaced or edited
    since is refused rather than silently mixed.
    """
    if not os.path.isfile(path):
        raise ChainError(f"--branch {path}: no such file (give a round checkpoint, e.g. out/round1_helpful.safetensors)")
    links = [{"path": os.path.abspath(path), **read_metadata(path)}]
    while links[0].get("kind") == "round":
        child, sha = links[0]["path"], links[0].get("parent_sha256")
        found = [p for p in parent_candidates(child, links[0]) if os.path.isfile(p)]
        if not found:
            named = " or ".join(repr(links[0][k]) for k in ("parent", "parent_abspath") if links[0].get(k))
            raise ChainError(f"{child}: its parent checkpoint {named or '(none recorded)'} is missing (a relative "
                             "path is from this file's folder); restore it to branch from here")
        parent = next((p for p in found if file_sha256(p) == sha), None)
        if parent is None:
            raise ChainError(f"{child}: its parent {found[0]} has changed since (sha256 differs); "
                             "restore the original file to branch from here")
        links.insert(0, {"path": parent, **read_metadata(parent)})
    if [m.get("round", 0) for m in links] != list(range(len(links))):
        raise ChainError(f"--branch {path}: its chain is not rounds 0..{len(links) - 1} in order")
    return links


def check_chain_complete(out_dir, stages):
    """With --resume, a round's files need every earlier round's checkpoint (its margin uses them)."""
    for n in range(len(stages), 0, -1):
        done = os.path.exists(round_path(out_dir, n, stages[n - 1]))
        started = os.path.exists(round_path(out_dir, n, stages[n - 1]).replace(".safetensors", ".state.safetensors"))
        if done or started:
            for k in range(1, n):
                earlier = round_path(out_dir, k, stages[k - 1])
                if not os.path.exists(earlier):
                    raise ChainError(f"cannot resume round {n}: it needs the earlier checkpoint {earlier}, "
                                     "which is missing. Restore it, or use another --out to start over")
            return


def check_resumable(path, expected):
    """A finished round may be reused only if it was trained from this chain with these settings.

    `expected` is runs.round_settings(...) of this run; every key must match the recorded one.
    """
    compare_settings(f"--resume: {path}", read_metadata(path), expected,
                     "use another --out, or drop --resume to retrain every round")


def check_resume_plan(args, train_pairs, base_path):
    """With --resume, check everything the run will reuse before it writes anything.

    Walks the rounds in order: each finished round must match this run's settings (and becomes
    the next round's parent); the first unfinished round's state, if any, must match too and be
    complete and finite. train_pairs: stage -> the round's tokenized training pairs.
    """
    parent = base_path
    links = [read_metadata(base_path)]  # the chain so far: round n's lambdas need its earlier betas
    for n, stage in enumerate(args.stage, start=1):
        path = round_path(args.out, n, stage)
        settings = round_settings(args, n, stage, round_lambdas(args, links), data.fingerprint(train_pairs[stage]),
                                  file_sha256(parent))
        if os.path.exists(path):
            check_resumable(path, settings)
            parent = path
            links.append(read_metadata(path))
            continue
        state = path.replace(".safetensors", ".state.safetensors")
        if os.path.exists(state):  # a trial load into a scratch copy of the parent
            model, _ = load_model(parent)
            load_train_state(state, model, AdamW(model.parameters(), lr=0.0), settings)
        return


def check_unchanged(*entries):
    """Each chain member is still the file the chain saw (same sha256).

    A frozen policy is re-read several times in a run (reference, margin, evaluation); if the file
    changed meanwhile (another process, a copy), the run would silently mix two models.
    """
    for entry in entries:
        found = file_sha256(entry["path"])
        if found != entry["sha256"]:
            raise ChainError(f"{entry['path']} changed during this run (sha256 {found[:12]}.., the chain "
                             f"recorded {entry['sha256'][:12]}..): another process wrote to --out; "
                             "rerun with one run per --out")


def load_verified(entry, device="cpu"):
    """Load a chain member (pi_0 .. pi_{n-1}) after checking it is unchanged."""
    check_unchanged(entry)
    return load_model(entry["path"], device=device)


def chain_entry(path):
    """A chain member: its path, its metadata and the sha256 later loads are checked against."""
    return {"path": path, **read_metadata(path), "sha256": file_sha256(path)}


def save_train_state(path, model, optimizer, step, meta):
    """Resumable mid-round state: weights, AdamW moments and the next step, written atomically."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ChainError(f"not saving {path}: the weights are no longer finite (the last good state is kept)")
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): k for k, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().clone().reshape(-1)
    header = {"spo_min.train_state": json.dumps({"step": step, **meta})}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, header), nbytes)


ADAMW_SLOTS = ("step", "exp_avg", "exp_avg_sq")


def load_train_state(path, model, optimizer, expected):
    """Restore a state written by save_train_state; returns the step to continue from.

    Refuses a state made with other settings (`expected`: runs.round_settings of this run), one
    missing any weight or AdamW slot (a resume would not be bit-exact), and non-finite weights.
    """
    restart = f"delete {path} to restart the round"
    try:
        with safe_open(path, framework="pt") as f:
            state_meta = json.loads(f.metadata()["spo_min.train_state"])
        tensors = load_file(path)
        step = int(state_meta["step"])
    except Exception as err:
        raise ChainError(f"{path}: not a readable round state ({err}); {restart}") from None
    compare_settings(f"--resume: {path}", state_meta, expected, f"use another --out, or {restart}")
    if not 0 < step < expected["steps"]:
        raise ChainError(f"{path}: step {step} is outside this round's 1..{expected['steps'] - 1}; {restart}")
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    named = dict(model.named_parameters())
    wanted = set(model.state_dict()) | {f"optim.{name}.{slot}" for name in named for slot in ADAMW_SLOTS}
    have = set(weights) | {k for k in tensors if k.startswith("optim.")}
    if wanted != have:
        odd = sorted(wanted ^ have)
        raise ChainError(f"{path}: incomplete round state ({len(odd)} weights or AdamW slots missing or "
                         f"unexpected, e.g. '{odd[0]}'); {restart}")
    model.load_state_dict(weights)
    check_finite(model, path, restart)
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, _, slot = key[len("optim."):].rpartition(".")
            param = named[name]
            optimizer.state[param][slot] = value.reshape(()) if slot == "step" else value.reshape(param.shape)
    return step
