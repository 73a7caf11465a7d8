"""kernels/linear_logprobs.py: the chunked lm_head + log-probs (no gradient) against the unfused path.

The unfused path is F.linear(hidden, weight) -> token_logprobs, whose own reference is checked
against the definition in tests/test_logprobs.py. Here it is evaluated in fp64 on the same values
("exact": ~1e-15), so every comparison measures the chunked path's own fp32 error. The training
path built from the same per-chunk pieces (spo_min/pair_loss.py) is tested in tests/test_pair_loss.py.

Both backends run: "torch" everywhere, "triton" on CUDA or, on CPU, in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), where the sizes stay tiny (it is slow).
"""

import pytest
import torch
import torch.nn.functional as F

import kernels.logprobs as lp
from allocations import RecordAllocations
from kernels.linear_logprobs import linear_token_logprobs
from kernels.logprobs import IGNORE_INDEX, TokenLogprobsError, token_logprobs_reference

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


def unfused(hidden, weight, labels, ref_hidden=None, ref_weight=None):
    """The path this module replaces, in plain torch: full (N, V) logits, then log-probs."""
    ref_logits = F.linear(ref_hidden, ref_weight) if ref_hidden is not None else None
    return token_logprobs_reference(F.linear(hidden, weight), labels, ref_logits)


def exact(hidden, weight, labels, ref_hidden=None, ref_weight=None):
    """The unfused path in fp64 on the same values: log-probs to ~1e-15."""
    r64 = (ref_hidden.double(), ref_weight.double()) if ref_hidden is not None else (None, None)
    return unfused(hidden.double(), weight.double(), labels, *r64)


def assert_close_fp32(got, want):
    # fp32 (eps 1.2e-7) everywhere: the logits are sums of C products, the lse a sum of V terms
    # of size <= 1. Measured worst error: 2.5e-6 on log-probs of size <= 21; atol 1e-5 + rtol 1e-5
    # (the fp32 budget) bounds it with a margin of 4x, while a wrong chunk, row, label or
    # lse moves entries by >> 1e-3.
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Values against the unfused path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_unfused_fp32(backend):
    N, C, V = (45, 16, 300) if backend == "triton" else (200, 32, 5000)
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(N, C, V)
    got = linear_token_logprobs(hidden, weight, labels, ref_hidden, ref_weight, chunk_size=16, backend=backend)
    for got_t, want_t in zip(got, exact(hidden, weight, labels, ref_hidden, ref_weight)):  # policy, reference
        assert_close_fp32(got_t, want_t)


def test_fp64_in_fp64_out():
    hidden, weight, labels, _, _ = make_inputs(7, 4, 11, dtype=torch.float64, with_ref=False)
    out, _ = linear_token_logprobs(hidden, weight, labels, chunk_size=3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, exact(hidden, weight, labels)[0], atol=1e-12, rtol=0)  # fp64 rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_labels_give_zero(backend):
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(30, 8, 97, ignore_frac=0.4)
    ignored = labels == IGNORE_INDEX
    pol, ref = linear_token_logprobs(hidden, weight, labels, ref_hidden, ref_weight, chunk_size=8, backend=backend)
    assert torch.all(pol[ignored] == 0) and torch.all(ref[ignored] == 0) and torch.all(pol[~ignored] < 0)


@pytest.mark.parametrize("chunk_size", [1, 7, 23, 64])
def test_any_chunk_size(chunk_size):
    """N = 23 rows in chunks of 1 (23 chunks), 7 (a ragged last chunk of 2), N, and more than N."""
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(23, 8, 150)
    got = linear_token_logprobs(hidden, weight, labels, ref_hidden, ref_weight, chunk_size=chunk_size,
                                backend="torch")
    for got_t, want_t in zip(got, exact(hidden, weight, labels, ref_hidden, ref_weight)):
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


def test_refuses_to_be_differentiated():
    """It returns no gradient: called where one is expected, it says where training goes instead."""
    hidden, weight, labels, _, _ = make_inputs(10, 8, 50, with_ref=False)
    hidden.requires_grad_(True)
    with pytest.raises(TokenLogprobsError, match=r"scores without gradients .* spo_min/pair_loss.py"):
        linear_token_logprobs(hidden, weight, labels)
    with torch.no_grad():
        out, _ = linear_token_logprobs(hidden, weight, labels)
    assert not out.requires_grad


def test_leading_dims_and_empty_input():
    hidden, weight, labels, _, _ = make_inputs(12, 8, 40, with_ref=False)
    out, _ = linear_token_logprobs(hidden.view(3, 4, 8), weight, labels.view(3, 4), chunk_size=5)
    assert out.shape == (3, 4) and torch.equal(out.reshape(-1), linear_token_logprobs(hidden, weight, labels,
                                                                                         chunk_size=5)[0])
    out, _ = linear_token_logprobs(torch.zeros(0, 8, device=DEVICE), weight, labels[:0])
    assert out.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Memory: no tensor of N x V elements, ever
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tensor_of_n_by_v_elements(backend):
    N, C, V, K = 40, 8, 300, 16  # N x V = 12000 > K x V = 4800
    hidden, weight, labels, ref_hidden, ref_weight = make_inputs(N, C, V)
    with RecordAllocations() as rec:
        linear_token_logprobs(hidden, weight, labels, ref_hidden, ref_weight, chunk_size=K, backend=backend)
    biggest, op = max(rec.numels)
    assert biggest <= K * V, f"{op} made a tensor of {biggest} elements"
    assert any(numel == K * V for numel, _ in rec.numels)  # a chunk of logits was made, and seen
    # The recorder does see N x V tensors: the unfused path makes them.
    with RecordAllocations() as rec:
        unfused(hidden, weight, labels)
    assert max(rec.numels)[0] == N * V


# ---------------------------------------------------------------------------------------------
# autocast (train.py --dtype bfloat16) and bad input
# ---------------------------------------------------------------------------------------------


def test_autocast_computes_the_logits_as_f_linear_would():
    """Under autocast the logits are bf16, as F.linear's; their log-probs are summed in fp32. The
    reference builds its logits with the same per-chunk matmuls, so both sides hold bitwise the
    same bf16 logits on any device."""
    hidden, weight, labels, _, _ = make_inputs(40, 16, 200, with_ref=False)

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, _ = linear_token_logprobs(hidden, weight, labels, chunk_size=16, backend="torch")
        logits = torch.cat([F.linear(hidden[i : i + 16], weight) for i in range(0, len(hidden), 16)])
    assert logits.dtype == torch.bfloat16 and got.dtype == torch.float32
    want, _ = token_logprobs_reference(logits, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # the same bf16 logits, fp32 sums on both sides


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
