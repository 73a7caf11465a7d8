"""A run you can trust (spo_min/runs.py): what --out may reuse, what is checked before training.

Every bad input must give one line naming the input and the fix, and leave --out as it was.
Runs are in-process calls to train.main (they raise what train.py prints as "error: ..."), from
a random "nano" base given as --init, with 2 steps: each takes a few seconds. Which flag sets
which recorded setting is checked without training at all. Three subprocess tests check what the
user actually sees: exit code 2, a single line on stderr, and no lock left behind.
"""

import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train
from spo_min import chain, data, losses, runs, stages
from spo_min.checkpoint import load_model, read_metadata, save_model
from spo_min.ddp import Distributed
from spo_min.logps import batch_pair_loss
from spo_min.model import GPT, GPTConfig
from spo_min.tokenizer import get_tokenizer
from spo_min.world import build_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--no-grad-check", "--eval-prompts", "1", "--eval-samples", "1", "--eval-pairs", "4",
        "--batch-size", "4", "--steps", "2", "--save-every", "1"]


pytestmark = pytest.mark.usefixtures("torch_backend")  # train.py's CPU path (tests/conftest.py)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random nano policy, used as --init (no SFT needed)."""
    path = tmp_path_factory.mktemp("base") / "nano.safetensors"
    save_model(GPT(GPTConfig.preset("nano"), seed=0), path, metadata={"kind": "init"})
    return str(path)


def argv(base, out, *extra, stages=("helpful",)):
    return ["--init", base, "--out", str(out), *[a for s in stages for a in ("--stage", s)], *FAST, *extra]


def snapshot(folder):
    """Every file of a folder and its bytes: 'nothing in --out changed'.

    Leaves out a lock held by this process: train.py releases it at exit (atexit), and tests call
    train.main in-process, where the next call takes over a lock of its own pid.
    """
    if not os.path.exists(folder):
        return None
    files = {name: open(os.path.join(folder, name), "rb").read() if os.path.isfile(os.path.join(folder, name))
             else "not a file" for name in sorted(os.listdir(folder))}
    if ".lock" in files and json.loads(files[".lock"])["pid"] == os.getpid():
        del files[".lock"]
    return files


def refused(args, needle, out):
    """train.main(args) stops with one line containing needle, and --out is unchanged."""
    before = snapshot(out)
    with pytest.raises(train.USER_ERRORS) as err:
        train.main(args)
    message = str(err.value)
    assert needle in message, message
    assert "\n" not in message
    assert snapshot(out) == before
    return message


class Stop(Exception):
    """Raised by a patched save to stop a run mid-round, like kill -9 but in-process."""


@pytest.fixture(scope="module")
def two_rounds(base, tmp_path_factory):
    """A finished two-round run."""
    out = tmp_path_factory.mktemp("done")
    train.main(argv(base, out, stages=("helpful", "harmless")))
    return out


@pytest.fixture(scope="module")
def mid_round(base, tmp_path_factory):
    """A round-1 state saved at step 2 of 3, the run stopped right after."""
    out = tmp_path_factory.mktemp("mid")
    save = chain.save_train_state

    def save_then_stop(*a, **k):
        save(*a, **k)
        raise Stop

    patch = pytest.MonkeyPatch()
    patch.setattr(chain, "save_train_state", save_then_stop)
    try:
        with pytest.raises(Stop):
            train.main(argv(base, out, "--steps", "3", "--save-every", "2"))
    finally:
        patch.undo()
    assert (out / "round1_helpful.state.safetensors").exists()
    return out


def copy_of(folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(folder, out)
    (out / ".lock").unlink(missing_ok=True)  # left by the in-process stop: same pid, taken over anyway
    return out


def write_pairs(path, n_prompts, pairs_per_prompt=1):
    rows = [{"prompt": f"Question {i}?", "chosen": f" Answer {i} {j}.", "rejected": f" No {i} {j}."}
            for i in range(n_prompts) for j in range(pairs_per_prompt)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- High 1-2: reuse

def test_fresh_run_records_every_setting_and_tags_metrics(two_rounds):
    meta = read_metadata(two_rounds / "round2_harmless.safetensors")
    expected = {"stage": "harmless", "loss": "spo", "beta": train.DEFAULT_BETA,
                "lambdas": [chain.DEFAULT_ALPHA / train.DEFAULT_BETA], "margin_mode": "exact",
                "alpha": None, "lr": train.DEFAULT_LR, "warmup": 1, "steps": 2, "batch_size": 4, "seed": 0, "average_logps": False,
                "dtype": "float32", "parent_sha256": chain.file_sha256(two_rounds / "round1_helpful.safetensors")}
    assert {k: meta[k] for k in expected} == expected and len(meta["data_fingerprint"]) == 16
    # One row per round, every row carries this run's id.
    rows = [json.loads(line) for line in (two_rounds / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert len({r["run_id"] for r in rows}) == 1 and rows[0]["run_id"]
    assert not (two_rounds / ".lock").exists()  # released at the end of the run


@pytest.mark.parametrize("flags, key, have, want", [
    (["--beta", "0.7"], "beta", "1.0", "0.7"),
    (["--steps", "2"], "steps", "3", "2"),  # fewer steps than the state's: its weights went further
])
def test_resume_refuses_a_state_made_with_other_settings(mid_round, base, tmp_path, flags, key, have, want):
    out = copy_of(mid_round, tmp_path)
    args = argv(base, out, "--steps", "3", "--save-every", "2", "--resume") + flags  # the last --steps counts
    message = refused(args, f"was made with {key}={have}, this run has {key}={want}", out)
    assert "round1_helpful.state.safetensors" in message and "use another --out" in message


@pytest.mark.parametrize("flags, changed, have, want", [
    (["--beta", "0.7"], ["beta", "lambdas"], "1.0", "0.7"),  # lambda = alpha / beta
    (["--loss", "dpo"], ["loss", "lambdas", "margin_mode"], "'spo'", "'dpo'"),  # no margin at all
    (["--alpha", "2"], ["lambdas"], "[0.5]", "[2.0]"),
    (["--lambdas", "0.3"], ["lambdas"], "[0.5]", "[0.3]"),
    (["--margin", "telescoped"], ["margin_mode", "alpha"], "'exact'", "'telescoped'"),
    (["--lr", "0.001"], ["lr"], "0.0002", "0.001"),
    (["--warmup", "3"], ["warmup"], "10", "3"),
    (["--steps", "7"], ["steps", "warmup"], "100", "7"),  # the default warm-up (10) ends before a 7-step round
    (["--batch-size", "2"], ["batch_size"], "16", "2"),
    (["--seed", "5"], ["seed"], "0", "5"),
    (["--average-logps"], ["average_logps"], "False", "True"),
    (["--dtype", "bfloat16"], ["dtype"], "'float32'", "'bfloat16'"),
])
def test_every_weight_setting_is_recorded_and_compared(flags, changed, have, want):
    """Round 2 of a two-stage run: each flag that changes the weights changes exactly one setting."""
    def settings(extra):
        args = train.parse_args(["--stage", "helpful", "--stage", "harmless", *extra])
        chain.resolve_hyperparameters(args)
        round1 = {"beta": args.beta}  # the chain pi_0, pi_1 that round 2 extends, as recorded
        return runs.round_settings(args, 2, "harmless", chain.round_lambdas(args, [{}, round1]), "data", "parent")

    recorded, expected = settings([]), settings(flags)
    assert [k for k in expected if expected[k] != recorded[k]] == changed
    key = changed[0]  # the message names the first setting that differs
    with pytest.raises(runs.RunError) as err:
        runs.compare_settings("x.safetensors", recorded, expected, "use another --out")
    assert str(err.value).startswith(f"x.safetensors was made with {key}={have}, this run has {key}={want} (set by ")
    # What cannot change the weights is not compared: the reference path and the save interval.
    assert settings(["--ref", "live", "--save-every", "3"]) == recorded


def test_resume_refuses_a_state_of_other_data(mid_round, base, tmp_path):
    out = copy_of(mid_round, tmp_path)
    other = write_pairs(tmp_path / "other.jsonl", 40)
    refused(argv(base, out, "--steps", "3", "--save-every", "2", "--resume", "--data", f"helpful={other}"),
            "was made with data_fingerprint=", out)


@pytest.mark.parametrize("flags, needle", [
    (["--steps", "3"], "round1_helpful.safetensors was made with steps=2, this run has steps=3"),
    (["--alpha", "2"], "round2_harmless.safetensors was made with lambdas=[0.5], this run has lambdas=[2.0]"),
])
def test_resume_refuses_a_finished_round_made_with_other_settings(two_rounds, base, tmp_path, flags, needle):
    out = copy_of(two_rounds, tmp_path)
    refused(argv(base, out, "--resume", *flags, stages=("helpful", "harmless")), needle, out)


def test_resume_refuses_a_finished_round_of_other_data(two_rounds, base, tmp_path):
    out = copy_of(two_rounds, tmp_path)
    other = write_pairs(tmp_path / "other.jsonl", 40)
    refused(argv(base, out, "--resume", "--data", f"helpful={other}", stages=("helpful", "harmless")),
            "round1_helpful.safetensors was made with data_fingerprint=", out)


@pytest.mark.parametrize("damage, needle", [
    ("drop_slot", "incomplete round state"),
    ("nan", "has non-finite weights"),
])
def test_resume_refuses_an_incomplete_or_non_finite_state(mid_round, base, tmp_path, damage, needle):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = copy_of(mid_round, tmp_path)
    state = out / "round1_helpful.state.safetensors"
    with safe_open(state, framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if damage == "drop_slot":
        del tensors[next(k for k in tensors if k.endswith(".exp_avg_sq"))]
    else:
        tensors["model.transformer.wte.weight"][0, 0] = math.nan
    save_file(tensors, state, metadata=header)
    message = refused(argv(base, out, "--steps", "3", "--save-every", "2", "--resume"), needle, out)
    assert "delete" in message and "restart the round" in message


# ----------------------------------------------------------------------------- High 2-3: what a run writes

def everything(folder):
    """Every file under folder (recursively) and its bytes: 'no other file changed'."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files if f != ".lock"}


@pytest.mark.parametrize("flags, needle", [
    # High 3: README's own example with the default --out replaced round 2 and its metrics rows.
    (["--branch", "{out}/round1_helpful.safetensors", "--stage", "harmless", "--alpha", "0.1"],
     "{out}/round2_harmless.safetensors is the round 2 checkpoint of an earlier run; this run would overwrite "
     "it: use another --out, or delete the file (a --branch run does not --resume)"),
    # High 3: a fresh run with another --beta overwrote round 1 and orphaned round 2.
    (["--init", "{base}", "--stage", "helpful", "--beta", "0.5"],
     "{out}/round1_helpful.safetensors is the round 1 checkpoint of an earlier run; this run would overwrite it: "
     "continue that run with --resume, use another --out, or delete the file"),
    (["--branch", "{out}/round1_helpful.safetensors", "--stage", "concise"],
     "{out}/metrics.jsonl is the metrics file of an earlier run; this run would overwrite it: use another --out"),
    # High 2: --init is the file the run is about to write.
    (["--init", "{out}/round1_helpful.safetensors", "--stage", "helpful", "--resume"],
     "--init {out}/round1_helpful.safetensors is the round 1 checkpoint this run writes: a run never reads what "
     "it writes; copy the file elsewhere first, or use another --out"),
    (["--init", "{base}", "--stage", "helpful", "--data", "helpful={out}/metrics.jsonl", "--resume"],
     "--data {out}/metrics.jsonl is the metrics file this run writes: a run never reads what it writes"),
], ids=["branch-into-own-folder", "fresh-run-over-finished", "branch-metrics", "init-is-output", "data-is-output"])
def test_a_run_never_overwrites_what_it_did_not_create(two_rounds, base, tmp_path, flags, needle):
    out = copy_of(two_rounds, tmp_path)
    before = everything(tmp_path)
    fill = {"out": out, "base": base}
    args = [f.format(**fill) for f in flags] + ["--out", str(out), *FAST]
    refused(args, needle.format(**fill), out)
    assert everything(tmp_path) == before


def test_an_unfinished_round_is_continued_only_with_resume(mid_round, base, tmp_path):
    out = copy_of(mid_round, tmp_path)
    refused(argv(base, out, "--steps", "3", "--save-every", "2"),
            f"{out}/round1_helpful.state.safetensors is the unfinished round 1 state of an earlier run; this run "
            "would overwrite it: continue that run with --resume", out)


@pytest.mark.parametrize("name", ["metrics.jsonl", "scores.png"])
def test_an_output_that_is_a_folder_is_refused_before_training(base, tmp_path, name):
    """Medium 5: scores.png or metrics.jsonl being a folder was a traceback after training."""
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    refused(argv(base, out), f"{out / name} is a folder; spo-min writes its outputs only as plain files: remove it "
                             "or use another --out", out)


def test_resume_drops_a_cut_last_metrics_line_and_says_so(two_rounds, base, tmp_path, capsys):
    """Medium 8: --resume appended onto a cut last line, gluing two rows into one invalid line."""
    out = copy_of(two_rounds, tmp_path)
    whole = (out / "metrics.jsonl").read_bytes()
    cut = whole[: len(whole) - 40]  # the last row, cut short by a kill during its write
    (out / "metrics.jsonl").write_bytes(cut)
    train.main(argv(base, out, "--resume", "--eval-samples", "0", stages=("helpful", "harmless")))
    dropped = len(cut) - cut.rfind(b"\n") - 1
    assert (f"[metrics] {out / 'metrics.jsonl'}: dropped its last line, cut short by an interrupted write "
            f"({dropped} bytes)") in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_bytes().splitlines()
    assert lines[:2] == whole.splitlines()[:2] and all(json.loads(line) for line in lines)


def test_resume_refuses_to_append_to_a_file_that_is_not_metrics(two_rounds, base, tmp_path):
    out = copy_of(two_rounds, tmp_path)
    (out / "metrics.jsonl").write_text('{"round": 0}\nnot a row\n')
    refused(argv(base, out, "--resume", stages=("helpful", "harmless")),
            f"{out / 'metrics.jsonl'}:2: not a metrics row (one JSON object per line); this file was not written by "
            "spo-min: move it away, or use another --out", out)


# ----------------------------------------------------------------------------- High 3: one run per --out

def test_a_live_lock_stops_a_second_run(base, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": other.pid, "host": runs.socket.gethostname(),
                                               "run_id": "x", "started": "now"}))
        refused(argv(base, out), f"--out is in use by another run (pid {other.pid}", out)
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_and_orphan_temp_files_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: its run was killed
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": runs.socket.gethostname()}))
    (tmp_path / ".base.safetensors.0123abcd.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    lock = runs.RunLock(str(tmp_path), "run-b").acquire()
    assert json.loads((tmp_path / ".lock").read_text())["run_id"] == "run-b"
    assert sorted(os.listdir(tmp_path)) == [".lock", "notes.tmp"]
    lock.release()
    assert os.listdir(tmp_path) == ["notes.tmp"]


def test_a_lock_whose_pid_was_reused_is_taken_over(tmp_path):
    """Low 15: a stale lock whose pid now belongs to another live process blocked forever."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = runs._process_start(other.pid)
        lock = {"pid": other.pid, "host": runs.socket.gethostname(), "run_id": "x", "started": "then"}
        (tmp_path / ".lock").write_text(json.dumps({**lock, "pid_start": started}))  # that process's own lock
        with pytest.raises(runs.RunError, match=f"--out is in use by another run \\(pid {other.pid}"):
            runs.RunLock(str(tmp_path), "run-b").acquire()
        (tmp_path / ".lock").write_text(json.dumps({**lock, "pid_start": started - 1}))  # a run before it had the pid
        runs.RunLock(str(tmp_path), "run-b").acquire().release()
        assert os.listdir(tmp_path) == []
    finally:
        other.kill()
        other.wait()


def test_metrics_and_lock_honour_the_umask(tmp_path):
    """Low 17: checkpoints were 0600 whatever the umask (tests/test_checkpoint.py); the lock and
    metrics.jsonl were 0644 whatever it was."""
    old = os.umask(0o002)  # a shared group folder: group members may write too
    try:
        runs.append_metrics(tmp_path / "metrics.jsonl", {"round": 0}, "r")
        lock = runs.RunLock(str(tmp_path), "r").acquire()
        modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("metrics.jsonl", ".lock")}
        lock.release()
    finally:
        os.umask(old)
    assert modes == {"metrics.jsonl": 0o664, ".lock": 0o664}


def test_frozen_policy_is_checked_against_the_chain(base, tmp_path):
    path = tmp_path / "pi0.safetensors"
    shutil.copy(base, path)
    entry = chain.chain_entry(str(path))
    chain.load_verified(entry)  # unchanged: loads
    save_model(GPT(GPTConfig.preset("nano"), seed=1), path, metadata={"kind": "init"})  # another run's file
    with pytest.raises(chain.ChainError, match=r"pi0.safetensors changed during this run \(sha256"):
        chain.load_verified(entry)


# ----------------------------------------------------------------------------- High 4: the SFT base

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A folder holding only an SFT base (1 step) as train.py saves it."""
    out = tmp_path_factory.mktemp("sft")
    args = train.parse_args(["--model", "nano", "--sft-steps", "1", "--stage", "helpful", "--out", str(out)])
    train.bootstrap_base(args, get_tokenizer(), Distributed(), torch.device("cpu"), "world", {})
    return out


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "3"], "was made with seed=0, this run has seed=3"),
    (["--sft-lr", "0.001"], "was made with sft_lr=0.003, this run has sft_lr=0.001"),
])
def test_base_is_reused_only_with_the_same_settings(sft_run, tmp_path, flags, needle):
    out = copy_of(sft_run, tmp_path)
    args = ["--model", "nano", "--sft-steps", "1", "--stage", "helpful", "--out", str(out), *FAST]
    message = refused(args + flags, needle, out)
    assert "base.safetensors" in message and "delete" in message


def test_base_settings_name_the_flag():
    args = train.parse_args(["--model", "nano", "--stage", "helpful"])
    recorded = runs.base_settings(args, GPTConfig.preset("nano"), "data", "world")
    for flags, needle in [(["--sft-steps", "2"], "sft_steps=400, this run has sft_steps=2 (set by --sft-steps)"),
                          (["--model", "tiny"], "config=nano ({"), (["--seed", "1"], "seed=0, this run has seed=1")]:
        args = train.parse_args(["--model", "nano", "--stage", "helpful", *flags])
        expected = runs.base_settings(args, GPTConfig.preset(args.model), "data", "world")
        with pytest.raises(runs.RunError, match=re.escape(needle)):
            runs.compare_settings("base.safetensors", recorded, expected, "use another --out")


def test_a_moved_run_folder_still_verifies(sft_run, tmp_path):
    """Low 12: parents were recorded as absolute paths, so a moved folder could not be branched from."""
    out = copy_of(sft_run, tmp_path)
    train.main(["--model", "nano", "--sft-steps", "1", "--stage", "helpful", "--out", str(out), *FAST,
                "--eval-samples", "0"])
    meta = read_metadata(out / "round1_helpful.safetensors")
    assert meta["parent"] == "base.safetensors" and "parent_abspath" not in meta  # same bytes wherever --out is
    moved = tmp_path / "elsewhere" / "deeper"
    moved.parent.mkdir()
    shutil.move(out, moved)
    links = chain.rebuild_chain(str(moved / "round1_helpful.safetensors"))
    assert [link["path"] for link in links] == [str(moved / "base.safetensors"), str(moved / "round1_helpful.safetensors")]


def test_a_parent_outside_the_folder_is_also_named_absolutely(two_rounds, base, tmp_path):
    """An --init outside --out may not move with it: a copy at another depth still finds it."""
    meta = read_metadata(two_rounds / "round1_helpful.safetensors")
    assert meta["parent"] == os.path.relpath(base, two_rounds) and meta["parent_abspath"] == base
    copy = tmp_path / "a" / "b"
    shutil.copytree(two_rounds, copy)  # the relative link now points nowhere
    links = chain.rebuild_chain(str(copy / "round2_harmless.safetensors"))
    assert [link["path"] for link in links] == [base, *(str(copy / f"round{n}_{s}.safetensors")
                                                       for n, s in [(1, "helpful"), (2, "harmless")])]


def test_non_finite_base_is_never_saved_nor_reused(sft_run, tmp_path):
    fresh = tmp_path / "nan"
    fresh.mkdir()
    args = ["--model", "nano", "--stage", "helpful", *FAST]
    refused(args + ["--out", str(fresh), "--sft-steps", "2", "--sft-lr", "1e30"],
            "the SFT base after training has non-finite weights", fresh)
    assert not (fresh / "base.safetensors").exists()
    # A base that went bad on disk is refused too, not reused.
    out = copy_of(sft_run, tmp_path)
    model, meta = load_model(out / "base.safetensors")
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = math.inf
    save_model(model, out / "base.safetensors", metadata=meta)
    refused(args + ["--out", str(out), "--sft-steps", "1"], "base.safetensors has non-finite weights", out)


# ----------------------------------------------------------------------------- bad input before any work

NOT_THERE = "/nonexistent/spo-min/out"


@pytest.mark.parametrize("flags, needle", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (["--eval-prompts", "0"], "--eval-prompts must be >= 1, got 0"),
    (["--eval-samples", "-1"], "--eval-samples must be >= 0, got -1"),  # 0: exact evaluation only
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--world-temperature", "0"], "--world-temperature must be a positive number, got 0.0"),
    (["--world-cautious", "nan"], "--world-cautious must be a finite number >= 0, got nan"),
    (["--branch", "/nonexistent/round1.safetensors", "--resume"], "--resume does not apply to --branch"),
    (["--branch", "/nonexistent/round1.safetensors"], "--branch /nonexistent/round1.safetensors: no such file"),
    (["--eval-pairs", "0"], "--eval-pairs must be >= 1, got 0"),
    # High 4: every flag that names a stage names a known one, the closest suggested.
    (["--stage", "harmles"], "unknown stage 'harmles' (did you mean 'harmless'?): known dimensions are ['concise', "
                             "'harmless', 'helpful'] (the built-in world's), or give its pairs as --data harmles=PATH"),
    # Medium 7: absurd counts, refused before anything is built (the schedule alone was 200 GB).
    (["--steps", "1000000000"], "--steps 1000000000 is more than spo-min's limit of 1,000,000: use fewer"),
    (["--sft-steps", "2000000"], "--sft-steps 2000000 is more than spo-min's limit of 1,000,000: use fewer"),
    (["--eval-samples", "100000"], "--eval-samples 100000 is more than spo-min's limit of 10,000: use fewer"),
    # Low 14: a warm-up as long as the round never reaches the peak learning rate, let alone decays.
    (["--warmup", "1000"], "--warmup 1000 is not shorter than the round (--steps 2): the learning rate would never "
                           "leave warm-up; use --warmup 1 or less"),
    # Medium 5: a seed no generator takes (was a ValueError), a temperature that overflows to inf.
    (["--seed", str(2**70)], f"--seed must be between 0 and 4294967295 (2**32 - 1), got {2**70}"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295 (2**32 - 1), got -1"),
    (["--eval-temperature", "1e-300"], "--eval-temperature must be between 0.01 (greedy in effect) and 100.0, "
                                       "got 1e-300"),
    (["--eval-temperature", "-1"], "--eval-temperature must be a positive number, got -1.0"),
    (["--sft-lr", "inf"], "--sft-lr must be a positive number, got inf"),
    (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["--stage", "harmless", "--lambdas", "nan"], "--lambdas 'nan': every lambda must be a finite number"),
    (["--stage", "harmless", "--margin", "telescoped", "--lambdas", "0.5"],
     "--margin telescoped scales the margin by --alpha alone"),
    (["--device", "bogus"], "--device bogus: not a device"),
    (["--device", "mps"], "--device mps: spo-min trains on cpu or cuda"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA GPU is available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_bad_flags_are_refused_before_anything_is_written(base, flags, needle):
    refused(argv(base, NOT_THERE, *flags), needle, NOT_THERE)
    assert not os.path.exists(NOT_THERE)


def test_unknown_model_size():
    refused(["--model", "nosuch", "--stage", "helpful", "--out", NOT_THERE, *FAST],
            "--model nosuch: unknown size; choose one of", NOT_THERE)


def test_batch_must_split_over_processes(base):
    args = train.parse_args(argv(base, NOT_THERE, "--batch-size", "5"))
    with pytest.raises(runs.RunError, match="--batch-size 5 does not split over 2 processes"):
        runs.preflight(args, world_size=2)


@pytest.mark.parametrize("name", ["metrics.jsonl", "scores.png"])
def test_outputs_are_never_written_through_a_link(base, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious.txt").write_text("keep me")
    (out / name).symlink_to(tmp_path / "precious.txt")
    refused(argv(base, out), f"{name} is a symbolic link; spo-min writes its outputs only as plain files", out)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def hf_export(model, folder, config_json=True, **config):
    """model as a Hugging Face GPT-2 export: model.safetensors (HF keys, no metadata) + config.json."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    save_model(model, folder / "ours.safetensors", layout="hf")
    save_file(load_file(folder / "ours.safetensors"), folder / "model.safetensors")  # as HF writes it
    (folder / "ours.safetensors").unlink()
    c = model.config
    if config_json:
        (folder / "config.json").write_text(json.dumps({
            "model_type": "gpt2", "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
            "vocab_size": c.vocab_size, "n_positions": c.block_size, "layer_norm_epsilon": 1e-5, **config}))
    return str(folder / "model.safetensors")


def test_hf_init_without_config_json_is_refused(base, tmp_path):
    path = hf_export(load_model(base)[0], tmp_path / "hf", config_json=False)
    refused(["--init", path, "--stage", "helpful", "--out", NOT_THERE, *FAST],
            "a Hugging Face GPT-2 file without its config.json", NOT_THERE)


NANO = GPTConfig.preset("nano")


def not_gpt2(folder):
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"w": torch.zeros(2)}, folder / "x.safetensors")
    return folder / "x.safetensors"


def extra_key(folder):
    """Our own checkpoint with one tensor too many: found only by a full load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir()
    path = folder / "x.safetensors"
    save_model(GPT(NANO, seed=0), path)
    with safe_open(path, framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "extra.weight": torch.zeros(2)}, path, metadata=header)
    return path


@pytest.mark.parametrize("make, needle", [
    # Medium 5 and 9: config.json values are type- and range-checked where they are read.
    (lambda d: hf_export(GPT(NANO, seed=0), d, layer_norm_epsilon="1e-5"),
     "config.json: layer_norm_epsilon is str '1e-5'; expected a positive number (GPT-2's is 1e-05)"),
    (lambda d: hf_export(GPT(NANO, seed=0), d, layer_norm_epsilon=-1e-5),
     "config.json: layer_norm_epsilon is float -1e-05; expected a positive number"),
    (lambda d: hf_export(GPT(NANO, seed=0), d, n_embd="32"),
     "config.json: n_embd is str '32'; expected a positive integer: fix config.json"),
    # Medium 5: a vocabulary smaller than the tokenizer's (it was an IndexError mid-run).
    (lambda d: hf_export(GPT(GPTConfig.preset("nano", vocab_size=1000), seed=0), d),
     "its vocabulary has 1000 tokens, GPT-2's tokenizer has 50257"),
    # Low 10: a safetensors file that is no GPT-2 at all.
    (not_gpt2, "not a GPT-2 checkpoint (no token embedding 'wte.weight' among its keys w)"),
    # Low 11: a key too many is found before --out is created (--init is loaded in full up front).
    (extra_key, "unexpected keys 'extra.weight'"),
], ids=["eps-string", "eps-negative", "n_embd-string", "vocab-1000", "not-gpt2", "extra-key"])
def test_a_bad_init_is_refused_before_out_exists(tmp_path, make, needle):
    init = make(tmp_path / "init")
    out = tmp_path / "out"
    message = refused(["--init", str(init), "--stage", "helpful", "--out", str(out), *FAST], needle, out)
    assert message.startswith(("--init ", str(tmp_path))) and not out.exists()


def test_an_unreadable_init_is_one_line(base, tmp_path, monkeypatch):
    import spo_min.checkpoint as checkpoint

    def no_permission(path, *a, **k):  # what open() raises on a chmod 000 file (tests may run as root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "open", no_permission, raising=False)
    out = tmp_path / "out"
    refused(argv(base, out), f"{base}: cannot read it (Permission denied); make it readable", out)
    assert not out.exists()


def test_a_foreign_file_named_base_in_out_is_not_reused(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(hf_export(load_model(base)[0], tmp_path / "hf", config_json=False), out / "base.safetensors")
    refused(["--model", "nano", "--stage", "helpful", "--out", str(out), *FAST],
            f"{out / 'base.safetensors'} was not made by spo-min's SFT (it records no SFT settings): pass it as "
            "--init, or move it away", out)


def test_a_padded_vocabulary_loads_and_runs(tmp_path):
    """nanoGPT pads GPT-2's 50257 tokens to 50304. The padding rows get huge logits here: were
    they sampled, decoding would fail; were they scored, every log-prob would be ~-1e4."""
    model = GPT(GPTConfig.preset("nano", vocab_size=50304), seed=0)
    with torch.no_grad():
        model.transformer.wte.weight[50257:] = 50.0
    padded = tmp_path / "padded.safetensors"
    save_model(model, padded, metadata={"kind": "init"})
    out = tmp_path / "out"
    rows = train.main(argv(str(padded), out))
    assert rows[1]["sample"] and rows[1]["acc/helpful"] is not None
    policy, _ = load_model(out / "round1_helpful.safetensors")
    assert policy.config.vocab_size == 50257
    meta = read_metadata(out / "round1_helpful.safetensors")
    assert meta["parent_sha256"] == chain.file_sha256(padded)


@pytest.mark.parametrize("rows, flags, needle", [
    ('{"prompt": "a", "chosen": "b"}\n', [], "cannot tell the format from keys ['chosen', 'prompt']"),
    ("[" * 100_000 + "]" * 100_000 + "\n", [], "JSON nested too deeply"),
    (None, ["--batch-size", "64"], "--batch-size 64 is larger than stage 'honest''s"),
    ("few", [], "stage 'honest' has no held-out pairs"),
])
def test_data_is_checked_before_the_base_sft(tmp_path, rows, flags, needle):
    path = tmp_path / "pairs.jsonl"
    if rows is None:
        write_pairs(path, 40)
    elif rows == "few":
        write_pairs(path, 8, pairs_per_prompt=2)  # 5% of 8 prompts rounds to 0 held out
    else:
        path.write_text(rows)
    out = tmp_path / "out"  # no --init: a base SFT would run (and write base.safetensors) first
    refused(["--model", "nano", "--stage", "honest", "--data", f"honest={path}", "--out", str(out), *FAST, *flags],
            needle, out)
    assert not out.exists()


def test_custom_dimension_and_colon_in_path_load(tmp_path):
    path = write_pairs(tmp_path / "a:b.jsonl", 40)
    args = train.parse_args(["--stage", "honest", "--data", f"honest={path}:generic"])
    assert stages.stage_sources(args) == {"honest": (path, "generic")}
    args = train.parse_args(["--stage", "honest", "--data", f"honest={path}"])
    sources = stages.stage_sources(args)
    assert sources == {"honest": (path, "auto")}
    pairs, _ = stages.load_stage_pairs(args, sources)
    tokenized = stages.tokenize_stages(pairs, get_tokenizer(), 64)
    train_tok, heldout = tokenized["honest"]
    assert len(train_tok) + len(heldout) == 40 and len(heldout) == 2


# ----------------------------------------------------------------------------- names that become paths

@pytest.mark.parametrize("stage", ["../../../victim", "x/y", "", ".hidden", "two words", "x" * 65])
def test_a_stage_name_is_an_identifier(base, tmp_path, stage):
    """High 1: a stage name becomes part of file names; '../../../victim' wrote outside --out."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 40)
    out = tmp_path / "a" / "b" / "out"
    refused(argv(base, out, "--data", f"{stage}={pairs}", stages=(stage,)),
            f"--stage {stage!r}: a stage name becomes part of file names, so it must be a letter followed by "
            "letters, digits or _ (at most 64), e.g. helpful", out)
    assert victim.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["pairs.jsonl", "victim"]


@pytest.mark.parametrize("stage, flags, needle", [
    # High 4: a typo trained the built-in world instead, exit 0; a second file replaced the first.
    ("helpful", ["helpfull={pairs}"],
     "--data helpfull={pairs}: 'helpfull' is not a stage of this run (did you mean 'helpful'?); its stages are helpful"),
    ("helpful", ["helpful={pairs}", "helpful={other}"],
     "--data helpful={other}: stage 'helpful' already has --data {pairs}; give one file per stage"),
    # Low 10: what each bad --data is, rather than "no such file", and hints in flags, not Python.
    ("helpful", ["helpful={pairs}:xml"],
     "--data helpful={pairs}:xml: unknown format 'xml' after the last ':'; expected one of auto, hh, pku, generic"),
    ("helpful", ["helpful={folder}"], "--data helpful={folder}: {folder} is a folder; give a .jsonl or .jsonl.gz file"),
    ("honest", ["honest={pku}"], "{pku}: looks like PKU-SafeRLHF, whose rows label two dimensions; name the stage "
                                 "helpful or harmless (it picks the label)"),
    ("honest", ["honest={bad}"], "{bad}:2: invalid JSON (Expecting value at column 1); expected one JSON object per "
                                 "line (fix the row, or remove it)"),
], ids=["typo", "twice", "format", "folder", "pku", "bad-row"])
def test_every_data_flag_names_one_stage_once(base, tmp_path, stage, flags, needle):
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\nnot json\n')
    (tmp_path / "pku.jsonl").write_text(json.dumps({"prompt": "p", "response_0": "a", "response_1": "b",
                                                    "better_response_id": 0, "safer_response_id": 1}) + "\n")
    paths = {"pairs": write_pairs(tmp_path / "pairs.jsonl", 40), "other": write_pairs(tmp_path / "other.jsonl", 40),
             "folder": tmp_path / "folder", "bad": tmp_path / "bad.jsonl", "pku": tmp_path / "pku.jsonl"}
    data_flags = [a for f in flags for a in ("--data", f.format(**paths))]
    out = tmp_path / "out"
    message = refused(argv(base, out, *data_flags, stages=(stage,)), needle.format(**paths), out)
    assert "skip_bad" not in message and "dimension=" not in message  # Python arguments, not flags
    assert not out.exists()


# ----------------------------------------------------------------------------- Medium 5, 7: disk and metrics

def test_not_enough_free_space_is_refused_before_the_round(base, tmp_path, monkeypatch):
    out = tmp_path / "full"
    out.mkdir()
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    message = refused(argv(base, out), "MB free, a round needs about", out)
    assert message.startswith(f"--out {out}: 0.0 MB free") and os.listdir(out) == []


def test_a_failed_final_save_keeps_the_last_state_for_resume(base, tmp_path, monkeypatch):
    import spo_min.checkpoint as checkpoint

    out = tmp_path / "enospc"
    real = checkpoint.write_safetensors

    def disk_full_for_rounds(filename, tensors, metadata):
        if "round1_helpful.safetensors" in os.path.basename(filename) and ".state." not in filename:
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(filename, tensors, metadata)

    monkeypatch.setattr(checkpoint, "write_safetensors", disk_full_for_rounds)
    with pytest.raises(runs.RunError) as err:
        train.main(argv(base, out))
    message = str(err.value)
    assert "cannot write" in message and "round1_helpful.safetensors: [Errno 28] No space left" in message
    assert "MB free" in message and "MB needed" in message
    assert "round1_helpful.state.safetensors is intact" in message and "--resume" in message
    assert sorted(snapshot(out)) == ["metrics.jsonl", "round1_helpful.state.safetensors"]  # no orphan temp file


def test_the_same_run_twice_gives_byte_identical_checkpoints(tmp_path):
    """Low 16: identical weights gave files with different sha256 (the header's metadata came out
    in a per-process order). Two runs of one command, into two folders: the same bytes."""
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        train.main(["--model", "nano", "--sft-steps", "1", "--stage", "helpful", "--stage", "harmless",
                    "--out", str(out), *FAST, "--eval-samples", "0"])
        digests.append({f: chain.file_sha256(out / f) for f in sorted(os.listdir(out)) if f.endswith(".safetensors")})
    assert list(digests[0]) == ["base.safetensors", "round1_helpful.safetensors", "round2_harmless.safetensors"]
    assert digests[0] == digests[1]


def test_metrics_rows_are_valid_json_with_a_run_id(tmp_path):
    path = tmp_path / "metrics.jsonl"
    runs.append_metrics(path, {"round": 1, "acc/x": math.nan, "margin/x": math.inf, "loss": 0.5}, "r1")
    assert json.loads(path.read_text()) == {"run_id": "r1", "round": 1, "acc/x": None, "margin/x": None, "loss": 0.5}


# ----------------------------------------------------------------------------- Also: bf16 reference cache

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ref", ["cache", "live"])
def test_step0_loss_is_ln2_under_each_dtype(base, dtype, ref):
    """pi_theta == pi_ref at step 0: the cached reference is computed in the policy's precision."""
    pairs, _ = data.tokenize_pairs(build_world(seed=0).pairs["helpful"]["train"][:8], get_tokenizer(), 64)
    args = train.parse_args(["--stage", "helpful", "--dtype", dtype, "--ref", ref])
    chain.resolve_hyperparameters(args)
    entry = chain.chain_entry(base)
    ref_c, ref_r, margin = train.frozen_round_inputs([entry], pairs, args, torch.device("cpu"))
    policy, _ = load_model(base)
    ref_model = load_model(base)[0] if ref == "live" else None
    cached = torch.cat([ref_c, ref_r]) if ref == "cache" else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):  # train.py's training step
        loss, _, _ = batch_pair_loss(policy, data.collate_pairs(pairs), functools.partial(losses.spo_loss, beta=0.1),
                                     cached, ref_model, margin)
    # Same weights, same precision: equal up to fp32 summation order (an fp32 cache against a
    # bf16 policy was 2e-5 off on this batch).
    assert abs(loss.item() - math.log(2)) < 1e-6


# ----------------------------------------------------------------------------- what the user sees

def test_cli_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--stage", "helpful", "--steps", "0",
                           "--out", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == "error: --steps must be >= 1, got 0\n"
    assert not (tmp_path / "o").exists()


def test_ctrl_c_is_one_line_and_the_run_resumes(base, tmp_path, capsys):
    """Medium 6: Ctrl-C printed a KeyboardInterrupt traceback. Here it comes right after round 1
    saved its state at step 2 of 3 (deterministic, unlike a timed kill)."""
    out = tmp_path / "out"
    args = argv(base, out, "--steps", "3", "--save-every", "2", "--eval-samples", "0")
    script = (f"import os, signal, sys; sys.path.insert(0, {REPO!r}); import train; from spo_min import chain\n"
              "save = chain.save_train_state\n"
              "def save_then_ctrl_c(*a, **k):\n    save(*a, **k)\n    os.kill(os.getpid(), signal.SIGINT)\n"
              f"chain.save_train_state = save_then_ctrl_c\ntrain.cli({args!r})\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"stopped by SIGINT; the finished rounds and the last saved state of this round (every --save-every steps) "
        f"are in {out}: run the same command with --resume to continue")
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "round1_helpful.state.safetensors"]  # no lock, no temp file
    train.main(args + ["--resume"])
    assert "[round 1] resuming helpful at step 2" in capsys.readouterr().out
    assert (out / "round1_helpful.safetensors").exists() and not (out / "round1_helpful.state.safetensors").exists()


def test_sigterm_stops_a_run_like_ctrl_c():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        runs.stop_on_signals()
        with pytest.raises(KeyboardInterrupt) as stop:  # so train.cli, atomic_write and the lock treat it alike
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.value.signum == signal.SIGTERM
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    args = train.parse_args(["--stage", "helpful", "--out", "o"])
    assert runs.interrupted_message(args, signal.SIGTERM).startswith("stopped by SIGTERM; the finished rounds")


def test_cli_error_after_the_lock_releases_it(sft_run, tmp_path):
    out = copy_of(sft_run, tmp_path)
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--model", "nano", "--sft-steps", "1",
                           "--stage", "helpful", "--seed", "3", "--out", str(out), *FAST], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "was made with seed=0" in proc.stderr
    assert snapshot(out) == before and not (out / ".lock").exists()


def test_cli_tampered_tokenizer_is_one_line(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("not the ranks\n")
    env = {**os.environ, "PYTHONPATH": REPO, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"),
           "SPO_MIN_GPT2_TIKTOKEN": str(bad)}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--stage", "helpful",
                           "--out", str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {bad}: sha256 ") and "is not the GPT-2 BPE ranks" in proc.stderr


def test_a_round_of_another_parent_is_refused(two_rounds, base, tmp_path):
    out = copy_of(two_rounds, tmp_path)
    other = tmp_path / "other_base.safetensors"
    save_model(GPT(GPTConfig.preset("nano"), seed=1), other, metadata={"kind": "init"})
    args = argv(str(other), out, "--resume", stages=("helpful", "harmless"))
    refused(args, "round1_helpful.safetensors was trained from another parent checkpoint (sha256 ", out)


@pytest.mark.parametrize("preset", ["nano", "tiny", "gpt2"])
@pytest.mark.parametrize("bias", [True, False])
def test_checkpoint_bytes_counts_every_parameter(preset, bias):
    """The free-space check's size, counted from the config, equals the model's own tensors."""
    config = GPTConfig.preset(preset, bias=bias)
    with torch.device("meta"):  # shapes only
        n = sum(t.numel() for t in GPT(config).state_dict().values())
    assert runs.checkpoint_bytes(config) == 4 * n + 65536
