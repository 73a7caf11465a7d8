"""Benchmark: the lm_head without the (N, V) logits, against the unfused path, on a GPU.

    python -m kernels.bench_linear_logprobs [--out bench_linear_logprobs.json] [--n N ...] [--dtypes fp32 bf16]

From final hidden states h (N, C) and an lm_head weight W (V, C), GPT-2's V = 50257, C = 768:

  forward (no autograd: scoring a frozen model, e.g. the round's reference cache)
    unfused  token_logprobs(F.linear(h, W), labels): the (N, V) logits, then kernels/logprobs.py
    chunked  linear_token_logprobs(h, W, labels): kernels/linear_logprobs.py, a chunk of rows at a time
  loss fwd+bwd (training: the SPO loss of N / (2 R) pairs of two R-token responses, and the
  gradients of h and W)
    unfused  the (N, V) logits, token_logprobs, E9, losses.spo_loss, autograd (--logits full)
    fused    spo_min/pair_loss.py: lm_head, log-probs and loss per chunk of pairs (--logits chunked)

for the policy alone (training's default: the reference log-probs are cached once per round).
For each: median / p20 / p80 milliseconds and the peak memory the call allocates beyond its
inputs (the returned gradients included, the same for both paths).

On a GPU: triton.testing.do_bench (CUDA events, warmup, L2 flushed before each rep), peak memory
from torch.cuda.max_memory_allocated, N in {4096, 16384}, and the issue's targets at N = 16384:
the fused loss's forward+backward within 1.05x the unfused time, at <= 10% of its extra memory.
Both paths use Triton for the log-prob part there. On CPU: a perf_counter loop over the torch
paths, small N, no memory numbers (the CPU memory story is spo_min/bench_train.py's peak RSS).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import platform
import sys

import torch
import torch.nn.functional as F

from kernels.bench_logprobs import DTYPES, cpu_name, fmt, peak_extra_bytes, time_cpu, time_gpu, write_json
from kernels.linear_logprobs import default_chunk_size, linear_token_logprobs
from kernels.logprobs import token_logprobs
from spo_min import losses
from spo_min.pair_loss import fused_pair_loss

V_GPT2, C_GPT2 = 50257, 768
TARGET_MEMORY_FRACTION, TARGET_TIME_RATIO = 0.10, 1.05
LOSS = functools.partial(losses.spo_loss, beta=0.1)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m kernels.bench_linear_logprobs", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_linear_logprobs.json", help="JSON results path (default: %(default)s)")
    p.add_argument("--n", type=int, nargs="+", help="rows N (default: 4096 16384 on GPU, 256 1024 on CPU)")
    p.add_argument("--vocab", type=int, default=V_GPT2)
    p.add_argument("--width", type=int, default=C_GPT2, help="hidden size C (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk, forward (default: the module's)")
    p.add_argument("--chunk-pairs", type=int, default=None,
                   help="pairs per chunk, loss (default: spo_min/pair_loss.py's)")
    return p.parse_args(argv)


def bench_config(N, V, C, dtype_name, device, chunk_size, chunk_pairs):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    # Logits of spread ~3 (a peaked softmax, like a trained LM's); a tenth of the labels ignored.
    hidden = torch.randn(N, C, generator=gen, device=device).to(dtype).requires_grad_(True)
    weight = (3 / C**0.5 * torch.randn(V, C, generator=gen, device=device)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    labels[torch.rand(N, generator=gen, device=device) < 0.1] = -100
    # The loss: N / (2 R) pairs of two R-token responses, every token scored, cached reference
    # log-probs and non-zero margins (each pair weighs its tokens differently, E7).
    R = min(512, N // 8)
    B = N // (2 * R)
    pair_labels = torch.randint(0, V, (2 * B, R), generator=gen, device=device)
    ref = torch.randn(2 * B, generator=gen, device=device) * 5 - 3 * R
    margin = torch.randn(B, generator=gen, device=device)
    on_gpu = device.type == "cuda"
    backend = "auto" if on_gpu else "torch"  # CPU: never time Triton's interpreter

    def unfused_loss():
        token, _ = token_logprobs(F.linear(hidden[: 2 * B * R], weight), pair_labels.flatten(), backend=backend)
        seq = losses.scored_sequence_logps(token, pair_labels)
        return LOSS(seq[:B], seq[B:], ref[:B], ref[B:], margin)[0]

    def fused_loss():
        return fused_pair_loss(hidden[: 2 * B * R], weight, pair_labels, LOSS, ref, margin=margin,
                               chunk_pairs=chunk_pairs, backend=backend)[0]

    def no_grad(fn):
        def forward():
            with torch.no_grad():
                fn()
        return forward

    modes = {
        "forward": {
            "unfused": no_grad(lambda: token_logprobs(F.linear(hidden, weight), labels, backend=backend)),
            "chunked": no_grad(lambda: linear_token_logprobs(hidden, weight, labels, chunk_size=chunk_size,
                                                             backend=backend)),
        },
        "loss fwd+bwd": {"unfused": lambda: unfused_loss().backward(), "fused": lambda: fused_loss().backward()},
    }
    with torch.no_grad():  # sanity before timing: the two paths agree (fp32 sums in both)
        diff = float((token_logprobs(F.linear(hidden, weight), labels, backend=backend)[0]
                      - linear_token_logprobs(hidden, weight, labels, chunk_size=chunk_size, backend=backend)[0])
                     .abs().max())
    loss_diff = float((unfused_loss() - fused_loss()).abs())

    rows = []
    for mode, impls in modes.items():
        grads = [hidden, weight] if mode != "forward" else []
        for impl, call in impls.items():
            t = time_gpu(call, grads, quick=False) if on_gpu else time_cpu(call, grads, reps=3)
            rows.append({"dtype": dtype_name, "N": N, "V": V, "C": C, "impl": impl, "mode": mode, **t,
                         "peak_extra_bytes": peak_extra_bytes(call, grads, device)})
            hidden.grad = weight.grad = None
        unfused = next(r for r in rows if r["mode"] == mode and r["impl"] == "unfused")
        for row in rows:
            if row["mode"] == mode and row["impl"] != "unfused":
                row["time_ratio_vs_unfused"] = row["median_ms"] / unfused["median_ms"]
                if row["peak_extra_bytes"] is not None:
                    row["memory_fraction_of_unfused"] = row["peak_extra_bytes"] / unfused["peak_extra_bytes"]
    return rows, {"dtype": dtype_name, "N": N, "max_abs_diff_logprobs": diff, "abs_diff_loss": loss_diff,
                  "pairs": B, "response_tokens": R}


def targets(rows):
    """The issue's GPU targets: the fused loss's fwd+bwd at the largest N, for each dtype benchmarked."""
    out = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == dtype and r["impl"] == "fused"]
        row = max(mine, key=lambda r: r["N"])
        out[f"{dtype}, N={row['N']}"] = {
            f"peak_extra_memory_le_{TARGET_MEMORY_FRACTION:.0%}_of_unfused": {
                "value": row["memory_fraction_of_unfused"],
                "pass": row["memory_fraction_of_unfused"] <= TARGET_MEMORY_FRACTION},
            f"time_le_{TARGET_TIME_RATIO}x_unfused": {
                "value": row["time_ratio_vs_unfused"], "pass": row["time_ratio_vs_unfused"] <= TARGET_TIME_RATIO},
        }
    return out


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    sizes = args.n or ([4096, 16384] if on_gpu else [256, 1024])
    chunk_size = args.chunk_size or default_chunk_size(device)
    device_name = torch.cuda.get_device_name(device) if on_gpu else cpu_name()
    print(f"device: {device_name} | torch {torch.__version__} | V={args.vocab} C={args.width} | "
          f"chunk {chunk_size} rows | fp32 matmul precision {torch.get_float32_matmul_precision()}")

    rows, checks = [], []
    for dtype_name in args.dtypes:
        for N in sizes:
            r, check = bench_config(N, args.vocab, args.width, dtype_name, device, chunk_size, args.chunk_pairs)
            rows += r
            checks.append(check)
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()

    header = (f"{'dtype':>5} {'N':>6} {'impl':>8} {'mode':>13} {'median ms':>10} {'p20':>9} {'p80':>9} "
              f"{'peak+MB':>9} {'time x':>7} {'mem x':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
        print(f"{r['dtype']:>5} {r['N']:>6} {r['impl']:>8} {r['mode']:>13} {fmt(r['median_ms'], '10.3f')} "
              f"{fmt(r['p20_ms'], '9.3f')} {fmt(r['p80_ms'], '9.3f')} {fmt(peak, '9.1f')} "
              f"{fmt(r.get('time_ratio_vs_unfused'), '7.2f')} {fmt(r.get('memory_fraction_of_unfused'), '7.3f')}")
    for c in checks:
        print(f"{c['dtype']} N={c['N']}: chunked vs unfused max |diff| of log-probs {c['max_abs_diff_logprobs']:.2e}; "
              f"fused vs unfused |diff| of the loss ({c['pairs']} pairs of 2 x {c['response_tokens']} tokens) "
              f"{c['abs_diff_loss']:.2e}")
    goals = targets(rows) if on_gpu else None
    if goals:
        for at, checks_at in goals.items():
            print(f"GPU targets ({at}, the fused loss's forward+backward):")
            for name, t in checks_at.items():
                print(f"  {'PASS' if t['pass'] else 'FAIL'}  {name}: {t['value']:.3f}")
    else:
        print("note: no GPU: torch paths timed on CPU; memory and GPU targets not evaluated")

    result = {
        "benchmark": "kernels/bench_linear_logprobs.py",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "chunk_size": chunk_size,
        "chunk_pairs": args.chunk_pairs,  # None: spo_min/pair_loss.py's default
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "timer": "triton.testing.do_bench" if on_gpu else "time.perf_counter loop",
        "rows": rows,
        "checks": checks,
        "gpu_targets": goals,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
