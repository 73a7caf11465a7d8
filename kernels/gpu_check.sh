#!/usr/bin/env bash
# The GPU numbers of every kernel and of the training step, in one go:   bash kernels/gpu_check.sh OUTDIR
#
# For a CUDA machine with its own torch and triton and NO network: nothing is installed or
# downloaded. Runs in under 8 minutes on one H100/H200: each step has its own time limit below
# (455 s together), is killed when it runs over, and the next step starts. It writes into OUTDIR:
#
#   env.json                     python, torch, triton, CUDA, GPU, driver
#   kernel_tests.json            tests/test_logprobs.py, test_linear_logprobs.py and test_pair_loss.py
#                                compiled (TRITON_INTERPRET=0), summarised from pytest's junit XML
#   bench_logprobs.json          python -m kernels.bench_logprobs         (N 4096/16384, fp32/bf16)
#   bench_linear_logprobs.json   python -m kernels.bench_linear_logprobs  (same N, C=768: chunked forward,
#                                and the fused pair loss's fwd+bwd, each against the unfused path)
#   bench_train.json             python -m spo_min.bench_train --device cuda (full vs fused k = 1, 2, B, compile)
#   bench_gpt2.json              python -m spo_min.bench_gpt2: the GPT-2 124M step, T 1024/512, tokens/s,
#                                MFU, peak memory, full vs fused, compile off/on, the largest batch per path
#   profile_logprobs.json        python -m kernels.profile_logprobs: the bf16 forward kernel's time peeled
#                                (do_bench vs the profiler's kernel time; checks, strides, ignore path)
#   train_demo.json              a short two-round train.py run on CUDA (compile and the step-0 gradient
#                                checks on, as by default): its metrics and wall time
#   steps.json                   every step: exit code, seconds, log file (a failed step never
#                                stops the others; its log says why)
#   logs.tar.gz                  every step's log and pytest's junit XML
#
# GPU_CHECK_TINY=1 runs every step at tiny shapes, on a CPU too (Triton's interpreter for the kernel
# tests and the profile): how this script is checked without a GPU. Its numbers mean nothing.
#
# The train.py demo tokenizes text: it needs the GPT-2 BPE ranks offline (spo_min/tokenizer.py):
# set SPO_MIN_GPT2_TIKTOKEN to a copy of gpt2.tiktoken, or have openai-whisper's asset installed.
# Without them that one step fails and is recorded; the others do not need a tokenizer.
set -u

OUT=${1:?usage: bash kernels/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."  # the repository root: `python -m kernels...` and train.py resolve from here
PY=${PYTHON:-python3}
TINY=${GPU_CHECK_TINY:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # compiled kernels, never Triton's CPU interpreter (but see GPU_CHECK_TINY)
export PYTHONUNBUFFERED=1
LOGS="$OUT/logs"
mkdir -p "$LOGS"
STEPS="$LOGS/steps.tsv"
: >"$STEPS"
KERNEL_TRITON=0  # TRITON_INTERPRET for the steps that run the Triton kernels themselves
[ "$TINY" = 1 ] && KERNEL_TRITON=1

# step NAME SECONDS COMMAND...: run with a time limit, log to LOGS/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >>"$STEPS"
    tail -n 25 "$LOGS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start))s"
}

# pick FULL TINY: a step's arguments, FULL on the GPU, TINY (tiny shapes) when GPU_CHECK_TINY=1.
pick() { if [ "$TINY" = 1 ]; then echo "$2"; else echo "$1"; fi; }

step env 15 env GPU_CHECK_TINY="$TINY" "$PY" - "$OUT/env.json" <<'EOF'
import json, os, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "tiny": os.environ["GPU_CHECK_TINY"] == "1"}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError as err:
    info["nvidia_smi"] = str(err)
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
if not torch.cuda.is_available() and not info["tiny"]:
    sys.exit("no CUDA device: every number below would be a CPU number (GPU_CHECK_TINY=1 to check the script)")
EOF

step kernel_tests 50 env TRITON_INTERPRET=$KERNEL_TRITON "$PY" -m pytest tests/test_logprobs.py \
    tests/test_linear_logprobs.py tests/test_pair_loss.py -q -o addopts= -p no:cacheprovider \
    --junitxml="$LOGS/kernel_tests.xml"
"$PY" - "$LOGS/kernel_tests.xml" "$OUT/kernel_tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (OSError, ET.ParseError) as err:
    json.dump({"error": f"no junit XML: {err}"}, open(sys.argv[2], "w"), indent=2)
    sys.exit()
results = []
for case in cases:
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    results.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                    "seconds": float(case.get("time", 0))})
summary = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failure", "error", "skipped")}
json.dump({"summary": summary, "tests": results}, open(sys.argv[2], "w"), indent=2)
print(summary)
EOF

# shellcheck disable=SC2046  # pick's output is meant to split into arguments
step bench_logprobs 35 env TRITON_INTERPRET=$KERNEL_TRITON "$PY" -m kernels.bench_logprobs --out "$OUT/bench_logprobs.json" \
    $(pick "" "--n 64 --vocab 1000")
# shellcheck disable=SC2046
step bench_linear_logprobs 45 "$PY" -m kernels.bench_linear_logprobs --out "$OUT/bench_linear_logprobs.json" \
    $(pick "" "--n 64 --width 32 --vocab 1000")
# shellcheck disable=SC2046
step bench_train 45 "$PY" -m spo_min.bench_train --out "$OUT/bench_train.json" \
    $(pick "--device cuda" "--steps 2 --warmup 1 --pairs 2 --mallopt off --no-compile-row")
# shellcheck disable=SC2046
step bench_gpt2 150 "$PY" -m spo_min.bench_gpt2 --out "$OUT/bench_gpt2.json" $(pick "" "--tiny --seq-lens 32")
# shellcheck disable=SC2046
step profile_logprobs 25 env TRITON_INTERPRET=$KERNEL_TRITON "$PY" -m kernels.profile_logprobs \
    --out "$OUT/profile_logprobs.json" $(pick "" "--tiny")

# A short demo on the built-in world: SFT base, then two rounds (helpful, harmless), on the GPU, with
# train.py's defaults (--compile auto: on with CUDA; the step-0 gradient checks, fused == autograd).
# shellcheck disable=SC2046
step train_demo 90 "$PY" train.py --stage helpful --stage harmless --out "$LOGS/train_demo_run" \
    $(pick "--device cuda --model tiny --sft-steps 100 --steps 30 --eval-prompts 16" \
           "--device cpu --model nano --sft-steps 4 --steps 4 --eval-prompts 2 --eval-samples 0 --eval-pairs 8")
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
metrics = out / "logs" / "train_demo_run" / "metrics.jsonl"
rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
steps = [line.split("\t") for line in (out / "logs" / "steps.tsv").read_text().splitlines()]
demo = next((s for s in steps if s[0] == "train_demo"), None)
json.dump({"exit_code": int(demo[1]) if demo else None, "seconds": int(demo[2]) if demo else None,
           "command": demo[3] if demo else None, "metrics": rows}, open(out / "train_demo.json", "w"), indent=2)
json.dump([{"step": s[0], "exit_code": int(s[1]), "seconds": int(s[2]), "command": s[3], "log": f"logs.tar.gz: logs/{s[0]}.log"}
           for s in steps], open(out / "steps.json", "w"), indent=2)
for s in steps:
    print(f"{s[0]:>24}: exit {s[1]:>3} after {s[2]:>4}s")
EOF
rm -rf "$LOGS/train_demo_run"  # checkpoints: not results (metrics.jsonl is in train_demo.json)
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
ls -l "$OUT"
