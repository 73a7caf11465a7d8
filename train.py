"""Sequential preference alignment with SPO, one round per --stage.

    python train.py --stage helpful --stage harmless            # built-in world, CPU, minutes
    python train.py --stage helpful --stage harmless --stage concise   # three rounds (README, "Round 3")
    torchrun --nproc_per_node=2 train.py --stage helpful ...    # data parallel (gloo / nccl)

Round 0 builds the base policy pi_0 (a short SFT on the built-in world, or --init a checkpoint).
Round n fine-tunes pi_{n-1} into pi_n on the pairs of dimension n with the SPO loss (E6): DPO
against pi_{n-1}, plus the frozen margin M_n from the implicit rewards of rounds 1..n-1.
Round 1 has no margin: it is plain DPO against pi_0. `--loss dpo` drops every margin
("sequential DPO", the baseline of the paper).

Every file written is a safetensors checkpoint whose metadata rebuilds the chain pi_0..pi_n.
The loss math is in spo_min/losses.py; the kernel only computes log-probs.
"""

import argparse
import functools
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

from kernels.logprobs import token_logprobs, triton_available
from spo_min import chain, data, evaluate, losses, runs, stages
from spo_min.checkpoint import CheckpointError, read_config, save_model
from spo_min.ddp import Distributed
from spo_min.logps import batch_pair_loss, batch_sequence_logps, frozen_sequence_logps, keep_freed_memory_in_process
from spo_min.model import GPT, GPTConfig
from spo_min.optim import AdamW  # torch.optim.AdamW, spelled out; it spares torch._dynamo (~145 MB)
from spo_min.schedule import cosine_lr, step_schedule
from spo_min.tokenizer import TokenizerError, get_tokenizer
from spo_min import world as world_mod

# Round defaults for the built-in world on a CPU (chosen by the measurements in README.md,
# "Training that does not degenerate"): a large beta stops each round once the policy has moved
# a few nats, before the text degenerates; warm-up and decay keep the first and last steps gentle.
DEFAULT_BETA = 1.0
DEFAULT_LR = 2e-4
DEFAULT_STEPS = 100
DEFAULT_WARMUP = 10


class TrainError(RuntimeError):
    """A problem the user can fix; printed as one line, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", action="append", default=[],
                   help="a dimension to align, in order (repeat): the built-in world's helpful, harmless, "
                        "concise, or one given with --data")
    p.add_argument("--loss", choices=["spo", "dpo"], default="spo", help="dpo = sequential DPO (margin 0)")
    p.add_argument("--margin", choices=["exact", "telescoped"], default="exact",
                   help="exact E6 margin, or the telescoped simplification alpha*Delta log(pi_{n-1}/pi_0)")
    p.add_argument("--beta", type=float, default=DEFAULT_BETA, help="KL strength beta_n, every round")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"SPO margin scale (default {chain.DEFAULT_ALPHA} unless --lambdas): lambda_i^(n) = alpha / beta_i, "
                        "beta_i as recorded by round i (E5's alpha at n = 2)")
    p.add_argument("--lambdas", action="append", default=None,
                   help="per-round lambdas from round 2 on, comma separated, e.g. --lambdas 0.5 --lambdas 0.3,0.2")
    p.add_argument("--data", action="append", default=[],
                   help="'world' (default) or DIMENSION=PATH[:FORMAT] per stage (hh, pku, generic jsonl)")
    p.add_argument("--init", default=None, help="base policy pi_0: our or an HF GPT-2 safetensors file")
    p.add_argument("--branch", default=None,
                   help="continue a finished chain: a round checkpoint whose chain (pi_0..pi_k, rebuilt from its "
                        "metadata) the new --stage rounds k+1.. extend; e.g. several round-2 variants from one pi_1")
    p.add_argument("--model", default="tiny", help="GPTConfig preset of the SFT base (without --init)")
    p.add_argument("--out", default="out", help="folder for checkpoints, metrics.jsonl and the plot")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per round")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step, across all processes")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate of a round")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"steps of linear warm-up (default {DEFAULT_WARMUP}, or --steps - 1 if that is fewer); then "
                        "cosine decay to 0.1 x --lr by the round's last step")
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-data", default=None,
                   help="what the base pi_0 is fine-tuned on (without --init): world (the built-in world's dialogues), "
                        "stages (the preferred responses of the stages' training pairs; the default with --data "
                        "files) or PATH[:FORMAT] (the preferred responses of a pairs file)")
    p.add_argument("--ref", choices=["cache", "live"], default="cache",
                   help="reference log-probs cached once per round, or computed each step (fused kernel)")
    p.add_argument("--logits", choices=["chunked", "full"], default="chunked",
                   help="chunked: lm_head, log-probs and loss fused per chunk of pairs, never the (tokens x "
                        "vocab) logits (spo_min/pair_loss.py); full: model.head, log-probs, autograd (the plain path)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the policy's transformer blocks in each round. auto: on with CUDA, off on CPU, "
                        "where compiling takes over a minute per process for little gain (spo_min/bench_train.py)")
    p.add_argument("--average-logps", action="store_true", help="mean instead of sum over tokens (E9)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts evaluated (default: all)")
    p.add_argument("--eval-samples", type=int, default=8, help="responses sampled per held-out prompt (0: none)")
    p.add_argument("--eval-temperature", type=float, default=0.7)
    p.add_argument("--eval-pairs", type=int, default=300, help="held-out pairs per dimension per evaluation")
    p.add_argument("--trace-every", type=int, default=0,
                   help="evaluate inside each round every N steps (held-out loss, E7 weights, exact scores, "
                        "end-of-text) into metrics.jsonl; 0: only after each round")
    p.add_argument("--world-temperature", type=float, default=world_mod.DEFAULT_TEMPERATURE,
                   help="built-in world: Bradley-Terry temperature of the raters' labels")
    p.add_argument("--world-cautious", type=float, default=world_mod.DEFAULT_CAUTIOUS,
                   help="built-in world: harmlessness raters' preference for refusing benign requests")
    p.add_argument("--world-no-redirect", action="store_true",
                   help="built-in world: no 'redirect' style on harmful prompts (no compromise response)")
    p.add_argument("--no-grad-check", action="store_true", help="skip the start-up gradient checks")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--save-every", type=int, default=25, help="steps between resumable round states")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crash-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests of --resume
    args = p.parse_args(argv)
    if args.warmup is None:  # a short round still leaves warm-up (runs.preflight: --warmup < --steps)
        args.warmup = max(0, min(DEFAULT_WARMUP, args.steps - 1))
    return args


# ----------------------------------------------------------------------------- round 0

def bootstrap_base(args, tokenizer, dist, device, sft_data, pairs):
    """pi_0: --init if given, else a short SFT (reused when already saved) on the --sft-data corpus
    (spo_min/stages.py: the built-in world's dialogues, or the stages' own preferred responses)."""
    if args.init:  # checked in full (runs.check_init) before --out was touched
        return args.init
    path = os.path.join(args.out, "base.safetensors")
    config = GPTConfig.preset(args.model)
    examples, what = stages.sft_examples(args, sft_data, pairs)
    sft, report = data.tokenize_sft(examples, tokenizer, config.block_size)
    if not sft:
        raise TrainError(f"the SFT corpus ({what}) has no example that fits the {args.model} model's block ({report})")
    settings = runs.base_settings(args, config, data.fingerprint(sft), stages.sft_label(sft_data))
    if os.path.exists(path):
        runs.check_base(path, settings)
        dist.print(f"[base] reusing {path}")
        return path
    dist.print(f"[base] SFT on {what}: {len(sft)} examples")
    model = GPT(config, seed=args.seed).to(device)
    opt = AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = step_schedule(len(sft), 32, args.sft_steps, seed=args.seed)
    bar = tqdm(schedule, desc="round 0: SFT base", disable=not dist.is_main)
    for step, idx in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.sft_steps, args.sft_lr)
        batch = {k: v.to(device) for k, v in data.collate_sft([sft[i] for i in dist.shard(idx)]).items()}
        scored = batch["labels"] != -100
        logits = model.head(model.hidden_states(batch["input_ids"])[scored])
        token_lp, _ = token_logprobs(logits, batch["labels"][scored])
        loss = -token_lp.mean()  # SFT: mean negative log-likelihood of response tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(model)
        opt.step()
        bar.set_postfix(nll=f"{loss.item():.3f}")
    runs.check_finite(model, "the SFT base after training", f"lower --sft-lr (now {args.sft_lr}); nothing was saved")
    if dist.is_main:
        save_model(model, path, metadata={"kind": "base", "round": 0, "stage": "sft", **settings})
    dist.barrier()
    return path


# ----------------------------------------------------------------------------- round n

def frozen_round_inputs(round_chain, pairs, args, device, need_ref=False):
    """Everything frozen in round n, computed once (E6): reference log-probs and the margin M_n.

    Loads each earlier policy pi_0..pi_{n-1} in turn, scores the round's pairs, and frees it: no frozen
    policy stays in memory during the round. need_ref: pi_{n-1}'s log-probs even with --ref live."""
    last = len(round_chain) - 1  # round n = last + 1; its reference is pi_last
    with_margin = args.loss == "spo" and last > 0  # round 1 is plain DPO: no margin
    need = set(range(last + 1)) if with_margin else set()
    if args.ref == "cache" or need_ref:
        need.add(last)  # with --ref live, pi_{n-1} is scored at each step instead
    logps = {}
    # Same precision as the policy's forward, so pi_theta == pi_ref at step 0 under bf16 too.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    for j in sorted(need):
        model, _ = chain.load_verified(round_chain[j], device=device)
        with autocast:
            logps[j] = frozen_sequence_logps(model, pairs, average=args.average_logps, device=device,
                                             logits=args.logits)
        del model
    margin = torch.zeros(len(pairs))
    if with_margin:
        chosen = [logps[j][0] for j in range(last + 1)]
        rejected = [logps[j][1] for j in range(last + 1)]
        if args.margin == "exact":
            betas = [m["beta"] for m in round_chain[1:]]
            lambdas = [m["lambdas"] for m in round_chain[1:]] + [chain.round_lambdas(args, round_chain)]
            margin = losses.spo_margin(chosen, rejected, betas, lambdas)
        else:
            margin = losses.spo_margin_telescoped(chosen, rejected, args.alpha)
    ref_chosen, ref_rejected = logps[last] if args.ref == "cache" or need_ref else (None, None)
    return ref_chosen, ref_rejected, margin


def gradient_checks(policy, batch, ref_chosen, ref_rejected, margin, beta, average=False):
    """Start-up checks on a real batch: autograd vs E7's closed form, the fused training path vs
    plain autograd, kernel vs torch log-probs."""
    with torch.no_grad():
        seq, _ = batch_sequence_logps(policy, batch)
    n = len(ref_chosen)
    pc = seq[:n].double().requires_grad_()
    pr = seq[n:].double().requires_grad_()
    loss, _ = losses.spo_loss(pc, pr, ref_chosen.double(), ref_rejected.double(), margin.double(), beta)
    g_c, g_r = torch.autograd.grad(loss, (pc, pr))
    z = beta * ((pc - ref_chosen) - (pr - ref_rejected)) - margin  # E7: z = h_theta - M_n
    expected = -beta * torch.sigmoid(-z.detach()) / n  # dL/dlogpi(y_w); mean over the batch
    if not (torch.allclose(g_c, expected, atol=1e-10) and torch.allclose(g_r, -expected, atol=1e-10)):
        raise TrainError("gradient check failed: autograd disagrees with E7 on this batch")
    msg = "autograd == E7"
    # The fused path (spo_min/pair_loss.py) against plain autograd through the full logits: every
    # parameter's gradient, on this batch's first pairs (a whole GPT-2 batch's full logits may not
    # fit), one pair per chunk, without dropout (both paths must see the same network).
    k = min(n, 4)
    rows = list(range(k)) + list(range(n, n + k))
    pairs = {key: value[rows] for key, value in batch.items()}
    params = [p for p in policy.parameters() if p.requires_grad]
    was_training = policy.training
    policy.eval()
    grads = []
    for logits in ("chunked", "full"):
        loss, _, _ = batch_pair_loss(policy, pairs, functools.partial(losses.spo_loss, beta=beta),
                                     torch.cat([ref_chosen[:k], ref_rejected[:k]]), margin=margin[:k],
                                     average=average, logits=logits, chunk_pairs=1)
        grads.append(torch.autograd.grad(loss, params))
    policy.train(was_training)
    scale = max(g.abs().max().item() for g in grads[1])
    worst = max((a - b).abs().max().item() for a, b in zip(*grads))
    # fp32: full logits' sequence log-probs stray up to 5e-4 nats on long pairs; sigmoid(-h) follows (fp64: 1e-13)
    if not worst <= 1e-3 * scale:
        raise TrainError(f"gradient check failed: the fused loss's gradients differ from plain autograd's by "
                         f"{worst:.2e} (largest entry {scale:.2e}) on this batch")
    msg += ", fused loss == autograd"
    if triton_available(batch["input_ids"].device):
        scored = batch["labels"] != -100
        with torch.no_grad():
            logits = policy.head(policy.hidden_states(batch["input_ids"])[scored])[:64]
            labels = batch["labels"][scored][:64]
            fused, _ = token_logprobs(logits, labels, backend="triton")
            eager, _ = token_logprobs(logits, labels, backend="torch")
        if not torch.allclose(fused, eager, atol=1e-4, rtol=1e-4):  # fp32 sums over 50257 logits
            raise TrainError("kernel check failed: Triton and torch log-probs disagree on this batch")
        msg += ", Triton kernel == torch"
    else:
        msg += " (kernel check skipped: no GPU and TRITON_INTERPRET unset)"
    return msg


def train_round(args, n, stage, round_chain, train_tok, dist, device, step_log=None, trace=None):
    """Round n: fine-tune pi_{n-1} with the SPO loss (E6) against pi_{n-1}, margin frozen.

    step_log (evaluate.StepLog) records each step's loss and E7 pair weights; trace(step, policy)
    (evaluate.RoundTrace) evaluates the policy every --trace-every steps, and after the last."""
    path = chain.round_path(args.out, n, stage)
    state_path = path.replace(".safetensors", ".state.safetensors")
    beta = args.beta
    loss_fn = functools.partial(losses.spo_loss, beta=beta)  # E5/E6, applied per chunk of pairs
    lambdas_n = chain.round_lambdas(args, round_chain)
    schedule = step_schedule(len(train_tok), args.batch_size, args.steps, seed=args.seed * 1000 + n)
    # Score only the pairs this round will see; NaN elsewhere would surface any indexing bug.
    seen = schedule.items_seen()
    frozen = frozen_round_inputs(round_chain, [train_tok[i] for i in seen], args, device)
    ref_chosen, ref_rejected, margin = (None if t is None else
                                        torch.full((len(train_tok),), math.nan).index_copy(0, torch.tensor(seen), t)
                                        for t in frozen)
    policy, _ = chain.load_verified(round_chain[-1], device=device)  # pi_theta starts as pi_{n-1}
    policy.train()
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        policy.compile_trunk()
    ref_model = None
    if args.ref == "live":  # pi_{n-1} kept in memory, scored each step in the same kernel pass
        ref_model, _ = chain.load_verified(round_chain[-1], device=device)
        ref_model.eval().requires_grad_(False)
    opt = AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    settings = runs.round_settings(args, n, stage, lambdas_n, data.fingerprint(train_tok), round_chain[-1]["sha256"])
    meta = {"kind": "round", "round": n, "ref": args.ref, **chain.parent_links(path, round_chain[-1]["path"]),
            **settings}
    start = 0
    if args.resume and os.path.exists(state_path):
        start = chain.load_train_state(state_path, policy, opt, settings)
        dist.print(f"[round {n}] resuming {stage} at step {start}")
    if dist.is_main:
        runs.check_free_space(args.out, policy.config, with_state=args.save_every < args.steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    # Round 1 has no earlier reward to keep: whatever --loss says, it is plain DPO (E5).
    bar = tqdm(range(start, args.steps), desc=f"round {n}: {stage} ({'dpo' if n == 1 else args.loss})",
               initial=start, total=args.steps, disable=not dist.is_main)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=args.warmup)
        if trace is not None and dist.is_main and step % args.trace_every == 0:
            step_log.trace.append(trace(step, policy))  # no RNG, no grad: training is unchanged
        idx = dist.shard(schedule[step])
        batch = {k: v.to(device) for k, v in data.collate_pairs([train_tok[i] for i in idx]).items()}
        b = len(idx)
        cached_ref = torch.cat([ref_chosen[idx], ref_rejected[idx]]).to(device) if ref_model is None else None
        m = margin[idx].to(device)
        try:
            with autocast:  # the loss and, on the default path, already its gradients (spo_min/pair_loss.py)
                loss, policy_seq, ref_seq = batch_pair_loss(policy, batch, loss_fn, cached_ref, ref_model, m,
                                                            average=args.average_logps, logits=args.logits)
            finite = torch.isfinite(loss)
        except losses.LossInputError:  # E9 and the loss refuse NaN/inf log-probs
            finite = torch.tensor(False)
        # Every process must agree to stop, or the others would wait forever in all_reduce.
        if dist.mean(finite) < 1:
            raise TrainError(f"round {n} step {step}: loss is not finite; stopped. The last good "
                             f"state is {state_path if os.path.exists(state_path) else round_chain[-1]['path']} "
                             "(lower --lr or --beta, or use --dtype float32, then --resume)")
        rc, rr = ref_seq[:b], ref_seq[b:]
        if step == start and not args.no_grad_check:
            checks = gradient_checks(policy, batch, rc, rr, m, beta, args.average_logps)
            dist.print(f"[round {n}] gradient checks: {checks}")
        _, metrics = losses.spo_loss(policy_seq[:b], policy_seq[b:], rc, rr, m, beta)  # for the progress bar
        if step_log is not None:  # E7: each pair's weight sigmoid(M_n - h_theta), before this step's update
            step_log.add(loss.detach(), losses.pair_weights(policy_seq[:b], policy_seq[b:], rc, rr, m, beta), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(policy)
        opt.step()
        bar.set_postfix(loss=f"{dist.mean(loss):.3f}", acc=f"{dist.mean(metrics['rewards/accuracies']):.2f}")
        if dist.is_main and ((step + 1) % args.save_every == 0) and step + 1 < args.steps:
            try:
                chain.save_train_state(state_path, policy, opt, step + 1, meta)
            except CheckpointError as err:
                raise runs.explain_failed_save(err, state_path, round_chain[-1]["path"]) from None
        if args.crash_at_step is not None and step + 1 == args.crash_at_step:
            dist.barrier()
            os.kill(os.getpid(), 9)  # simulate kill -9 for the resume test
    if trace is not None and dist.is_main:
        step_log.trace.append(trace(args.steps, policy))
    if dist.is_main:
        try:
            save_model(policy, path, metadata=meta)
        except CheckpointError as err:
            raise runs.explain_failed_save(err, state_path, round_chain[-1]["path"]) from None
        if os.path.exists(state_path):
            os.remove(state_path)
    dist.barrier()
    return path


def main(argv=None):
    """Run the rounds; returns the evaluation rows (one per round, round 0 = the base)."""
    args = parse_args(argv)
    # glibc: keep freed (N, V) logits for reuse, ~30% less CPU per step wherever full logits are built
    # (round 0's SFT, --logits full); the measurement is in spo_min/logps.py keep_freed_memory_in_process.
    keep_freed_memory_in_process()
    if not args.stage:
        raise TrainError("give at least one --stage, e.g. --stage helpful --stage harmless")
    dist = Distributed.from_env()
    runs.preflight(args, dist.world_size)  # what the command line alone can get wrong, before any work
    device = dist.device(args.device)
    tokenizer = get_tokenizer()
    branch_chain = chain.rebuild_chain(args.branch) if args.branch else None
    args.first_round = len(branch_chain) if branch_chain else 1
    # Every dimension of the chain, earlier rounds (from --branch) included: each is evaluated.
    args.all_stages = [m["stage"] for m in branch_chain[1:]] + args.stage if branch_chain else list(args.stage)
    chain.resolve_hyperparameters(args)
    sources = stages.stage_sources(args)  # an unknown stage fails now, not after the base SFT
    sft_data = stages.sft_choice(args, sources)
    chain.check_run_files(args, branch_chain, sources)  # nothing overwritten, no input is an output
    if args.resume:
        chain.check_chain_complete(args.out, args.stage)
    # Every --data file is loaded and tokenized before the base SFT: bad data fails in seconds.
    base_config = read_config(branch_chain[0]["path"]) if branch_chain else runs.base_config(args)
    pairs, world = stages.load_stage_pairs(args, sources)
    tokenized = stages.tokenize_stages(pairs, tokenizer, base_config.block_size)
    runs.check_stage_data(args, tokenized, dist.world_size)
    runs.make_out(args.out, base_config, with_state=args.save_every < args.steps)  # writable, with room
    run_id = runs.new_run_id()
    lock = runs.RunLock(args.out, run_id).acquire() if dist.is_main else None  # one run per --out
    if branch_chain:
        round_chain = [chain.chain_entry(link["path"]) for link in branch_chain]
        base_path = round_chain[0]["path"]
    else:
        base_path = bootstrap_base(args, tokenizer, dist, device, sft_data, pairs)
        round_chain = [chain.chain_entry(base_path)]
    if args.resume:  # every reused round and state is checked before metrics.jsonl is touched
        chain.check_resume_plan(args, {stage: pairs[0] for stage, pairs in tokenized.items()}, base_path)
    metrics_path = os.path.join(args.out, "metrics.jsonl")  # one evaluation row per round
    steps_path = os.path.join(args.out, "steps.jsonl")  # per round: each step's loss and E7 weights, the trace
    cache, rows = {}, []
    if dist.is_main:
        runs.start_metrics(metrics_path, args.resume)
        runs.start_metrics(steps_path, args.resume)
        if not branch_chain:  # a branch's earlier rounds were evaluated by the run that made them
            rows.append(evaluate.evaluate_round(args, 0, "base", base_path, base_path, tokenized, world, tokenizer,
                                                device, cache))
            runs.append_metrics(metrics_path, rows[-1], run_id)
    for n, stage in enumerate(args.stage, start=args.first_round):
        t0 = time.time()
        path = chain.round_path(args.out, n, stage)
        step_log = None
        if args.resume and os.path.exists(path):  # its settings were checked by check_resume_plan
            dist.print(f"[round {n}] {path} already complete; reusing it")
        else:
            heldout = tokenized[stage][1][: args.eval_pairs]  # the trace's, with this round's frozen inputs
            frozen = frozen_round_inputs(round_chain, heldout, args, device, need_ref=True) if args.trace_every else None
            step_log, trace = evaluate.round_monitors(args, stage, tokenized, world, tokenizer, device, cache, frozen,
                                                      round_chain[0])
            path = train_round(args, n, stage, round_chain, tokenized[stage][0], dist, device, step_log, trace)
        round_chain.append(chain.chain_entry(path))
        if dist.is_main:
            chain.check_unchanged(round_chain[0], round_chain[-1])  # pi_0 and pi_n, as evaluated below
            rows.append(evaluate.evaluate_round(args, n, stage, path, base_path, tokenized, world, tokenizer,
                                                device, cache, parent_path=round_chain[-2]["path"]))
            rows[-1]["seconds"] = round(time.time() - t0, 1)
            if step_log is not None:
                rows[-1].update(step_log.summary())
            runs.append_metrics(metrics_path, rows[-1], run_id)
            if step_log is not None:  # the per-step record, in a file of its own (lists, for plots)
                runs.append_metrics(steps_path, {"round": n, "stage": stage, **step_log.record()}, run_id)
                rows[-1]["steps"] = step_log.record()
            print(evaluate.format_table(rows[-1:], evaluate.result_columns(rows, args.all_stages)))
    if dist.is_main:
        evaluate.print_results(rows, args.all_stages, world, args.out)
        print(f"\ncheckpoints, {metrics_path} and scores.png are in {args.out}/")
        lock.release()
    dist.close()
    return rows


# Problems the user can fix: printed as one line "error: ...", exit code 2, no traceback.
USER_ERRORS = (TrainError, CheckpointError, data.DataError, losses.HyperparameterError, losses.LossInputError,
               TokenizerError, world_mod.WorldError, stages.StageError)


def cli(argv=None):
    """train.py as a command: a problem the user can fix, and a signal, each end with one line."""
    runs.stop_on_signals()  # SIGTERM as Ctrl-C: an exception, so nothing is left half-written
    say = os.environ.get("RANK", "0") == "0"  # under torchrun every process stops alike: say it once
    try:
        main(argv)
    except USER_ERRORS as err:
        if say:
            print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, however long
        sys.exit(2)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (runs.Interrupted)
        signum = getattr(stop, "signum", signal.SIGINT)
        if say:
            print(runs.interrupted_message(parse_args(argv), signum), file=sys.stderr)
        sys.exit(128 + signum)  # the shell's convention: 130 after Ctrl-C, 143 after SIGTERM


if __name__ == "__main__":
    cli()
