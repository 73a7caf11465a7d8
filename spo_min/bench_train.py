"""Throughput and memory of SPO training steps, the log-prob paths side by side:

    python -m spo_min.bench_train [--device cuda] [--steps 20] [--repeats 3] [--out bench_train.json]

The fixed "small" setup of the train.py issue: GPT-2 vocabulary (50257), n_embd 128, 4 layers,
4 heads, 8 pairs per step, prompts and both responses of 20-40 tokens, fp32, with the round's
reference log-probs and margin cached (the default of train.py). Random token ids stand in for
text: the cost of a step depends on shapes only. The step is train.py's: spo_min/logps.py's
batch_pair_loss (sequence log-probs and the SPO loss), backward, AdamW.

Rows (each one a fresh subprocess, because a process's peak RSS never goes down: a path run
after another would inherit its high-water mark):
  full         model.head builds the (N, V) logits, then kernels/logprobs.py  (--logits full)
  chunked k=1  spo_min/pair_loss.py, the lm_head, log-probs and loss fused per chunk of k pairs
  chunked k=2  (--logits chunked, train.py's default); k = B: the whole batch in one chunk, which
  chunked k=B  is the default k on a CPU for this setup (spo_min/pair_loss.py CHUNK_TOKENS_CPU)
each with glibc's default allocator settings and, on Linux CPU, with mallopt (below); and one
more row, the default chunked path with torch.compile of the transformer blocks (train.py
--compile on), under the last glibc setting: the measurement behind --compile's CPU default.

glibc mallopt. Blocks above M_MMAP_THRESHOLD (at most 32 MiB by default) are mmap-ed on malloc and
returned to the OS on free, so a step that allocates ~100 MB of logits page-faults them in again
every step. Notebook 04 raises M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to 1 GiB (freed memory stays
in the process for reuse); the "mallopt" rows measure that setting on the same step.

Prints a table (ms per step, pairs/s, peak RSS; peak GPU memory on CUDA) and writes JSON.
Compare runs on the same machine only, and note whether other jobs shared its cores.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from spo_min import data, losses
from spo_min.logps import batch_pair_loss, keep_freed_memory_in_process
from spo_min.model import GPT, GPTConfig
from spo_min.optim import AdamW

CPU_TARGET_PEAK_RSS_MB = 550  # the target for the chunked path on the 2-core CPU


def random_pairs(n_pairs, generator, vocab=50257):
    def ids(low, high):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(0, vocab - 1, (length,), generator=generator).tolist()

    return [data.TokenizedPair(prompt_ids=ids(20, 40), chosen_ids=ids(20, 40), rejected_ids=ids(20, 40))
            for _ in range(n_pairs)]


def peak_rss_mb():
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / (1024 * 1024) if platform.system() == "Darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---------------------------------------------------------------------------------------------
# One row, in its own process
# ---------------------------------------------------------------------------------------------


def run_worker(args):
    if args.mallopt == "on" and not keep_freed_memory_in_process():
        raise SystemExit("mallopt failed")
    device = torch.device(args.device)
    config = GPTConfig(block_size=128, vocab_size=50257, n_layer=4, n_head=4, n_embd=128)
    policy = GPT(config, seed=0).to(device).train()
    if args.compile == "on":
        policy.compile_trunk()  # compiled on the first steps (the warm-up, keep it >= 2: two shapes)
    opt = AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)  # train.py's (spo_min/optim.py)
    loss_fn = functools.partial(losses.spo_loss, beta=0.1)
    generator = torch.Generator().manual_seed(0)
    pairs = random_pairs(args.pairs * (args.steps + args.warmup), generator)
    # Frozen reference log-probs and margins as the round cache would give them.
    ref = torch.randn(len(pairs), 2, generator=generator) * 5 - 100
    margin = torch.randn(len(pairs), generator=generator) * 0.5
    rss_before_steps = peak_rss_mb()  # torch, the model and its optimizer: the same for every path
    chunk_pairs = args.chunk_pairs[0] if args.chunk_pairs else None  # one row: one k

    times, cpu_times, tokens = [], [], []
    for step in range(args.warmup + args.steps):
        idx = list(range(step * args.pairs, (step + 1) * args.pairs))
        batch = {k: v.to(device) for k, v in data.collate_pairs([pairs[i] for i in idx]).items()}
        cached = torch.cat([ref[idx, 0], ref[idx, 1]]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss, _, _ = batch_pair_loss(policy, batch, loss_fn, cached, margin=margin[idx].to(device),
                                     logits=args.logits, chunk_pairs=chunk_pairs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - cpu0)
            tokens.append(int((batch["labels"] != -100).sum()))

    ms = statistics.median(times) * 1000
    result = {
        "logits": args.logits,
        "chunk_pairs": chunk_pairs,  # None: the default (spo_min/pair_loss.py default_chunk_pairs)
        "mallopt": args.mallopt,
        "compile": args.compile,
        "median_ms_per_step": round(ms, 1),
        "p20_ms": round(statistics.quantiles(times, n=5)[0] * 1000, 1),
        "p80_ms": round(statistics.quantiles(times, n=5)[3] * 1000, 1),
        "pairs_per_s": round(args.pairs / (ms / 1000), 2),
        # CPU time of all threads: the work done, less sensitive than wall time to other jobs
        # sharing the cores (it is ~threads x wall time when the step parallelises well).
        "cpu_ms_per_step": round(statistics.median(cpu_times) * 1000, 1),
        "scored_tokens_per_step": round(statistics.mean(tokens), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_steps_mb": round(rss_before_steps, 1),
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The side-by-side run
# ---------------------------------------------------------------------------------------------


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def run_rows(args):
    device = torch.device(args.device)
    mallopt_modes = ["off"]
    if args.mallopt != "off" and device.type == "cpu" and platform.system() == "Linux":
        mallopt_modes = ["off", "on"] if args.mallopt == "both" else ["on"]
    # (logits, chunk_pairs, mallopt, compile); chunk_pairs None: the default.
    configs = [(path, k, m, "off") for m in mallopt_modes
               for path, k in [("full", None)] + [("chunked", k) for k in args.chunk_pairs]]
    if args.compile_row:
        configs.append(("chunked", None, mallopt_modes[-1], "on"))
    # Training on CPU uses the torch path: Triton's interpreter (TRITON_INTERPRET=1, set by the
    # test suite) would time numpy, not this step.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = {config: [] for config in configs}
    for _ in range(args.repeats):  # alternate the rows, so a slow spell of the machine hits all
        for path, k, mallopt, compile_ in configs:
            cmd = [sys.executable, "-m", "spo_min.bench_train", "--worker", "--logits", path,
                   "--mallopt", mallopt, "--compile", compile_, "--device", args.device, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--pairs", str(args.pairs)]
            cmd += ["--chunk-pairs", str(k)] if k is not None else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
            results[path, k, mallopt, compile_].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for config, runs in results.items():
        # The median run by time; its own RSS (each run is a fresh process).
        runs = sorted(runs, key=lambda r: r["median_ms_per_step"])
        rows.append({**runs[len(runs) // 2], "repeats": [r["median_ms_per_step"] for r in runs]})
    return rows


def cpu_targets(rows):
    """The issue's CPU targets, under each glibc setting: every fused row against the full row."""
    out = {}
    for mallopt in dict.fromkeys(r["mallopt"] for r in rows):
        same = [r for r in rows if r["mallopt"] == mallopt and r["compile"] == "off"]
        full = next(r for r in same if r["logits"] == "full")
        for r in (r for r in same if r["logits"] == "chunked"):
            out[f"mallopt {mallopt}, chunked k={r['chunk_pairs'] or 'default'}"] = {
                f"peak_rss_le_{CPU_TARGET_PEAK_RSS_MB}_mb": {
                    "value": r["peak_rss_mb"], "pass": r["peak_rss_mb"] <= CPU_TARGET_PEAK_RSS_MB},
                "pairs_per_s_ge_full": {
                    "value": [r["pairs_per_s"], full["pairs_per_s"]], "pass": r["pairs_per_s"] >= full["pairs_per_s"]},
            }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles in them)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-pairs", type=int, nargs="+", default=None,
                   help="pairs per chunk of the chunked rows (default: 1, 2 and --pairs, the whole batch)")
    p.add_argument("--mallopt", choices=["both", "on", "off"], default="both",
                   help="glibc setting of the rows (Linux CPU only; 'both' runs each path twice)")
    p.add_argument("--compile-row", action=argparse.BooleanOptionalAction, default=True,
                   help="one more row: the default chunked path with torch.compile of the blocks")
    p.add_argument("--repeats", type=int, default=1, help="runs per row, alternating; the median is kept")
    p.add_argument("--out", default="bench_train.json")
    p.add_argument("--logits", choices=["full", "chunked"], default="chunked", help=argparse.SUPPRESS)
    p.add_argument("--compile", choices=["off", "on"], default="off", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one row, JSON on stdout
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)
    args.chunk_pairs = args.chunk_pairs or list(dict.fromkeys([1, 2, args.pairs]))

    device = torch.device(args.device)
    rows = run_rows(args)
    result = {
        "benchmark": "spo_min/bench_train.py",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": f"GPT-2 vocab 50257, n_embd 128, 4 layers, 4 heads, fp32, {args.pairs} pairs/step, "
                 "prompts and responses 20-40 tokens, reference log-probs cached",
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pairs_per_step": args.pairs,
        "steps_timed": args.steps,
        "rows": rows,
    }
    gpu = device.type == "cuda"
    print(f"device: {result['device']} | torch {torch.__version__} | {args.pairs} pairs/step, "
          f"{args.steps} timed steps, {args.repeats} run(s) per row")
    header = (f"{'logits':>8} {'k':>7} {'mallopt':>7} {'compile':>7} {'ms/step':>8} {'p20':>7} {'p80':>7} "
              f"{'pairs/s':>8} {'CPU ms/step':>11} {'peak RSS MB':>12}")
    header += f" {'peak GPU MB':>12}" if gpu else ""
    print(header)
    print("-" * len(header))
    for r in rows:
        k = "-" if r["logits"] == "full" else (r["chunk_pairs"] or "default")
        line = (f"{r['logits']:>8} {k:>7} {r['mallopt']:>7} {r['compile']:>7} {r['median_ms_per_step']:>8} "
                f"{r['p20_ms']:>7} {r['p80_ms']:>7} {r['pairs_per_s']:>8} {r['cpu_ms_per_step']:>11} "
                f"{r['peak_rss_mb']:>12}")
        print(line + (f" {r['peak_gpu_mb']:>12}" if gpu else ""))
    print("(k: pairs per chunk; the default, spo_min/pair_loss.py's default_chunk_pairs, is the whole batch here "
          f"on a CPU. Before the first step every process holds ~{rows[0]['rss_before_steps_mb']:.0f} MB: torch, "
          "the model and AdamW)")
    if not gpu:
        result["cpu_targets"] = cpu_targets(rows)
        for setting, checks in result["cpu_targets"].items():
            print(f"CPU targets, {setting}: " + "; ".join(
                f"{'PASS' if t['pass'] else 'FAIL'} {name} {t['value']}" for name, t in checks.items()))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
