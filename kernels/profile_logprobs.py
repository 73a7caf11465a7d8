"""Where the fused log-prob forward loses bandwidth at bf16: its time, peeled layer by layer.

    python -m kernels.profile_logprobs [--out profile_logprobs.json] [--n 16384] [--dtypes bf16 fp32]
    TRITON_INTERPRET=1 python -m kernels.profile_logprobs --tiny     # checks the script on a CPU

On one H200, kernels/bench_logprobs.py timed the fused forward (policy and reference, N = 16384,
V = 50257) at 61.5% of copy bandwidth in bf16 and 92.3% in fp32, while a stripped-down copy of the
kernel (contiguous rows, no strides, no ignore path, no input checks, launched directly) reached
74-80% in bf16. What does the real one add? This script times the same forward several ways,
each with triton.testing.do_bench (as bench_logprobs does: CUDA events around the call, L2 flushed
before it) and, from torch.profiler, the device time of the forward kernel alone:

  token_logprobs        what bench_logprobs times: input checks (a label-range reduction and a
                        host sync), the labels' int64 copy, three (N,) allocations, the launch
  launch_forward        the launch alone, outputs preallocated, labels already int64
  policy only           launch_forward with HAS_REF=False: one model's rows (half the bytes)
  no ignored labels     launch_forward with no -100 label (the ignore path never taken)
  strided view          launch_forward on (B, T, V) views of (B, T + 1, V) logits (the strides)
  copy                  pol.clone(): bench_logprobs's bandwidth reference (reads and writes N V)

%copy = (bytes the forward must read) / time, over the copy's (2 N V bytes) / time, as in
bench_logprobs. The kernel's own %copy (from the profiler) against do_bench's shows the cost of the
timing and of the Python around the launch; the variants show the strides' and ignore path's.
Prints a table and writes JSON. On a CPU (TRITON_INTERPRET=1, --tiny) the numbers are the
interpreter's: only a check that the script runs.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from kernels.bench_logprobs import DTYPES, cpu_name, time_cpu, time_gpu, write_json
from kernels.logprobs import HAS_TRITON, launch_forward, token_logprobs, triton_available

KERNEL_NAME = "_logprobs_fwd_kernel"


def kernel_ms(fn, reps=20):
    """Mean device time of the forward kernel per call, from torch.profiler (None on a CPU)."""
    if not torch.cuda.is_available():
        return None
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    for event in prof.key_averages():
        if KERNEL_NAME in event.key:
            total = getattr(event, "device_time_total", None) or event.cuda_time_total  # microseconds
            return total / event.count / 1e3
    return None


def profile_dtype(N, V, dtype_name, device):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    T = 512 if N % 512 == 0 else N
    B = N // T
    # Logits as bench_logprobs makes them; the strided variant slices one position off (B, T + 1, V).
    wide = (3 * torch.randn(2, B, T + 1, V, generator=gen, device=device)).to(dtype)
    pol, ref = wide[0, :, :T].contiguous().view(N, V), wide[1, :, :T].contiguous().view(N, V)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    labels[torch.rand(N, generator=gen, device=device) < 0.1] = -100
    no_ignored = labels.clamp(min=0)
    acc = torch.float32
    out = [torch.empty(N, dtype=acc, device=device) for _ in range(3)]

    def launch(p, r, lab):
        return lambda: launch_forward(p, lab, r, out[0], out[1] if r is not None else None, out[2])

    btv = (pol.view(B, T, V), ref.view(B, T, V))
    variants = {
        "token_logprobs": (lambda: token_logprobs(pol, labels, ref, backend="triton"), 2),
        "launch_forward": (launch(*btv, labels), 2),
        "policy only": (launch(btv[0], None, labels), 1),
        "no ignored labels": (launch(*btv, no_ignored), 2),
        "strided view": (launch(wide[0, :, :T], wide[1, :, :T], labels), 2),
    }
    on_gpu = device.type == "cuda"

    def timer(fn):
        return time_gpu(fn, [], quick=False) if on_gpu else time_cpu(fn, [], reps=2)

    logits_bytes = N * V * pol.element_size()
    copy = timer(lambda: pol.clone())
    copy_gbps = 2 * logits_bytes / (copy["median_ms"] * 1e-3) / 1e9
    rows = []
    with torch.no_grad():
        for name, (fn, models) in variants.items():
            t = timer(fn)
            k = kernel_ms(fn)
            read = models * logits_bytes + N * (8 + 4 * (models + 1))  # logits, labels, (N,) outputs
            row = {"dtype": dtype_name, "N": N, "V": V, "variant": name, "models": models, **t, "kernel_ms": k,
                   "pct_of_copy": 100 * read / (t["median_ms"] * 1e-3) / 1e9 / copy_gbps,
                   "kernel_pct_of_copy": None if k is None else 100 * read / (k * 1e-3) / 1e9 / copy_gbps}
            rows.append(row)
    return rows, {"dtype": dtype_name, "N": N, **copy, "gbps": copy_gbps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="rows N (default: 16384; --tiny: 64)")
    p.add_argument("--vocab", type=int, default=None, help="V (default: 50257; --tiny: 1000)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for Triton's CPU interpreter")
    p.add_argument("--out", default="profile_logprobs.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (HAS_TRITON and triton_available(device)):
        raise SystemExit("kernels/profile_logprobs.py: needs a CUDA GPU, or TRITON_INTERPRET=1 set before start-up")
    N = args.n or (64 if args.tiny else 16384)
    V = args.vocab or (1000 if args.tiny else 50257)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device: {name} | torch {torch.__version__} | N={N} V={V} | policy and reference unless said")
    rows, copies = [], []
    for dtype_name in args.dtypes:
        r, c = profile_dtype(N, V, dtype_name, device)
        rows += r
        copies.append(c)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = f"{'dtype':>5} {'variant':>18} {'do_bench ms':>12} {'%copy':>6} {'kernel ms':>10} {'kernel %copy':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        k = "n/a" if r["kernel_ms"] is None else f"{r['kernel_ms']:.3f}"
        kp = "n/a" if r["kernel_pct_of_copy"] is None else f"{r['kernel_pct_of_copy']:.1f}"
        print(f"{r['dtype']:>5} {r['variant']:>18} {r['median_ms']:>12.3f} {r['pct_of_copy']:>6.1f} {k:>10} {kp:>13}")
    for c in copies:
        print(f"copy {c['dtype']}: {c['median_ms']:.3f} ms, {c['gbps']:.1f} GB/s")
    result = {
        "benchmark": "kernels/profile_logprobs.py",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "timer": "triton.testing.do_bench; kernel_ms: torch.profiler device time of " + KERNEL_NAME
                 if device.type == "cuda" else "Triton's interpreter on a CPU: not a speed measurement",
        "rows": rows,
        "copy_baseline": copies,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
