"""Per-token log-probs straight from the final hidden states: the lm_head and the log-softmax fused,
so the (N, V) logits never exist.

kernels/logprobs.py turns (N, V) logits into N log-probs without an (N, V) log-softmax. But the
logits themselves, and their gradient, are still (N, V) tensors: at N = 16384 scored tokens and
GPT-2's V = 50257 that is 1.65 GB of bf16 logits per model and as much again for the gradient,
the biggest tensors of a training step by far. This module never builds them. It walks the N rows
in chunks of K and holds one chunk of logits, (K, V), at a time. Read it top to bottom: the math,
the memory arithmetic, the per-chunk pieces (torch, or the Triton kernels of kernels/logprobs.py),
the autograd wiring, and the entry point `linear_token_logprobs`.

The math
--------
With hidden states h (N, C) after the final LayerNorm, the lm_head weight W (V, C) (GPT-2 ties it
to the token embedding wte), and labels y (N,):

    logits  x = h W^T                                   (N, V): the thing we never build whole
    logp_i    = x_iy - lse(x_i)                         one number per token (E9 sums them)

The forward walks row chunks c (K rows each): x_c = h_c W^T, then each row's lse and label logit
(the online max/sum of kernels/logprobs.py), and keeps only lse (N,) for the backward.

The backward, with g the upstream gradient of each token's log-prob (one number PER TOKEN: the
loss weights chosen and rejected rows, masks and beta differently; never assume g = 1):

    d loss / d x_i = g_i (onehot(y_i) - exp(x_i - lse_i))        (as in kernels/logprobs.py)
    d loss / d h_c = (d loss / d x_c) W                         (K, C): each chunk owns its rows
    d loss / d W   = sum over chunks c of (d loss / d x_c)^T h_c    (V, C): every chunk adds to it

so each chunk's logits are computed again from h_c and W, turned into their gradient in place,
and multiplied out into the two gradients. That recomputation is the price of not keeping the
logits: one more N x C x V matmul on top of the unfused path's three (forward, d h, d W), so
where those matmuls dominate (a GPU at GPT-2's sizes) forward+backward takes up to ~4/3 of the
unfused time. Labels of -100 give log-prob 0 and gradient 0.

GPT-2's W is the token embedding: the embedding's own gradient (from the input lookup) and this
weight gradient are two contributions to one tensor. Autograd adds them, exactly as for
model.head = F.linear(h, wte.weight), because W is an ordinary input of the autograd.Function.

The memory arithmetic
---------------------
N scored tokens, vocabulary V, width C, chunk K rows, e bytes per logit (2 for bf16, 4 for fp32):

                     unfused (model.head + token_logprobs)     chunked (this module)
    forward          N V e logits per model, the policy's       K V e per model, transient;
                     kept alive for the backward                keeps lse: 4 N bytes
    backward         N V e gradient of the logits               K V e (recomputed logits, their
                                                                gradient written over them),
                                                                V C 4 fp32 sum of the weight
                                                                gradient (+ V C e for each
                                                                chunk's product at bf16)

Both paths also return grad_hidden (N C e) and grad_weight (V C, the weight's dtype).
GPT-2 at N = 16384, V = 50257, C = 768, bf16, K = 512 (the GPU default):

    unfused: 16384 * 50257 * 2 = 1.65 GB of logits + 1.65 GB of gradient = 3.3 GB
    chunked: 512 * 50257 * 2 = 51 MB of chunk + 154 MB fp32 weight-gradient sum + 77 MB product
             = 0.28 GB, and no longer growing with N

On the CPU setup of spo_min/bench_train.py (about 480 tokens per step, C = 128, fp32) the unfused
path's logits are 97 MB per (N, V) tensor, several of them alive at once (logits, log-softmax,
their gradients); a chunk of CHUNK_ROWS_CPU rows is 13 MB and stays in the 32 MB L3 cache.

Accumulation is fp32 (fp64 when the inputs are fp64, so gradcheck works): lse and the log-probs,
the softmax of the gradient, and the sum of the weight gradient over chunks. The matmuls run in
the inputs' dtype (under autocast, in autocast's dtype, as F.linear would).

Backends: on CUDA (or CPU under TRITON_INTERPRET=1) each chunk's log-probs and its softmax
gradient come from the Triton kernels of kernels/logprobs.py (the forward reads the policy and
reference chunk in one pass); otherwise plain torch does the same per chunk. The matmuls are
torch's (cuBLAS / CPU BLAS) in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.logprobs import (
    IGNORE_INDEX,
    TokenLogprobsError,
    _use_triton,
    launch_backward,
    launch_forward,
)

# Rows of logits per chunk. Bigger chunks make the lm_head matmuls more efficient; smaller ones
# hold less memory. CPU: 64 rows of V = 50257 fp32 are 13 MB, which fits the 32 MB L3 cache of
# the 2-core machine while the chunk's lse, softmax gradient and matmuls read it again. Measured
# there (one thread, CPU time, other jobs sharing the cores), the lm_head + log-probs forward and
# backward at N = 480, C = 128 took 835 / 755 / 715 / 819 ms in chunks of 32 / 64 / 128 / 256
# rows (727 ms unfused); whole spo_min/bench_train.py steps took the same time at 64 and 128 rows
# (974 vs 984 ms) with peak RSS 691 vs 722 MB: 64. GPU: 512 rows keep the (512, 768) x
# (768, 50257) matmul large enough for the tensor cores (40 GFLOP per chunk) while a bf16 chunk
# is 51 MB (the memory arithmetic above); not yet measured on a GPU (kernels/gpu_check.sh).
CHUNK_ROWS_CPU = 64
CHUNK_ROWS_GPU = 512


# --------------------------------------------------------------------------------------------
# 1. Dtypes
# --------------------------------------------------------------------------------------------


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) would compute the logits in.

    Under autocast (train.py --dtype bfloat16) F.linear casts fp32/bf16/fp16 inputs to autocast's
    dtype. We cast explicitly and switch autocast off inside: the backward runs outside autocast,
    and it must recompute the very logits whose lse the forward saved.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _accumulation_dtype(matmul_dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits, fp64 for fp64 ones (so gradcheck can work)."""
    return torch.float64 if matmul_dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# 2. One chunk: log-probs and lse (forward), the logits' gradient (backward)
# --------------------------------------------------------------------------------------------
# Each takes one chunk's (K, V) logits. The torch and Triton versions compute the same numbers;
# the Triton ones read each logits row once per pass, policy and reference together.


def _chunk_logprobs_torch(logits, labels, acc):
    """(K, V) logits, (K,) labels -> (K,) log-probs and (K,) lse, in the accumulation dtype."""
    x = logits.to(acc)  # no copy for fp32 logits; bf16 ones are summed in fp32
    lse = torch.logsumexp(x, dim=-1)
    ignored = labels == IGNORE_INDEX
    picked = x.gather(1, labels.masked_fill(ignored, 0).unsqueeze(1)).squeeze(1)
    # where, not a multiply by a mask: ignored rows give exactly 0 whatever their logits hold.
    return torch.where(ignored, torch.zeros_like(picked), picked - lse), lse


def _chunk_logits_grad_torch_(logits, labels, lse, g):
    """Overwrite (K, V) logits with g * (onehot(labels) - softmax(logits)); returns that gradient.

    g is already 0 on ignored rows (see _LinearTokenLogprobs.backward), so their rows are 0.
    """
    grad = logits.to(lse.dtype)  # the same memory for fp32 logits: updated in place below
    grad.sub_(lse.unsqueeze(1)).exp_()  # softmax = exp(x - lse)
    grad.mul_(g.neg().unsqueeze(1))  # - g * softmax
    safe_labels = labels.masked_fill(labels == IGNORE_INDEX, 0)
    grad.scatter_add_(1, safe_labels.unsqueeze(1), g.unsqueeze(1))  # + g * onehot
    return grad.to(logits.dtype)


def _chunk_logprobs_triton(logits, labels, ref_logits, pol_out, ref_out, lse_out):
    """The forward kernel on one chunk, both models in one pass; writes into (K,) output views."""
    ref = ref_logits.unsqueeze(0) if ref_logits is not None else None
    launch_forward(logits.unsqueeze(0), labels, ref, pol_out, ref_out, lse_out)


def _chunk_logits_grad_triton_(logits, labels, lse, g):
    """The backward kernel on one chunk, writing the gradient over the logits (no second buffer)."""
    launch_backward(g, logits.unsqueeze(0), labels, lse, logits)
    return logits


# --------------------------------------------------------------------------------------------
# 3. Autograd wiring
# --------------------------------------------------------------------------------------------


class _LinearTokenLogprobs(torch.autograd.Function):
    """Chunked lm_head + log-probs; differentiable in hidden and weight (the policy's) only."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_hidden, ref_weight, chunk_size, use_triton):
        mm = _matmul_dtype(hidden, weight)
        acc = _accumulation_dtype(mm)
        N, device = labels.numel(), hidden.device
        pol_out = torch.empty(N, dtype=acc, device=device)
        ref_out = torch.empty(N, dtype=acc, device=device) if ref_hidden is not None else None
        lse = torch.empty(N, dtype=acc, device=device)  # all the backward keeps besides the inputs

        with torch.autocast(device.type, enabled=False):
            h, w = hidden.to(mm), weight.to(mm)
            ref_h = ref_hidden.to(mm) if ref_hidden is not None else None
            ref_w = ref_weight.to(mm) if ref_hidden is not None else None
            for start in range(0, N, chunk_size):
                rows = slice(start, start + chunk_size)
                logits = F.linear(h[rows], w)  # (K, V): the only logits alive, per model
                ref_logits = F.linear(ref_h[rows], ref_w) if ref_h is not None else None
                if use_triton:
                    _chunk_logprobs_triton(logits, labels[rows], ref_logits, pol_out[rows],
                                           ref_out[rows] if ref_out is not None else None, lse[rows])
                else:
                    pol_out[rows], lse[rows] = _chunk_logprobs_torch(logits, labels[rows], acc)
                    if ref_logits is not None:
                        ref_out[rows], _ = _chunk_logprobs_torch(ref_logits, labels[rows], acc)
                del logits, ref_logits  # free this chunk before the next one is computed

        ctx.save_for_backward(hidden, weight, labels, lse)  # inputs (no copies) and (N,) lse
        ctx.chunk_size, ctx.use_triton, ctx.matmul_dtype = chunk_size, use_triton, mm
        if ref_out is None:
            return pol_out, None
        ctx.mark_non_differentiable(ref_out)  # the reference model is frozen: no gradient
        return pol_out, ref_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pol, grad_ref):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        K, mm, acc = ctx.chunk_size, ctx.matmul_dtype, lse.dtype
        # g is read per token, never folded into the forward (kernels/logprobs.py explains why).
        # An ignored token's output is the constant 0: its g is 0, so its whole gradient row is.
        g = torch.where(labels == IGNORE_INDEX, 0.0, grad_pol.reshape(-1).to(acc)).contiguous()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The weight gradient is a sum over every chunk: kept in fp32 (fp64) whatever mm is.
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None

        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(mm), weight.to(mm)
            for start in range(0, labels.numel(), K):
                rows = slice(start, start + K)
                logits = F.linear(h[rows], w)  # recomputed: the forward kept only lse
                grad_fn = _chunk_logits_grad_triton_ if ctx.use_triton else _chunk_logits_grad_torch_
                dlogits = grad_fn(logits, labels[rows], lse[rows], g[rows])  # (K, V), mm dtype
                if need_hidden:
                    grad_hidden[rows] = dlogits @ w  # (K, V) x (V, C): this chunk's rows only
                if need_weight:
                    if grad_weight.dtype == mm:
                        grad_weight.addmm_(dlogits.t(), h[rows])  # += (V, K) x (K, C), in place
                    else:
                        # bf16/fp16: the product is summed in fp32 inside the matmul and rounded
                        # once to bf16 (a (V, C) temporary); the sum over chunks stays fp32.
                        grad_weight += dlogits.t() @ h[rows]
                del logits, dlogits

        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)  # no copy when the dtypes already agree
        return grad_hidden, grad_weight, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# 4. Input checks and the public entry point
# --------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, labels, ref_hidden, ref_weight) -> None:
    """One clear TokenLogprobsError per kind of bad input (before any matmul or kernel)."""
    where = "kernels/linear_logprobs.py linear_token_logprobs"
    if (ref_hidden is None) != (ref_weight is None):
        raise TokenLogprobsError(
            f"{where}: give ref_hidden and ref_weight together (the reference model's hidden states "
            "and its own lm_head weight), or neither"
        )
    for name, x in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden),
                    ("ref_weight", ref_weight)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TokenLogprobsError(f"{where}: {name} must be a floating-point tensor, got {kind}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise TokenLogprobsError(
            f"{where}: expected hidden (..., C) and weight (V, C), got hidden {tuple(hidden.shape)} and "
            f"weight {tuple(weight.shape)}; weight is the lm_head's (GPT-2: the token embedding wte)"
        )
    if ref_hidden is not None and (ref_hidden.shape != hidden.shape or ref_weight.shape != weight.shape):
        raise TokenLogprobsError(
            f"{where}: the reference's hidden {tuple(ref_hidden.shape)} and weight {tuple(ref_weight.shape)} "
            f"must have the policy's shapes {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    for h, w in ((hidden, weight), (ref_hidden, ref_weight)):
        if h is not None and h.dtype != w.dtype and not torch.is_autocast_enabled(h.device.type):
            raise TokenLogprobsError(
                f"{where}: hidden states ({h.dtype}) and weight ({w.dtype}) must have one dtype, as "
                "for F.linear (or run under torch.autocast)"
            )
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TokenLogprobsError(f"{where}: labels must be an integer tensor of token ids (-100 = ignore), got {kind}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise TokenLogprobsError(
            f"{where}: labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}; labels[i] is the token hidden[i] predicts"
        )
    tensors = [t for t in (hidden, weight, labels, ref_hidden, ref_weight) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise TokenLogprobsError(f"{where}: all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")
    V = weight.shape[0]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bad.any():  # one small reduction and a host sync, as in kernels/logprobs.py
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise TokenLogprobsError(
            f"{where}: labels{list(index)} = {int(labels[index])} is outside [0, {V}) and is not the "
            f"ignore index {IGNORE_INDEX}; use -100 for unscored positions"
        )


def default_chunk_size(device: torch.device) -> int:
    return CHUNK_ROWS_GPU if device.type == "cuda" else CHUNK_ROWS_CPU


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each label under the policy (and the reference), from hidden states.

    Equal to token_logprobs(F.linear(hidden, weight), labels, F.linear(ref_hidden, ref_weight))
    without ever holding more than chunk_size rows of logits.

    hidden:      (..., C) final hidden states (after ln_f) of the positions to score.
    weight:      (V, C) lm_head weight (GPT-2: the token embedding; its gradient adds into it).
    labels:      (...) integer tensor; labels[i] is the token hidden[i] predicts, -100 = ignore.
    ref_hidden, ref_weight: optional, the frozen reference model's (same shapes); no gradient.
    chunk_size:  rows of logits per chunk (default: CHUNK_ROWS_GPU on CUDA, CHUNK_ROWS_CPU else).
    backend:     "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton", "torch":
                 who computes each chunk's log-probs and softmax gradient (the matmuls are torch's).

    Returns (policy_logp, ref_logp or None) with the labels' shape, in fp32 (fp64 for fp64
    inputs). Differentiable in hidden and weight; ignored positions are 0 with zero gradient.
    """
    _check_inputs(hidden, weight, labels, ref_hidden, ref_weight)
    chunk_size = default_chunk_size(hidden.device) if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise TokenLogprobsError(f"kernels/linear_logprobs.py: chunk_size must be a positive int, got {chunk_size!r}")
    use_triton = _use_triton(backend, hidden.device)
    C = hidden.shape[-1]
    flat_labels = labels.reshape(-1).to(torch.int64)  # (N,): small, copying is fine
    flat_ref = ref_hidden.detach().reshape(-1, C) if ref_hidden is not None else None
    ref_w = ref_weight.detach() if ref_weight is not None else None
    pol, ref = _LinearTokenLogprobs.apply(
        hidden.reshape(-1, C), weight, flat_labels, flat_ref, ref_w, chunk_size, use_triton
    )
    return pol.view(labels.shape), (ref.view(labels.shape) if ref is not None else None)
