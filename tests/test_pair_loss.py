"""spo_min/pair_loss.py: the lm_head, log-probs and loss fused per chunk of pairs, against plain autograd.

The reference is the path the fused one replaces, written out here: the full (N, V) logits,
torch.log_softmax, gather, E9's sums, and losses.spo_loss, differentiated by autograd. Both run in
fp64 on random data with non-zero margins and cached reference log-probs, so they agree to fp64
rounding (~1e-15 relative) and any missing, doubled or misplaced term shows. The loss is a sum of
per-pair terms over the batch's pair count: exactly the losses the fused path is exact for.

Both backends run: "torch" everywhere, "triton" on CUDA or, on CPU, in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), at tiny sizes.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.logprobs as lp
from allocations import RecordAllocations
from spo_min import data, losses
from spo_min.logps import batch_pair_loss, batch_sequence_logps
from spo_min.model import GPT, GPTConfig
from spo_min.pair_loss import fused_pair_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEEDS_TRITON = pytest.mark.skipif(not (lp.HAS_TRITON and (DEVICE == "cuda" or lp._kernels_interpreted())),
                                  reason="needs Triton with a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
BACKENDS = ["torch", pytest.param("triton", marks=NEEDS_TRITON)]
BETA = 0.7
LOSS = functools.partial(losses.spo_loss, beta=BETA)
F64 = torch.float64


def make_batch(B, T=9, C=6, V=50, *, dtype=F64, seed=0):
    """A batch of B pairs: hidden states (2B, T, C) (a leaf), the lm_head weight (V, C), labels (2B, T).

    Each row has a prompt of 1-3 positions, a response of random length, padding after it, and
    random ignored (-100) positions inside the response (at least one scored token per row).
    Logits of spread ~3: a peaked softmax, like a trained LM's. The cached reference log-probs
    sit a few nats from the policy's and the margins are non-zero, so every pair has its own
    weight sigmoid(M - h) (E7) and the per-token gradients differ from pair to pair.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    for row in labels:
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        end = int(torch.randint(prompt + 1, T + 1, (1,), generator=gen))
        row[:prompt] = -100
        row[end:] = -100
        inside = torch.rand(T, generator=gen) < 0.2
        inside[prompt] = False  # the response's first token stays scored
        row[inside] = -100
    hidden = torch.randn(2 * B, T, C, generator=gen, dtype=F64).to(dtype).to(DEVICE).requires_grad_(True)
    weight = (3 / C**0.5 * torch.randn(V, C, generator=gen, dtype=F64)).to(dtype).to(DEVICE).requires_grad_(True)
    labels = labels.to(DEVICE)
    with torch.no_grad():
        _, seq = plain_autograd(hidden.double(), weight.double(), labels, torch.zeros(2 * B, dtype=F64, device=DEVICE),
                                0.0)
    ref_logps = (seq + 3 * torch.randn(2 * B, generator=gen, dtype=F64).to(DEVICE)).float()
    margin = torch.randn(B, generator=gen).to(DEVICE)
    return hidden, weight, labels, ref_logps, margin


def plain_autograd(hidden, weight, labels, ref_logps, margin, average=False, divisor=None):
    """The unfused path: (N, V) logits, log_softmax, gather, E9 written out, losses.spo_loss."""
    scored = labels != -100
    logits = F.linear(hidden[scored], weight)  # every scored token's logits at once
    token = torch.log_softmax(logits, dim=-1).gather(1, labels[scored].unsqueeze(1)).squeeze(1)
    per_position = torch.zeros(labels.shape, dtype=token.dtype, device=token.device).masked_scatter(scored, token)
    seq = per_position.sum(1) / (scored.sum(1) if average else 1)  # E9 (--average-logps: the mean)
    B = labels.shape[0] // 2
    if divisor is None:
        loss, _ = losses.spo_loss(seq[:B], seq[B:], ref_logps[:B], ref_logps[B:], margin, BETA)  # the mean
    else:
        loss = losses.spo_loss(seq[:B], seq[B:], ref_logps[:B], ref_logps[B:], margin, BETA, reduction="none")[0]
        loss = loss.sum() / divisor
    return loss, seq


def fused(hidden, weight, labels, ref_logps, margin, **kwargs):
    """fused_pair_loss on a (2B, T, C) hidden-state leaf, as spo_min/logps.py calls it."""
    return fused_pair_loss(hidden[labels != -100], weight, labels, LOSS, ref_logps=ref_logps, margin=margin, **kwargs)


def loss_and_grads(fn, hidden, weight, *args, **kwargs):
    loss, seq = fn(hidden, weight, *args, **kwargs)[:2]
    return (loss.detach(), seq.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def assert_fp64_equal(got, want):
    # fp64 (eps 2.2e-16) on both sides, sums of at most V = 50 or N ~ 60 terms: the measured worst
    # difference is 3.6e-15 (on sequence log-probs of size <= 41); 1e-12 leaves room while a wrong
    # chunk, row, pair, divisor or upstream gradient moves entries by > 1e-3.
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Values and both gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", [False, True], ids=["sum", "average-logps"])
@pytest.mark.parametrize("backend, chunk_pairs", [("torch", 1), ("torch", 2), ("torch", 5),
                                                  pytest.param("triton", 2, marks=NEEDS_TRITON)],
                         ids=["torch-k1", "torch-k2", "torch-kB", "triton-k2"])
def test_matches_plain_autograd(backend, chunk_pairs, average):
    """Loss, sequence log-probs, d hidden and d weight; B = 5 pairs, so k = 2 leaves a chunk of one."""
    hidden, weight, labels, ref_logps, margin = make_batch(5)
    got = loss_and_grads(fused, hidden, weight, labels, ref_logps, margin, chunk_pairs=chunk_pairs, average=average,
                         backend=backend)
    want = loss_and_grads(plain_autograd, hidden, weight, labels, ref_logps, margin, average=average)
    assert got[0].dtype == F64 and got[0] > 0.1  # a real loss, not ln 2 or 0
    assert_fp64_equal(got, want)


def test_every_chunk_size_gives_the_same_numbers():
    hidden, weight, labels, ref_logps, margin = make_batch(7, seed=1)
    results = [loss_and_grads(fused, hidden, weight, labels, ref_logps, margin, chunk_pairs=k, backend="torch")
               for k in (1, 2, 3, 7, 50)]  # 3 leaves a chunk of one pair; 50 > B is one chunk
    for other in results[1:]:
        assert_fp64_equal(other, results[0])


def test_a_non_unit_upstream_gradient_scales_both_gradients():
    hidden, weight, labels, ref_logps, margin = make_batch(4, seed=2)
    _, _, d_hidden, d_weight = loss_and_grads(fused, hidden, weight, labels, ref_logps, margin, chunk_pairs=2)
    loss, _, _ = fused(hidden, weight, labels, ref_logps, margin, chunk_pairs=2)
    (3 * loss).backward()
    assert_fp64_equal((hidden.grad, weight.grad), (3 * d_hidden, 3 * d_weight))
    loss, _, _ = fused(hidden, weight, labels, ref_logps, margin, chunk_pairs=2)
    upstream = torch.tensor(-0.37, dtype=F64, device=DEVICE)
    got = torch.autograd.grad(loss, (hidden, weight), grad_outputs=upstream)
    assert_fp64_equal(got, (-0.37 * d_hidden, -0.37 * d_weight))


def test_two_backwards_with_retain_graph_give_identical_gradients():
    hidden, weight, labels, ref_logps, margin = make_batch(3, seed=3)
    loss, _, _ = fused(hidden, weight, labels, ref_logps, margin, chunk_pairs=1)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # the saved gradients were not scaled in place


def test_two_half_batches_accumulate_to_the_full_batch():
    """Each half divides by the whole batch's pair count (gradient accumulation, DDP's shards)."""
    hidden, weight, labels, ref_logps, margin = make_batch(6, seed=4)
    full = loss_and_grads(fused, hidden, weight, labels, ref_logps, margin, chunk_pairs=2)
    total, grads = 0.0, [torch.zeros_like(hidden), torch.zeros_like(weight)]
    for pairs in (range(0, 3), range(3, 6)):
        rows = list(pairs) + [6 + p for p in pairs]  # its chosen rows, then its rejected rows
        h = hidden[rows]  # a slice of the same leaf: d hidden lands on these rows
        loss, _, _ = fused(h, weight, labels[rows], ref_logps[rows], margin[list(pairs)], chunk_pairs=2, divisor=6)
        total += loss.detach()
        for acc, g in zip(grads, torch.autograd.grad(loss, (hidden, weight))):
            acc += g
    assert_fp64_equal((total, *grads), (full[0], full[2], full[3]))


def test_policy_equal_to_reference_with_zero_margin_gives_ln2():
    """pi_theta == pi_ref and M = 0: every pair's loss is -log sigmoid(0) = ln 2 (and DPO's weight 1/2)."""
    hidden, weight, labels, _, _ = make_batch(4, seed=5)
    with torch.no_grad():
        _, own, _ = fused(hidden, weight, labels, torch.zeros(8, dtype=F64, device=DEVICE), 0.0)
    loss, _, _ = fused(hidden, weight, labels, own, 0.0, chunk_pairs=3)
    assert abs(loss.item() - math.log(2)) < 1e-12


# ---------------------------------------------------------------------------------------------
# A GPT: the tied lm_head, --ref live, batch_pair_loss's two paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["cache", "live"])
def test_tied_embedding_gradient_matches_the_full_logits_path(ref):
    """batch_pair_loss, chunked (fused) vs full, on a GPT whose lm_head is its token embedding.

    wte.weight receives two contributions, the input lookup's and the head's: the fused path must
    return its head contribution so that autograd adds the two, as it does for model.head. With
    --ref live the reference is scored inside the same chunk loop. fp64, so both paths agree to
    rounding and any missing or doubled contribution shows.
    """
    config = GPTConfig(block_size=32, vocab_size=97, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config, seed=0).double().to(DEVICE)
    ref_model = GPT(config, seed=1).double().to(DEVICE).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 96, (n,), generator=gen).tolist()

    pairs = [data.TokenizedPair(prompt_ids=ids(5), chosen_ids=ids(4 + i) + [96], rejected_ids=ids(7 - i) + [96])
             for i in range(3)]
    # Token 96 plays GPT-2's end-of-text (50256) in this 97-token vocabulary: it ends and pads rows.
    batch = {k: v.to(DEVICE) for k, v in data.collate_pairs(pairs, pad_id=96).items()}
    with torch.no_grad():
        cached, _ = batch_sequence_logps(ref_model, batch, logits="full")
    margin = torch.randn(3, generator=gen, dtype=F64).to(DEVICE)
    reference = {"ref_model": ref_model} if ref == "live" else {"ref_logps": cached}

    def grads(logits):
        model.zero_grad(set_to_none=True)
        loss, seq, ref_seq = batch_pair_loss(model, batch, LOSS, margin=margin, logits=logits, chunk_pairs=2,
                                             backend="torch", **reference)
        loss.backward()
        return loss.detach(), seq, ref_seq, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_full, seq_full, ref_full, full = grads("full")
    loss_fused, seq_fused, ref_fused, fused_grads = grads("chunked")
    torch.testing.assert_close(loss_fused, loss_full, atol=1e-12, rtol=0)  # fp64 rounding only
    torch.testing.assert_close(seq_fused, seq_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(ref_fused, cached, atol=1e-12, rtol=0)  # live: scored in the chunk loop
    assert full.keys() == fused_grads.keys()
    for name in full:
        torch.testing.assert_close(fused_grads[name], full[name], atol=1e-12, rtol=1e-10, msg=name)
    # The check has teeth: both contributions to wte are there and neither is negligible. The
    # head's alone (hidden states held constant) leaves a real remainder on the rows the input
    # looked up, and nothing elsewhere: a path that dropped or doubled either part would fail above.
    scored = batch["labels"] != -100
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"])
    wte = model.transformer.wte.weight
    head_only = torch.autograd.grad(plain_autograd(hidden, wte, batch["labels"], cached, margin)[0], wte)[0]
    lookup = full["transformer.wte.weight"] - head_only
    seen = torch.zeros(config.vocab_size, dtype=torch.bool, device=DEVICE)
    seen[batch["input_ids"].unique()] = True
    assert head_only.abs().max() > 1e-3 and lookup[seen].abs().max() > 1e-3 and scored.sum() > 20
    if ref == "cache":
        assert lookup[~seen].abs().max() < 1e-12  # rows never looked up: the head's gradient only


# ---------------------------------------------------------------------------------------------
# bf16 autocast, memory, bad input
# ---------------------------------------------------------------------------------------------


def test_bf16_autocast_accumulates_the_weight_gradient_in_fp32():
    """train.py --dtype bfloat16: fp32 weights, bf16 matmuls, the sum over chunks in fp32."""
    hidden, weight, labels, ref_logps, margin = make_batch(8, T=12, C=16, V=64, dtype=torch.float32, seed=6)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _, d_hidden, d_weight = loss_and_grads(fused, hidden, weight, labels, ref_logps, margin,
                                                     chunk_pairs=1, backend="torch")
    assert loss.dtype == d_hidden.dtype == d_weight.dtype == torch.float32
    # 8 chunks summed in fp32: most entries are not bf16 numbers. A bf16 accumulator (or one bf16
    # matmul over every token) would make each entry exactly a bf16 number.
    assert (d_weight.to(torch.bfloat16).float() != d_weight).float().mean() > 0.5
    exact = loss_and_grads(plain_autograd, hidden.double(), weight.double(), labels, ref_logps, margin)
    # Against fp64: h, W and each chunk's d logits are rounded to bf16 (relative 2^-9 each), so
    # logits of size ~3 move by ~2^-7 and so do the softmax weights; every gradient entry is a sum
    # of such products, each chunk's rounded once more to bf16 (2^-9). Measured worst, as a share
    # of the largest entry: loss 0.9%, d hidden 1.0%, d weight 1.2% (plain autograd under the same
    # autocast, one bf16 matmul for d weight: 2.1%). Bound: 4%, about 2^-8 x the ~10 rounded
    # factors behind each product; a wrong chunk or pair moves entries by tens of percent.
    for got, want in ((loss, exact[0]), (d_hidden, exact[2]), (d_weight, exact[3])):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=0.04 * scale, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tensor_of_all_scored_tokens_by_v_elements(backend):
    B, T, C, V = 4, 9, 6, 300
    hidden, weight, labels, ref_logps, margin = make_batch(B, T, C, V, dtype=torch.float32, seed=7)
    n_scored = (labels != -100).sum(1)
    biggest_chunk = int((n_scored[:B] + n_scored[B:]).max())  # k = 1: one pair's tokens
    N = int(n_scored.sum())
    assert N * V > biggest_chunk * V > V * C  # the sizes tell the tensors apart
    with RecordAllocations() as rec:
        loss, _, _ = fused(hidden, weight, labels, ref_logps, margin, chunk_pairs=1, backend=backend)
        torch.autograd.grad(loss, (hidden, weight))
    biggest, op = max(rec.numels)
    assert biggest <= biggest_chunk * V, f"{op} made a tensor of {biggest} elements"
    assert any(numel == biggest_chunk * V for numel, _ in rec.numels)  # a chunk of logits was made, and seen
    # The recorder does see N x V tensors: the plain path makes them.
    with RecordAllocations() as rec:
        torch.autograd.grad(plain_autograd(hidden, weight, labels, ref_logps, margin)[0], (hidden, weight))
    assert max(rec.numels)[0] == N * V


def test_bad_input_gives_one_clear_error():
    hidden, weight, labels, ref_logps, margin = make_batch(2)
    h = hidden[labels != -100]
    with pytest.raises(losses.LossInputError, match="exactly one of them"):
        fused_pair_loss(h, weight, labels, LOSS, margin=margin)
    with pytest.raises(losses.LossInputError, match="exactly one of them"):
        fused_pair_loss(h, weight, labels, LOSS, ref_logps, h, weight, margin=margin)
    with pytest.raises(losses.LossInputError, match=r"hidden has \d+ rows but labels score \d+ positions"):
        fused_pair_loss(h[1:], weight, labels, LOSS, ref_logps, margin=margin)
    with pytest.raises(losses.LossInputError, match="chunk_pairs must be a positive int, got 0"):
        fused_pair_loss(h, weight, labels, LOSS, ref_logps, margin=margin, chunk_pairs=0)
    with pytest.raises(losses.LossInputError, match="NaN"):  # E9's own check (losses.sequence_logps)
        fused_pair_loss(h * float("nan"), weight, labels, LOSS, ref_logps, margin=margin, backend="torch")
