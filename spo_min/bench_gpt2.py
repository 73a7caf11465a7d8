"""The GPT-2 124M SPO training step on a GPU: tokens/s, MFU and peak memory, full logits vs the
fused pair loss, torch.compile off and on, and the largest batch each path fits.

    python -m spo_min.bench_gpt2 [--seq-lens 1024 512] [--pairs 16] [--steps 10] [--out bench_gpt2.json]
    python -m spo_min.bench_gpt2 --tiny     # a tiny model at tiny shapes: checks the script on a CPU

The step is train.py's round step with --dtype bfloat16 --ref cache: spo_min/logps.py's
batch_pair_loss under bf16 autocast (fp32 weights), backward, AdamW (spo_min/optim.py). GPT-2
124M (12 layers, 12 heads, n_embd 768, V = 50257) with random weights and tokens (the speed
depends on shapes only). Every sequence is T tokens, chosen and rejected alike (no padding): a
prompt of T/16 tokens, then the response, whose T - T/16 tokens are scored.

Rows, each timed over --steps steps after --warmup (torch.compile compiles during the warm-up):
  full     --logits full: model.head makes the (tokens x V) bf16 logits, kernels/logprobs.py
  chunked  --logits chunked (train.py's default): spo_min/pair_loss.py, the loss fused per chunk
           of pairs (its default chunk size)
for each T, with compile off and on (GPT.compile_trunk: the transformer blocks). Then, with
compile off, at the first T: the largest number of pairs per step each path fits in GPU memory
(doubling from --pairs until out of memory, then bisecting to within 1/16).

MFU, model FLOPs utilisation, by nanoGPT's estimate (from the PaLM paper's appendix; llm.c quotes
the same kind of figure):

    FLOPs per token = 6 N + 12 L H Q T          MFU = tokens/s x FLOPs per token / 989e12

N = the parameters without the position embedding (nanoGPT's get_num_params(); the token embedding
counts, being the lm_head too), L layers, H heads, Q = n_embd / H, T the sequence length. Every
input token counts, prompt included: the lm_head only sees the scored 15/16, so MFU slightly
overstates the work done. 989e12 FLOP/s is the dense bf16 peak of an H100 SXM and of an H200.
llm.c trains GPT-2 124M at about 468K tokens/s on one H100, about 40% MFU.

Prints a table and writes JSON (every row has its `mfu`). On a CPU (--tiny, or no GPU) the same
code runs at whatever shapes it is given; its MFU and the peak are not meaningful there.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import platform
import statistics
import time

import torch

from spo_min import losses
from spo_min.bench_train import device_name
from spo_min.logps import batch_pair_loss
from spo_min.model import GPT, GPTConfig
from spo_min.optim import AdamW

PEAK_BF16_FLOPS = 989e12  # H100 SXM / H200, dense bf16 tensor cores (no 2:4 sparsity)
TINY = dict(config=dict(n_layer=2, n_head=2, n_embd=64, block_size=64), seq_lens=[64, 32], pairs=2, steps=2,
            warmup=2, max_pairs=8)


def flops_per_token(model: GPT, T: int) -> float:
    """nanoGPT's estimate_mfu numerator: 6 N + 12 L H Q T."""
    cfg = model.config
    N = model.num_params() - model.transformer.wpe.weight.numel()
    return 6 * N + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T


def make_batch(pairs, T, vocab, device, generator):
    """input_ids (2B, T), labels (2B, T): a T/16-token prompt unscored, the rest scored."""
    input_ids = torch.randint(0, vocab - 1, (2 * pairs, T), generator=generator)
    labels = input_ids.roll(-1, dims=1)  # labels[t] is the token after t
    labels[:, -1] = -100  # the last position predicts nothing
    labels[:, : T // 16 - 1] = -100  # positions that predict prompt tokens
    return {"input_ids": input_ids.to(device), "labels": labels.to(device)}


class Step:
    """train.py's round step (bf16 autocast, cached reference), on one model and optimizer."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.opt = AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
        self.loss_fn = functools.partial(losses.spo_loss, beta=0.1)
        self.generator = torch.Generator().manual_seed(0)
        self.compiled = None  # the compiled hidden_states, once made

    def set_compile(self, on):
        if on and self.compiled is None:
            self.compiled = self.model.compile_trunk().hidden_states
        elif on:
            self.model.hidden_states = self.compiled
        elif "hidden_states" in vars(self.model):
            del self.model.hidden_states  # back to the class's eager method

    def __call__(self, path, pairs, T):
        batch = make_batch(pairs, T, self.model.config.vocab_size, self.device, self.generator)
        ref = (torch.randn(2 * pairs, generator=self.generator) * 5 - 3 * T).to(self.device)  # cached
        margin = (0.5 * torch.randn(pairs, generator=self.generator)).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss, _, _ = batch_pair_loss(self.model, batch, self.loss_fn, ref, margin=margin, logits=path)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def free(self):
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def time_row(step, path, pairs, T, steps, warmup):
    for _ in range(warmup):
        step(path, pairs, T)
    step.sync()
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(path, pairs, T)
        step.sync()
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    tokens = 2 * pairs * T
    tokens_per_s = tokens / (ms / 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if step.device.type == "cuda" else None
    return {"ms_per_step": round(ms, 2), "min_ms": round(min(times) * 1e3, 2), "max_ms": round(max(times) * 1e3, 2),
            "tokens_per_step": tokens, "tokens_per_s": round(tokens_per_s),
            "mfu": tokens_per_s * flops_per_token(step.model, T) / PEAK_BF16_FLOPS,
            "peak_gpu_gib": None if peak is None else round(peak, 2)}


def fits(step, path, pairs, T):
    """One step at this batch: True, or False when the GPU runs out of memory."""
    try:
        step(path, pairs, T)
        step.sync()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        step.free()


def largest_batch(step, path, T, start, cap):
    """Pairs per step: double from `start` until a step fails (or `cap`), then bisect to 1/16."""
    ok, bad = 0, None
    pairs = start
    while pairs <= cap:
        if not fits(step, path, pairs, T):
            bad = pairs
            break
        ok, pairs = pairs, pairs * 2
    if bad is None:
        return {"pairs": ok, "capped_at": cap}
    while ok and bad - ok > max(1, ok // 16):
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(step, path, mid, T) else (ok, mid)
    return {"pairs": ok, "first_failed": bad}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model at tiny shapes (runs on a CPU)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="tokens per sequence (default: 1024 512)")
    p.add_argument("--pairs", type=int, help="pairs per step (default: 16)")
    p.add_argument("--steps", type=int, help="timed steps per row (default: 10)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compiling included (default: 3)")
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--paths", nargs="+", choices=["full", "chunked"], default=["full", "chunked"])
    p.add_argument("--max-pairs", type=int, help="largest batch tried (default: 4096; 0 skips the search)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench_gpt2.json")
    args = p.parse_args(argv)
    defaults = TINY if args.tiny else dict(config={}, seq_lens=[1024, 512], pairs=16, steps=10, warmup=3,
                                           max_pairs=4096)
    seq_lens = args.seq_lens or defaults["seq_lens"]
    pairs = args.pairs or defaults["pairs"]
    steps, warmup = args.steps or defaults["steps"], args.warmup or defaults["warmup"]
    max_pairs = defaults["max_pairs"] if args.max_pairs is None else args.max_pairs

    device = torch.device(args.device)
    if "on" in args.compile:
        torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per sequence length
    model = GPT(GPTConfig.preset("gpt2", **defaults["config"]), seed=0).to(device).train()
    step = Step(model, device)
    print(f"device: {device_name(device)} | torch {torch.__version__} | GPT-2 "
          f"{model.num_params() / 1e6:.1f}M params ({model.config.n_layer} layers, n_embd {model.config.n_embd}) | "
          f"bf16 autocast, cached reference, {pairs} pairs/step, {steps} timed steps after {warmup}")

    result = {
        "benchmark": "spo_min/bench_gpt2.py",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "config": model.config.to_dict(),
        "params": model.num_params(),
        "mfu_formula": "tokens/s x (6 N + 12 L H Q T) / 989e12; N = params without wpe (nanoGPT); every input "
                       "token counted",
        "peak_flops": PEAK_BF16_FLOPS,
        "setup": f"bf16 autocast, fp32 weights, AdamW (spo_min/optim.py), cached reference, {pairs} pairs/step, "
                 "sequences of T tokens with a T/16 prompt, no padding",
        "steps_timed": steps,
        "warmup": warmup,
        "rows": [],
        "largest_batch": {},
        "mfu": None,  # the best row's
    }

    def save():  # after every row: a run stopped by a time limit keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    header = (f"{'T':>5} {'compile':>7} {'logits':>8} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} "
              f"{'peak GiB':>9}")
    print(header)
    print("-" * len(header))

    def measure(compile_):
        step.set_compile(compile_ == "on")
        for T in seq_lens:
            for path in args.paths:
                row = {"T": T, "compile": compile_, "logits": path, "pairs": pairs,
                       **time_row(step, path, pairs, T, steps, warmup)}
                step.free()
                result["rows"].append(row)
                result["mfu"] = max(r["mfu"] for r in result["rows"])
                save()
                peak = "n/a" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.2f}"
                print(f"{T:>5} {compile_:>7} {path:>8} {row['ms_per_step']:>9.2f} {row['tokens_per_s']:>10} "
                      f"{row['mfu']:>6.1%} {peak:>9}", flush=True)

    # Eager rows and the batch search first: compiling (minutes at GPT-2 size) comes last.
    if "off" in args.compile:
        measure("off")
    if max_pairs:
        step.set_compile(False)
        largest = result["largest_batch"]
        for path in args.paths:
            largest[path] = largest_batch(step, path, seq_lens[0], pairs, max_pairs)
            save()
            print(f"largest batch, T={seq_lens[0]}, compile off, {path}: {largest[path]}", flush=True)
        if {"full", "chunked"} <= set(largest):
            largest["chunked_over_full"] = largest["chunked"]["pairs"] / max(largest["full"]["pairs"], 1)
            save()
            print(f"  chunked / full: {largest['chunked_over_full']:.2f}x (target >= 4x)")
    if "on" in args.compile:
        measure("on")

    best = max(result["rows"], key=lambda r: r["mfu"])
    print(f"best: T={best['T']} compile {best['compile']} {best['logits']}: {best['tokens_per_s']} tokens/s, "
          f"MFU {best['mfu']:.1%} (target >= 40%; llm.c GPT-2 124M: ~468K tokens/s, ~40% on an H100)")
    save()
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
