"""End-to-end tests of train.py on a tiny config: smoke, ref cache, resume, DDP, bad input.

Each run uses the "nano" GPT (1 layer, n_embd 32, GPT-2 vocabulary) and a handful of steps, so
a two-round run takes seconds. Runs are subprocesses: that is how users call train.py, and it
is the only way to test kill -9 and torchrun.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spo_min import chain, data, losses
from spo_min.checkpoint import load_model, read_metadata
from spo_min.logps import batch_sequence_logps, frozen_sequence_logps
from spo_min.world import build_world
from spo_min.tokenizer import get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A nano run whose evaluation is as small as its training: a run's time is mostly evaluation
# (300 held-out pairs per dimension and 8 samples per prompt by default), and the tests check
# that it runs and what it writes, not its numbers.
TINY = ["--model", "nano", "--sft-steps", "6", "--steps", "6", "--batch-size", "4",
        "--eval-prompts", "4", "--eval-samples", "2", "--eval-pairs", "24", "--save-every", "2"]
RUN = TINY + ["--alpha", "0.5", "--beta", "0.8"]  # the two-round runs compared below


pytestmark = pytest.mark.usefixtures("torch_backend")  # train.py's CPU path (tests/conftest.py)


def test_this_module_scores_on_the_torch_path():
    # The opt-in above: without it the in-process scoring below would run Triton's interpreter.
    assert os.environ.get("TRITON_INTERPRET") is None


def run_train(*args, check=True, env_extra=None, launcher=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)  # training on CPU uses the torch path; kernel tests cover Triton
    cmd = (launcher or [sys.executable]) + [os.path.join(REPO, "train.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # --trace-every evaluates inside each round; the resume test below compares this run's weights
    # with an untraced one, bit for bit: tracing never changes training.
    proc = run_train("--stage", "helpful", "--stage", "harmless", "--out", str(out), *RUN, "--trace-every", "3")
    return out, proc


def test_two_round_smoke(two_round_run):
    out, proc = two_round_run
    for name in ("base.safetensors", "round1_helpful.safetensors", "round2_harmless.safetensors",
                 "metrics.jsonl", "scores.png"):
        assert (out / name).exists(), name
    assert not list(out.glob("*.state.safetensors"))  # resumable states are removed at round end
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # After round 2 both dimensions were evaluated on held-out pairs, and the world was sampled.
    assert {"acc/helpful", "acc/harmless", "helpfulness", "harmlessness"} <= set(rows[2])
    assert "gradient checks: autograd == E7" in proc.stdout
    assert "Results" in proc.stdout
    # Chain metadata: round 2 records its parent (round 1) by path and hash, and its hyperparameters.
    meta2 = read_metadata(out / "round2_harmless.safetensors")
    assert meta2["round"] == 2 and meta2["stage"] == "harmless" and meta2["beta"] == 0.8
    assert meta2["lambdas"] == [pytest.approx(0.5 / 0.8)]  # --alpha 0.5: lambda = alpha / beta_1 (E5)
    assert meta2["parent_sha256"] == chain.file_sha256(out / "round1_helpful.safetensors")
    meta1 = read_metadata(out / "round1_helpful.safetensors")
    assert meta1["lambdas"] == [] and meta1["parent_sha256"] == chain.file_sha256(out / "base.safetensors")


def test_round_trace_and_step_log(two_round_run):
    """The in-round record: E7 weights per step (1/2 for DPO at step 0), and trace points whose
    held-out loss at step 0 is E5's -log sigmoid(-M) with M recomputed here from the checkpoints."""
    out, _ = two_round_run
    steps = {r["round"]: r for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    evals = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(steps) == [1, 2] and len(steps[1]["loss"]) == 6 == len(steps[2]["pair_weight"])
    assert [p["step"] for p in steps[2]["trace"]] == [0, 3, 6]
    r1 = steps[1]["trace"][0]
    assert steps[1]["pair_weight"][0] == 0.5  # round 1 is DPO: sigmoid(0 - 0) at the first step
    assert abs(r1["heldout_loss"] - math.log(2)) < 1e-6 and r1["heldout_weight"] == 0.5 and r1["dlogp_yw"] == 0.0
    # Round 2 at step 0: pi_theta = pi_1, so h = 0 and the loss is the mean of -log sigmoid(-M_2),
    # M_2 = alpha Delta log(pi_1 / pi_0) (E5), on the held-out harmless pairs that train.py evaluates.
    tokenizer = get_tokenizer()
    world = build_world(seed=0)
    eval_pairs = int(TINY[TINY.index("--eval-pairs") + 1])
    heldout, _ = data.tokenize_pairs(world.pairs["harmless"]["heldout"][:eval_pairs], tokenizer, 64)
    (c0, r0), (c1, r1_) = (frozen_sequence_logps(load_model(out / f)[0], heldout)
                           for f in ("base.safetensors", "round1_helpful.safetensors"))
    margin = 0.5 * ((c1 - r1_) - (c0 - r0))
    want = float(torch.nn.functional.softplus(margin).mean())  # -log sigmoid(-M) = softplus(M)
    assert steps[2]["trace"][0]["heldout_loss"] == pytest.approx(want, abs=1e-5)
    # The last point is the finished round: its displacement is the evaluation row's, by other code.
    assert steps[2]["trace"][-1]["dlogp_yw"] == pytest.approx(evals[2]["chosen_logp_change/harmless"], abs=1e-6)
    assert 0 <= steps[2]["trace"][-1]["eot_rate"] <= 1 and len(steps[2]["trace"][-1]["style_logp"]) == 4
    assert {"pair_weight/conflict/start", "acc_round_own/conflict"} <= set(evals[2])


def test_reference_cache_matches_live_reference(two_round_run):
    """--ref cache and --ref live give the same SPO loss on a fixed batch (1e-5)."""
    out, _ = two_round_run
    tokenizer = get_tokenizer()
    world = build_world(seed=0)
    pairs, _ = data.tokenize_pairs(world.pairs["harmless"]["train"][:8], tokenizer, 64)
    ref, _ = load_model(out / "round1_helpful.safetensors")
    policy, _ = load_model(out / "round2_harmless.safetensors")
    cached_c, cached_r = frozen_sequence_logps(ref, pairs, batch_size=3)  # other padding, other batches
    batch = data.collate_pairs(pairs)
    with torch.no_grad():
        pol, live = batch_sequence_logps(policy, batch, ref_model=ref)
    margin = torch.linspace(-1, 1, 8)
    loss_cached, _ = losses.spo_loss(pol[:8], pol[8:], cached_c, cached_r, margin, 0.1)
    loss_live, _ = losses.spo_loss(pol[:8], pol[8:], live[:8], live[8:], margin, 0.1)
    # Both are fp32 sums of ~10-20 token log-probs; padding changes float order only slightly.
    assert abs(loss_cached.item() - loss_live.item()) <= 1e-5


def test_resume_after_kill_matches_uninterrupted_run(two_round_run, tmp_path):
    out_ref, _ = two_round_run
    out = tmp_path / "killed"
    os.makedirs(out)
    # The reference run's base (no SFT again) and no sampling: neither changes what is compared.
    (out / "base.safetensors").write_bytes((out_ref / "base.safetensors").read_bytes())
    quiet = ["--eval-samples", "0"]
    crashed = run_train("--stage", "helpful", "--stage", "harmless", "--out", str(out), *RUN, *quiet,
                        "--crash-at-step", "5", check=False)
    assert crashed.returncode != 0  # killed by SIGKILL in round 1 after step 5 (state saved at step 4)
    assert (out / "round1_helpful.state.safetensors").exists()
    assert not (out / "round1_helpful.safetensors").exists()
    resumed = run_train("--stage", "helpful", "--stage", "harmless", "--out", str(out), *RUN, *quiet, "--resume")
    assert "resuming helpful at step 4" in resumed.stdout
    for name in ("round1_helpful.safetensors", "round2_harmless.safetensors"):
        a, b = load_file(out / name), load_file(out_ref / name)
        assert a.keys() == b.keys()
        for key in a:  # same seed, same batches, deterministic CPU kernels: bit-exact
            assert torch.equal(a[key], b[key]), (name, key)


def test_torchrun_two_processes_matches_single_process(two_round_run, tmp_path):
    out_ref, _ = two_round_run
    out = tmp_path / "ddp"
    os.makedirs(out)
    # Reuse the single-process base so both runs start from identical weights.
    (out / "base.safetensors").write_bytes((out_ref / "base.safetensors").read_bytes())
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    run_train("--stage", "helpful", "--out", str(out), *RUN, launcher=launcher,
              env_extra={"OMP_NUM_THREADS": "1"})
    a = load_file(out / "round1_helpful.safetensors")
    b = load_file(out_ref / "round1_helpful.safetensors")
    for key in a:
        # Two half-batch gradients averaged equal the full-batch gradient up to float summation
        # order (~1e-7 relative); after 6 Adam steps the weights agree to ~1e-6.
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--stage", "kindness"], "unknown stage 'kindness'"),
    (["--stage", "helpful", "--init", "/nonexistent/base.safetensors"], "no such file"),
    (["--stage", "helpful", "--beta", "0"], "--beta must be > 0"),
    (["--stage", "helpful", "--stage", "harmless", "--lambdas", "0.1,0.2"], "needs 1 finite non-negative"),
    ([], "give at least one --stage"),
    (["--stage", "helpful", "--data", "helpful=/nonexistent.jsonl"], "no such file /nonexistent.jsonl"),
])
def test_bad_input_gives_one_clear_error(args, message, tmp_path):
    proc = run_train(*args, "--out", str(tmp_path / "o"), *TINY, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_train("--stage", "helpful", "--out", str(blocker / "sub"), check=False)
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(two_round_run, tmp_path):
    out_ref, _ = two_round_run
    out = tmp_path / "nan"
    os.makedirs(out)
    (out / "base.safetensors").write_bytes((out_ref / "base.safetensors").read_bytes())
    proc = run_train("--stage", "helpful", "--out", str(out), *RUN, "--lr", "1e30", check=False)
    assert proc.returncode == 2 and "loss is not finite" in proc.stderr
    assert not (out / "round1_helpful.safetensors").exists()
    assert not list(out.glob("*.tmp*"))


def test_resume_without_an_earlier_round_checkpoint(two_round_run, tmp_path):
    out_ref, _ = two_round_run
    out = tmp_path / "gap"
    os.makedirs(out)
    for name in ("base.safetensors", "round2_harmless.safetensors"):  # round 1 is missing
        (out / name).write_bytes((out_ref / name).read_bytes())
    proc = run_train("--stage", "helpful", "--stage", "harmless", "--out", str(out), *RUN, "--resume",
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot resume round 2: it needs the earlier checkpoint" in proc.stderr
    assert "round1_helpful.safetensors" in proc.stderr
