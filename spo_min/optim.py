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
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            # One call per operation for all parameters (torch._foreach_*: a loop over the list in
            # C++, fused into few kernel launches on a GPU), each the update rule above, elementwise.
            g = [p.grad for p in params]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            t = [self.state[p]["step"].item() for p in params]
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)  # p <- p (1 - lr wd)
            torch._foreach_lerp_(m, g, 1 - beta1)  # m <- b1 m + (1 - b1) g
            torch._foreach_mul_(v, beta2)  # v <- b2 v + (1 - b2) g^2
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)
            denom = torch._foreach_sqrt(v)  # sqrt(v) / sqrt(1 - b2^t) + eps
            torch._foreach_div_(denom, [(1 - beta2 ** k) ** 0.5 for k in t])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, [-(lr / (1 - beta1 ** k)) for k in t])  # p -= lr/(1-b1^t) m/denom
