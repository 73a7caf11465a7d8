"""Benchmark: fused Triton token log-probs vs torch eager, forward and forward+backward.

    python -m kernels.bench_logprobs [--out bench_logprobs.json] [--quick] [--n N ...] [--dtypes fp32 bf16]

Compares, for policy AND reference logits of shape (N, V) with V = 50257 (GPT-2):
  eager  token_logprobs(..., backend="torch"): log_softmax + gather, once per model
  fused  token_logprobs(..., backend="triton"): one kernel pass over both models
in "forward" (no autograd) and "forward+backward" (policy gradient with a per-token upstream
gradient) modes. For each: median / p20 / p80 milliseconds, achieved GB/s, that bandwidth as a
percentage of a plain copy (torch clone of one logits array) measured in the same run, and the
peak extra memory the call allocates.

GB/s counts the bytes the operation must move at least, the same for both implementations:
forward reads both (N, V) logits arrays; forward+backward also reads the policy logits again and
writes the (N, V) gradient. Small (N,) reads/writes are included; anything an implementation
moves beyond that (eager's (N, V) log-softmax outputs) is its overhead, so it shows as lower GB/s.

On a GPU: triton.testing.do_bench (CUDA events, warmup, L2 flushed before each rep), peak memory
from torch.cuda.max_memory_allocated. On CPU: a perf_counter loop over the torch path with small
N (the default there, as --quick); peak memory is n/a (no allocator statistics on CPU). Under
TRITON_INTERPRET=1 the fused rows run once in Triton's interpreter and are labelled
"interpreter (not a speed measurement)".
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

from kernels.logprobs import HAS_TRITON, _kernels_interpreted, _triton_installed, token_logprobs

V_GPT2 = 50257
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INTERPRETER_LABEL = "interpreter (not a speed measurement)"
INTERPRETER_MAX_N = 256  # the interpreter takes seconds per 100 rows of V = 50257


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m kernels.bench_logprobs", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_logprobs.json", help="JSON results path (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and reps (always on for CPU)")
    p.add_argument("--n", type=int, nargs="+", help="rows N = batch x length (default: 4096 16384 on GPU)")
    p.add_argument("--vocab", type=int, default=V_GPT2, help="vocabulary size V (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def time_gpu(fn, grad_to_none, quick):
    import triton.testing

    # do_bench: warmup, then reps timed with CUDA events, synchronised, L2 flushed before each.
    median, p20, p80 = triton.testing.do_bench(
        fn, warmup=10 if quick else 25, rep=50 if quick else 200, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
    )
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def time_cpu(fn, grad_to_none, reps):
    for x in grad_to_none:
        x.grad = None
    fn()  # warmup (first-call allocations, lazy init)
    times = []
    for _ in range(reps):
        for x in grad_to_none:
            x.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def peak_extra_bytes(fn, grad_to_none, device):
    """Peak memory the call allocates beyond what was live before it (GPU only)."""
    if device.type != "cuda":
        return None
    for x in grad_to_none:
        x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for x in grad_to_none:
        x.grad = None
    return peak


# ---------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------


def bench_config(N, V, dtype_name, device, quick, run_fused, interpreted):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    # Logits spread like a trained LM's (scale 3), a tenth of the labels ignored like padding.
    pol = (3 * torch.randn(N, V, generator=gen, device=device, dtype=torch.float32)).to(dtype)
    ref = (3 * torch.randn(N, V, generator=gen, device=device, dtype=torch.float32)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    labels[torch.rand(N, generator=gen, device=device) < 0.1] = -100
    g = torch.randn(N, generator=gen, device=device)  # per-token upstream gradient, not all ones
    pol_req = pol.detach().requires_grad_(True)

    elt = pol.element_size()
    logits_bytes = N * V * elt
    small = N * (8 + 2 * 4)  # labels in, two (N,) fp32 log-probs out
    bytes_moved = {"forward": 2 * logits_bytes + small, "forward+backward": 4 * logits_bytes + small + N * 4}

    on_gpu = device.type == "cuda"
    reps = 5 if quick else 20

    def timer(fn, grad_to_none=()):
        return time_gpu(fn, list(grad_to_none), quick) if on_gpu else time_cpu(fn, list(grad_to_none), reps)

    # The copy baseline: clone of one logits array reads and writes logits_bytes each.
    copy = timer(lambda: pol.clone())
    copy_gbps = 2 * logits_bytes / (copy["median_ms"] * 1e-3) / 1e9

    def make_fns(backend):
        def forward():
            with torch.no_grad():
                token_logprobs(pol, labels, ref, backend=backend)

        def forward_backward():
            out, _ = token_logprobs(pol_req, labels, ref, backend=backend)
            out.backward(g)

        return {"forward": (forward, ()), "forward+backward": (forward_backward, (pol_req,))}

    impls = {"eager": make_fns("torch")}
    if run_fused:
        impls["fused"] = make_fns("triton")

    # Sanity before timing: the two implementations agree (fp32 accumulation in both).
    check = {}
    if run_fused:
        with torch.no_grad():
            e_pol, e_ref = token_logprobs(pol, labels, ref, backend="torch")
            f_pol, f_ref = token_logprobs(pol, labels, ref, backend="triton")
        check = {
            "max_abs_diff_policy": float((e_pol - f_pol).abs().max()),
            "max_abs_diff_ref": float((e_ref - f_ref).abs().max()),
        }
        del e_pol, e_ref, f_pol, f_ref

    rows = []
    for impl, fns in impls.items():
        for mode, (fn, grad_to_none) in fns.items():
            row = {"dtype": dtype_name, "N": N, "V": V, "impl": impl, "mode": mode, "bytes": bytes_moved[mode]}
            if impl == "fused" and interpreted:
                for x in grad_to_none:
                    x.grad = None
                start = time.perf_counter()
                fn()
                row.update(timing=INTERPRETER_LABEL, median_ms=(time.perf_counter() - start) * 1e3,
                           p20_ms=None, p80_ms=None, gbps=None, pct_of_copy=None, peak_extra_bytes=None)
            else:
                t = timer(fn, grad_to_none)
                gbps = bytes_moved[mode] / (t["median_ms"] * 1e-3) / 1e9
                row.update(timing="do_bench" if on_gpu else "perf_counter loop", **t, gbps=gbps,
                           pct_of_copy=100 * gbps / copy_gbps,
                           peak_extra_bytes=peak_extra_bytes(fn, grad_to_none, device))
            rows.append(row)
            pol_req.grad = None

    # Speedup of fused over eager, same mode (real timings only).
    for row in rows:
        if row["impl"] == "fused" and row["timing"] != INTERPRETER_LABEL:
            eager = next(r for r in rows if r["impl"] == "eager" and r["mode"] == row["mode"])
            row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]
    copy_row = {"dtype": dtype_name, "N": N, "V": V, "bytes": 2 * logits_bytes, **copy, "gbps": copy_gbps}
    return rows, copy_row, check


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def print_table(rows, copies):
    header = f"{'dtype':>5} {'N':>6} {'impl':>6} {'mode':>16} {'median':>9} {'p20':>9} {'p80':>9} " \
             f"{'GB/s':>7} {'%copy':>6} {'peak+MB':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
        speedup = "n/a" if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.2f}x"
        line = (f"{r['dtype']:>5} {r['N']:>6} {r['impl']:>6} {r['mode']:>16} {fmt(r['median_ms'], '9.3f')} "
                f"{fmt(r['p20_ms'], '9.3f')} {fmt(r['p80_ms'], '9.3f')} {fmt(r['gbps'], '7.1f')} "
                f"{fmt(r['pct_of_copy'], '6.1f')} {fmt(peak, '9.1f')} {speedup:>8}")
        if r["timing"] == INTERPRETER_LABEL:
            line += f"  [{INTERPRETER_LABEL}]"
        print(line)
    print()
    for c in copies:
        print(f"copy baseline {c['dtype']:>5} N={c['N']:>6}: {c['median_ms']:.3f} ms, {c['gbps']:.1f} GB/s")


def gpu_targets(rows):
    """The issue's GPU targets, at bf16 with the largest N benchmarked (16384 by default)."""
    bf16 = [r for r in rows if r["dtype"] == "bf16" and r["timing"] == "do_bench"]
    if not bf16:
        return None
    N = max(r["N"] for r in bf16)

    def get(impl, mode):
        return next(r for r in bf16 if r["N"] == N and r["impl"] == impl and r["mode"] == mode)

    fwd, fwd_bwd = get("fused", "forward"), get("fused", "forward+backward")
    logits_bytes = N * fwd["V"] * 2
    return {
        "at": f"bf16, N={N}, V={fwd['V']}",
        "fused_forward_speedup_ge_2x": {"value": fwd["speedup_vs_eager"], "pass": fwd["speedup_vs_eager"] >= 2},
        "fused_forward_pct_of_copy_ge_80": {"value": fwd["pct_of_copy"], "pass": fwd["pct_of_copy"] >= 80},
        "fused_forward_backward_speedup_ge_1.5x": {
            "value": fwd_bwd["speedup_vs_eager"], "pass": fwd_bwd["speedup_vs_eager"] >= 1.5},
        # O(N): a few bytes per row for the (N,) outputs, never a fraction of an (N, V) array.
        "fused_forward_peak_extra_O_N": {
            "value_bytes": fwd["peak_extra_bytes"], "bytes_per_row": fwd["peak_extra_bytes"] / N,
            "pass": fwd["peak_extra_bytes"] <= 64 * N},
        # Forward+backward: exactly the one (N, V) gradient plus O(N).
        "fused_forward_backward_peak_extra_one_grad": {
            "value_bytes": fwd_bwd["peak_extra_bytes"], "grad_bytes": logits_bytes,
            "pass": fwd_bwd["peak_extra_bytes"] <= logits_bytes + 64 * N},
    }


def write_json(path, result):
    """A benchmark's results as JSON at `path` (its folder created)."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def cpu_name():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.machine()} ({os.cpu_count()} cores)"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    interpreted = not on_gpu and os.environ.get("TRITON_INTERPRET") == "1" and _kernels_interpreted()
    run_fused = HAS_TRITON and (on_gpu or interpreted)
    quick = args.quick or not on_gpu  # CPU: small sizes so the run takes well under a minute
    if args.n:
        sizes = args.n
    elif on_gpu:
        sizes = [4096] if quick else [4096, 16384]
    else:
        sizes = [256, 1024]

    notes = []
    if not on_gpu:
        notes.append("no GPU: eager torch timed on CPU; GPU targets not evaluated")
        if not run_fused:
            notes.append("fused path not run (needs CUDA, or TRITON_INTERPRET=1 for the interpreter)")
        else:
            notes.append(f"fused rows ran once in Triton's interpreter, N <= {INTERPRETER_MAX_N}: {INTERPRETER_LABEL}")
    notes.append("both paths include token_logprobs' input checks (one small reduction + host sync per call)")

    device_name = torch.cuda.get_device_name(device) if on_gpu else cpu_name()
    print(f"device: {device_name} | torch {torch.__version__} | triton "
          f"{__import__('triton').__version__ if _triton_installed() else 'not installed'} | V={args.vocab}")

    rows, copies, checks = [], [], []
    for dtype_name in args.dtypes:
        for N in sizes:
            fused_here = run_fused and (on_gpu or N <= INTERPRETER_MAX_N)
            r, c, chk = bench_config(N, args.vocab, dtype_name, device, quick, fused_here, interpreted)
            rows += r
            copies.append(c)
            if chk:
                checks.append({"dtype": dtype_name, "N": N, **chk})
            if on_gpu:
                torch.cuda.empty_cache()
            gc.collect()

    print_table(rows, copies)
    for chk in checks:
        print(f"fused vs eager {chk['dtype']} N={chk['N']}: max |diff| policy {chk['max_abs_diff_policy']:.2e}, "
              f"ref {chk['max_abs_diff_ref']:.2e}")
    targets = gpu_targets(rows) if on_gpu else None
    if targets:
        print(f"\nGPU targets ({targets['at']}):")
        for name, t in targets.items():
            if name != "at":
                print(f"  {'PASS' if t['pass'] else 'FAIL'}  {name}: {t}")
    for n in notes:
        print(f"note: {n}")

    result = {
        "benchmark": "kernels/bench_logprobs.py",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if _triton_installed() else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": quick,
        "timer": "triton.testing.do_bench" if on_gpu else "time.perf_counter loop",
        "bytes_model": "forward: 2 N V elt + N*16; forward+backward: 4 N V elt + N*20 (same for both impls)",
        "notes": notes,
        "copy_baseline": copies,
        "rows": rows,
        "fused_vs_eager_check": checks,
        "gpu_targets": targets,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
