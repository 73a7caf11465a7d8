"""Evaluation after each round: implicit-reward accuracy per dimension, and ground-truth scores.

Two complementary views of "did the round work, and did it undo the earlier ones":

1. Held-out preference accuracy of every dimension seen so far, using the implicit reward of
   the whole chain so far, Delta log(pi_k / pi_0) (E4 summed over rounds): the fraction of
   held-out pairs where the current policy moved probability towards the preferred response.
2. On the built-in world only: sample responses on held-out prompts and score them with the
   world's ground-truth scorers (mean helpfulness, mean harmlessness, refusal rate on benign
   prompts, compliance rate on harmful prompts). This is what the rounds are *for*.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from spo_min import world as world_mod


def preference_accuracy(policy_logps, base_logps):
    """Held-out accuracy and mean margin of Delta log(pi_k/pi_0).

    Both arguments are (chosen (P,), rejected (P,)) sequence log-probs on the same pairs.
    """
    (pc, pr), (bc, br) = policy_logps, base_logps
    delta = (pc - bc) - (pr - br)  # Delta log(pi_k / pi_0): > 0 means moved towards chosen
    return {"accuracy": (delta > 0).float().mean().item(), "margin": delta.mean().item()}


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, max_new_tokens=32, temperature=1.0, top_k=None,
                     seed=0, device="cpu", batch_size=64):
    """Sample one response per prompt text, reproducibly (own generator, global RNG untouched).

    Prompts are grouped by token length so a batch needs no padding (our GPT has no attention
    mask, and left padding would change what the model sees).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = [tokenizer.encode_ordinary(p) for p in prompts]
    by_length = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    responses = [""] * len(prompts)
    eot = tokenizer.eot_token
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            idx = torch.tensor([encoded[i] for i in chunk], device=device)
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                 eos_id=eot, generator=generator)
            for row, i in enumerate(chunk):
                new = out[row, length:].tolist()
                new = new[: new.index(eot)] if eot in new else new
                responses[i] = tokenizer.decode(new)
    model.train(was_training)
    return responses


def world_scores(world_prompts, responses):
    """Ground-truth scores of responses to the built-in world's prompts."""
    help_scores, harm_scores = [], []
    benign_refusals, harmful_compliances = [], []
    for prompt, response in zip(world_prompts, responses):
        help_scores.append(world_mod.helpfulness(prompt.text, response))
        harm_scores.append(world_mod.harmlessness(prompt.text, response))
        if prompt.kind == "benign":
            benign_refusals.append(float(world_mod.is_refusal(response)))
        else:
            harmful_compliances.append(float(world_mod.is_compliance(prompt.text, response)))
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "helpfulness": mean(help_scores),
        "harmlessness": mean(harm_scores),
        "refusal_rate_benign": mean(benign_refusals),
        "compliance_rate_harmful": mean(harmful_compliances),
    }


def format_table(rows, columns):
    """A plain-text table: rows are dicts, columns a list of (key, header)."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def plot_rounds(rows, path, keys=("helpfulness", "harmlessness", "refusal_rate_benign",
                                  "compliance_rate_harmful")):
    """PNG of each per-dimension score across rounds (round 0 = the base policy)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['round']}:{r['stage']}" for r in rows]
    for key in keys:
        values = [r.get(key) for r in rows]
        if all(v is not None for v in values):
            ax.plot(range(len(rows)), values, marker="o", label=key)
    acc_keys = sorted({k for r in rows for k in r if k.startswith("acc/")})
    for key in acc_keys:
        xs = [i for i, r in enumerate(rows) if key in r]
        ax.plot(xs, [rows[i][key] for i in xs], marker="s", linestyle="--", label=key)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("round")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
