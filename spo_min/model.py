"""GPT-2, written from scratch in the style of nanoGPT.

The architecture is exactly OpenAI's GPT-2, so real GPT-2 weights load unchanged
(see checkpoint.py):

    tokens -> wte + wpe -> n_layer x Block -> ln_f -> logits = h @ wte^T   (tied head)
    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))                   (pre-LayerNorm)

Parameter names follow nanoGPT (= HF GPT-2 names), but every projection is an nn.Linear,
whose weight is [out, in]; HF stores the same matrices as Conv1D, [in, out].

SPO only ever needs log-probabilities of response tokens (E9), so besides `model(idx) -> logits`
the model exposes `hidden_states(idx)` and `head(h)`: a loss can project only the positions it
scores, or hand the hidden states to a fused kernel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelError(ValueError):
    """A bad configuration or a bad input to the model."""


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (number of learned positions)
    vocab_size: int = 50257  # GPT-2 BPE: 50256 merges + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 by default: preference losses compare policy and reference exactly
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ModelError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        is_number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        if not (is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ModelError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        # LayerNorm divides by sqrt(var + eps): a negative eps gives NaN on a constant input.
        eps = self.layer_norm_epsilon
        if not (is_number(eps) and math.isfinite(eps) and eps > 0):
            raise ModelError(f"GPTConfig.layer_norm_epsilon must be a positive number, got {eps!r}")
        if not isinstance(self.bias, bool):
            raise ModelError(f"GPTConfig.bias must be true or false, got {self.bias!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """Named sizes: "gpt2" (124M, OpenAI's smallest) and CPU-sized "small", "tiny", "nano"."""
        if name not in PRESETS:
            raise ModelError(f"unknown GPTConfig preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"GPTConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    # Deeper is nearly free on CPU: the (tokens x 50257) head dominates the cost, not the blocks.
    "tiny": dict(n_layer=4, n_head=4, n_embd=64, block_size=128),
    "nano": dict(n_layer=1, n_head=2, n_embd=32, block_size=64),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): every head attends independently.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(head_dim) + causal mask) v, with a fused kernel where one exists.
        # is_causal=True: position t sees positions <= t only, so logits at t never see token t+1.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate the heads again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU (HF calls it "gelu_new").
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        eps, bias = config.layer_norm_epsilon, config.bias
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=bias)
        self.mlp = MLP(config)

    def forward(self, x):
        # Pre-LN: normalise the input of each sublayer, add its output to the residual stream.
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int | None = None):
        """Build GPT-2 with GPT-2's initialisation.

        seed=None draws the initial weights from torch's global RNG (like nanoGPT). With a seed,
        they come from a private generator and the global RNG is left exactly as it was, so
        building a model never shifts data order or dropout elsewhere.
        """
        super().__init__()
        self.config = config
        # nn.Linear/nn.Embedding initialise themselves from the global RNG; we overwrite those
        # values below, so with a seed we fork the RNG to make construction invisible.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            self.transformer = nn.ModuleDict(
                dict(
                    wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding = output head
                    wpe=nn.Embedding(config.block_size, config.n_embd),  # learned absolute positions
                    drop=nn.Dropout(config.dropout),
                    h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                    ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
                )
            )
        # No lm_head module: head() multiplies by wte directly. The tie is then structural
        # (one tensor), and the state dict holds no duplicate, as in GPT-2's own files.
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.transformer.wte.weight.device).manual_seed(seed)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """GPT-2 init: N(0, 0.02) weights, zero biases, unit LayerNorms; the projections that
        write into the residual stream get std 0.02 / sqrt(2 * n_layer), so the stream's variance
        does not grow with depth (2 such writes per block)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, residual_std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name:  # ln_1, ln_2, ln_f weights
                p.fill_(1.0)
            else:  # wte, wpe, c_attn, c_fc
                p.normal_(0.0, 0.02, generator=generator)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head is counted once). non_embedding drops wpe and wte,
        the convention of the scaling-law papers."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, n_embd) hidden states after the final LayerNorm."""
        if idx.dim() != 2:
            raise ModelError(f"expected token ids of shape (batch, time), got shape {tuple(idx.shape)}")
        T = idx.size(1)
        if T > self.config.block_size:
            raise ModelError(
                f"sequence length {T} exceeds block_size={self.config.block_size} (the number of learned "
                "positions); truncate or crop the input, or use a config with a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., n_embd) -> logits (..., vocab_size), tied to the token embedding."""
        return F.linear(h, self.transformer.wte.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits; logits[:, t] predict token t + 1."""
        return self.head(self.hidden_states(idx))

    def compile_trunk(self) -> "GPT":
        """torch.compile hidden_states (token ids -> final hidden states) in place; returns self.

        Only the transformer blocks are compiled: the lm_head and the loss (spo_min/pair_loss.py)
        loop over chunks of pairs in Python with host syncs, which a graph would break on anyway.
        The module stays itself, so its state dict keeps its keys (torch.compile(model) would wrap
        it and prefix every key with "_orig_mod."). train.py --compile; measured in
        spo_min/bench_train.py (CPU) and spo_min/bench_gpt2.py (GPU).
        """
        self.hidden_states = torch.compile(self.hidden_states)
        return self

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample up to max_new_tokens after idx (B, T); returns (B, T + n_new).

        temperature=0 decodes greedily; top_k keeps the k most likely tokens. A row that
        produces eos_id is finished: it is padded with eos_id from then on, and generation stops
        once every row is finished. Rows are always sampled together (finished ones too), so the
        random stream, and hence every row's text, does not depend on when other rows finish.
        Pass a seeded torch.Generator for reproducible samples. Call model.eval() first if the
        config has dropout. Context longer than block_size is cropped to the last block_size tokens.
        """
        if temperature < 0:
            raise ModelError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ModelError(f"top_k must be >= 1 or None, got {top_k}")
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits = self.head(self.hidden_states(context)[:, -1, :]).float()  # last position only
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.size(-1):
                    kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth_largest, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            if eos_id is not None:
                next_id = next_id.masked_fill(finished[:, None], eos_id)
                finished |= next_id[:, 0] == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        return idx
