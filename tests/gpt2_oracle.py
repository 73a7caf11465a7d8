"""Test oracle: tiny random `transformers` GPT-2 models, saved the way Hugging Face saves them.

transformers is a test-only dependency: it is the independent reference our GPT must match.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def hf_config(n_embd, n_layer, n_head, n_positions, vocab_size, layer_norm_epsilon=1e-5):
    import transformers

    return transformers.GPT2Config(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=n_positions,
        vocab_size=vocab_size,
        layer_norm_epsilon=layer_norm_epsilon,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # GPT-2's default 50256 lies outside a tiny vocabulary (transformers warns about it).
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )


def make_hf_gpt2(n_embd, n_layer, n_head, n_positions, vocab_size, seed=0):
    """A GPT2LMHeadModel in eval mode whose every parameter is random.

    HF's init leaves biases at 0 and LayerNorms at (1, 0): a swapped or dropped bias, or a
    missing LayerNorm affine, would then go unnoticed. So each parameter is redrawn: LayerNorm
    weights 1 + N(0, 0.1^2), everything else N(0, 0.1^2). The global RNG is left untouched.
    """
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(hf_config(n_embd, n_layer, n_head, n_positions, vocab_size))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied lm_head is listed once, as wte
            base = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def save_hf(model, directory, prefix=True, config_json=True) -> Path:
    """save_pretrained (safetensors, keys "transformer.*"); prefix=False renames the keys to the
    bare form ("h.0.attn.c_attn.weight") that other GPT-2 exports use."""
    directory = Path(directory)
    model.save_pretrained(directory)
    path = directory / "model.safetensors"
    if not prefix:
        with safe_open(path, framework="pt") as f:
            tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        save_file(tensors, path, metadata=metadata)
    if not config_json:
        (directory / "config.json").unlink()
    return path


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def read_tensors(path) -> tuple[dict, dict]:
    """All tensors of a safetensors file and its header metadata."""
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def randomized_gpt(config, seed=0, scale=0.2):
    """Our GPT with every parameter perturbed: GPT-2's init has zero biases and unit LayerNorms,
    which would let a swapped or missing bias go unnoticed."""
    from spo_min.model import GPT

    model = GPT(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()
