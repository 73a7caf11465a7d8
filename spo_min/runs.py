"""A run you can trust: what a run records, what it checks before training, what it may reuse.

A training run writes into one folder (--out) and may reuse what an earlier run left there: the
SFT base, finished rounds, a mid-round state. Reuse is only safe when the file was produced by
exactly the settings this run would use, so every checkpoint and state records the settings that
determine its weights, and reuse compares them all:

    base   model config, sft_steps, sft_lr, seed, fingerprint of the SFT data
    round  stage, loss, beta, lambdas, margin mode/alpha (where a margin exists), lr, steps,
           batch size, seed, average_logps, dtype, fingerprint of the round's data, parent sha256

A mismatch stops the run with one line naming the setting, both values and what to do. Settings
that cannot change the weights (--ref cache vs live, --save-every, evaluation sizes) are not
compared: they only change how the same numbers are computed or reported.

Everything the command line alone can get wrong is checked before the first step (`preflight`),
a lock file stops two runs from sharing one --out, and metrics rows carry the id of the run
that wrote them. One rule covers every file a run writes (`check_outputs`): no input is an
output, and a run never overwrites, deletes or orphans a file it did not create; only --resume
continues in a folder that holds an earlier run's files.
"""

from __future__ import annotations

import atexit
import difflib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import time

import torch

from spo_min import data
from spo_min.checkpoint import CheckpointError, load_model, read_config, read_header, read_metadata, _parse_our_header
from spo_min.model import GPT, PRESETS, GPTConfig
from spo_min.tokenizer import VOCAB_SIZE


class RunError(CheckpointError):
    """A run that cannot start or continue as asked; the message says what to do instead."""


# ----------------------------------------------------------------------------- settings

# Which command-line flag sets each recorded setting (for "run with the same --beta" in messages).
FLAGS = {"stage": "--stage", "loss": "--loss", "beta": "--beta", "lambdas": "--lambdas/--alpha",
         "margin_mode": "--margin", "alpha": "--alpha", "lr": "--lr", "warmup": "--warmup", "steps": "--steps",
         "batch_size": "--batch-size", "seed": "--seed", "average_logps": "--average-logps",
         "dtype": "--dtype", "data_fingerprint": "--data and --seed", "config": "--model",
         "sft_steps": "--sft-steps", "sft_lr": "--sft-lr", "sft_data": "--sft-data"}


def round_settings(args, n, stage, lambdas, data_fingerprint, parent_sha256):
    """The settings that determine round n's weights, as recorded in its checkpoint and states."""
    with_margin = args.loss == "spo" and n > 1  # round 1 (and sequential DPO) has no margin
    return {"stage": stage, "loss": args.loss, "beta": args.beta, "lambdas": lambdas,
            "margin_mode": args.margin if with_margin else None,
            # alpha shapes the margin only through the lambdas, except in the telescoped form
            "alpha": args.alpha if with_margin and args.margin == "telescoped" else None,
            # steps before warmup: the default warm-up follows --steps, and a message names --steps first
            "lr": args.lr, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "seed": args.seed,
            "average_logps": args.average_logps, "dtype": args.dtype,
            "data_fingerprint": data_fingerprint, "parent_sha256": parent_sha256}


def base_settings(args, config, data_fingerprint, sft_data):
    """The settings that determine the SFT base pi_0's weights; sft_data names its corpus (world,
    stages or file; spo_min/stages.py), data_fingerprint pins its exact examples."""
    return {"config": config.to_dict(), "sft_steps": args.sft_steps, "sft_lr": args.sft_lr,
            "seed": args.seed, "sft_data": sft_data, "data_fingerprint": data_fingerprint}


def _show(key, value):
    if key == "config":
        preset = [name for name, p in PRESETS.items() if GPTConfig(**p).to_dict() == value]
        return f"{preset[0]} ({value})" if preset else repr(value)
    return repr(value)


def compare_settings(what, recorded, expected, fix):
    """Refuse reuse of `what` when any recorded setting differs from this run's.

    One line: the setting, both values, and what to do (`fix` says how to start over).
    """
    for key, want in expected.items():
        have = recorded.get(key)
        if have == want:
            continue
        if key == "parent_sha256":  # no flag sets it: the file it started from has changed
            raise RunError(f"{what} was trained from another parent checkpoint (sha256 {str(have)[:12]}.., this "
                           f"run's parent has {want[:12]}..): {fix}")
        flag = FLAGS.get(key, key)
        raise RunError(f"{what} was made with {key}={_show(key, have)}, this run has {key}={_show(key, want)} "
                       f"(set by {flag}): run with the same {flag} to reuse it, or {fix}")


# ----------------------------------------------------------------------------- names and stages

# A stage name becomes part of file names (round1_helpful.safetensors): one rule for every name
# that does, so none can climb out of --out ('../x'), make sub-folders ('x/y') or be empty.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def check_stage_names(stages):
    for stage in stages:
        _check(_NAME.fullmatch(stage), f"--stage {stage!r}: a stage name becomes part of file names, so it must be "
                                       "a letter followed by letters, digits or _ (at most 64), e.g. helpful")


def closest(name, choices):
    """' (did you mean 'x'?)' for the choice nearest to a mistyped name, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def data_flags(items, stages, formats):
    """--data DIMENSION=PATH[:FORMAT] flags -> {stage: (path, format)}.

    Every flag names one of the run's stages, once: a typo ('helpfull') or a second file for the
    same stage would otherwise be ignored, and the stage trained on the built-in world instead.
    """
    files = {}
    for item in items:
        if item == "world":
            continue
        _check("=" in item, f"--data {item}: expected 'world' or DIMENSION=PATH[:FORMAT]")
        stage, spec = item.split("=", 1)
        _check(stage in stages, f"--data {item}: '{stage}' is not a stage of this run{closest(stage, stages)}; "
                                f"its stages are {', '.join(stages)}")
        if stage in files:
            raise RunError(f"--data {item}: stage '{stage}' already has --data {files[stage][0]}; give one file per stage")
        files[stage] = data_source(f"--data {item}", spec, formats)
    return files


def data_source(flag, spec, formats):
    """PATH[:FORMAT] of a pairs file -> (path, format); `flag` names the option in messages."""
    path, _, fmt = spec.rpartition(":")
    if fmt not in formats:  # no known format after the last ':': it belongs to the path
        path, fmt = spec, ""
    if not os.path.exists(path):
        head, _, suffix = spec.rpartition(":")
        _check(not (head and os.path.exists(head)), f"{flag}: unknown format '{suffix}' after the last ':'; "
                                                    f"expected one of {', '.join(formats)}")
        raise RunError(f"{flag}: no such file {path}")
    # A pipe (<(zcat pairs.jsonl.gz)) is fine: it is read once.
    _check(not os.path.isdir(path), f"{flag}: {path} is a folder; give a .jsonl or .jsonl.gz file of pairs")
    return path, fmt or "auto"


def data_error_for_flags(err):
    """data.load_pairs' hints name its Python arguments; train.py's user has flags instead."""
    message = str(err)
    for api, flags in ((data.SKIP_BAD_HINT, "or remove it"),
                       (data.DIMENSION_HINT, "name the stage helpful or harmless (it picks the label)")):
        message = message.replace(api, flags)
    return data.DataError(message)


# ----------------------------------------------------------------------------- preflight

def _check(ok, message):
    if not ok:
        raise RunError(message)


# Counts beyond these are typos, not runs: a million steps of the tiny model take weeks on a CPU
# (and ~3 hours of GPT-2 124M on an H200); 10,000 samples per held-out prompt is ~1.4 million
# generations. Refused up front, rather than hours of work (or gigabytes) later.
MAX_STEPS = 10**6
MAX_SAMPLES = 10**4
MAX_SEED = 2**32 - 1  # every seed a 64-bit generator takes, after train.py's seed * 1000 + round
TEMPERATURE_RANGE = (0.01, 100.0)  # below 0.01 sampling is greedy in effect, and 1e-300 overflows to inf


def preflight(args, world_size=1):
    """Every check the command line alone allows, before any file is written or any step taken."""
    positive_ints = [("--steps", args.steps), ("--batch-size", args.batch_size), ("--save-every", args.save_every),
                     ("--eval-pairs", args.eval_pairs)]
    if args.eval_prompts is not None:  # None: every held-out prompt
        positive_ints.append(("--eval-prompts", args.eval_prompts))
    for flag, value in positive_ints:
        _check(value >= 1, f"{flag} must be >= 1, got {value}")
    for flag, value in [("--eval-samples", args.eval_samples), ("--warmup", args.warmup),
                        ("--trace-every", args.trace_every)]:
        _check(value >= 0, f"{flag} must be >= 0, got {value}")  # --eval-samples 0: exact evaluation only
    for flag, value, limit in [("--steps", args.steps, MAX_STEPS), ("--sft-steps", args.sft_steps, MAX_STEPS),
                               ("--eval-samples", args.eval_samples, MAX_SAMPLES)]:
        _check(value <= limit, f"{flag} {value} is more than spo-min's limit of {limit:,}: use fewer")
    _check(args.warmup < args.steps, f"--warmup {args.warmup} is not shorter than the round (--steps {args.steps}): "
                                     f"the learning rate would never leave warm-up; use --warmup {args.steps - 1} or less")
    _check(0 <= args.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED} (2**32 - 1), got {args.seed}")
    _check(args.world_temperature > 0 and math.isfinite(args.world_temperature),
           f"--world-temperature must be a positive number, got {args.world_temperature}")
    _check(args.world_cautious >= 0 and math.isfinite(args.world_cautious),
           f"--world-cautious must be a finite number >= 0, got {args.world_cautious}")
    _check(not (args.branch and args.resume), "--resume does not apply to --branch: a branch is cheap to "
           "rerun into a fresh --out")
    _check(args.sft_steps >= 0, f"--sft-steps must be >= 0, got {args.sft_steps}")
    for flag, value in [("--sft-lr", args.sft_lr), ("--eval-temperature", args.eval_temperature)]:
        _check(value > 0 and math.isfinite(value), f"{flag} must be a positive number, got {value}")
    low, high = TEMPERATURE_RANGE
    _check(low <= args.eval_temperature <= high, f"--eval-temperature must be between {low} (greedy in effect) and "
                                                 f"{high}, got {args.eval_temperature}")
    # NaN passes every comparison (nan < 0 is False), so non-finite values need their own check.
    if args.alpha is not None:
        _check(math.isfinite(args.alpha), f"--alpha must be a finite number, got {args.alpha}")
    for text in args.lambdas or []:
        for x in text.split(","):
            try:
                value = float(x)
            except ValueError:
                continue  # resolve_hyperparameters names malformed lists
            _check(math.isfinite(value), f"--lambdas '{text}': every lambda must be a finite number")
    _check(not (args.lambdas and args.margin == "telescoped"),
           "--margin telescoped scales the margin by --alpha alone: give --alpha, not --lambdas "
           "(or use --margin exact with --lambdas)")
    if args.init is None:
        _check(args.model in PRESETS, f"--model {args.model}: unknown size; choose one of {sorted(PRESETS)}")
    _check(args.batch_size % world_size == 0,
           f"--batch-size {args.batch_size} does not split over {world_size} processes: "
           "make it a multiple of --nproc_per_node")
    check_device(args.device)
    check_stage_names(args.stage)


# ----------------------------------------------------------------------------- what a run writes

def same_file(a, b):
    a, b = os.path.realpath(a), os.path.realpath(b)  # links resolved; hard links below
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _not_plain(path):
    """What a path is when it cannot be an output (a link could point into someone else's file)."""
    if os.path.islink(path):
        return "a symbolic link"
    if os.path.isdir(path):
        return "a folder"
    if os.path.exists(path) and not os.path.isfile(path):
        return "not a regular file"
    return None


def check_outputs(outputs, inputs, resume, branch, reusable=()):
    """The one rule for what a run writes, checked before it writes anything.

    outputs: {path: what} for every file the run may write (chain.run_outputs); inputs: [(flag,
    path)] for every file it reads. No input may be an output; every output is a plain file; and
    a run never overwrites, deletes or orphans a file it did not create: without --resume, none
    of its outputs may exist yet (except `reusable` ones, e.g. an SFT base reused when its settings
    match). --resume continues the run that made them, each file checked against its settings.
    """
    for path, what in outputs.items():
        for flag, given in inputs:
            _check(not same_file(given, path), f"{flag} {given} is {what} this run writes: a run never reads "
                                               "what it writes; copy the file elsewhere first, or use another --out")
        kind = _not_plain(path)
        _check(kind is None, f"{path} is {kind}; spo-min writes its outputs only as plain files: remove it or use "
                             "another --out")
        if os.path.exists(path) and not resume and path not in reusable:
            choices = ("use another --out, or delete the file (a --branch run does not --resume)" if branch else
                       "continue that run with --resume, use another --out, or delete the file")
            raise RunError(f"{path} is {what} of an earlier run; this run would overwrite it: {choices}")


def check_device(requested):
    if requested == "auto":
        return
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise RunError(f"--device {requested}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        _check(torch.cuda.is_available(), f"--device {requested}: no CUDA GPU is available here; "
                                          "use --device cpu (or auto)")
        _check(device.index is None or device.index < torch.cuda.device_count(),
               f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    elif device.type != "cpu":
        raise RunError(f"--device {requested}: spo-min trains on cpu or cuda; use auto, cpu or cuda")


def check_init(path):
    """--init, checked in full before --out is touched: a readable GPT-2 checkpoint (an HF file
    needs its config.json for n_head), GPT-2's vocabulary (or a padded one), finite weights."""
    if not os.path.isfile(path):
        raise RunError(f"--init {path}: no such file (give a safetensors checkpoint)")
    infos, file_metadata = read_header(path)
    _, config, _ = _parse_our_header(path, file_metadata)
    if config is None:
        if not any(key.split(".")[-2:] == ["wte", "weight"] for key in infos):
            keys = ", ".join(sorted(infos)[:4]) + (", ..." if len(infos) > 4 else "")
            raise RunError(f"--init {path}: not a GPT-2 checkpoint (no token embedding 'wte.weight' among its keys "
                           f"{keys}): give a GPT-2 safetensors file")
        if not os.path.isfile(os.path.join(os.path.dirname(path) or ".", "config.json")):
            raise RunError(f"--init {path}: a Hugging Face GPT-2 file without its config.json; no weight shape "
                           "tells the number of heads: put the model's config.json beside the file")
    config = read_config(path)
    if config.vocab_size < VOCAB_SIZE:
        raise RunError(f"--init {path}: its vocabulary has {config.vocab_size} tokens, GPT-2's tokenizer has "
                       f"{VOCAB_SIZE}: give a checkpoint with GPT-2's vocabulary (a padded one, e.g. 50304, is fine)")
    check_finite(load_model(path)[0], f"--init {path}", "give a checkpoint with finite weights")  # keys and shapes too
    return config


def check_base(path, settings):
    """An SFT base found in --out is reused only if it is one, made with this run's settings."""
    recorded = read_metadata(path)
    if recorded.get("kind") != "base":
        raise RunError(f"{path} was not made by spo-min's SFT (it records no SFT settings): pass it as --init, "
                       "or move it away to train a new base")
    compare_settings(path, recorded, settings, f"use another --out, or delete {path} to train a new base")
    check_finite(load_model(path)[0], path, "delete it to train a new base (lower --sft-lr)")


def base_config(args):
    """The GPTConfig of pi_0, known before it is built: from --init's header or the --model preset."""
    return check_init(args.init) if args.init else GPTConfig.preset(args.model)


def check_stage_data(args, tokenized, world_size=1):
    """After loading every --data file: each stage can fill a batch and has held-out pairs."""
    for stage, (train, heldout) in tokenized.items():
        _check(args.batch_size <= len(train),
               f"--batch-size {args.batch_size} is larger than stage '{stage}''s {len(train)} training pairs: "
               f"use --batch-size {len(train) - len(train) % world_size or world_size} or less, or more data")
        _check(len(heldout) > 0,
               f"stage '{stage}' has no held-out pairs to evaluate on (5% of its prompts are held out, "
               "and it has too few distinct prompts): give a file with at least 20 distinct prompts")


def check_finite(model, what, fix):
    """Refuse weights that are NaN or inf: every later step would only spread them."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RunError(f"{what} has non-finite weights (first: {bad[0]}): {fix}")


# ----------------------------------------------------------------------------- disk space

def checkpoint_bytes(config: GPTConfig) -> int:
    """fp32 bytes of one checkpoint of this config (the header adds a few kB).

    Counted from the config (GPT-2's layout, spo_min/model.py) rather than by building the model:
    that takes seconds, at every start of every run. tests/test_runs.py checks both agree.
    """
    C, L = config.n_embd, config.n_layer
    bias = 1 if config.bias else 0
    layer_norm = C * (1 + bias)  # weight (and bias)
    per_block = 12 * C * C + bias * 9 * C + 2 * layer_norm  # attention (4 C^2) + MLP (8 C^2), their biases, 2 LNs
    n = config.vocab_size * C + config.block_size * C + L * per_block + layer_norm  # wte, wpe, blocks, ln_f
    return 4 * n + 65536


def make_out(out, config, with_state):
    """Create --out (after every check that needs no file), writable and with room for the run."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise RunError(f"cannot write to --out {out}: {err.strerror}") from None
    _check(os.access(out, os.W_OK), f"cannot write to --out {out}: permission denied")
    check_free_space(out, config, with_state)


def check_free_space(out, config, with_state):
    """Room for a round's files before it starts, rather than a failed save after it trained.

    A checkpoint is one copy of the weights; a resumable state is three (weights and two AdamW
    moments), and while a new state replaces the old one both exist: six copies at the peak.
    """
    need = checkpoint_bytes(config) * (6 if with_state else 1)
    free = shutil.disk_usage(out).free
    what = "its resumable states and checkpoint" if with_state else "its checkpoint"
    _check(free >= need, f"--out {out}: {free / 1e6:.1f} MB free, a round needs about {need / 1e6:.1f} MB "
                         f"({what}): free some space or use another --out")


def explain_failed_save(err, state_path, parent_path):
    """One line for a round checkpoint or state that could not be written (a full disk, most often).

    The write was atomic, so the round's last state (or, before the first one, its parent) is
    intact and --resume continues from there.
    """
    resume_from = state_path if os.path.exists(state_path) else parent_path
    return RunError(f"{err}. Nothing was lost: {resume_from} is intact; free space and rerun with --resume "
                    "to continue from it")


# ----------------------------------------------------------------------------- lock

_TMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # checkpoint.atomic_write's temporary names


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _process_start(pid):
    """When process `pid` started (clock ticks after boot, field 22 of /proc/<pid>/stat), or None
    where there is no /proc. A pid alone does not name a process: the system reuses pids."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])  # after "pid (name)": field 3 is index 0
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """`--out/.lock`, holding the pid, its start time and the host of the run that uses the folder.

    Created with O_EXCL, so two runs starting at once cannot both get it. A lock whose process is
    gone (kill -9, a crash) is stale and taken over, and so is one whose pid now belongs to a
    process that started later (pid reuse). One from another host cannot be checked and must be
    removed by hand. Holding the lock also makes it safe to clear orphan temp files.
    """

    def __init__(self, out, run_id):
        self.path = os.path.join(out, ".lock")
        self.run_id = run_id
        self.held = False

    def acquire(self):
        record = {"pid": os.getpid(), "pid_start": _process_start(os.getpid()), "host": socket.gethostname(),
                  "run_id": self.run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # second try after removing a stale lock
            try:  # 0o666: the umask decides who may read it, as for every file a run writes
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            except FileExistsError:
                self._clear_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
            self.held = True
            atexit.register(self.release)  # on any exit but kill -9, which leaves a stale lock
            self._remove_orphan_temp_files()
            return self
        raise RunError(f"{self.path}: could not take the lock (another run keeps creating it)")

    def _clear_if_stale(self):
        try:
            with open(self.path) as f:
                owner = json.loads(f.read())
            pid, host = int(owner["pid"]), owner["host"]
        except FileNotFoundError:
            return  # released meanwhile
        except (ValueError, KeyError, TypeError, OSError):
            raise RunError(f"{self.path}: unreadable lock file; if no run uses this folder, delete it") from None
        if host != socket.gethostname():
            raise RunError(f"{self.path}: --out is in use by pid {pid} on host {host}; wait for it, use another "
                           "--out, or delete the lock if that run is gone")
        # Our own pid: a lock left by an earlier train.main() call in this process (tests call it
        # in-process); nothing else runs in this process at the same time.
        started, now = owner.get("pid_start"), _process_start(pid)
        reused = None not in (started, now) and started != now  # the pid now names another, later process
        if pid != os.getpid() and _pid_alive(pid) and not reused:
            raise RunError(f"{self.path}: --out is in use by another run (pid {pid}, started {owner.get('started')}); "
                           "wait for it to finish or use another --out")
        os.remove(self.path)

    def _remove_orphan_temp_files(self):
        # Temp files of a write killed half-way: never renamed, never read again.
        out = os.path.dirname(self.path)
        for name in os.listdir(out):
            if _TMP.fullmatch(name):
                os.remove(os.path.join(out, name))

    def release(self):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


# ----------------------------------------------------------------------------- signals

class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM: the run stops where it is, and what it saved stays resumable."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals():
    """SIGTERM (kill, a job scheduler) stops a run the way Ctrl-C does: as an exception. An atomic
    write in progress removes its temp file (the file it replaces stays intact), the lock is
    released, and train.py says one line instead of a traceback."""
    def stop(signum, frame):
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def interrupted_message(args, signum):
    """The one line train.py prints when a signal stopped it: what is kept and how to go on."""
    name = signal.Signals(signum).name
    if args.branch:
        return (f"stopped by {name}; a --branch run does not resume: delete {args.out} (or use another --out) and "
                "run it again")
    return (f"stopped by {name}; the finished rounds and the last saved state of this round (every --save-every "
            f"steps) are in {args.out}: run the same command with --resume to continue")


# ----------------------------------------------------------------------------- metrics

def new_run_id():
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _json_safe(value):
    # JSON has no NaN: an undefined metric (e.g. accuracy over zero pairs) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metrics_rows(path):
    """(complete lines, the last line if it has no newline) of metrics.jsonl."""
    with open(path, "rb") as f:
        text = f.read()
    cut = text.rfind(b"\n") + 1
    return text[:cut].splitlines(), text[cut:]


def _is_row(line):
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def check_metrics(path):
    """Before --resume appends to metrics.jsonl: every complete line is a row (a JSON object).
    A file of something else is refused rather than appended to; a cut last line is repaired by
    start_metrics."""
    if not os.path.exists(path):
        return
    lines, _ = _metrics_rows(path)
    for number, line in enumerate(lines, start=1):
        _check(not line.strip() or _is_row(line),
               f"{path}:{number}: not a metrics row (one JSON object per line); this file was not written by "
               "spo-min: move it away, or use another --out")


def start_metrics(path, resume):
    """A fresh run starts with no metrics.jsonl (check_outputs made sure). --resume appends to it,
    after repairing a last line that an interrupted write cut short: dropped, and said so (two
    rows glued into one invalid line otherwise). A last row that only lacks its newline gets it."""
    if not resume or not os.path.exists(path):
        return
    lines, tail = _metrics_rows(path)
    if not tail:
        return
    with open(path, "rb+") as f:
        if _is_row(tail):
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(sum(len(line) + 1 for line in lines))
            print(f"[metrics] {path}: dropped its last line, cut short by an interrupted write ({len(tail)} bytes)")


def append_metrics(path, row, run_id):
    """One JSON line per evaluation, tagged with the run that wrote it; never through a link."""
    record = {"run_id": run_id, **{k: _json_safe(v) for k, v in row.items()}}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)  # the umask decides
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
