"""AdamW, the update rule spelled out (Loshchilov & Hutter, "Decoupled Weight Decay Regularization").

For every parameter p with gradient g, at step t (from 1), with lr, betas (b1, b2), eps and
weight decay wd:

    p   <- p (1 - lr wd)                          decoupled weight decay: not part of g
    m   <- b1 m + (1 - b1) g                      first moment (exp_avg)
    v   <- b2 v + (1 - b2) g^2                    second moment (exp_avg_sq)
    p   <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

These are the operations, in the order, of torch.optim.AdamW's single-tensor path (its default
for CPU tensors), so on a CPU the two agree bit for bit (tests/test_optim.py).

Why our own: creating a torch.optim optimizer imports torch._dynamo (torch's Optimizer wraps
add_param_group in a dynamo guard), which costs about 145 MB of resident memory on the 2-core CPU,
more than the whole tiny model with its gradients and both moments (about 100 MB). A training run
never uses dynamo. The state keeps torch's names ("step", "exp_avg", "exp_avg_sq") so the resumable
round states of spo_min/chain.py read the same either way.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class AdamW:
    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.param_groups = [{"params": list(params), "lr": lr, "betas": tuple(betas), "eps": eps,
                              "weight_decay": weight_decay}]
        self.state = defaultdict(dict)  # parameter -> {"step", "exp_avg", "exp_avg_sq"}

    def zero_grad(self, set_to_none: bool = True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                if wd != 0:
                    p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-(lr / (1 - beta1 ** t)))
