"""kernels/logprobs.py: the fused Triton kernels against the plain-torch reference.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton), so CPU CI checks the very kernel code a GPU compiles. With a GPU the
same tests run the compiled kernels on CUDA tensors.

The reference (log_softmax + gather in torch) is itself checked against an independent formula
(test_reference_matches_definition), so "kernel == reference" means "kernel == the math".
"""

import importlib.util
import itertools
import pathlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.logprobs as lp
from kernels.logprobs import (
    IGNORE_INDEX,
    TokenLogprobsError,
    TritonUnavailableError,
    token_logprobs,
    token_logprobs_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPT2_V = 50257

pytestmark = pytest.mark.skipif(
    not (lp.HAS_TRITON and (DEVICE == "cuda" or lp._kernels_interpreted())),
    reason="needs Triton (Linux) with a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)",
)


def make_batch(shape, V, *, dtype=torch.float32, ignore_frac=0.25, seed=0, scale=3.0):
    """Policy and reference logits (shape + (V,)) and labels with random -100 positions.

    scale=3 spreads the logits like a trained LM's (a peaked softmax), not a flat randn one.
    """
    gen = torch.Generator().manual_seed(seed)
    pol = (scale * torch.randn(*shape, V, generator=gen, dtype=torch.float64)).to(dtype)
    ref = (scale * torch.randn(*shape, V, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = IGNORE_INDEX
    return pol.to(DEVICE), labels.to(DEVICE), ref.to(DEVICE)


def upstream_grad(shape, dtype=torch.float32, seed=1):
    """A per-token upstream gradient that is NOT all ones: signs, zeros and a wide range of sizes,
    as a loss with per-sequence weights (chosen +, rejected -, masked 0, beta) produces. Kernels
    that fold the gradient into the forward pass only ever see a uniform one."""
    gen = torch.Generator().manual_seed(seed)
    size = 4 * torch.rand(shape, generator=gen, dtype=torch.float64)
    g = size * torch.randn(shape, generator=gen, dtype=torch.float64)
    g[torch.rand(shape, generator=gen) < 0.2] = 0.0
    return g.to(dtype).to(DEVICE)


def grads(fn, logits, g):
    logits = logits.detach().requires_grad_(True)
    (out,) = torch.autograd.grad(fn(logits), logits, g)
    return out


def exact(pol, labels, ref=None, g=None):
    """The reference evaluated in fp64 on the same values: exact to ~1e-15, so comparisons
    measure the kernel's own error. (torch's fp32 CPU log_softmax is itself ~1e-5 off at
    V=50257, measured 1.2e-5; the kernel's blocked sums are ~1e-6 off.)
    Returns (policy_logp, ref_logp) or, given an upstream gradient g, d policy_logp . g."""
    ref64 = ref.double() if ref is not None else None
    if g is None:
        return token_logprobs_reference(pol.double(), labels, ref64)
    return grads(lambda x: token_logprobs_reference(x, labels, ref64)[0], pol.double(), g.double())


def assert_logp_close(got, want):
    # atol 1e-5 on fp32 log-probs: |logp| <= ~30 here and fp32 has eps 1.2e-7, so rounding in
    # the logsumexp over up to 50257 terms stays ~1e-6; a wrong max, chunk or label is >> 1e-3.
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def assert_grad_close(got, want):
    # Gradient entries are g * (onehot - softmax) with |g| <= 4 and softmax in [0, 1]; the
    # softmax is exp(x - lse) with lse off by ~1e-6 (above): entries agree to ~4e-6 * softmax.
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The reference is the definition: log softmax(x)[y], computed independently here
# ---------------------------------------------------------------------------------------------


def test_reference_matches_definition():
    pol, labels, ref = make_batch((2, 5), 11, dtype=torch.float64)
    got_pol, got_ref = token_logprobs_reference(pol, labels, ref)
    for logits, got in ((pol, got_pol), (ref, got_ref)):
        for idx in itertools.product(*map(range, labels.shape)):
            y = int(labels[idx])
            x = logits[idx]
            # log softmax(x)[y] = x_y - log sum_j exp(x_j), summed in Python floats (fp64).
            want = 0.0 if y == IGNORE_INDEX else float(x[y]) - float(torch.log(torch.exp(x).sum()))
            assert float(got[idx]) == pytest.approx(want, abs=1e-12)  # fp64 rounding only


def test_reference_gradcheck_fp64():
    pol, labels, ref = make_batch((2, 4), 9, dtype=torch.float64)
    pol.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: token_logprobs_reference(x, labels, ref)[0], (pol,))


# ---------------------------------------------------------------------------------------------
# Triton vs reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,V", [((3, 47), 123), ((2, 64), GPT2_V), ((1, 1), 7)])
def test_triton_matches_reference_fp32(shape, V):
    """Forward (both models) and backward with a per-token upstream gradient.

    (2, 64, 50257) is the real GPT-2 vocabulary: 4 chunks of 16384 with a ragged tail under
    the interpreter (13 chunks of 4096 on a GPU), and takes a few seconds interpreted.
    """
    pol, labels, ref = make_batch(shape, V)
    got_pol, got_ref = token_logprobs(pol, labels, ref, backend="triton")
    want_pol, want_ref = exact(pol, labels, ref)
    assert got_pol.shape == got_ref.shape == labels.shape
    assert_logp_close(got_pol, want_pol)
    assert_logp_close(got_ref, want_ref)
    # ... and the fp32 torch reference agrees within its own (larger, see exact()) error.
    fp32_pol, _ = token_logprobs_reference(pol, labels, ref)
    torch.testing.assert_close(got_pol, fp32_pol, atol=5e-5, rtol=0)

    g = upstream_grad(shape)
    got = grads(lambda x: token_logprobs(x, labels, ref, backend="triton")[0], pol, g)
    assert_grad_close(got, exact(pol, labels, ref, g))


def test_multi_chunk_online_softmax(monkeypatch):
    """Force tiny chunks so a small V walks many chunks (8 of 16 for V=123, ragged tail of 11),
    exercising the running-max rescale the big-vocab test only hits a few times per row."""
    monkeypatch.setattr(lp, "BLOCK_V_INTERPRETER", 16)
    monkeypatch.setattr(lp, "BLOCK_V_GPU", 16)
    # Row-sorted logits put the max in the LAST chunk for half the rows (the rescale s*exp(m-m_new)
    # must then shrink everything summed so far) and in the first chunk for the other half.
    pol, labels, ref = make_batch((4, 6), 123, scale=8.0)
    pol = torch.sort(pol, dim=-1, descending=False).values
    pol[::2] = pol[::2].flip(-1)
    got_pol, got_ref = token_logprobs(pol, labels, ref, backend="triton")
    want_pol, want_ref = exact(pol, labels, ref)
    assert_logp_close(got_pol, want_pol)
    assert_logp_close(got_ref, want_ref)
    g = upstream_grad((4, 6))
    got = grads(lambda x: token_logprobs(x, labels, ref, backend="triton")[0], pol, g)
    assert_grad_close(got, exact(pol, labels, ref, g))


def test_gradient_is_g_times_onehot_minus_softmax():
    """The backward against the closed form, independently of autograd through torch ops."""
    pol, labels, ref = make_batch((3, 5), 37, dtype=torch.float64)
    g = upstream_grad((3, 5), dtype=torch.float64)
    got = grads(lambda x: token_logprobs(x, labels, ref, backend="triton")[0], pol, g)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 37).to(torch.float64)
    scored = (labels != IGNORE_INDEX).unsqueeze(-1)
    want = torch.where(scored, g.unsqueeze(-1) * (onehot - torch.softmax(pol, dim=-1)), 0.0)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)  # fp64 rounding only


def test_triton_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(lp, "BLOCK_V_INTERPRETER", 8)  # 2 chunks for V=13: cover the online path
    monkeypatch.setattr(lp, "BLOCK_V_GPU", 8)
    pol, labels, ref = make_batch((2, 5), 13, dtype=torch.float64)
    pol.requires_grad_(True)
    out_pol, out_ref = token_logprobs(pol, labels, ref, backend="triton")
    assert out_pol.dtype == out_ref.dtype == torch.float64  # fp64 inputs accumulate in fp64
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs(x, labels, ref, backend="triton")[0], (pol,), fast_mode=True
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_reference_of_same_values(dtype):
    pol, labels, ref = make_batch((2, 16), GPT2_V, dtype=dtype)
    got_pol, got_ref = token_logprobs(pol, labels, ref, backend="triton")
    assert got_pol.dtype == got_ref.dtype == torch.float32
    # The reference sees the SAME values, upcast (exactly) to fp64. The kernel upcasts them
    # (exactly) to fp32 and accumulates in fp32, so its only error is fp32 rounding: the fp32
    # tolerance applies unchanged (a kernel accumulating in bf16 would be off by ~1e-1).
    want_pol, want_ref = exact(pol, labels, ref)
    assert_logp_close(got_pol, want_pol)
    assert_logp_close(got_ref, want_ref)

    g = upstream_grad((2, 16))
    got = grads(lambda x: token_logprobs(x, labels, ref, backend="triton")[0], pol, g)
    assert got.dtype == dtype  # the gradient comes back in the logits' dtype
    want = exact(pol, labels, ref, g).to(dtype)
    # The kernel's fp32 gradient (within ~1e-6 relative of the exact one, as above) and the exact
    # one, both rounded to the low-precision format, differ by at most one unit in the last
    # place: 2^-7 relative for bf16's 8-bit significand (2^-10 for fp16's 11); atol 1e-7 covers
    # one step (6e-8) of fp16's subnormals, below 6e-5.
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(got.float(), want.float(), atol=1e-7, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Ignored positions, identical models, the policy-only launch
# ---------------------------------------------------------------------------------------------


def test_ignored_positions_give_zero_and_zero_gradient():
    pol, labels, ref = make_batch((4, 9), 123, ignore_frac=0.3)
    labels[1] = IGNORE_INDEX  # one sequence entirely unscored (e.g. a prompt that filled the block)
    g = upstream_grad((4, 9))
    g[labels == IGNORE_INDEX] = 5.0  # a non-zero upstream gradient must still not get through
    out_pol, out_ref = token_logprobs(pol, labels, ref, backend="triton")
    ignored = labels == IGNORE_INDEX
    assert torch.all(out_pol[ignored] == 0) and torch.all(out_ref[ignored] == 0)
    assert torch.all(out_pol[~ignored] < 0)  # scored positions are real log-probs
    d = grads(lambda x: token_logprobs(x, labels, ref, backend="triton")[0], pol, g)
    assert torch.all(d[ignored] == 0)
    live = ~ignored & (g != 0)  # scored tokens with a non-zero upstream gradient
    assert live.sum() >= 10 and torch.all(d[live].abs().sum(-1) > 0)


def test_all_positions_ignored():
    pol, labels, ref = make_batch((2, 3), 50, ignore_frac=1.0)
    out_pol, out_ref = token_logprobs(pol, labels, ref, backend="triton")
    assert torch.equal(out_pol, torch.zeros_like(out_pol)) and torch.equal(out_ref, torch.zeros_like(out_ref))
    d = grads(lambda x: token_logprobs(x, labels, ref, backend="triton")[0], pol, upstream_grad((2, 3)))
    assert torch.equal(d, torch.zeros_like(d))


def test_policy_equal_to_reference_gives_identical_outputs():
    """Step 0 of every round: pi_theta == pi_ref, so the implicit rewards must be exactly 0."""
    pol, labels, _ = make_batch((3, 20), 1000)
    out_pol, out_ref = token_logprobs(pol, labels, pol.clone(), backend="triton")
    assert torch.equal(out_pol, out_ref)  # bitwise: same arithmetic on the same values
    out_pol2, out_ref2 = token_logprobs(pol, labels, pol, backend="triton")  # the same tensor twice
    assert torch.equal(out_pol2, out_ref2) and torch.equal(out_pol2, out_pol)


def test_policy_only_launch():
    pol, labels, ref = make_batch((3, 20), 1000)
    only_pol, none = token_logprobs(pol, labels, backend="triton")
    both_pol, _ = token_logprobs(pol, labels, ref, backend="triton")
    assert none is None
    assert torch.equal(only_pol, both_pol)  # the reference loads never touch the policy's sums
    g = upstream_grad((3, 20))
    d_only = grads(lambda x: token_logprobs(x, labels, backend="triton")[0], pol, g)
    assert_grad_close(d_only, exact(pol, labels, None, g))


def test_no_gradient_flows_to_reference():
    pol, labels, ref = make_batch((2, 4), 30)
    ref.requires_grad_(True)  # e.g. a reference model run without torch.no_grad()
    out_pol, out_ref = token_logprobs(pol.requires_grad_(True), labels, ref, backend="triton")
    assert out_pol.requires_grad and not out_ref.requires_grad
    (out_pol.sum() + out_ref.sum()).backward()
    assert ref.grad is None and pol.grad is not None


def test_empty_batch():
    pol = torch.randn(0, 5, 11, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    out_pol, out_ref = token_logprobs(pol, labels, pol.detach(), backend="triton")
    assert out_pol.shape == out_ref.shape == (0, 5)
    out_pol.sum().backward()
    assert pol.grad.shape == pol.shape


# ---------------------------------------------------------------------------------------------
# Layouts: non-contiguous inputs, any number of leading dims
# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    # logits[:, :-1]: the classic shift; the (B, T) dims no longer merge into one row stride.
    "time_sliced": lambda x: torch.cat([x, x[:, :1]], dim=1)[:, :-1],
    # a (T, B, V) tensor transposed to (B, T, V).
    "transposed": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
    # a vocabulary padded to a multiple of 64 and sliced back: row stride != V.
    "vocab_padded": lambda x: torch.nn.functional.pad(x, (0, 5))[..., : x.shape[-1]],
    # a strided vocabulary axis: the one layout the kernel copies (see _as_btv).
    "vocab_strided": lambda x: torch.stack([x, x], dim=-1)[..., 0],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_non_contiguous_inputs(layout):
    pol, labels, ref = make_batch((3, 7), 123)
    to_layout = LAYOUTS[layout]
    pol_v, ref_v = to_layout(pol), to_layout(ref)
    assert torch.equal(pol_v, pol) and not pol_v.is_contiguous()
    labels_v = labels.t().contiguous().t()  # non-contiguous labels too
    got_pol, got_ref = token_logprobs(pol_v, labels_v, ref_v, backend="triton")
    want_pol, want_ref = exact(pol, labels, ref)
    assert_logp_close(got_pol, want_pol)
    assert_logp_close(got_ref, want_ref)
    g = upstream_grad((3, 7))
    got = grads(lambda x: token_logprobs(x, labels_v, ref_v, backend="triton")[0], pol_v, g)
    assert_grad_close(got, exact(pol, labels, ref, g))


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_other_leading_shapes(shape):
    """(V,) with a scalar label, (N, V), and (A, B, C, V): the labels' shape comes back."""
    pol, labels, ref = make_batch(shape, 33, ignore_frac=0.0)
    got_pol, got_ref = token_logprobs(pol, labels, ref, backend="triton")
    want_pol, want_ref = exact(pol, labels, ref)
    assert got_pol.shape == labels.shape
    assert_logp_close(got_pol, want_pol)
    assert_logp_close(got_ref, want_ref)


# ---------------------------------------------------------------------------------------------
# Memory: forward allocates nothing N x V, backward exactly one N x V tensor
# ---------------------------------------------------------------------------------------------


class RecordAllocations(TorchDispatchMode):
    """Records every op output whose storage is new and at least `min_bytes` long."""

    def __init__(self, known_tensors, min_bytes):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known_tensors}
        self.min_bytes = min_bytes
        self.big = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.known and storage.nbytes() >= self.min_bytes:
                    self.known.add(storage.data_ptr())
                    self.big.append((str(func), tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("layout", ["contiguous", "time_sliced", "transposed"])
def test_memory_forward_none_backward_one(layout):
    pol, labels, ref = make_batch((4, 9), 300)
    if layout != "contiguous":
        pol, ref = LAYOUTS[layout](pol), LAYOUTS[layout](ref)
    pol.requires_grad_(True)
    n_by_v = 4 * 9 * 300 * 2  # bytes of an N x V tensor in the narrowest dtype in play (bf16)
    with RecordAllocations([pol, ref, labels], n_by_v) as fwd:
        out_pol, _ = token_logprobs(pol, labels, ref, backend="triton")
    assert fwd.big == []
    with RecordAllocations([pol, ref, labels], n_by_v) as bwd:
        torch.autograd.grad(out_pol, pol, upstream_grad((4, 9)))
    assert [(shape, dtype) for _, shape, dtype in bwd.big] == [((36, 300), torch.float32)]

    # The recorder does see N x V allocations: the torch reference makes several.
    with RecordAllocations([pol, ref, labels], n_by_v) as eager:
        torch.autograd.grad(token_logprobs_reference(pol, labels, ref)[0], pol, upstream_grad((4, 9)))
    assert len(eager.big) >= 3


# ---------------------------------------------------------------------------------------------
# Bad input, backend selection, Triton missing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "case,match",
    [
        ("labels_shape", r"labels shape \(2, 4\) must equal policy_logits.shape\[:-1\] = \(2, 5\)"),
        ("ref_shape", r"ref_logits shape \(2, 5, 9\) must equal policy_logits shape \(2, 5, 10\)"),
        ("label_too_big", r"labels\[1, 2\] = 10 is outside \[0, 10\)"),
        ("label_negative", r"labels\[0, 3\] = -1 is outside \[0, 10\)"),
        ("float_labels", r"labels must be an integer tensor"),
        ("int_logits", r"policy_logits must be a floating-point tensor"),
        ("int_ref", r"ref_logits must be a floating-point tensor"),
        ("bad_backend", r"backend must be 'auto', 'triton' or 'torch'"),
        ("labels_on_meta", r"must be on one device"),
    ],
)
def test_bad_input_raises_one_clear_error(case, match, backend):
    pol = torch.randn(2, 5, 10, device=DEVICE)
    ref = torch.randn(2, 5, 10, device=DEVICE)
    labels = torch.randint(0, 10, (2, 5), device=DEVICE)
    if case == "labels_shape":
        labels = labels[:, :4]
    elif case == "ref_shape":
        ref = ref[..., :9]
    elif case == "label_too_big":
        labels[1, 2] = 10
    elif case == "label_negative":
        labels[0, 3] = -1
    elif case == "float_labels":
        labels = labels.float()
    elif case == "int_logits":
        pol = labels.unsqueeze(-1).expand(2, 5, 10)
    elif case == "int_ref":
        ref = labels.unsqueeze(-1).expand(2, 5, 10)
    elif case == "bad_backend":
        backend = "cuda"
    elif case == "labels_on_meta":
        labels = labels.to("meta")
    with pytest.raises(TokenLogprobsError, match=match):
        token_logprobs(pol, labels, ref, backend=backend)


def test_auto_backend_follows_device_and_interpreter(monkeypatch):
    pol, labels, ref = make_batch((2, 3), 20)
    calls = []
    monkeypatch.setattr(lp._FusedTokenLogprobs, "apply", lambda *a: calls.append("triton") or (None, None))
    token_logprobs(pol, labels, ref)
    assert calls == ["triton"]  # CUDA tensors, or the interpreter (conftest): Triton
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        out, _ = token_logprobs(pol, labels, ref)  # CPU without the interpreter: torch
        assert calls == ["triton"] and out is not None
        with pytest.raises(TritonUnavailableError, match="needs a CUDA device, or TRITON_INTERPRET=1"):
            token_logprobs(pol, labels, ref, backend="triton")
    token_logprobs(pol, labels, ref, backend="torch")
    assert calls == ["triton"]


def test_module_imports_and_falls_back_without_triton(monkeypatch):
    """Triton ships Linux wheels only: elsewhere the module must import and use torch."""
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton", None)
    path = pathlib.Path(lp.__file__)
    spec = importlib.util.spec_from_file_location("logprobs_without_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HAS_TRITON is False
    pol, labels, ref = make_batch((2, 3), 20)
    got_pol, got_ref = mod.token_logprobs(pol, labels, ref)  # auto -> torch
    want_pol, want_ref = token_logprobs_reference(pol, labels, ref)
    assert torch.equal(got_pol, want_pol) and torch.equal(got_ref, want_ref)
    with pytest.raises(mod.TritonUnavailableError, match="triton is not installed"):
        mod.token_logprobs(pol, labels, ref, backend="triton")
