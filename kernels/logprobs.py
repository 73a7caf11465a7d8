"""Per-token log-probabilities of the labels, for the policy and the reference in one pass.

This is where spo-min turns (N, V) logits into N numbers: everything after it (sequence sums
E9, the SPO margin E6, the loss E5) works on (N,) numbers. kernels/linear_logprobs.py goes one
step further and never builds the (N, V) logits at all, running these same kernels on one chunk
of rows at a time (launch_forward / launch_backward). Read it top to bottom: the math, the
plain-torch reference, the Triton forward kernel, the Triton backward kernel, the autograd
wiring, and the dispatcher `token_logprobs`.

The math
--------
For one row of logits x (length V, the vocabulary) and its label y (the next token):

    lse(x)   = log sum_j exp(x_j)                  (the log of the softmax normaliser)
    logp     = log softmax(x)[y] = x_y - lse(x)     (what E9 sums over response tokens)

A label of -100 marks a token that is not scored (prompt, padding): its log-prob is defined as 0,
so summing over a whole row of labels gives exactly E9's sum over response tokens.

lse is computed without overflow by subtracting the running maximum m. Seen in chunks of the
vocabulary (the "online" softmax), with m and s = sum exp(x_j - m) carried across chunks:

    m_new = max(m, max(chunk))
    s     = s * exp(m - m_new) + sum(exp(chunk - m_new))     (rescale the old sum to the new max)
    lse   = m + log(s)                                        (after the last chunk)

so one pass over the row suffices, for any V (50257 for GPT-2: not a power of two).

The gradient, with g the upstream gradient of this token's logp (one number per token: the loss
weights tokens differently, e.g. chosen vs rejected rows, masks, beta), is

    d logp / d x_j = onehot(y)_j - softmax(x)_j = onehot(y)_j - exp(x_j - lse)
    d loss / d x_j = g * (onehot(y)_j - exp(x_j - lse))

Saving lse (one number per row) is all the backward needs besides x itself. The gradient of an
ignored token is 0 (its output is the constant 0). The reference model is frozen: no gradient.

Why a kernel at all? `log_softmax(x).gather(y)` materialises an (N, V) tensor of log-probs per
model (N = batch x length, V = 50257: 3.3 GB in fp32 at N = 16384) only to read N numbers from
it. The fused forward reads each logits row once, for both models in the same program, and
writes 3 numbers per row. The fused backward writes the one (N, V) gradient that autograd needs.

Backends: `token_logprobs(..., backend="auto")` runs the Triton kernels on CUDA tensors, and on
CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter: slow but exact, how CPU CI checks the
kernels); otherwise the torch reference. Triton ships Linux wheels only: without it this module
still imports and "auto" uses torch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Triton is optional (Linux-only wheels; without it everything falls back to torch), and it is
# imported only where its kernels can run: with a CUDA GPU, or in its CPU interpreter
# (TRITON_INTERPRET=1, which triton reads when the kernels below are defined: set it before this
# import). On a CPU without the interpreter nothing would use it, and importing it costs about
# 74 MB of resident memory (measured: 218 MB after `import torch`, 292 MB with `import triton`
# too), a seventh of a CPU training step's peak (spo_min/bench_train.py).
triton = tl = None
HAS_TRITON = False  # imported, so its kernels are defined
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    try:
        import triton
        import triton.language as tl

        HAS_TRITON = True
    except ImportError:  # exercised by a test that hides triton
        pass


def _triton_installed() -> bool:
    if HAS_TRITON:
        return True
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a hidden module (sys.modules["triton"] = None)
        return False

IGNORE_INDEX = -100  # the label of a position that is not scored (prompt, padding, last position)

# Vocabulary chunk each program loads per loop iteration. On a GPU, 4096 elements over 4 warps is
# 32 elements per thread: enough bytes in flight per SM to stream at memory speed, few enough
# registers to keep several programs resident. Measured on one H200 (N = 16384, V = 50257; sweep
# of BLOCK_V 2048..16384 x 4/8/16 warps in kernels/results/nvidia-h200/sweep_block_v.json),
# 4096 x 4 warps was the fastest forward at bf16 (1.276 ms; 1.367 with 8 warps) and ties 8 warps
# at fp32 (1.630 vs 1.616 ms); bf16 forward+backward 2.478 vs 2.754 ms. Triton's interpreter (CPU
# CI) runs each loop iteration as numpy calls with a fixed overhead, so it prefers bigger chunks:
# 16384 keeps the V = 50257 tests fast while still walking 4 chunks with a ragged tail.
BLOCK_V_GPU = 4096
NUM_WARPS_GPU = 4
BLOCK_V_INTERPRETER = 16384


class TokenLogprobsError(ValueError):
    """Bad input to token_logprobs (shape, dtype, device or label range)."""


class TritonUnavailableError(RuntimeError):
    """backend="triton" was forced where the Triton kernels cannot run."""


# --------------------------------------------------------------------------------------------
# 1. The pure-torch reference (the definition the kernels are tested against)
# --------------------------------------------------------------------------------------------


def _accumulation_dtype(*logits: torch.Tensor | None) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits, fp64 when any input is fp64 (so gradcheck can work)."""
    if any(x is not None and x.dtype == torch.float64 for x in logits):
        return torch.float64
    return torch.float32


def token_logprobs_reference(
    policy_logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax + gather in plain torch, once per model. Same contract as token_logprobs.

    Inputs are assumed valid (token_logprobs checks them). This allocates an (N, V) tensor of
    log-probs per model: fine as a reference and on CPU, the cost the kernels remove on GPU.
    """
    acc = _accumulation_dtype(policy_logits, ref_logits)
    labels = labels.long()
    ignored = labels == IGNORE_INDEX
    safe_labels = labels.masked_fill(ignored, 0)  # any valid index; the result is masked below

    def one_model(logits: torch.Tensor) -> torch.Tensor:
        # dtype= upcasts inside the op: bf16/fp16 logits are never rounded in low precision.
        logp = torch.log_softmax(logits, dim=-1, dtype=acc)
        picked = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        # where (not multiply by a mask): ignored positions give exactly 0 and a zero gradient,
        # even if their logits hold inf/nan.
        return torch.where(ignored, torch.zeros_like(picked), picked)

    policy_logp = one_model(policy_logits)
    ref_logp = one_model(ref_logits.detach()) if ref_logits is not None else None
    return policy_logp, ref_logp


# --------------------------------------------------------------------------------------------
# 2. The Triton kernels
# --------------------------------------------------------------------------------------------
# Layout: the logits are viewed as (B, T, V) with unit stride along V (see _as_btv). Row r of the
# flattened (N = B*T, V) problem is (b, t) = (r // T, r % T), at element offset
# b * stride_b + t * stride_t. Passing both strides (instead of one row stride) lets sliced
# views such as logits[:, :-1] or a transposed (T, B, V) run without a copy.

if HAS_TRITON:

    @triton.jit
    def _logprobs_fwd_kernel(
        pol_ptr, pol_stride_b, pol_stride_t,  # policy logits (B, T, V), unit stride along V
        ref_ptr, ref_stride_b, ref_stride_t,  # reference logits (unused when HAS_REF is False)
        labels_ptr,  # (N,) int64, -100 = ignore
        pol_out_ptr, ref_out_ptr, lse_out_ptr,  # (N,) outputs in the accumulation dtype
        T, V,
        HAS_REF: tl.constexpr,  # False: the policy-only launch (SFT, cached reference log-probs)
        BLOCK_V: tl.constexpr,
    ):
        # One program per row, on a 1-D grid (a 2-D (batch, length) grid hits CUDA's 65535 limit
        # on its second axis). The row index is cast to int64 BEFORE multiplying by a stride:
        # N * V passes 2^31 after ~42k rows of GPT-2 logits and int32 offsets would wrap.
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row % T
        pol_row = pol_ptr + b * pol_stride_b + t * pol_stride_t
        ref_row = ref_ptr + b * ref_stride_b + t * ref_stride_t

        # Accumulate in the output's dtype: fp32, or fp64 for fp64 inputs (see _accumulation_dtype).
        acc_dtype = pol_out_ptr.dtype.element_ty
        m_pol = tl.full([], float("-inf"), dtype=acc_dtype)  # running max
        s_pol = tl.full([], 0.0, dtype=acc_dtype)  # running sum of exp(x - m)
        m_ref = tl.full([], float("-inf"), dtype=acc_dtype)
        s_ref = tl.full([], 0.0, dtype=acc_dtype)

        # The online max/sum of the module docstring, one BLOCK_V chunk at a time. Policy and
        # reference chunks are read in the same iteration: one pass, two models.
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < V  # the last chunk is ragged when V is not a multiple of BLOCK_V
            # -inf outside the vocabulary: it never wins the max and exp(-inf) adds 0 to the sum.
            x = tl.load(pol_row + cols, mask=in_vocab, other=float("-inf")).to(acc_dtype)
            m_new = tl.maximum(m_pol, tl.max(x, axis=0))
            s_pol = s_pol * tl.exp(m_pol - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m_pol = m_new
            if HAS_REF:
                r = tl.load(ref_row + cols, mask=in_vocab, other=float("-inf")).to(acc_dtype)
                m_new_ref = tl.maximum(m_ref, tl.max(r, axis=0))
                s_ref = s_ref * tl.exp(m_ref - m_new_ref) + tl.sum(tl.exp(r - m_new_ref), axis=0)
                m_ref = m_new_ref

        # logp = x_y - lse. The label's logit is one scalar load; ignored rows load index 0
        # (always in bounds) and then write 0.
        label = tl.load(labels_ptr + row)
        ignored = label == -100
        safe_label = tl.where(ignored, 0, label)
        lse_pol = m_pol + tl.log(s_pol)
        x_label = tl.load(pol_row + safe_label).to(acc_dtype)
        tl.store(pol_out_ptr + row, tl.where(ignored, 0.0, x_label - lse_pol))
        tl.store(lse_out_ptr + row, lse_pol)  # all the backward needs besides the logits
        if HAS_REF:
            lse_ref = m_ref + tl.log(s_ref)
            r_label = tl.load(ref_row + safe_label).to(acc_dtype)
            tl.store(ref_out_ptr + row, tl.where(ignored, 0.0, r_label - lse_ref))

    @triton.jit
    def _logprobs_bwd_kernel(
        grad_ptr,  # (N,) upstream gradient g of each token's log-prob
        pol_ptr, pol_stride_b, pol_stride_t,  # the policy logits of the forward, same layout
        labels_ptr, lse_ptr,  # (N,) labels and the forward's saved logsumexp
        dlogits_ptr,  # (N, V) contiguous output, in the logits' dtype
        T, V,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64 before any multiply: see the forward
        b = row // T
        t = row % T
        pol_row = pol_ptr + b * pol_stride_b + t * pol_stride_t
        out_row = dlogits_ptr + row * V

        label = tl.load(labels_ptr + row)
        lse = tl.load(lse_ptr + row)
        # g is read per token, never assumed to be 1 and never folded into the forward: losses
        # weight tokens differently, and a pre-scaled gradient silently breaks that.
        # An ignored token's output is the constant 0, so its whole gradient row is 0.
        g = tl.where(label == -100, 0.0, tl.load(grad_ptr + row))

        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < V
            x = tl.load(pol_row + cols, mask=in_vocab, other=0.0).to(lse.dtype)
            softmax = tl.exp(x - lse)
            onehot = tl.where(cols == label, 1.0, 0.0)
            dx = g * (onehot - softmax)  # d loss / d x_j = g * (onehot(y)_j - softmax(x)_j)
            tl.store(out_row + cols, dx.to(dlogits_ptr.dtype.element_ty), mask=in_vocab)


def _kernels_interpreted() -> bool:
    """True when triton.jit built our kernels for Triton's CPU interpreter.

    Triton reads TRITON_INTERPRET when a kernel is *decorated*, i.e. when this module is
    imported: setting it later does not turn these kernels into interpreted ones.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_logprobs_fwd_kernel, InterpretedFunction)


def _block_v(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V on this device."""
    cap = BLOCK_V_GPU if device.type == "cuda" and not _kernels_interpreted() else BLOCK_V_INTERPRETER
    block = min(cap, triton.next_power_of_2(V))  # tl.arange needs a power of two
    return block, NUM_WARPS_GPU


def _as_btv(x: torch.Tensor) -> torch.Tensor:
    """View logits (..., V) as (B, T, V) with unit stride along V, copying only when unavoidable."""
    if x.stride(-1) != 1:
        # The kernels read each row with contiguous (coalesced, vectorisable) loads. A strided
        # vocabulary axis (e.g. logits[..., ::2], or a (V, T) tensor transposed) is rare enough
        # that one copy here beats a second addressing mode in the kernels.
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() > 3:
        # Merge the extra leading dims into B; this copies only if they cannot merge as a view.
        return x.flatten(0, -3)
    return x


def launch_forward(pol, flat_labels, ref, pol_out, ref_out, lse_out) -> None:
    """Run the forward kernel over every row: fills pol_out, ref_out (if ref) and lse_out.

    pol, ref: (B, T, V) logits with unit stride along V (see _as_btv); flat_labels: (N,) int64
    with N = B * T; the outputs: (N,) contiguous, in the accumulation dtype. Also used by
    kernels/linear_logprobs.py on one chunk of rows at a time.
    """
    B, T, V = pol.shape
    N = flat_labels.numel()
    if N == 0:
        return
    block, num_warps = _block_v(V, pol.device)
    # Policy-only launch: HAS_REF=False compiles the reference loads away; the ref pointer
    # arguments just repeat the policy's (never read).
    r = ref if ref is not None else pol
    _logprobs_fwd_kernel[(N,)](
        pol, pol.stride(0), pol.stride(1),
        r, r.stride(0), r.stride(1),
        flat_labels,
        pol_out, ref_out if ref_out is not None else pol_out, lse_out,
        T, V,
        HAS_REF=ref is not None,
        BLOCK_V=block,
        num_warps=num_warps,
    )


def launch_backward(g, pol, flat_labels, lse, dlogits) -> None:
    """Run the backward kernel: dlogits[r] = g[r] * (onehot(label[r]) - exp(pol[r] - lse[r])).

    g, lse: (N,) contiguous in the accumulation dtype; pol: (B, T, V) as in launch_forward;
    dlogits: (N, V) contiguous. dlogits may be the memory of pol itself (in place, as
    kernels/linear_logprobs.py does): each program owns one row and reads every chunk of it
    before writing the same chunk back.
    """
    B, T, V = pol.shape
    N = flat_labels.numel()
    if N == 0:
        return
    block, num_warps = _block_v(V, pol.device)
    _logprobs_bwd_kernel[(N,)](
        g,
        pol, pol.stride(0), pol.stride(1),
        flat_labels, lse,
        dlogits,
        T, V,
        BLOCK_V=block,
        num_warps=num_warps,
    )


# --------------------------------------------------------------------------------------------
# 3. Autograd wiring
# --------------------------------------------------------------------------------------------


class _FusedTokenLogprobs(torch.autograd.Function):
    """Triton forward/backward; differentiable in policy_logits only."""

    @staticmethod
    def forward(ctx, policy_logits, labels, ref_logits):
        pol = _as_btv(policy_logits)
        ref = _as_btv(ref_logits) if ref_logits is not None else None
        flat_labels = labels.reshape(-1).to(torch.int64)  # (N,): small, copying is fine
        N = flat_labels.numel()
        acc = _accumulation_dtype(policy_logits, ref_logits)
        device = policy_logits.device

        # Nothing of size N x V is allocated here: three (N,) outputs.
        pol_out = torch.empty(N, dtype=acc, device=device)
        ref_out = torch.empty(N, dtype=acc, device=device) if ref is not None else None
        lse = torch.empty(N, dtype=acc, device=device)
        launch_forward(pol, flat_labels, ref, pol_out, ref_out, lse)

        ctx.save_for_backward(pol, flat_labels, lse)  # pol is a view: no copy is kept
        ctx.logits_shape = policy_logits.shape
        pol_out = pol_out.view(labels.shape)
        if ref_out is None:
            return pol_out, None
        ref_out = ref_out.view(labels.shape)
        ctx.mark_non_differentiable(ref_out)  # the reference model is frozen: no gradient
        return pol_out, ref_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pol, grad_ref):
        pol, flat_labels, lse = ctx.saved_tensors
        N, V = flat_labels.numel(), pol.shape[-1]
        # The one N x V allocation of the backward: the gradient itself, in the logits' dtype.
        dlogits = torch.empty((N, V), dtype=pol.dtype, device=pol.device)
        # (N,) upstream grads may arrive expanded (stride 0, e.g. from .sum()): make them a
        # plain contiguous vector in the accumulation dtype. Small.
        g = grad_pol.reshape(-1).to(lse.dtype).contiguous()
        launch_backward(g, pol, flat_labels, lse, dlogits)
        return dlogits.view(ctx.logits_shape), None, None


# --------------------------------------------------------------------------------------------
# 4. Input checks and the public entry point
# --------------------------------------------------------------------------------------------


def _check_inputs(policy_logits, labels, ref_logits) -> None:
    """One clear TokenLogprobsError per kind of bad input (before any kernel reads memory)."""
    where = "kernels/logprobs.py token_logprobs"
    for name, x in (("policy_logits", policy_logits), ("ref_logits", ref_logits)):
        if x is None and name == "ref_logits":
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TokenLogprobsError(
                f"{where}: {name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got {kind}; "
                "pass the model's logits, not token ids"
            )
        if x.dim() < 1 or x.shape[-1] < 1:
            raise TokenLogprobsError(
                f"{where}: {name} must have shape (..., V) with V >= 1, got {tuple(x.shape)}"
            )
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TokenLogprobsError(
            f"{where}: labels must be an integer tensor of token ids (-100 = ignore), got {kind}"
        )
    if tuple(labels.shape) != tuple(policy_logits.shape[:-1]):
        raise TokenLogprobsError(
            f"{where}: labels shape {tuple(labels.shape)} must equal policy_logits.shape[:-1] = "
            f"{tuple(policy_logits.shape[:-1])} (logits (..., V), labels (...)); labels are already "
            "shifted: labels[b, t] is the token logits[b, t] predicts"
        )
    if ref_logits is not None and ref_logits.shape != policy_logits.shape:
        raise TokenLogprobsError(
            f"{where}: ref_logits shape {tuple(ref_logits.shape)} must equal policy_logits shape "
            f"{tuple(policy_logits.shape)} (both models score the same batch)"
        )
    devices = {policy_logits.device, labels.device}
    if ref_logits is not None:
        devices.add(ref_logits.device)
    if len(devices) > 1:
        raise TokenLogprobsError(
            f"{where}: policy_logits, labels and ref_logits must be on one device, got "
            f"{sorted(str(d) for d in devices)}"
        )
    # Out-of-range labels would make the kernels read outside the row (and torch's gather fail
    # with a device assert on GPU): find the first one and name it. This costs one small
    # reduction and a host sync per call.
    V = policy_logits.shape[-1]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise TokenLogprobsError(
            f"{where}: labels{list(index)} = {int(labels[index])} is outside [0, {V}) and is not the "
            f"ignore index {IGNORE_INDEX}; check the tokenizer's vocabulary size against the model's "
            "(GPT-2: 50257) and use -100 for unscored positions"
        )


def triton_available(device: torch.device) -> bool:
    """Can the Triton kernels run on tensors of this device (CUDA, or CPU under the interpreter)?"""
    return HAS_TRITON and (
        device.type == "cuda" or (os.environ.get("TRITON_INTERPRET") == "1" and _kernels_interpreted())
    )


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise TokenLogprobsError(
            "kernels/logprobs.py token_logprobs: backend must be 'auto', 'triton' or 'torch', "
            f"got {backend!r}"
        )
    if backend == "torch":
        return False
    triton_can_run = triton_available(device)
    if backend == "auto":
        return triton_can_run
    if not triton_can_run and not _triton_installed():
        raise TritonUnavailableError(
            "kernels/logprobs.py: backend='triton' but triton is not installed (it ships Linux "
            "wheels only; see pyproject.toml); use backend='auto' or 'torch'"
        )
    if not triton_can_run:
        raise TritonUnavailableError(
            f"kernels/logprobs.py: backend='triton' on a {device.type} tensor needs a CUDA device, or "
            "TRITON_INTERPRET=1 set in the environment BEFORE triton and kernels.logprobs are "
            "imported (triton reads it when the kernels are defined); use backend='auto' or 'torch'"
        )
    return True


def token_logprobs(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each label under the policy (and the reference), per token.

    policy_logits: (..., V) float tensor (fp32, bf16, fp16 or fp64), any strides.
    labels:        (...) integer tensor; labels[i] is the token logits[i] predicts, -100 = ignore.
    ref_logits:    optional (..., V) logits of the frozen reference model on the same batch.
    backend:       "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton", "torch".

    Returns (policy_logp, ref_logp or None), each with the labels' shape, in fp32 (fp64 if an input
    is fp64). Ignored positions are 0 with zero gradient. Differentiable in policy_logits only.
    Summing the result over a row of labels is E9's sequence log-probability.
    """
    _check_inputs(policy_logits, labels, ref_logits)
    if _use_triton(backend, policy_logits.device):
        ref = ref_logits.detach() if ref_logits is not None else None
        return _FusedTokenLogprobs.apply(policy_logits, labels, ref)
    return token_logprobs_reference(policy_logits, labels, ref_logits)
