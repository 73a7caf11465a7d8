"""What happens at optimizer step k: which examples it sees, and at which learning rate.

Both are pure functions of the step (and a seed), never of any global RNG. A resumed run, a run
with a reference cache, and a run without one therefore see exactly the same batches.
"""

from __future__ import annotations

import math

import torch


def step_schedule(n_items, batch_size, steps, seed):
    """Index batches for every step, fixed up front from a private generator.

    Epochs are fresh permutations laid end to end, so a batch at an epoch boundary takes the last
    items of one permutation and the first of the next. Every batch is full, even one larger than
    the data (it then spans several epochs).
    """
    generator = torch.Generator().manual_seed(seed)
    order, schedule = [], []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(n_items, generator=generator).tolist()
        schedule.append(order[:batch_size])
        order = order[batch_size:]
    return schedule


def cosine_lr(step, total, peak, warmup=20, floor=0.1):
    """Linear warm-up, then cosine decay to floor * peak: the usual SFT schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
