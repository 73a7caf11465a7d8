"""One pass per pair: the lm_head, the log-probs and the loss fused per chunk of preference pairs.

The training path of spo_min/logps.py (`batch_pair_loss`, train.py's default `--logits chunked`).
From the final hidden states of a batch of pairs it returns the loss, ready for .backward(),
without ever holding the (tokens x vocabulary) logits and without computing any logits twice.
Read it top to bottom: why chunks of pairs give the exact gradient, the FLOP and memory
arithmetic, the autograd Function, and the entry point `fused_pair_loss`.

Why a chunk of whole pairs can finish its own gradient
------------------------------------------------------
The DPO/SPO loss of a batch of B pairs (E5/E6) is a sum of per-pair terms over one number fixed
before the step, the divisor D (the batch's pair count: the mean):

    L = (1/D) sum_p l_p,   l_p = -log sigmoid(beta (Delta log pi_theta - Delta log pi_ref)_p - M_p)

l_p depends on the policy only through the two sequence log-probs of pair p (E9: sums over their
tokens), which depend only on the logits of pair p's own tokens. So for a token t of pair p

    d L / d x_t = (1/D) (d l_p / d logp_t) (onehot(y_t) - softmax(x_t))

needs nothing outside pair p. A chunk of k whole pairs therefore computes its logits, their
log-probs, its sequence log-probs, its loss (1/D) sum_{p in chunk} l_p and that loss's gradient
to its logits, and from those the gradients to its hidden states and to the lm_head weight, all
while the chunk's logits are in hand. Then the logits are dropped. Nothing is recomputed.

The loss itself is not written here. It is a callable, losses.spo_loss with its beta bound,
applied to the chunk's pairs with reduction="sum" and divided by the batch's D: the loss math
lives once, in spo_min/losses.py. Autograd differentiates it on the chunk's (k,) numbers; only
the per-token chain rule above, the lm_head's, is written out (kernels/linear_logprobs.py).

This is exact only for such a loss: a sum of per-pair terms, each a function of its own pair,
with a divisor that does not depend on the batch's values. A loss that couples pairs (a softmax
over the batch, rewards centred on the batch mean, a divisor computed from the log-probs) would
need every pair's log-probs before any token's gradient is known: those would have to take the
recomputing route (issue 13) or the full logits.

The arithmetic
--------------
N scored tokens, vocabulary V, width C, a chunk of n_c tokens (k pairs), e bytes per logit:

                     full logits (--logits full)      recompute in backward      this module
    lm_head matmuls  3 of N C V: logits, d h, d W     4 (the logits again)       3, all in the forward
    logits alive     N V e, kept for the backward     n_c V e                    n_c V e
    logits' grad     N V e                            written over the chunk     written over the chunk
    kept for bwd     the logits                       lse (N,)                   d h (N C) and d W (V C fp32)

The gradients are computed in the forward and kept until .backward(), which multiplies them by
the upstream gradient (1 for loss.backward(); 3 for (3 * loss).backward()). The weight gradient
is a sum over chunks, kept in fp32 (fp64 for fp64 inputs) whatever the matmul dtype: under bf16
autocast each chunk's product is rounded once to bf16 and added to the fp32 sum.

GPT-2 (V = 50257, C = 768), bf16, 16 pairs of 2 x 512 scored tokens (N = 16384), k = 1:
full logits 1.65 GB + 1.65 GB for their gradient; here one chunk of 1024 x 50257 x 2 = 103 MB,
plus the fp32 weight gradient 154 MB, its bf16 per-chunk product 77 MB and d h 50 MB, whatever
N is. On the CPU setup of spo_min/bench_train.py (about 60 scored tokens per pair, fp32) one
pair's chunk is 12 MB and stays in cache, where the full path's (N, V) tensors are 97 MB each.

Chunk size: `chunk_pairs` whole pairs per chunk, by default as many as fit in a budget of
scored tokens (CHUNK_TOKENS_CPU / CHUNK_TOKENS_GPU; at least one pair). Any k gives the same
numbers up to float summation order.
"""

from __future__ import annotations

import torch

from kernels.linear_logprobs import accumulation_dtype, chunk_logits_grad_, chunk_token_logprobs, matmul_dtype
from kernels.logprobs import IGNORE_INDEX, _use_triton
from spo_min.losses import LossInputError, scored_sequence_logps

# Scored tokens per chunk (whole pairs: a chunk holds as many pairs as fit, at least one).
# CPU: every chunk reads the whole (V, C) weight twice (its logits, d h) and reads and writes the
# fp32 weight gradient, 26 MB each on the bench_train setup (C = 128), so small chunks pay that
# traffic again and again; a bigger chunk holds more memory (768 fp32 rows of V = 50257: 154 MB).
# Measured on the idle 2-core CPU (python -m spo_min.bench_train --repeats 3, 8 pairs of about 60
# scored tokens; kernels/results/cpu-2core/bench_train.json), pairs/s and peak RSS, with glibc
# keeping freed memory as train.py sets it: full logits 29.9 / 990 MB; 1 pair per chunk 25.0 /
# 526 MB, 2 pairs 29.0 / 565 MB, all 8 pairs 33.6 / 577 MB (glibc defaults: full 21.9, the three
# 28.1 / 26.7 / 28.0). So the CPU budget takes the whole batch of that setup (12 or more of
# train.py's 16 built-in-world pairs, up to 61 tokens each), and caps the chunk for long sequences.
# GPU: 4096 bf16 rows are 412 MB, a (4096, 768) x (768, 50257) matmul of 316 GFLOP, far above what
# the tensor cores need to run at full speed; 2 pairs of 2 x 1024 tokens at GPT-2's context
# (spo_min/bench_gpt2.py measures the step).
CHUNK_TOKENS_CPU = 768
CHUNK_TOKENS_GPU = 4096


def default_chunk_pairs(tokens_per_pair: list[int], device: torch.device) -> int:
    """As many whole pairs as fit in the device's token budget, and at least one."""
    budget = CHUNK_TOKENS_GPU if device.type == "cuda" else CHUNK_TOKENS_CPU
    return max(1, budget // max(max(tokens_per_pair, default=1), 1))


class _FusedPairLoss(torch.autograd.Function):
    """Loss and both gradients in the forward, per chunk of pairs; the backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, starts, ref_hidden, ref_weight, ref_logps, margin, loss_fn,
                chunk_pairs, divisor, average, use_triton):
        # starts[r]: hidden's first row of sequence r (row-major over labels); starts[2B] = N.
        B = labels.shape[0] // 2
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        mm = matmul_dtype(hidden, weight)
        acc = accumulation_dtype(mm)
        device = hidden.device
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_weight else None
        policy_logps = torch.empty(2 * B, dtype=acc, device=device)
        live_ref = torch.empty(2 * B, dtype=acc, device=device) if ref_hidden is not None else None
        loss = torch.zeros((), dtype=acc, device=device)

        # The chunks: pairs p..q-1, i.e. chosen rows p..q-1 and rejected rows B+p..B+q-1; each of
        # the two groups of rows is one contiguous run of hidden's rows.
        chunks = [(p, min(p + chunk_pairs, B)) for p in range(0, B, chunk_pairs)]
        spans = [(slice(starts[p], starts[q]), slice(starts[B + p], starts[B + q])) for p, q in chunks]
        rows = max(c.stop - c.start + r.stop - r.start for c, r in spans)  # the largest chunk's tokens
        with torch.autocast(device.type, enabled=False):
            h, w = hidden.to(mm), weight.to(mm)
            ref_h = ref_hidden.to(mm) if ref_hidden is not None else None
            ref_w = ref_weight.to(mm) if ref_hidden is not None else None
            # One (n_c, V) buffer per model, reused by every chunk: the only logits alive.
            buffer = torch.empty((rows, w.shape[0]), dtype=mm, device=device)
            ref_buffer = torch.empty_like(buffer) if ref_h is not None else None
            for (p, q), (c_span, r_span) in zip(chunks, spans):
                k = q - p
                chosen, rejected = slice(p, q), slice(B + p, B + q)
                chunk_labels = torch.cat([labels[chosen], labels[rejected]])  # (2k, T)
                token_labels = chunk_labels[chunk_labels != IGNORE_INDEX]  # (n_c,), hidden's row order
                h_c = torch.cat([h[c_span], h[r_span]])  # (n_c, C)
                n_c = len(h_c)
                logits = torch.mm(h_c, w.t(), out=buffer[:n_c])  # = F.linear(h_c, w)
                ref_logits = None
                if ref_h is not None:
                    ref_logits = torch.mm(torch.cat([ref_h[c_span], ref_h[r_span]]), ref_w.t(), out=ref_buffer[:n_c])
                token_logps, ref_tokens, lse = chunk_token_logprobs(logits, token_labels, ref_logits, use_triton,
                                                                    for_gradient=True)

                # The chunk's loss through the loss callable, and its gradient to each token's
                # log-prob (autograd on (n_c,) numbers: E9, then E5/E6).
                with torch.enable_grad():
                    token_logps.requires_grad_(True)
                    seq = scored_sequence_logps(token_logps, chunk_labels, average)  # (2k,): E9
                    if ref_tokens is not None:
                        ref_c, ref_r = scored_sequence_logps(ref_tokens, chunk_labels, average).split(k)
                        live_ref[chosen], live_ref[rejected] = ref_c, ref_r
                    else:
                        ref_c, ref_r = ref_logps[chosen], ref_logps[rejected]
                    m = margin[chosen] if isinstance(margin, torch.Tensor) else margin
                    chunk_loss = loss_fn(seq[:k], seq[k:], ref_c, ref_r, m, reduction="sum")[0] / divisor
                    (g,) = torch.autograd.grad(chunk_loss, token_logps)
                loss += chunk_loss.detach()
                policy_logps[chosen], policy_logps[rejected] = seq.detach().split(k)

                # The lm_head's chain rule, while the logits are in hand (kernels/linear_logprobs.py).
                dlogits = chunk_logits_grad_(logits, token_labels, lse, g, use_triton)  # over the logits
                if need_hidden:
                    d_h = dlogits @ w  # (n_c, V) x (V, C)
                    n_chosen = c_span.stop - c_span.start
                    grad_hidden[c_span], grad_hidden[r_span] = d_h[:n_chosen], d_h[n_chosen:]
                if need_weight:
                    if grad_weight.dtype == mm:
                        grad_weight.addmm_(dlogits.t(), h_c)  # += (V, n_c) x (n_c, C), in place
                    else:  # bf16: the product is rounded once to bf16; the sum over chunks stays fp32
                        grad_weight += dlogits.t() @ h_c

        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)  # no copy when the dtypes already agree
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(policy_logps)
        if live_ref is None:
            return loss, policy_logps, None
        ctx.mark_non_differentiable(live_ref)
        return loss, policy_logps, live_ref

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_policy_logps, _grad_ref_logps):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Out of place: the saved gradients stay as they are, so a second backward
        # (retain_graph=True) gets the same numbers.
        return (grad_hidden * grad_loss if grad_hidden is not None else None,
                grad_weight * grad_loss if grad_weight is not None else None,
                None, None, None, None, None, None, None, None, None, None, None)


def fused_pair_loss(hidden, weight, labels, loss_fn, ref_logps=None, ref_hidden=None, ref_weight=None, margin=0.0,
                    chunk_pairs=None, divisor=None, average=False, backend="auto"):
    """The loss of a batch of preference pairs from its final hidden states, a chunk of pairs at a time.

    hidden:     (N, C) final hidden states (after ln_f) at the scored positions of `labels`
                (labels != -100), in row-major order: model.hidden_states(input_ids)[scored].
    weight:     (V, C) lm_head weight (GPT-2: the token embedding; its gradient adds into it).
    labels:     (2B, T) shifted labels, -100 = not scored: chosen rows 0..B-1, then rejected rows
                B..2B-1 (spo_min.data.collate_pairs).
    loss_fn:    losses.spo_loss with its beta bound (functools.partial), or any function with its
                signature (policy_chosen, policy_rejected, ref_chosen, ref_rejected, margin,
                reduction="sum") -> (the sum of per-pair losses, metrics). See the module docstring
                for what such a loss must be.
    ref_logps:  (2B,) the reference's sequence log-probs (the round's cache), or
    ref_hidden, ref_weight: the reference model's, scored in the same pass (--ref live).
    margin:     (B,) the frozen SPO margin M_n, or a number (0: DPO).
    chunk_pairs: whole pairs per chunk (default: default_chunk_pairs).
    divisor:    the loss is (sum of per-pair losses) / divisor; default B, the mean over this
                batch. Give the whole batch's pair count when this call sees a part of it.
    average:    E9's --average-logps.
    backend:    "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton", "torch".

    Returns (loss, policy_logps (2B,), ref_logps (2B,)): the loss is differentiable in hidden and
    weight; the sequence log-probs are detached (for metrics and the finite check).
    """
    if labels.dim() != 2 or labels.shape[0] % 2 or hidden.dim() != 2:
        raise LossInputError(f"fused_pair_loss: expected labels (2B, T) and hidden (N, C), got labels "
                             f"{tuple(labels.shape)} and hidden {tuple(hidden.shape)}")
    if (ref_logps is None) == (ref_hidden is None):
        raise LossInputError("fused_pair_loss: give the reference either as ref_logps (cached) or as "
                             "ref_hidden and ref_weight (live), exactly one of them")
    B = labels.shape[0] // 2
    n_scored = (labels != IGNORE_INDEX).sum(1).tolist()  # tokens per sequence: one host sync
    if sum(n_scored) != hidden.shape[0]:
        raise LossInputError(f"fused_pair_loss: hidden has {hidden.shape[0]} rows but labels score "
                             f"{sum(n_scored)} positions; pass model.hidden_states(ids)[labels != -100]")
    if chunk_pairs is None:
        chunk_pairs = default_chunk_pairs([c + r for c, r in zip(n_scored[:B], n_scored[B:])], hidden.device)
    if not isinstance(chunk_pairs, int) or isinstance(chunk_pairs, bool) or chunk_pairs < 1:
        raise LossInputError(f"fused_pair_loss: chunk_pairs must be a positive int, got {chunk_pairs!r}")
    starts = [0]
    for n in n_scored:
        starts.append(starts[-1] + n)
    loss, policy_logps, live_ref = _FusedPairLoss.apply(
        hidden, weight, labels, starts, ref_hidden.detach() if ref_hidden is not None else None,
        ref_weight.detach() if ref_weight is not None else None, ref_logps, margin, loss_fn, chunk_pairs,
        B if divisor is None else divisor, average, _use_triton(backend, hidden.device))
    return loss, policy_logps, (live_ref if live_ref is not None else ref_logps)
