"""Throughput and memory of SPO training steps: `python -m spo_min.bench_train`.

The fixed "small" setup of the train.py issue: GPT-2 vocabulary (50257), n_embd 128, 4 layers,
4 heads, 8 pairs per step, prompts of 20-40 tokens, responses of up to 40 tokens, fp32, with
the round's reference log-probs and margin cached (the default of train.py). Random token ids
stand in for text: the cost of a step depends on shapes only.

Prints a table (pairs/s, ms per step, peak RSS) and writes JSON. On a GPU the same script times
CUDA steps. Compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

from spo_min import data, losses
from spo_min.logps import batch_sequence_logps
from spo_min.model import GPT, GPTConfig


def random_pairs(n_pairs, generator, vocab=50257):
    def ids(low, high):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(0, vocab - 1, (length,), generator=generator).tolist()

    return [data.TokenizedPair(prompt_ids=ids(20, 40), chosen_ids=ids(8, 40), rejected_ids=ids(8, 40))
            for _ in range(n_pairs)]


def peak_rss_mb():
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / (1024 * 1024) if platform.system() == "Darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pairs", type=int, default=8, help="pairs per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_train.json")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    config = GPTConfig(block_size=128, vocab_size=50257, n_layer=4, n_head=4, n_embd=128)
    policy = GPT(config, seed=0).to(device).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    pairs = random_pairs(args.pairs * (args.steps + args.warmup), generator)
    # Frozen reference log-probs and margins as the round cache would give them.
    ref = torch.randn(len(pairs), 2, generator=generator) * 5 - 100
    margin = torch.randn(len(pairs), generator=generator) * 0.5

    times = []
    for step in range(args.warmup + args.steps):
        idx = list(range(step * args.pairs, (step + 1) * args.pairs))
        batch = {k: v.to(device) for k, v in data.collate_pairs([pairs[i] for i in idx]).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        seq, _ = batch_sequence_logps(policy, batch)
        b = len(idx)
        loss, _ = losses.spo_loss(seq[:b], seq[b:], ref[idx, 0].to(device), ref[idx, 1].to(device),
                                  margin[idx].to(device), beta=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)

    ms = statistics.median(times) * 1000
    result = {
        "setup": "GPT-2 vocab 50257, n_embd 128, 4 layers, 4 heads, fp32, prompts 20-40, responses 8-40",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pairs_per_step": args.pairs,
        "median_ms_per_step": round(ms, 1),
        "pairs_per_s": round(args.pairs / (ms / 1000), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "steps_timed": args.steps,
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(f"{'pairs/step':>10} {'ms/step (median)':>17} {'pairs/s':>8} {'peak RSS MB':>12}  device")
    print(f"{args.pairs:>10} {result['median_ms_per_step']:>17} {result['pairs_per_s']:>8} "
          f"{result['peak_rss_mb']:>12}  {result['device']} ({result['threads']} threads)")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
