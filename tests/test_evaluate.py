"""The exact (sample-free) evaluation, the world's population prediction, and the study's statistics.

References are independent of the code under test: a GPT's full logits with a plain
log_softmax (not the scored-positions path and kernel the evaluation uses), hand-computed
expectations, and the closed forms of E3/E10 written out with numpy.
"""

import math

import numpy as np
import pytest
import torch

from gpt2_oracle import randomized_gpt
from spo_min import evaluate
from spo_min import world as W
from spo_min.data import PreferencePair
from spo_min.model import GPTConfig
from spo_min.tokenizer import get_tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def world():
    return W.build_world(seed=0, pairs_per_prompt=2, sft_per_style=1)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


# ----------------------------------------------------------------------------- the world's styles

def test_every_style_opens_with_its_own_word_and_first_token(world, tokenizer):
    for prompt in world.prompts["heldout"][:6]:
        templates = world.style_templates(prompt, per_style=6)
        first_tokens = {}
        for style, responses in templates.items():
            for r in responses:
                assert W.style_of(r, prompt.kind) == style, r
                first_tokens.setdefault(style, set()).add(tokenizer.encode_ordinary(r)[0])
        # One first token per style, different for every style of the prompt's kind: the style a
        # policy is about to produce is decided by its very first token.
        assert all(len(t) == 1 for t in first_tokens.values()), first_tokens
        assert len({next(iter(t)) for t in first_tokens.values()}) == len(first_tokens)


def test_style_of_on_other_text():
    assert W.style_of(" Sure! To bake bread, knead.", "benign") == "answer"
    assert W.style_of(" Sure! To break in, rake the pins.", "harmful") == "comply"
    assert W.style_of(" No, I can't.", "harmful") == "redirect"
    assert W.style_of(" No, I can't.", "benign") is None  # benign prompts have no redirect style
    assert W.style_of("", "benign") is None and W.style_of(" flour yeast", "benign") is None


def test_world_options_cautious_raters_and_no_redirect():
    base = W.build_world(seed=0, cautious=0.0, temperature=0.25)
    cautious = W.build_world(seed=0, cautious=0.5, temperature=0.25)

    def refusal_won(w):  # benign harmless pairs of refusal vs a style that is just as harmless
        wins = []
        for pair in w.pairs["harmless"]["train"]:
            kind = W.find_topic(pair.prompt).kind
            chosen, rejected = W.style_of(pair.chosen, kind), W.style_of(pair.rejected, kind)
            if kind == "benign" and "refusal" in (chosen, rejected) and "rude" not in (chosen, rejected):
                wins.append(chosen == "refusal")
        return sum(wins) / len(wins), len(wins)

    p0, n0 = refusal_won(base)
    p1, n1 = refusal_won(cautious)
    # Ties are coin flips (0.5); cautious raters prefer the refusal with sigmoid(0.5 / 0.25) = 0.88.
    # ~230 such pairs: 4 binomial standard deviations is about 0.13.
    assert abs(p0 - 0.5) < 0.13 and abs(p1 - 1 / (1 + math.exp(-2))) < 0.13, (p0, n0, p1, n1)
    assert base.prompts == cautious.prompts  # raters change labels only

    plain = W.build_world(seed=0, redirect=False, pairs_per_prompt=3)
    harmful = [p for p in plain.prompts["train"] if p.kind == "harmful"]
    assert harmful and all("redirect" not in p.styles for p in harmful)
    assert all(W.style_of(r, "harmful") != "redirect" for p, r in plain.sft["train"]
               if W.find_topic(p).kind == "harmful")
    for bad in (dict(temperature=float("nan")), dict(cautious=-0.1), dict(cautious=float("inf"))):
        with pytest.raises(W.WorldError):
            W.build_world(**bad)


def test_is_well_formed():
    prompt = W.WorldPrompt(W.format_prompt("How do I bake bread?"), "How do I bake bread?", "benign", "bread")
    assert W.is_well_formed(prompt, " Sure! To bake bread, knead the dough.")
    assert W.is_well_formed(prompt, " Maybe to bake bread, first mix")  # the world's cut-off partial
    assert not W.is_well_formed(prompt, " To bake bread, knead.")  # no style opening
    assert not W.is_well_formed(prompt, " Sure! To bake breadxq, knead.")  # a non-word
    assert not W.is_well_formed(prompt, " Sure, knead the dough, knead the dough, knead the dough.")


# ----------------------------------------------------------------------------- exact evaluation

def _reference_style_logp(model, tokenizer, prompt, templates):
    """log P(s|x) from the model's FULL logits of the prompt alone (no padding, no batching), a
    plain float64 log_softmax at its last position, at each style's first template token."""
    ids = torch.tensor([tokenizer.encode_ordinary(prompt.text)])
    with torch.no_grad():
        logits = model.head(model.hidden_states(ids))[0, -1].double()
    lp = torch.log_softmax(logits, dim=-1).numpy()
    firsts = np.array([lp[tokenizer.encode_ordinary(templates[s][0])[0]] for s in prompt.styles])
    return firsts - np.logaddexp.reduce(firsts), 1 - np.exp(firsts).sum()


def test_style_probabilities_match_an_independent_computation(world, tokenizer):
    model = randomized_gpt(GPTConfig.preset("nano"), seed=3, scale=0.5)
    prompts = [p for p in world.prompts["heldout"] if p.kind == "benign"][:3] + \
              [p for p in world.prompts["heldout"] if p.kind == "harmful"][:2]
    exact = evaluate.ExactEvaluation(world, prompts, tokenizer, block_size=64, per_style=3)
    got = exact.style_logprobs(model)  # batched, right-padded prompts of different lengths
    off = []
    for prompt, templates, logp in zip(prompts, exact.templates, got):
        want, off_style = _reference_style_logp(model, tokenizer, prompt, templates)
        # fp32 logits of a 1-layer model, read in float64: 1e-5 absolute on log-probs of ~-10.
        np.testing.assert_allclose(logp.numpy(), want, atol=1e-5)
        assert abs(logp.exp().sum().item() - 1) < 1e-9
        off.append(off_style)
    # A random model puts nearly all its mass on tokens that open no style.
    assert exact.off_style_mass() == pytest.approx(np.mean(off), abs=1e-6) and exact.off_style_mass() > 0.9


def test_scores_are_the_style_ideal_expectations(world, tokenizer):
    benign = next(p for p in world.prompts["heldout"] if p.kind == "benign")
    harmful = next(p for p in world.prompts["heldout"] if p.kind == "harmful")
    exact = evaluate.ExactEvaluation(world, [benign, harmful], tokenizer, block_size=64, per_style=2)
    # Policies known by construction: all mass on the answer for the benign prompt; half refusal,
    # half comply for the harmful one.
    p_benign = torch.full((len(benign.styles),), -1e9, dtype=torch.float64)
    p_benign[benign.styles.index("answer")] = 0.0
    p_harmful = torch.full((len(harmful.styles),), -1e9, dtype=torch.float64)
    p_harmful[harmful.styles.index("refusal")] = math.log(0.5)
    p_harmful[harmful.styles.index("comply")] = math.log(0.5)
    scores = exact.scores([p_benign, p_harmful])
    b_answers = exact.templates[0]["answer"]
    assert scores["exact/helpful_benign"] == pytest.approx(np.mean([W.helpfulness(benign.text, r) for r in b_answers]))
    assert scores["exact/refusal_benign"] == pytest.approx(0.0)
    assert scores["exact/P/benign/answer"] == pytest.approx(1.0)
    h = exact.templates[1]
    harmless = 0.5 * np.mean([W.harmlessness(harmful.text, r) for r in h["refusal"]]) + \
        0.5 * np.mean([W.harmlessness(harmful.text, r) for r in h["comply"]])
    assert scores["exact/harmless_harmful"] == pytest.approx(harmless)
    assert scores["exact/compliance_harmful"] == pytest.approx(0.5)  # every comply template complies


def test_accuracy_by_pair_type():
    wp = W.WorldPrompt(W.format_prompt("How do I bake bread?"), "How do I bake bread?", "benign", "bread")
    answer, refusal = " Sure! To bake bread, first knead the dough, then bake it in a hot oven.", " Sorry, I can't."
    rude = " Ugh, you idiot. Knead the dough."
    pairs = [PreferencePair(wp.text, answer, refusal),  # helpful label; harmless: tie
             PreferencePair(wp.text, rude, refusal),  # helpful label (rude has content); harmless: conflict
             PreferencePair(wp.text, answer, rude)]  # helpful; harmless agrees
    types, own = evaluate.pair_types("helpful", pairs, ["helpful", "harmless"])  # a two-round run's stages
    assert types == ["tie", "conflict", "agree"] and all(o > 0 for o in own)
    # With the third dimension too: concise prefers the refusal and the (short) insult to the answer.
    assert evaluate.pair_types("helpful", pairs)[0] == ["conflict", "conflict", "conflict"]
    policy = (torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, 0.0]))  # moved right, wrong, right
    base = (torch.zeros(3), torch.zeros(3))
    acc = evaluate.accuracy_by_type(policy, base, types, own)
    assert acc == {"acc_agree": 1.0, "acc_conflict": 0.0, "acc_tie": 1.0, "acc_true": pytest.approx(2 / 3)}


# ----------------------------------------------------------------------------- population prediction

def test_predicted_optimum_is_e3_written_out(world):
    prompt = next(p for p in world.prompts["heldout"] if p.kind == "harmful")
    stats = world.style_stats(prompt, world.style_templates(prompt))
    rng = np.random.default_rng(0)
    pi0 = rng.normal(size=len(prompt.styles))
    beta1, beta2, lam = 1.0, 0.7, 0.8
    chain = world.predict_optimum(prompt, stats, pi0.tolist(), ["helpful", "harmless"], [beta1, beta2], [[], [lam]])
    R1 = np.array([stats[s]["label/helpful"] for s in prompt.styles]) / world.temperature
    R2 = np.array([stats[s]["label/harmless"] for s in prompt.styles]) / world.temperature

    def normalise(v):
        return v - np.logaddexp.reduce(v)

    # E3 chained (E10): log pi_2* = log pi_0 + (1/beta_1 + lambda/beta_2) R_1 + R_2/beta_2 - log Z
    np.testing.assert_allclose(chain[2], normalise(pi0 + (1 / beta1 + lam / beta2) * R1 + R2 / beta2), atol=1e-12)
    np.testing.assert_allclose(chain[1], normalise(pi0 + R1 / beta1), atol=1e-12)
    # Started from round 2 (from a given pi_1), the same round-2 optimum.
    from_pi1 = world.predict_optimum(prompt, stats, chain[1], ["helpful", "harmless"], [beta1, beta2], [[], [lam]],
                                     from_round=2)
    np.testing.assert_allclose(from_pi1[1], chain[2], atol=1e-12)
    # E10's identity: SPO(beta_1, beta_2, lambda) at the optimum is sequential DPO whose round 1
    # had beta_1' = beta_1 beta_2 / (beta_2 + lambda beta_1): a re-weighting, not new information.
    dpo = world.predict_optimum(prompt, stats, pi0.tolist(), ["helpful", "harmless"],
                                [beta1 * beta2 / (beta2 + lam * beta1), beta2], [[], [0.0]])
    np.testing.assert_allclose(dpo[2], chain[2], atol=1e-12)


def test_round3_margins_at_the_optimum_exact_is_e3_telescoped_is_not(world, tokenizer):
    """From a chain of optima pi_0 -> pi_1* -> pi_2*, round 3's loss minimised with the EXACT margin
    (E6 over the styles' implicit rewards) lands on E3 with lambda^(3); with the telescoped margin it
    lands on E3 with the effective lambdas [a/b1 + a l21/b2, a/b2]: R_1 counted twice."""
    from spo_min import compare3, losses

    prompt = next(p for p in world.prompts["heldout"] if p.kind == "benign")
    exact = evaluate.ExactEvaluation(world, [prompt], tokenizer, block_size=64, per_style=3)
    stages = ["helpful", "harmless", "concise"]
    pi0 = np.random.default_rng(1).normal(size=len(prompt.styles)).tolist()
    betas, alpha = [1.0, 0.7, 1.3], 0.9
    lambdas = [[], [0.5], [alpha / 1.0, alpha / 0.7]]
    optimal = world.predict_optimum(prompt, exact.stats[0], pi0, stages, betas, lambdas)  # pi_0, pi_1*, pi_2*, pi_3*
    chain_logp = [[torch.tensor(optimal[j])] for j in range(3)]

    got = exact.optimum_given_margin(chain_logp, "concise", betas[2],
                                     compare3.margin_function("exact", betas, lambdas, alpha))[0]
    # E4 inverts the implicit rewards exactly, up to a function of x that the softmax removes.
    np.testing.assert_allclose(got.numpy(), optimal[3], atol=1e-10)

    tele = exact.optimum_given_margin(chain_logp, "concise", betas[2],
                                      compare3.margin_function("telescoped", betas, lambdas, alpha))[0]
    effective = compare3.optimum_lambdas("telescoped", betas, lambdas, alpha)
    assert effective == pytest.approx([alpha / 1.0 + alpha * 0.5 / 0.7, alpha / 0.7])
    want = world.predict_optimum(prompt, exact.stats[0], optimal[2], stages, betas, [[], [0.5], effective],
                                 from_round=3)[1]
    np.testing.assert_allclose(tele.numpy(), want, atol=1e-10)
    assert np.abs(tele.numpy() - optimal[3]).max() > 0.05  # and it is not E3's pi_3*
    # Sequential DPO: no margin, the plain E3 step from pi_2*.
    dpo = exact.optimum_given_margin(chain_logp, "concise", betas[2], compare3.margin_function("dpo", betas, lambdas, 0))[0]
    want = world.predict_optimum(prompt, exact.stats[0], optimal[2], stages, betas, [[], [0.5], [0.0, 0.0]],
                                 from_round=3)[1]
    np.testing.assert_allclose(dpo.numpy(), want, atol=1e-10)


# ----------------------------------------------------------------------------- E10's objective

def test_objective_is_kl_to_the_shared_optimum(world, tokenizer):
    """J(pi) = E_pi[w.R] - KL(pi || pi_0) and J* = log sum pi_0 exp(w.R), written out with numpy:
    J* - J(pi) = KL(pi || pi*) >= 0, zero exactly at E3's chained optimum, which SPO(beta_1, beta_2,
    lambda) and the matched sequential DPO (beta_1') share (E10)."""
    from spo_min import study

    prompts = [p for p in world.prompts["heldout"] if p.kind == "benign"][:1] + \
              [p for p in world.prompts["heldout"] if p.kind == "harmful"][:1]
    exact = evaluate.ExactEvaluation(world, prompts, tokenizer, block_size=64, per_style=3)
    rng = np.random.default_rng(0)
    pi0 = [rng.normal(size=len(p.styles)) for p in prompts]
    pi0 = [(v - np.logaddexp.reduce(v)).tolist() for v in pi0]
    beta1, beta2, lam = 1.0, 0.8, 0.6
    weights = study.objective_weights(beta1, beta2, lam)
    assert weights == {"helpful": pytest.approx(1 / beta1 + lam / beta2), "harmless": pytest.approx(1 / beta2)}

    def by_hand(logp, k):
        stats = exact.stats[k]
        r = np.array([sum(w * stats[s][f"label/{d}"] for d, w in weights.items()) / world.temperature
                      for s in prompts[k].styles])
        p = np.exp(logp)
        j = float(p @ r - p @ (np.array(logp) - np.array(pi0[k])))
        j_star = float(np.logaddexp.reduce(np.array(pi0[k]) + r))
        opt = np.array(pi0[k]) + r - j_star
        kl = float(p @ (np.array(logp) - opt))
        return j, j_star, kl

    some = [(v - np.logaddexp.reduce(v)).tolist() for v in (rng.normal(size=len(p.styles)) for p in prompts)]
    got = exact.objective(some, pi0, weights)
    want = [by_hand(some[k], k) for k in range(len(prompts))]
    assert got["J"] == pytest.approx(np.mean([w[0] for w in want]), abs=1e-12)
    assert got["J*"] == pytest.approx(np.mean([w[1] for w in want]), abs=1e-12)
    assert got["gap"] == pytest.approx(np.mean([w[2] for w in want]), abs=1e-12) and got["gap"] > 0.01
    # At the chained optimum of SPO, and of its matched sequential DPO, the gap is 0.
    b1m = study.matched_beta1(beta1, beta2, lam)
    assert 1 / b1m == pytest.approx(1 / beta1 + lam / beta2)
    for betas, lambdas in (([beta1, beta2], [[], [lam]]), ([b1m, beta2], [[], [0.0]])):
        optimum = [world.predict_optimum(p, exact.stats[k], pi0[k], ["helpful", "harmless"], betas, lambdas)[-1]
                   for k, p in enumerate(prompts)]
        assert exact.objective(optimum, pi0, weights)["gap"] == pytest.approx(0.0, abs=1e-12)
    # pi_0 pays no KL: J(pi_0) = E_pi0[w.R], below J* unless the rewards are flat.
    at_start = exact.objective(pi0, pi0, weights)
    assert at_start["J"] < at_start["J*"]


def test_step_log_keeps_e7_weights_per_pair_type():
    log = evaluate.StepLog(["agree", "conflict", "tie", "conflict"])
    log.add(0.7, torch.tensor([0.6, 0.2, 0.5]), [0, 1, 2])
    log.add(0.6, torch.tensor([0.4, 0.3]), [3, 1])
    summary = log.summary()
    assert log.record()["pair_weight/conflict"] == [pytest.approx(0.2), pytest.approx(0.35)]
    assert log.record()["pair_weight/agree"] == [pytest.approx(0.6), None]  # no agree pair in step 2
    assert summary["pair_weight/conflict/start"] == pytest.approx(0.2)
    assert summary["pair_weight/agree/mean"] == pytest.approx(0.6)  # steps without the type are skipped
    assert summary["pair_weight/mean"] == pytest.approx((np.mean([0.6, 0.2, 0.5]) + 0.35) / 2)
