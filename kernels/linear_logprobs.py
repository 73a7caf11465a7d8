"""Per-token log-probs straight from the final hidden states: the lm_head and the log-softmax fused,
so the (N, V) logits never exist.

kernels/logprobs.py turns (N, V) logits into N log-probs without an (N, V) log-softmax. But the
logits themselves, and their gradient, are still (N, V) tensors: at N = 16384 scored tokens and
GPT-2's V = 50257 that is 1.65 GB of bf16 logits per model and as much again for the gradient,
the biggest tensors of a training step by far. This module never builds them. It walks the N rows
in chunks of K and holds one chunk of logits, (K, V), at a time. It has two users:

  linear_token_logprobs (below)   scoring without gradients: frozen policies (the round's
                                  reference cache, the SPO margin), evaluation
  spo_min/pair_loss.py            training: per chunk of whole preference pairs, the log-probs,
                                  the loss and its gradient while that chunk's logits are in hand

Read it top to bottom: the math, the memory arithmetic, the per-chunk pieces (torch, or the Triton
kernels of kernels/logprobs.py) that both users share, and the entry point `linear_token_logprobs`.

The math
--------
With hidden states h (N, C) after the final LayerNorm, the lm_head weight W (V, C) (GPT-2 ties it
to the token embedding wte), and labels y (N,):

    logits  x = h W^T                                   (N, V): the thing we never build whole
    logp_i    = x_iy - lse(x_i)                         one number per token (E9 sums them)

Each chunk c of K rows: x_c = h_c W^T, then each row's lse and label logit (the online max/sum of
kernels/logprobs.py). Labels of -100 give log-prob 0.

A gradient, when a caller needs one, comes from the same chunk, with g the upstream gradient of
each token's log-prob (one number PER TOKEN: the loss weights chosen and rejected rows, masks and
beta differently; never assume g = 1):

    d loss / d x_i = g_i (onehot(y_i) - exp(x_i - lse_i))        (chunk_logits_grad_, in place)
    d loss / d h_c = (d loss / d x_c) W                         (K, C)
    d loss / d W  += (d loss / d x_c)^T h_c                     (V, C)

g is known only once the loss has seen the whole sequences the tokens belong to. A backward that
runs after the forward has dropped the logits would have to compute them again (one more N x C x V
matmul); spo_min/pair_loss.py avoids that by chunking whole preference pairs and finishing each
chunk's loss, and so its g, before its logits are dropped.

The memory arithmetic
---------------------
N scored tokens, vocabulary V, width C, chunk K rows, e bytes per logit (2 for bf16, 4 for fp32):

                     unfused (model.head + token_logprobs)     chunked (this module)
    forward          N V e logits per model                     K V e per model, transient

GPT-2 at N = 16384, V = 50257, bf16, K = 512 (the GPU default): 1.65 GB of logits per model
unfused, 51 MB chunked, whatever N is. On the CPU setup of spo_min/bench_train.py (about 480
tokens per step, C = 128, fp32) one (N, V) tensor is 97 MB; a chunk of CHUNK_ROWS_CPU rows is 13 MB
and stays in the 32 MB L3 cache.

Accumulation is fp32 (fp64 when the inputs are fp64, so gradcheck works): lse and the log-probs,
and the softmax of a gradient. The matmuls run in the inputs' dtype (under autocast, in autocast's
dtype, as F.linear would).

Backends: on CUDA (or CPU under TRITON_INTERPRET=1) each chunk's log-probs and its softmax
gradient come from the Triton kernels of kernels/logprobs.py (the forward reads the policy and
reference chunk in one pass); otherwise plain torch does the same per chunk. The matmuls are
torch's (cuBLAS / CPU BLAS) in both.
"""

from __future__ import annotations

import torch

from kernels.logprobs import (
    IGNORE_INDEX,
    TokenLogprobsError,
    _use_triton,
    launch_backward,
    launch_forward,
)

# Rows of logits per chunk, for scoring without gradients. Bigger chunks make the lm_head matmul
# more efficient; smaller ones hold less memory. CPU: 64 rows of V = 50257 fp32 are 13 MB, which
# fits the 32 MB L3 cache of the 2-core machine while the chunk's lse reads it again (chosen when
# this module also ran a backward, issue 13: forward+backward at N = 480, C = 128 took 835 / 755 /
# 715 / 819 ms in chunks of 32 / 64 / 128 / 256 rows, one thread, other jobs sharing the cores).
# GPU: 512 rows keep the (512, 768) x (768, 50257) matmul large enough for the tensor cores
# (40 GFLOP per chunk) while a bf16 chunk is 51 MB; its forward ran at 1.03x the unfused time on
# an H200 (README, "GPU figures"). Training chunks whole pairs instead (spo_min/pair_loss.py).
CHUNK_ROWS_CPU = 64
CHUNK_ROWS_GPU = 512


# --------------------------------------------------------------------------------------------
# 1. Dtypes
# --------------------------------------------------------------------------------------------


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) would compute the logits in.

    Under autocast (train.py --dtype bfloat16) F.linear casts fp32/bf16/fp16 inputs to autocast's
    dtype. The chunk loops cast explicitly and switch autocast off inside, so that every matmul of
    a chunk (logits, and in spo_min/pair_loss.py the two gradients) runs in this one dtype.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def accumulation_dtype(matmul: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits, fp64 for fp64 ones (so gradcheck can work)."""
    return torch.float64 if matmul == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# 2. One chunk: log-probs and lse, and the logits' gradient
# --------------------------------------------------------------------------------------------
# Each takes one chunk's (K, V) logits, a buffer the chunk loop owns and overwrites. The torch
# and Triton versions compute the same numbers in different passes:
#   Triton  the forward kernel reads the logits once (policy and reference in one pass) and keeps
#           lse; the backward kernel reads them again and writes the gradient over them.
#   torch   the forward exponentiates the logits in place (one exp pass, no second (K, V)
#           buffer: on a CPU every fresh buffer is page faults) and, when a gradient follows,
#           normalises them to the softmax; the gradient is then one multiply and a scatter.


def _chunk_logprobs_torch_(logits, labels, acc, softmax):
    """(K, V) logits -> (K,) log-probs and lse in `acc`. Overwrites the logits: with their softmax
    if `softmax` (what the gradient needs), else with unnormalised exponentials."""
    x = logits.to(acc)  # the same memory for fp32/fp64 logits; bf16 ones get an fp32 copy
    ignored = labels == IGNORE_INDEX
    picked = x.gather(1, labels.masked_fill(ignored, 0).unsqueeze(1)).squeeze(1)
    shift = x.amax(dim=1, keepdim=True)  # the row max: exp never overflows
    total = x.sub_(shift).exp_().sum(dim=1, keepdim=True)  # x = exp(x - max)
    if softmax:
        x.div_(total)
        if x is not logits:
            logits.copy_(x)  # bf16: the softmax rounded once, as the Triton backward rounds its output
    lse = (shift + total.log()).squeeze(1)
    # where, not a multiply by a mask: ignored rows give exactly 0 whatever their logits hold.
    return torch.where(ignored, torch.zeros_like(picked), picked - lse), lse


def chunk_token_logprobs(logits, labels, ref_logits=None, use_triton=False, for_gradient=False):
    """One chunk: (K, V) logits (and the reference's), (K,) labels -> (policy (K,), ref (K,) or None, lse (K,)).

    In the accumulation dtype; lse is the policy rows' logsumexp. Consumes the logits buffers;
    with for_gradient the policy's then hold what chunk_logits_grad_ needs (Triton: the logits;
    torch: their softmax).
    """
    acc = accumulation_dtype(logits.dtype)
    if not use_triton:
        pol, lse = _chunk_logprobs_torch_(logits, labels, acc, softmax=for_gradient)
        ref = _chunk_logprobs_torch_(ref_logits, labels, acc, False)[0] if ref_logits is not None else None
        return pol, ref, lse
    K = labels.numel()
    pol = torch.empty(K, dtype=acc, device=logits.device)
    ref = torch.empty(K, dtype=acc, device=logits.device) if ref_logits is not None else None
    lse = torch.empty(K, dtype=acc, device=logits.device)
    launch_forward(logits.unsqueeze(0), labels, ref_logits.unsqueeze(0) if ref_logits is not None else None,
                   pol, ref, lse)
    return pol, ref, lse


def chunk_logits_grad_(logits, labels, lse, g, use_triton=False):
    """After chunk_token_logprobs(for_gradient=True): write g * (onehot(labels) - softmax) over the
    chunk's buffer; return it.

    g: (K,) upstream gradient of each row's log-prob, in lse's dtype; rows labelled -100 get 0.
    The gradient is in the logits' dtype and in their memory (no second (K, V) buffer).
    """
    g = torch.where(labels == IGNORE_INDEX, 0.0, g).contiguous()  # an ignored row's output is a constant
    if use_triton:
        launch_backward(g, logits.unsqueeze(0), labels, lse, logits)  # recomputes softmax from lse
        return logits
    grad = logits.to(lse.dtype)  # the softmax (chunk_token_logprobs); bf16: an fp32 copy
    grad.mul_(g.neg().unsqueeze(1))  # - g * softmax
    grad.scatter_add_(1, labels.masked_fill(labels == IGNORE_INDEX, 0).unsqueeze(1), g.unsqueeze(1))  # + g onehot
    if grad is not logits:
        logits.copy_(grad)
    return logits


# --------------------------------------------------------------------------------------------
# 3. Input checks and the public entry point
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
    without ever holding more than chunk_size rows of logits. No gradient: this scores frozen
    models (the reference cache, the SPO margin, evaluation). Training goes through
    spo_min/pair_loss.py, which needs no recomputed logits.

    hidden:      (..., C) final hidden states (after ln_f) of the positions to score.
    weight:      (V, C) lm_head weight (GPT-2: the token embedding).
    labels:      (...) integer tensor; labels[i] is the token hidden[i] predicts, -100 = ignore.
    ref_hidden, ref_weight: optional, a second model's (same shapes), scored in the same pass.
    chunk_size:  rows of logits per chunk (default: CHUNK_ROWS_GPU on CUDA, CHUNK_ROWS_CPU else).
    backend:     "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton", "torch":
                 who computes each chunk's log-probs (the matmuls are torch's).

    Returns (policy_logp, ref_logp or None) with the labels' shape, in fp32 (fp64 for fp64
    inputs). Ignored positions are 0.
    """
    _check_inputs(hidden, weight, labels, ref_hidden, ref_weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise TokenLogprobsError(
            "kernels/linear_logprobs.py linear_token_logprobs scores without gradients (frozen models, "
            "evaluation): call it under torch.no_grad(), or train through spo_min/pair_loss.py "
            "(fused_pair_loss), or use the full logits (model.head, then token_logprobs)"
        )
    chunk_size = default_chunk_size(hidden.device) if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise TokenLogprobsError(f"kernels/linear_logprobs.py: chunk_size must be a positive int, got {chunk_size!r}")
    use_triton = _use_triton(backend, hidden.device)
    C, N = hidden.shape[-1], labels.numel()
    mm = matmul_dtype(hidden, weight)
    acc = accumulation_dtype(mm)
    flat_labels = labels.reshape(-1).to(torch.int64)  # (N,): small, copying is fine
    pol = torch.empty(N, dtype=acc, device=hidden.device)
    ref = torch.empty(N, dtype=acc, device=hidden.device) if ref_hidden is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        h, w = hidden.reshape(-1, C).to(mm), weight.to(mm)
        ref_h = ref_hidden.reshape(-1, C).to(mm) if ref_hidden is not None else None
        ref_w = ref_weight.to(mm) if ref_hidden is not None else None
        # One (K, V) buffer per model, reused by every chunk: the only logits alive.
        buffer = torch.empty((min(chunk_size, N), w.shape[0]), dtype=mm, device=hidden.device)
        ref_buffer = torch.empty_like(buffer) if ref_h is not None else None
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            n = min(chunk_size, N - start)
            logits = torch.mm(h[rows], w.t(), out=buffer[:n])  # = F.linear(h[rows], w)
            ref_logits = torch.mm(ref_h[rows], ref_w.t(), out=ref_buffer[:n]) if ref_h is not None else None
            pol_rows, ref_rows, _ = chunk_token_logprobs(logits, flat_labels[rows], ref_logits, use_triton)
            pol[rows] = pol_rows
            if ref is not None:
                ref[rows] = ref_rows
    return pol.view(labels.shape), (ref.view(labels.shape) if ref is not None else None)
