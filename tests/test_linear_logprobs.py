"""kernels/linear_logprobs.py: the chunked lm_head + log-probs against the unfused path.

The unfused path is F.linear(hidden, weight) -> token_logprobs, whose own reference is checked
against the definition in tests/test_logprobs.py. Here it is evaluated in fp64 on the same values
("exact": ~1e-15), so every comparison measures the chunked path's own fp32 error.

Both backends run: "torch" everywhere, "triton" on CUDA or, on CPU, in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), where the sizes stay tiny (it is slow).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.logprobs as lp
from kernels.linear_logprobs import linear_token_logprobs
from kernels.logprobs import IGNORE_INDEX, TokenLogprobsError, token_logprobs_reference
from spo_min import data, losses
from spo_min.logps import batch_sequence_logps
from spo_min.model import GPT, GPTConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_RUNS = lp.HAS_TRITON and (DEVICE == "cuda" or lp._kernels_interpreted())
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        not TRITON_RUNS, reason="needs Triton with a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)")),
]


def make_inputs(N, C, V, *, dtype=torch.float32, ignore_frac=0.25, seed=0, with_ref=True):
    """Hidden states (N, C), an lm_head weight (V, C), labels with random -100s, and a reference.

    Hidden states of unit size and weights of size 1/sqrt(C) * 3 give logits of spread ~3: a
    peaked softmax, like a trained LM's (as in tests/test_logprobs.py).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)

    hidden, weight = randn(N, C), randn(V, C, scale=3 / C**0.5)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < ignore_frac] = IGNORE_INDEX
    ref = (randn(N, C), randn(V, C, scale=3 / C**0.5)) if with_ref else (None, None)
    return hidden, weight, labels.to(DEVICE), *ref


def upstream_grad(N, seed=1):
    """Per-token upstream gradients as a preference loss produces them: signs, zeros, sizes."""
    gen = torch.Generator().manual_seed(seed)
    g = 4 * torch.rand(N, generator=gen, dtype=torch.float64) * torch.randn(N, generator=gen, dtype=torch.float64)
    g[torch.rand(N, generator=gen) < 0.2] = 0.0
    return g.to(DEVICE)


def unfused(hidden, weight, labels, ref_hidden=None, ref_weight=None):
    """The path this module replaces, in plain torch: full (N, V) logits, then log-probs."""
    ref_logits = F.linear(ref_hidden, ref_weight) if ref_hidden is not None else None
    return token_logprobs_reference(F.linear(hidden, weight), labels, ref_logits)


def value_and_grads(fn, hidden, weight, g):
    """fn(hidden, weight) -> (policy_logp, ref_logp); returns (policy_logp, ref_logp, d hidden, d weight)."""
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    pol, ref = fn(hidden, weight)
    d_hidden, d_weight = torch.autograd.grad(pol, (hidden, weight), g.to(pol.dtype))
    return pol, ref, d_hidden, d_weight


def exact(hidden, weight, labels, ref_hidden, ref_weight, g):
    """The unfused path in fp64 on the same values: values and both gradients to ~1e-15."""
    r64 = (ref_hidden.double(), ref_weight.double()) if ref_hidden is not None else (None, None)
    return value_and_grads(lambda h, w: unfused(h, w, labels, *r64), hidden.double(), weight.double(), g)


def assert_close_fp32(got, want):
    # fp32 (eps 1.2e-7) everywhere: the logits are sums of C products, the lse a sum of V terms
    # of size <= 1, both gradients sums of V (d hidden) or N (d weight) terms weighted by a
    # softmax or by |g| <= 4. Measured worst errors: 2.5e-6 on log-probs of size <= 21, 7e-6 on
    # gradient entries of size <= 18; atol 1e-5 + rtol 1e-5 (the fp32 budget) bounds
    # those with a margin of 1.4x or more, while a wrong chunk, row, label, lse or upstream
    # gradient moves entries by >> 1e-3.
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Values and both gradients against the unfused path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_unfused_fp32(backend):
    N, C, V = (45, 16, 300) if backend == "triton" else (200, 32, 5000)
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(N, C, V)
    g = upstream_grad(N)
    got = value_and_grads(lambda h, w: linear_token_logprobs(h, w, labels, ref_hidden, ref_weight,
                                                             chunk_size=16, backend=backend), hidden, weight, g)
    want = exact(hidden, weight, labels, ref_hidden, ref_weight, g)
    for got_t, want_t in zip(got, want):  # policy, reference, d hidden, d weight
        assert_close_fp32(got_t, want_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    """fp64 in, fp64 accumulation: autograd's numerical check of both gradients, over 3 chunks."""
    hidden, weight, labels, _, _ = make_inputs(7, 4, 11, dtype=torch.float64, with_ref=False)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out, _ = linear_token_logprobs(hidden, weight, labels, chunk_size=3, backend=backend)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda h, w: linear_token_logprobs(h, w, labels, chunk_size=3, backend=backend)[0], (hidden, weight),
        fast_mode=backend == "triton",  # the interpreter is slow; fast mode checks random projections
    )


def test_upstream_gradient_is_per_token():
    """A path that scales every token's gradient by one number (the "pre-scaled in the forward"
    pitfall of design.md) must fail this test: the per-token g below is far from its mean."""
    hidden, weight, labels, _, _ = make_inputs(60, 16, 400, with_ref=False)
    g = upstream_grad(60)
    got = value_and_grads(lambda h, w: linear_token_logprobs(h, w, labels, chunk_size=16, backend="torch"),
                          hidden, weight, g)
    want = exact(hidden, weight, labels, None, None, g)
    one_scale = exact(hidden, weight, labels, None, None, torch.full_like(g, g.mean().item()))
    for i in (2, 3):  # d hidden, d weight
        assert_close_fp32(got[i], want[i])
        assert (one_scale[i] - want[i]).abs().max() > 0.1  # the pitfall would be off by this much


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_labels_give_zero_and_no_gradient(backend):
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(30, 8, 97, ignore_frac=0.4)
    g = upstream_grad(30)
    ignored = labels == IGNORE_INDEX
    g[ignored] = 5.0  # a non-zero upstream gradient must still not get through
    pol, ref, d_hidden, d_weight = value_and_grads(
        lambda h, w: linear_token_logprobs(h, w, labels, ref_hidden, ref_weight, chunk_size=8, backend=backend),
        hidden, weight, g)
    assert torch.all(pol[ignored] == 0) and torch.all(ref[ignored] == 0) and torch.all(pol[~ignored] < 0)
    assert torch.all(d_hidden[ignored] == 0)
    # The weight gradient is what the scored rows alone give.
    scored_only = exact(hidden[~ignored], weight, labels[~ignored], None, None, g[~ignored])
    assert_close_fp32(d_weight, scored_only[3])


@pytest.mark.parametrize("chunk_size", [1, 7, 23, 64])
def test_any_chunk_size(chunk_size):
    """N = 23 rows in chunks of 1 (23 chunks), 7 (a ragged last chunk of 2), N, and more than N."""
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(23, 8, 150)
    g = upstream_grad(23)
    got = value_and_grads(lambda h, w: linear_token_logprobs(h, w, labels, ref_hidden, ref_weight,
                                                             chunk_size=chunk_size, backend="torch"),
                          hidden, weight, g)
    for got_t, want_t in zip(got, exact(hidden, weight, labels, ref_hidden, ref_weight, g)):
        assert_close_fp32(got_t, want_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_and_reference_in_one_call_equals_two_calls(backend):
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(20, 8, 77)
    both_pol, both_ref = linear_token_logprobs(hidden, weight, labels, ref_hidden, ref_weight,
                                               chunk_size=8, backend=backend)
    pol, none = linear_token_logprobs(hidden, weight, labels, chunk_size=8, backend=backend)
    ref, _ = linear_token_logprobs(ref_hidden, ref_weight, labels, chunk_size=8, backend=backend)
    assert none is None
    # Bitwise: the same arithmetic on the same values, whether the other model is there or not.
    assert torch.equal(both_pol, pol) and torch.equal(both_ref, ref)


def test_reference_gets_no_gradient():
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(10, 8, 50)
    ref_hidden.requires_grad_(True)  # e.g. a reference model run without torch.no_grad()
    ref_weight.requires_grad_(True)
    pol, ref = linear_token_logprobs(hidden.requires_grad_(True), weight, labels, ref_hidden, ref_weight)
    assert pol.requires_grad and not ref.requires_grad
    (pol.sum() + ref.sum()).backward()
    assert hidden.grad is not None and ref_hidden.grad is None and ref_weight.grad is None


def test_leading_dims_and_empty_input():
    hidden, weight, labels, _, _ = make_inputs(12, 8, 40, with_ref=False)
    out, _ = linear_token_logprobs(hidden.view(3, 4, 8), weight, labels.view(3, 4), chunk_size=5)
    assert out.shape == (3, 4) and torch.equal(out.reshape(-1), linear_token_logprobs(hidden, weight, labels,
                                                                                         chunk_size=5)[0])
    empty = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    out, _ = linear_token_logprobs(empty, weight, labels[:0])
    out.sum().backward()
    assert out.shape == (0,) and empty.grad.shape == (0, 8)


# ---------------------------------------------------------------------------------------------
# GPT-2's tied lm_head: the weight gradient adds into the token embedding
# ---------------------------------------------------------------------------------------------


def test_tied_embedding_gradient_matches_unfused_path():
    """batch_sequence_logps, chunked vs full, on a GPT whose lm_head is its token embedding.

    wte.weight receives two contributions, the input lookup's and the head's: the chunked path
    must return its head contribution so that autograd adds the two, as it does for model.head.
    fp64, so the two paths agree to rounding and any missing or doubled contribution shows.
    """
    config = GPTConfig(block_size=32, vocab_size=97, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config, seed=0).double().to(DEVICE)
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 96, (n,), generator=gen).tolist()

    pairs = [data.TokenizedPair(prompt_ids=ids(5), chosen_ids=ids(4 + i) + [96], rejected_ids=ids(7 - i) + [96])
             for i in range(3)]
    # Token 96 plays GPT-2's end-of-text (50256) in this 97-token vocabulary: it ends and pads rows.
    batch = {k: v.to(DEVICE) for k, v in data.collate_pairs(pairs, pad_id=96).items()}
    ref_c, ref_r, margin = (torch.randn(3, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))

    def grads(logits):
        model.zero_grad(set_to_none=True)
        seq, _ = batch_sequence_logps(model, batch, logits=logits, backend="torch")
        loss, _ = losses.spo_loss(seq[:3], seq[3:], ref_c, ref_r, margin, beta=0.5)
        loss.backward()
        return seq.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    seq_full, full = grads("full")
    seq_chunked, chunked = grads("chunked")
    torch.testing.assert_close(seq_chunked, seq_full, atol=1e-12, rtol=0)  # fp64 rounding only
    assert full.keys() == chunked.keys()
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], atol=1e-12, rtol=1e-10, msg=name)
    # The check has teeth: both contributions to wte are there and neither is negligible. The
    # head's alone (hidden states held constant) leaves a real remainder on the rows the input
    # looked up, and nothing elsewhere: a path that dropped or doubled either part would fail above.
    scored = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"])[scored]
    wte = model.transformer.wte.weight
    tok, _ = token_logprobs_reference(F.linear(hidden, wte), batch["labels"][scored])
    per_token = torch.zeros(batch["labels"].shape, dtype=tok.dtype, device=DEVICE).masked_scatter(scored, tok)
    seq = losses.sequence_logps(per_token, batch["labels"])
    (head_only,) = torch.autograd.grad(losses.spo_loss(seq[:3], seq[3:], ref_c, ref_r, margin, beta=0.5)[0], wte)
    lookup = full["transformer.wte.weight"] - head_only
    seen = torch.zeros(config.vocab_size, dtype=torch.bool, device=DEVICE)
    seen[batch["input_ids"].unique()] = True
    assert head_only.abs().max() > 1e-3 and lookup[seen].abs().max() > 1e-3
    assert lookup[~seen].abs().max() < 1e-12  # rows never looked up: the head's gradient only


# ---------------------------------------------------------------------------------------------
# Memory: no tensor of N x V elements, ever
# ---------------------------------------------------------------------------------------------


class RecordAllocations(TorchDispatchMode):
    """Records the element count of every fresh op output (views and in-place ops excluded)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func._schema.is_mutable):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numels.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tensor_of_n_by_v_elements(backend):
    N, C, V, K = 40, 8, 300, 16  # N x V = 12000 > K x V = 4800 > V x C = 2400 (the weight gradient)
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(N, C, V)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with RecordAllocations() as rec:
        pol, _ = linear_token_logprobs(hidden, weight, labels, ref_hidden, ref_weight, chunk_size=K, backend=backend)
        torch.autograd.grad(pol, (hidden, weight), upstream_grad(N).float())
    biggest, op = max(rec.numels)
    assert biggest <= K * V, f"{op} made a tensor of {biggest} elements"
    assert any(numel == K * V for numel, _ in rec.numels)  # a chunk of logits was made, and seen
    # The recorder does see N x V tensors: the unfused path makes them.
    with RecordAllocations() as rec:
        torch.autograd.grad(unfused(hidden, weight, labels)[0], (hidden, weight), upstream_grad(N).float())
    assert max(rec.numels)[0] == N * V


# ---------------------------------------------------------------------------------------------
# autocast (train.py --dtype bfloat16) and bad input
# ---------------------------------------------------------------------------------------------


def test_autocast_backward_recomputes_the_forward_logits():
    """Under autocast the logits are bf16. The backward runs outside autocast: it must recompute
    the same bf16 logits, or its softmax would not match the saved lse (recomputing them in fp32
    moves gradient entries by ~0.15 here). The unfused reference below builds its logits with the
    same per-chunk matmuls, so both sides hold bitwise the same bf16 logits on any device."""
    hidden, weight, labels, _, _ = make_inputs(40, 16, 200, with_ref=False)
    g = upstream_grad(40)

    def unfused_chunkwise(h, w):
        logits = torch.cat([F.linear(h[i : i + 16], w) for i in range(0, len(h), 16)])
        return token_logprobs_reference(logits, labels)

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = value_and_grads(lambda h, w: linear_token_logprobs(h, w, labels, chunk_size=16, backend="torch"),
                              hidden, weight, g)
        want = value_and_grads(unfused_chunkwise, hidden, weight, g)
    assert got[2].dtype == got[3].dtype == torch.float32  # gradients in the inputs' dtype
    # Log-probs: the same bf16 logits, fp32 sums on both sides.
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    # Gradients: the same softmax gradients, rounded to bf16 for the bf16 matmuls on both sides;
    # the weight gradient's sum over chunks is fp32 here and bf16 in autograd's accumulation.
    # Measured worst: 2.1e-2 on entries of size <= 10. One bf16 rounding (2^-8 relative) of the
    # largest partial sums (~10) is 4e-2: atol; rtol 2^-7 for the larger entries.
    for i in (2, 3):
        torch.testing.assert_close(got[i], want[i], atol=4e-2, rtol=2**-7)


@pytest.mark.parametrize(
    "case,match",
    [
        ("ref_without_weight", r"give ref_hidden and ref_weight together"),
        ("width", r"expected hidden \(\.\.\., C\) and weight \(V, C\)"),
        ("labels_shape", r"labels shape \(9,\) must equal hidden.shape\[:-1\] = \(10,\)"),
        ("label_too_big", r"labels\[3\] = 50 is outside \[0, 50\)"),
        ("dtypes", r"hidden states \(torch.float64\) and weight \(torch.float32\) must have one dtype"),
        ("chunk", r"chunk_size must be a positive int, got 0"),
    ],
)
def test_bad_input_gives_one_clear_error(case, match):
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(10, 8, 50, ignore_frac=0.0)
    kwargs = {}
    if case == "ref_without_weight":
        kwargs["ref_hidden"] = ref_hidden
    elif case == "width":
        weight = weight[:, :7]
    elif case == "labels_shape":
        labels = labels[:9]
    elif case == "label_too_big":
        labels[3] = 50
    elif case == "dtypes":
        hidden = hidden.double()
    elif case == "chunk":
        kwargs["chunk_size"] = 0
    with pytest.raises(TokenLogprobsError, match=match):
        linear_token_logprobs(hidden, weight, labels, **kwargs)
