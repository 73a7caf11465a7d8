"""Three rounds end to end: helpful, harmless, concise, with per-round --lambdas.

The round-3 margin that train.py trains with must be E6, computed here independently: each
checkpoint's sequence log-probs from a plain forward pass of one sequence at a time, and the
betas and lambdas read back from the checkpoints' metadata, with E4's inversion written out.
"""

import json
from types import SimpleNamespace

import pytest
import torch

import train
from spo_min import chain, data, losses
from spo_min.checkpoint import load_model, read_metadata
from spo_min.tokenizer import get_tokenizer
from spo_min.world import build_world
from test_train import TINY, run_train

STAGES = ["--stage", "helpful", "--stage", "harmless", "--stage", "concise"]
# Round 2: lambda_1^(2) = 0.5; round 3: lambda^(3) = (0.6, 0.2). Chosen so that E6 and the
# telescoped margin differ: M_3 = 0.6 R_1 + 0.2 (r_2 - 0.5 r_1) = 0.5 r_1 + 0.2 r_2, which no
# single alpha (alpha (d_1 + d_2)) matches. (0.3, 0.2) would: 0.2 r_1 + 0.2 r_2.
LAMBDAS = ["--lambdas", "0.5", "--lambdas", "0.6,0.2"]
# A high lr: six steps must move the policy enough that the margin is far from 0 (nano, CPU).
RUN3 = [*STAGES, *TINY, "--beta", "0.8", "--lr", "5e-3", *LAMBDAS]


pytestmark = pytest.mark.usefixtures("torch_backend")  # train.py's CPU path (tests/conftest.py)


@pytest.fixture(scope="module")
def three_round_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    proc = run_train(*RUN3, "--out", str(out))
    return out, proc


def test_three_round_smoke(three_round_run):
    out, proc = three_round_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["stage"]) for r in rows] == [(0, "base"), (1, "helpful"), (2, "harmless"), (3, "concise")]
    # After round 3, every dimension: held-out accuracy and the exact evaluation.
    assert {"acc/helpful", "acc/harmless", "acc/concise", "exact/concise_all", "exact/helpful_benign",
            "exact/harmless_harmful", "conciseness"} <= set(rows[3])
    for row in rows:  # the exact evaluation runs after every round, round 0 included
        assert 0.0 <= row["exact/concise_all"] <= 1.0
    table = proc.stdout.split("Results")[1]
    assert "acc concise" in table and " concise " in table and "sampled concise" in table
    metas = [read_metadata(out / f) for f in ("round1_helpful.safetensors", "round2_harmless.safetensors",
                                              "round3_concise.safetensors")]
    assert [m["lambdas"] for m in metas] == [[], [0.5], [0.6, 0.2]]  # --lambdas, one per round from round 2
    assert metas[2]["parent_sha256"] == chain.file_sha256(out / "round2_harmless.safetensors")
    assert len(chain.rebuild_chain(str(out / "round3_concise.safetensors"))) == 4


def plain_sequence_logps(model, pairs):
    """log pi(y|x) of chosen and rejected, one sequence at a time, full logits, no padding (E9)."""
    chosen, rejected = [], []
    with torch.no_grad():
        for pair in pairs:
            for response, out in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
                ids = torch.tensor([pair.prompt_ids + response])
                logp = torch.log_softmax(model(ids)[0, :-1].double(), dim=-1)  # position t predicts t + 1
                targets = ids[0, 1:]
                picked = logp[torch.arange(len(targets)), targets]
                out.append(picked[len(pair.prompt_ids) - 1:].sum())  # response tokens only
    return torch.stack(chosen), torch.stack(rejected)


def test_round3_margin_is_e6_of_the_three_checkpoints(three_round_run):
    out, _ = three_round_run
    files = [out / f for f in ("base.safetensors", "round1_helpful.safetensors", "round2_harmless.safetensors",
                               "round3_concise.safetensors")]
    pairs, _ = data.tokenize_pairs(build_world(seed=0).pairs["concise"]["train"][:12], get_tokenizer(), 64)

    # The margin train.py's round 3 trains with: the very function its round loop calls.
    args = train.parse_args([*RUN3, "--out", str(out)])
    args.first_round, args.all_stages = 1, ["helpful", "harmless", "concise"]
    chain.resolve_hyperparameters(args)
    round_chain = [chain.chain_entry(str(f)) for f in files[:3]]
    _, _, used = train.frozen_round_inputs(round_chain, pairs, args, torch.device("cpu"))

    # Independently: log-probs of pi_0, pi_1, pi_2; betas and lambdas as recorded by rounds 1..3.
    logps = [plain_sequence_logps(load_model(f)[0].eval(), pairs) for f in files[:3]]
    meta = [read_metadata(f) for f in files[1:]]
    beta1, beta2 = meta[0]["beta"], meta[1]["beta"]
    (lam21,), (lam31, lam32) = meta[1]["lambdas"], meta[2]["lambdas"]
    d = [c - r for c, r in logps]  # Delta log pi_j
    r1, r2 = beta1 * (d[1] - d[0]), beta2 * (d[2] - d[1])  # E4: implicit reward differences
    R1, R2 = r1, r2 - lam21 * r1  # E4 inverted: round 2's implicit reward carries lambda_1^(2) R_1
    expected = lam31 * R1 + lam32 * R2  # E6: M_3

    # fp32 sequence log-probs of ~20 tokens (batched and padded in train.py, one by one here)
    # agree to ~1e-5 per sequence; the margin sums six of them with weights < 1.
    assert torch.allclose(used.double(), expected, atol=1e-4), (used, expected)
    via_losses = losses.spo_margin([c for c, _ in logps], [r for _, r in logps], [beta1, beta2], [[], [lam21], [lam31, lam32]])
    assert torch.allclose(via_losses, expected, atol=1e-12)
    assert expected.abs().max() > 0.5  # the rounds moved: a zero margin would pass trivially
    # ... and it is not the telescoped simplification, for any alpha (least squares fit).
    telescoped = d[2] - d[0]
    alpha = (telescoped @ expected) / (telescoped @ telescoped)
    assert (expected - alpha * telescoped).abs().max() > 1e-3


def test_lambdas_for_a_round_that_does_not_exist_are_refused(tmp_path):
    proc = run_train(*STAGES, *TINY, "--lambdas", "0.5", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "--lambdas is given 1 times" in proc.stderr
    proc = run_train(*STAGES, *TINY, "--lambdas", "0.5", "--lambdas", "0.3", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "round 3 needs 2" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_telescoped_round_records_the_lambdas_its_margin_amounts_to(n):
    """The telescoped margin alpha Delta log(pi_{n-1}/pi_0) equals E6 with the lambdas the round
    records, so a later exact round inverts E4 with the right numbers (at n = 2: alpha / beta_1)."""
    g = torch.Generator().manual_seed(n)
    betas = [0.5, 1.3, 0.8][: n - 1]
    earlier = [[], [0.4], [0.7, 0.25]][: n - 1]  # lambdas that rounds 1..n-1 recorded
    round_chain = [{"beta": None}] + [{"beta": b, "lambdas": lam} for b, lam in zip(betas, earlier)]
    args = SimpleNamespace(loss="spo", lambdas=None, alpha=0.9, margin="telescoped", first_round=1)
    recorded = chain.round_lambdas(args, round_chain)
    chosen = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(n)]
    rejected = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(n)]
    as_e6 = losses.spo_margin(chosen, rejected, betas, earlier + [recorded])
    torch.testing.assert_close(as_e6, losses.spo_margin_telescoped(chosen, rejected, 0.9), atol=1e-12, rtol=0)
    exact_args = SimpleNamespace(**{**vars(args), "margin": "exact"})
    assert recorded[-1] == pytest.approx(0.9 / betas[-1])  # the last earlier round: alpha / beta, as exact
    if n == 2:
        assert recorded == chain.round_lambdas(exact_args, round_chain)
    else:  # from round 3 on it differs from exact's alpha / beta_i: R_1 counted twice
        assert recorded[0] == pytest.approx(0.9 / 0.5 + 0.4 * 0.9 / 1.3 + (0.7 * 0.9 / 0.8 if n == 4 else 0.0))
        assert recorded != pytest.approx(chain.round_lambdas(exact_args, round_chain))
