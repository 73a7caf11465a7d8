"""GPT model: config, structure, init, forward invariants, generation.

(Numerical agreement with transformers' GPT-2 is tested in test_checkpoint.py, where the
weights come from real HF files.)
"""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2_oracle import randomized_gpt

from spo_min.model import GPT, GPTConfig, ModelError

V = 53  # a small vocabulary keeps the tests fast; nothing in the model assumes 50257


def tiny_config(**overrides):
    return GPTConfig(**{**dict(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32), **overrides})




def ids(shape, seed=0, vocab=V):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ config


def test_presets():
    assert GPTConfig.preset("gpt2") == GPTConfig()  # the dataclass defaults are GPT-2 124M
    shapes = {name: (c.n_embd, c.n_layer, c.n_head, c.block_size, c.vocab_size)
              for name in ("gpt2", "small", "tiny", "nano") for c in [GPTConfig.preset(name)]}
    assert shapes == {
        "gpt2": (768, 12, 12, 1024, 50257),
        "small": (128, 4, 4, 256, 50257),
        "tiny": (64, 4, 4, 128, 50257),
        "nano": (32, 1, 2, 64, 50257),
    }
    assert GPTConfig.preset("tiny", vocab_size=97).vocab_size == 97
    with pytest.raises(ModelError, match=r"unknown GPTConfig preset 'huge'; choose one of \['gpt2', 'nano'"):
        GPTConfig.preset("huge")


def test_gpt2_parameter_count():
    # OpenAI's GPT-2 small as published by transformers (GPT2LMHeadModel.num_parameters()):
    # 124,439,808 with the tied head counted once. Built on the meta device: no memory used.
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768


def test_config_dict_round_trip_and_errors():
    config = tiny_config(dropout=0.1, bias=False, layer_norm_epsilon=1e-6)
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ModelError, match=r"unknown keys \['n_ctx'\]"):
        GPTConfig.from_dict({**config.to_dict(), "n_ctx": 16})
    with pytest.raises(ModelError, match="n_embd=48 is not divisible by n_head=5"):
        GPTConfig(n_embd=48, n_head=5)
    with pytest.raises(ModelError, match=r"GPTConfig.n_layer must be a positive int, got 0"):
        GPTConfig(n_layer=0)
    # A string or negative epsilon was a TypeError, or NaN after the first LayerNorm.
    for eps in ("1e-5", -1e-5, 0.0, float("nan"), True):
        with pytest.raises(ModelError, match=f"layer_norm_epsilon must be a positive number, got {eps!r}"):
            GPTConfig(layer_norm_epsilon=eps)
    with pytest.raises(ModelError, match=r"GPTConfig.dropout must be in \[0, 1\), got '0.1'"):
        GPTConfig(dropout="0.1")
    with pytest.raises(ModelError, match="GPTConfig.bias must be true or false, got 'yes'"):
        GPTConfig(bias="yes")


# --------------------------------------------------------------------------- structure


def test_state_dict_keys_follow_the_contract():
    model = GPT(tiny_config(n_layer=2))
    per_block = [
        f"{m}.{p}"
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    ]
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    expected |= {f"transformer.h.{i}.{k}" for i in range(2) for k in per_block}
    assert set(model.state_dict()) == expected  # no lm_head: it is wte
    assert model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)  # nn.Linear: [out, in]
    no_bias = GPT(tiny_config(bias=False))
    assert not any(k.endswith("bias") for k in no_bias.state_dict())


def test_head_is_tied_to_the_embedding():
    model = randomized_gpt(tiny_config())
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.head(h), h @ model.transformer.wte.weight.T)
    # one tensor, two uses: the loss gradient reaches wte through the embedding and the head
    model(ids((2, 8))).logsumexp(-1).sum().backward()
    assert model.transformer.wte.weight.grad is not None


# -------------------------------------------------------------------------------- init


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    config = tiny_config(n_embd=128, n_head=4, n_layer=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = GPT(config, seed=7), GPT(config, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert not torch.equal(a.transformer.wte.weight, GPT(config, seed=8).transformer.wte.weight)
    # seed=None follows the global RNG, like any torch module
    torch.manual_seed(1)
    c = GPT(config)
    torch.manual_seed(1)
    assert torch.equal(c.transformer.wte.weight, GPT(config).transformer.wte.weight)


def test_init_follows_gpt2():
    config = tiny_config(n_embd=128, n_head=4, n_layer=3)
    model = GPT(config, seed=0)
    blk = model.transformer.h[1]
    # A sample std of N >= 16384 normal draws is within 1% of the truth with overwhelming
    # probability (its relative s.d. is 1/sqrt(2N) < 0.6%); we allow 5%.
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    for w, std in [(blk.attn.c_attn.weight, 0.02), (blk.mlp.c_fc.weight, 0.02), (model.transformer.wte.weight, None),
                   (blk.attn.c_proj.weight, residual), (blk.mlp.c_proj.weight, residual)]:
        std = 0.02 if std is None else std
        assert abs(w.std().item() / std - 1) < 0.05 and abs(w.mean().item()) < 0.1 * std
    assert torch.equal(blk.attn.c_attn.bias, torch.zeros(384)) and torch.equal(blk.ln_2.weight, torch.ones(128))


# ----------------------------------------------------------------------------- forward


def test_hidden_states_then_head_equals_forward():
    model = randomized_gpt(tiny_config())
    idx = ids((3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, V)
    h = model.hidden_states(idx)
    assert h.shape == (3, 16, 32)
    mask = ids((3, 16), seed=1, vocab=2).bool()
    # Same math on a different number of rows: the matmul may block differently, so allow fp32
    # rounding (logits here are of order 1; float32 eps is 1.2e-7).
    torch.testing.assert_close(model.head(h[mask]), logits[mask], rtol=0, atol=1e-5)


def test_causal_mask_future_tokens_do_not_leak():
    model = randomized_gpt(tiny_config())
    a = ids((2, 16), seed=0)
    b = a.clone()
    b[:, 10:] = ids((2, 6), seed=1)
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :10], lb[:, :10], rtol=0, atol=1e-5)  # fp32 rounding only
    assert (la[:, 10:] - lb[:, 10:]).abs().max() > 0.1  # ... while the changed positions do change


def test_position_embeddings_are_used():
    model = randomized_gpt(tiny_config())
    same = torch.full((1, 8), 5)
    logits = model(same)
    assert (logits[0, 1] - logits[0, 2]).abs().max() > 0.1  # same token, different positions


def test_dropout_is_wired_and_off_in_eval():
    model = randomized_gpt(tiny_config(dropout=0.5))
    idx = ids((2, 16))
    no_dropout = randomized_gpt(tiny_config(dropout=0.0))  # same seed, same weights
    assert torch.equal(model(idx), no_dropout(idx))
    model.train()
    assert (model(idx) - no_dropout(idx)).abs().max() > 0.1


def test_bad_inputs():
    model = GPT(tiny_config())
    with pytest.raises(ModelError, match=r"sequence length 17 exceeds block_size=16"):
        model(ids((1, 17)))
    with pytest.raises(ModelError, match=r"expected token ids of shape \(batch, time\), got shape \(5,\)"):
        model(ids((5,)))
    assert isinstance(ModelError("x"), ValueError)


# -------------------------------------------------------------------------- generation


def reference_sample(model, idx, steps, temperature, top_k, seed):
    """Textbook sampling loop, independent of GPT.generate: full forward, sort-based top-k."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(idx[:, -model.config.block_size :])[:, -1, :] / temperature
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        logits = torch.where(logits >= kth, logits, torch.tensor(float("-inf")))
        idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1, generator=g)], dim=1)
    return idx


def test_generate_matches_reference_and_is_reproducible():
    model = randomized_gpt(tiny_config())
    prompt = ids((3, 5))
    run = lambda seed: model.generate(prompt, 9, temperature=0.8, top_k=7, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    out = run(0)
    assert out.shape == (3, 14) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, run(0))
    assert not torch.equal(out, run(1))
    assert torch.equal(out, reference_sample(model, prompt, 9, 0.8, 7, seed=0))


def test_top_k_1_is_greedy_and_context_is_cropped():
    model = randomized_gpt(tiny_config())
    prompt = ids((2, 16))  # already block_size long: every step must crop
    greedy = model.generate(prompt, 4, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 4, top_k=1, generator=torch.Generator().manual_seed(3)))
    expect = prompt
    for _ in range(4):  # argmax of the logits of the last block_size tokens
        expect = torch.cat([expect, model(expect[:, -16:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expect)


def test_generate_stops_rows_at_eos():
    model = randomized_gpt(tiny_config())
    prompt = ids((4, 3), seed=2)
    gen = lambda **kw: model.generate(prompt, 12, generator=torch.Generator().manual_seed(5), **kw)  # noqa: E731
    free = gen()
    eos = int(free[0, 3 + 2])  # row 0 first produces this token at new step 3 or earlier

    # Expected output, built from the unconstrained run: all rows are sampled every step, so each
    # row matches `free` up to its first eos and is eos after it; generation ends when all rows
    # have produced eos (or after 12 new tokens).
    rows, ends = [], []
    for row in free[:, 3:].tolist():
        first = row.index(eos) if eos in row else None
        ends.append(12 if first is None else first + 1)
        rows.append(row if first is None else row[: first + 1] + [eos] * (11 - first))
    expect = torch.cat([prompt, torch.tensor(rows)[:, : max(ends)]], dim=1)
    out = gen(eos_id=eos)
    assert torch.equal(out, expect)
    assert ends[0] <= 3

    # A single row stops at its first eos: fewer than max_new_tokens steps.
    gen1 = lambda **kw: model.generate(prompt[:1], 12, generator=torch.Generator().manual_seed(5), **kw)  # noqa: E731
    free1 = gen1()[0, 3:].tolist()
    eos1 = free1[4]
    single = gen1(eos_id=eos1)
    assert single.shape[1] == 3 + free1.index(eos1) + 1 <= 3 + 5
    assert single[0, 3:].tolist() == free1[: free1.index(eos1) + 1]


def test_generate_bad_arguments():
    model = GPT(tiny_config())
    with pytest.raises(ModelError, match="temperature must be >= 0"):
        model.generate(ids((1, 2)), 3, temperature=-1)
    with pytest.raises(ModelError, match="top_k must be >= 1"):
        model.generate(ids((1, 2)), 3, top_k=0)
