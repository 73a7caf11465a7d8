"""Sequence log-probabilities of a batch under a model (the data path of design.md, end to end).

    input_ids, labels (already shifted, -100 = not scored)
      -> final hidden states of the GPT
      -> hidden states ONLY at scored positions (response tokens): prompt and padding positions
         would be projected onto the vocabulary just to be thrown away
      -> per-token log-probs of the labels, one of two ways (`logits=`):
         "chunked" (default) kernels/linear_logprobs.py: lm_head and log-probs fused, a chunk of
                   rows at a time, so the (N, V) logits (the biggest tensors of a step) never exist
         "full"    model.head -> (N, V) logits -> kernels/logprobs.py: the plain path, kept for
                   teaching and comparison (spo_min/bench_train.py runs both side by side)
         either way the policy and, with --ref live, the reference are scored in one call
      -> sequence log-probs, E9 (spo_min/losses.py)

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
from spo_min.losses import sequence_logps


LOGITS_PATHS = ("chunked", "full")


def _scored_hidden(model, input_ids, scored):
    return model.hidden_states(input_ids)[scored]  # (N_scored, C): only the positions E9 sums


def batch_sequence_logps(model, batch, ref_model=None, average=False, backend="auto", logits="chunked"):
    """Sequence log-probs (E9) of every row of `batch` under `model` (and `ref_model`).

    logits: "chunked" (never builds the (N, V) logits) or "full" (model.head, then log-probs).
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
        # GPT-2's lm_head is the token embedding (model.head): its gradient adds into wte.
        ref_weight = ref_model.transformer.wte.weight if ref_model is not None else None
        policy_tok, ref_tok = linear_token_logprobs(hidden, model.transformer.wte.weight, labels[scored],
                                                    ref_hidden, ref_weight, backend=backend)
    else:
        with torch.no_grad():
            ref_logits = ref_model.head(ref_hidden) if ref_model is not None else None
        # One kernel pass reads the policy and reference logits of each scored token.
        policy_tok, ref_tok = token_logprobs(model.head(hidden), labels[scored], ref_logits, backend=backend)

    def to_sequences(token_lp):
        # Put the per-token values back at their (row, position) so E9 is applied in one place.
        full = torch.zeros(labels.shape, dtype=token_lp.dtype, device=token_lp.device)
        full = full.masked_scatter(scored, token_lp)
        return sequence_logps(full, labels, average=average)

    return to_sequences(policy_tok), (None if ref_tok is None else to_sequences(ref_tok))


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
