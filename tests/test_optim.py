"""Our AdamW (spo_min/optim.py) against torch.optim.AdamW: the same update, bit for bit on CPU."""

import sys

import pytest
import torch

from spo_min.model import GPT, GPTConfig
from spo_min.optim import AdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_bit_for_bit(weight_decay):
    ours, theirs = GPT(GPTConfig.preset("nano"), seed=0), GPT(GPTConfig.preset("nano"), seed=0)
    kwargs = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt_ours, opt_theirs = AdamW(ours.parameters(), **kwargs), torch.optim.AdamW(theirs.parameters(), **kwargs)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        idx = torch.randint(0, 50257, (2, 12), generator=g)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for group in opt.param_groups:
                group["lr"] = 3e-3 * (step + 1) / 5  # a schedule changes lr between steps, as train.py's does
            loss = model(idx).logsumexp(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name  # the same operations in the same order: identical bits
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        assert sa["step"].item() == sb["step"].item() == 5
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_adamw_skips_parameters_without_gradients_and_zero_grad():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamW([a, b], lr=0.1)
    a.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    # Step 1 of Adam moves every coordinate with a non-zero gradient by lr, against its sign.
    torch.testing.assert_close(a.detach(), torch.tensor([0.9, 1.1, 1.0]), atol=1e-6, rtol=0)
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    opt.zero_grad(set_to_none=False)
    assert torch.equal(a.grad, torch.zeros(3))
    opt.zero_grad()
    assert a.grad is None
