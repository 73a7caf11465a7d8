"""Sequence log-probabilities of a batch under a model, and the training loss of a batch of pairs
(the data path of design.md, end to end).

    input_ids, labels (already shifted, -100 = not scored)
      -> final hidden states of the GPT
      -> hidden states ONLY at scored positions (response tokens): prompt and padding positions
         would be projected onto the vocabulary just to be thrown away
      -> per-token log-probs of the labels, one of two ways (`logits=`):
         "chunked" (default) the (N, V) logits (the biggest tensors of a step) never exist:
                   training: spo_min/pair_loss.py, the lm_head, log-probs AND loss fused per
                   chunk of pairs, each gradient computed while its logits are in hand
                   (`batch_pair_loss`); scoring without gradients: kernels/linear_logprobs.py,
                   a chunk of rows at a time (`batch_sequence_logps`)
         "full"    model.head -> (N, V) logits -> kernels/logprobs.py, then plain autograd: the
                   path kept for teaching and comparison (spo_min/bench_train.py runs both
                   side by side)
         either way the policy and, with --ref live, the reference are scored in one pass
      -> sequence log-probs, E9, and the loss, E5/E6 (spo_min/losses.py)

`frozen_sequence_logps` runs a frozen policy over a whole list of pairs once, in a fixed order
and without touching any RNG: that is the per-round reference cache.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from kernels.linear_logprobs import linear_token_logprobs
from kernels.logprobs import token_logprobs
from spo_min.data import collate_pairs
from spo_min.losses import scored_sequence_logps
from spo_min.pair_loss import fused_pair_loss


LOGITS_PATHS = ("chunked", "full")


def _scored_hidden(model, input_ids, scored):
    return model.hidden_states(input_ids)[scored]  # (N_scored, C): only the positions E9 sums


def batch_sequence_logps(model, batch, ref_model=None, average=False, backend="auto", logits="chunked"):
    """Sequence log-probs (E9) of every row of `batch` under `model` (and `ref_model`).

    logits: "chunked" (never builds the (N, V) logits; no gradient: call it under torch.no_grad)
    or "full" (model.head, then log-probs; differentiable). Training uses batch_pair_loss.
    Returns (policy (2B,), reference (2B,) or None). Gradients flow into `model` only.
    """
    if logits not in LOGITS_PATHS:
        raise ValueError(f"logits must be one of {LOGITS_PATHS}, got {logits!r}")
    input_ids, labels = batch["input_ids"], batch["labels"]
    scored = labels != -100
    hidden = _scored_hidden(model, input_ids, scored)
    ref_hidden = None
    if ref_model is not None:
        with torch.no_grad():
            ref_hidden = _scored_hidden(ref_model, input_ids, scored)
    if logits == "chunked":
        # GPT-2's lm_head is the token embedding (model.head).
        ref_weight = ref_model.transformer.wte.weight if ref_model is not None else None
        policy_tok, ref_tok = linear_token_logprobs(hidden, model.transformer.wte.weight, labels[scored],
                                                    ref_hidden, ref_weight, backend=backend)
    else:
        with torch.no_grad():
            ref_logits = ref_model.head(ref_hidden) if ref_model is not None else None
        # One kernel pass reads the policy and reference logits of each scored token.
        policy_tok, ref_tok = token_logprobs(model.head(hidden), labels[scored], ref_logits, backend=backend)
    policy = scored_sequence_logps(policy_tok, labels, average=average)
    return policy, (None if ref_tok is None else scored_sequence_logps(ref_tok, labels, average=average))


def batch_pair_loss(model, batch, loss_fn, ref_logps=None, ref_model=None, margin=0.0, average=False,
                    logits="chunked", chunk_pairs=None, divisor=None, backend="auto"):
    """The training loss of a batch of pairs, ready for .backward(): (loss, policy (2B,), reference (2B,)).

    loss_fn:   losses.spo_loss with its beta bound (functools.partial(losses.spo_loss, beta=beta)).
    ref_logps: (2B,) cached reference log-probs (chosen rows, then rejected), or ref_model: the
               reference scored at this step (--ref live).
    margin:    (B,) the frozen SPO margin M_n, or a number (0: DPO).
    logits:    "chunked": spo_min/pair_loss.py, the loss fused per chunk of `chunk_pairs` pairs;
               "full": model.head, token_logprobs, the loss on the whole batch, plain autograd.
    divisor:   the loss is the sum of per-pair losses over `divisor` (default: the batch's pairs).
    The sequence log-probs come back detached, for metrics and the finite check.
    """
    if logits not in LOGITS_PATHS:
        raise ValueError(f"logits must be one of {LOGITS_PATHS}, got {logits!r}")
    B = batch["labels"].shape[0] // 2
    divisor = B if divisor is None else divisor
    if logits == "full":
        policy, live_ref = batch_sequence_logps(model, batch, ref_model, average, backend, logits="full")
        ref = live_ref if ref_model is not None else ref_logps
        loss, _ = loss_fn(policy[:B], policy[B:], ref[:B], ref[B:], margin, reduction="sum")
        return loss / divisor, policy.detach(), ref
    input_ids, labels = batch["input_ids"], batch["labels"]
    scored = labels != -100
    hidden = _scored_hidden(model, input_ids, scored)
    ref_hidden = ref_weight = None
    if ref_model is not None:
        with torch.no_grad():
            ref_hidden = _scored_hidden(ref_model, input_ids, scored)
        ref_weight = ref_model.transformer.wte.weight
    # GPT-2's lm_head is the token embedding: its gradient adds into wte's, as for model.head.
    return fused_pair_loss(hidden, model.transformer.wte.weight, labels, loss_fn, ref_logps, ref_hidden, ref_weight,
                           margin, chunk_pairs, divisor, average, backend)


@torch.no_grad()
def frozen_sequence_logps(model, tokenized_pairs, batch_size=32, average=False, device="cpu", logits="chunked"):
    """Sequence log-probs of a frozen policy on every pair, in order: (chosen (P,), rejected (P,)).

    Computed once per round for each policy the round needs (pi_{n-1} as reference, and
    pi_0..pi_{n-1} for the SPO margin, E6). No RNG is consumed, so caching never changes the
    training order.
    """
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(tokenized_pairs), batch_size):
        chunk = tokenized_pairs[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk).items()}
        seq, _ = batch_sequence_logps(model, batch, average=average, logits=logits)
        chosen.append(seq[: len(chunk)].float().cpu())
        rejected.append(seq[len(chunk) :].float().cpu())
    model.train(was_training)
    empty = torch.zeros(0)
    return (torch.cat(chosen) if chosen else empty), (torch.cat(rejected) if rejected else empty)


def keep_freed_memory_in_process() -> bool:
    """glibc only: let big freed blocks stay in the process for reuse (notebook 04's finding).

    glibc mmaps every block above M_MMAP_THRESHOLD (at most 32 MiB) and unmaps it on free, so the
    next step page-faults it in again. The "full" path's (N, V) logits are ~100 MB per step on
    the CPU setup: measured with spo_min/bench_train.py (2-core CPU, one thread, CPU time per
    step, other jobs sharing the cores), 616 ms with this setting against 875 ms without, at a
    peak RSS of 1102 vs 976 MB. The "chunked" path allocates nothing above 32 MiB, so glibc
    already reuses its blocks: 886 vs 902 ms, 690 vs 673 MB. Same as exporting
    MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ before start-up. Returns False where
    there is no glibc (nothing changes: only slower).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
