"""A TorchDispatchMode that lists the size of every tensor an op creates (for memory tests)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class RecordAllocations(TorchDispatchMode):
    """Records the element count of every fresh op output (views and in-place ops excluded)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func._schema.is_mutable):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numels.append((t.numel(), str(func)))
        return out
