"""What happens at optimizer step k: which examples it sees, and at which learning rate.

Both are pure functions of the step (and a seed), never of any global RNG. A resumed run, a run
with a reference cache, and a run without one therefore see exactly the same batches.
"""

from __future__ import annotations

import math

import torch


class StepSchedule:
    """The index batch of every step, drawn on demand.

    Epochs are fresh permutations laid end to end, so a batch at an epoch boundary takes the last
    items of one permutation and the first of the next. Every batch is full, even one larger than
    the data (it then spans several epochs). Only the current permutation is ever held: a run
    of any length costs the memory of one epoch, not of the whole schedule. schedule[k] is cheap
    when k follows the last step asked for (a training loop, a resume from step k); earlier
    steps are drawn again from the seed.
    """

    def __init__(self, n_items, batch_size, steps, seed):
        self.n_items, self.batch_size, self.steps, self.seed = n_items, batch_size, steps, seed
        self._batches, self._next = None, 0

    def __len__(self):
        return self.steps

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        order = []
        for _ in range(self.steps):
            while len(order) < self.batch_size:
                order += torch.randperm(self.n_items, generator=generator).tolist()
            yield order[: self.batch_size]
            order = order[self.batch_size :]

    def __getitem__(self, step):
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside 0..{self.steps - 1}")
        if self._batches is None or step < self._next:
            self._batches, self._next = iter(self), 0
        while self._next <= step:
            batch, self._next = next(self._batches), self._next + 1
        return batch

    def items_seen(self):
        """Every item some step uses, sorted, without drawing the steps: all of them once the
        steps cover an epoch, else the head of the first permutation."""
        total = self.steps * self.batch_size
        if total >= self.n_items:
            return list(range(self.n_items))
        first = torch.randperm(self.n_items, generator=torch.Generator().manual_seed(self.seed))
        return sorted(first[:total].tolist())


def step_schedule(n_items, batch_size, steps, seed):
    """Index batches for every step (a StepSchedule), fixed by the seed alone."""
    return StepSchedule(n_items, batch_size, steps, seed)


def cosine_lr(step, total, peak, warmup=20, floor=0.1):
    """Linear warm-up, then cosine decay to floor * peak: the usual SFT schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
