"""Sequential preference alignment with SPO, one round per --stage.

    python train.py --stage helpful --stage harmless            # built-in world, CPU, minutes
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
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from kernels.logprobs import token_logprobs, triton_available
from spo_min import chain, data, evaluate, losses
from spo_min.checkpoint import CheckpointError, load_model, read_config, read_metadata, save_model
from spo_min.ddp import Distributed
from spo_min.logps import batch_sequence_logps, frozen_sequence_logps, keep_freed_memory_in_process
from spo_min.model import GPT, GPTConfig
from spo_min.schedule import cosine_lr, step_schedule
from spo_min.tokenizer import get_tokenizer
from spo_min.world import DIMENSIONS, build_world


class TrainError(RuntimeError):
    """A problem the user can fix; printed as one line, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", action="append", default=[], help="a dimension to align, in order (repeat)")
    p.add_argument("--loss", choices=["spo", "dpo"], default="spo", help="dpo = sequential DPO (margin 0)")
    p.add_argument("--margin", choices=["exact", "telescoped"], default="exact",
                   help="exact E6 margin, or the telescoped simplification alpha*Delta log(pi_{n-1}/pi_0)")
    p.add_argument("--beta", type=float, default=0.1, help="KL strength beta_n, every round")
    p.add_argument("--alpha", type=float, default=None,
                   help="SPO margin scale (default 0.1 unless --lambdas): lambda_i^(n) = alpha / beta_i (E5's alpha at n = 2)")
    p.add_argument("--lambdas", action="append", default=None,
                   help="per-round lambdas from round 2 on, comma separated, e.g. --lambdas 0.5 --lambdas 0.3,0.2")
    p.add_argument("--data", action="append", default=[],
                   help="'world' (default) or DIMENSION=PATH[:FORMAT] per stage (hh, pku, generic jsonl)")
    p.add_argument("--init", default=None, help="base policy pi_0: our or an HF GPT-2 safetensors file")
    p.add_argument("--model", default="tiny", help="GPTConfig preset of the SFT base (without --init)")
    p.add_argument("--out", default="out", help="folder for checkpoints, metrics.jsonl and the plot")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per round")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step, across all processes")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--ref", choices=["cache", "live"], default="cache",
                   help="reference log-probs cached once per round, or computed each step (fused kernel)")
    p.add_argument("--logits", choices=["chunked", "full"], default="chunked",
                   help="chunked: lm_head + log-probs fused, never the (tokens x vocab) logits "
                        "(kernels/linear_logprobs.py); full: model.head then log-probs (the plain path)")
    p.add_argument("--average-logps", action="store_true", help="mean instead of sum over tokens (E9)")
    p.add_argument("--eval-prompts", type=int, default=96, help="held-out prompts sampled per evaluation")
    p.add_argument("--eval-samples", type=int, default=4, help="responses sampled per held-out prompt")
    p.add_argument("--eval-temperature", type=float, default=0.7)
    p.add_argument("--eval-pairs", type=int, default=200, help="held-out pairs per dimension per evaluation")
    p.add_argument("--no-grad-check", action="store_true", help="skip the start-up gradient checks")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--save-every", type=int, default=25, help="steps between resumable round states")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crash-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests of --resume
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def stage_sources(args):
    """Where each stage's pairs come from: "world", or (path, format). Checked before any training."""
    files = {}
    for item in args.data:
        if item == "world":
            continue
        if "=" not in item:
            raise TrainError(f"--data {item}: expected 'world' or DIMENSION=PATH[:FORMAT]")
        dimension, spec = item.split("=", 1)
        path, _, fmt = spec.partition(":")
        if not os.path.isfile(path):
            raise TrainError(f"--data {item}: no such file {path}")
        files[dimension] = (path, fmt or "auto")
    sources = {}
    for stage in args.stage:
        if stage not in files and stage not in DIMENSIONS:
            known = sorted(set(DIMENSIONS) | set(files))
            raise TrainError(f"unknown stage '{stage}': known dimensions are {known} "
                             "(the built-in world's, or one given as --data DIMENSION=PATH)")
        sources[stage] = files.get(stage, "world")
    return sources


def load_stage_data(args, sources, tokenizer, block_size):
    """Tokenized train/held-out pairs for every stage, plus the world (None for file data)."""
    world = None
    pairs = {}
    for stage, source in sources.items():
        if source == "world":
            world = world or build_world(seed=args.seed)
            pairs[stage] = (world.pairs[stage]["train"], world.pairs[stage]["heldout"])
        else:
            loaded, report = data.load_pairs(source[0], fmt=source[1], dimension=stage)
            print(f"[data] {stage}: {report}")
            pairs[stage] = data.split_by_prompt(loaded, heldout_fraction=0.05, seed=args.seed)
    tokenized = {}
    for stage, (train, heldout) in pairs.items():
        train_tok, report = data.tokenize_pairs(train, tokenizer, block_size)
        heldout_tok, _ = data.tokenize_pairs(heldout, tokenizer, block_size)
        print(f"[data] {stage}: {len(train_tok)} train / {len(heldout_tok)} held-out pairs ({report})")
        if not train_tok:
            raise TrainError(f"stage '{stage}' has no training pairs left after tokenization")
        tokenized[stage] = (train_tok, heldout_tok)
    return tokenized, world


# ----------------------------------------------------------------------------- round 0

def bootstrap_base(args, tokenizer, dist, device):
    """pi_0: --init if given, else a short SFT on the built-in world (reused when already saved)."""
    if args.init:
        if not os.path.isfile(args.init):
            raise TrainError(f"--init {args.init}: no such file (give a safetensors checkpoint)")
        return args.init
    path = os.path.join(args.out, "base.safetensors")
    config = GPTConfig.preset(args.model)
    if os.path.exists(path):
        meta = read_metadata(path)
        if meta.get("config") == config.to_dict() and meta.get("sft_steps") == args.sft_steps:
            dist.print(f"[base] reusing {path}")
            return path
    world = build_world(seed=args.seed)
    sft, _ = data.tokenize_sft(world.sft["train"], tokenizer, config.block_size)
    model = GPT(config, seed=args.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.95), weight_decay=0.0)
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
    if dist.is_main:
        save_model(model, path, metadata={"kind": "base", "round": 0, "stage": "sft",
                                          "config": config.to_dict(), "sft_steps": args.sft_steps,
                                          "seed": args.seed})
    dist.barrier()
    return path


# ----------------------------------------------------------------------------- round n

def frozen_round_inputs(round_chain, pairs, args, device):
    """Everything frozen in round n, computed once (E6): reference log-probs and the margin M_n.

    Loads each earlier policy pi_0..pi_{n-1} in turn, scores the round's pairs, and frees it:
    no frozen policy stays in memory during the round.
    """
    last = len(round_chain) - 1  # round n = last + 1; its reference is pi_last
    with_margin = args.loss == "spo" and last > 0  # round 1 is plain DPO: no margin
    need = set(range(last + 1)) if with_margin else set()
    if args.ref == "cache":
        need.add(last)  # with --ref live, pi_{n-1} is scored at each step instead
    logps = {}
    for j in sorted(need):
        model, _ = load_model(round_chain[j]["path"], device=device)
        logps[j] = frozen_sequence_logps(model, pairs, average=args.average_logps, device=device, logits=args.logits)
        del model
    margin = torch.zeros(len(pairs))
    if with_margin:
        chosen = [logps[j][0] for j in range(last + 1)]
        rejected = [logps[j][1] for j in range(last + 1)]
        if args.margin == "exact":
            betas = [m["beta"] for m in round_chain[1:]]
            lambdas = [m["lambdas"] for m in round_chain[1:]] + [chain.round_lambdas(args, last + 1)]
            margin = losses.spo_margin(chosen, rejected, betas, lambdas)
        else:
            margin = losses.spo_margin_telescoped(chosen, rejected, args.alpha)
    ref_chosen, ref_rejected = logps[last] if args.ref == "cache" else (None, None)
    return ref_chosen, ref_rejected, margin


def gradient_checks(policy, batch, ref_chosen, ref_rejected, margin, beta):
    """Start-up checks on a real batch: autograd vs E7's closed form, kernel vs torch log-probs."""
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


def train_round(args, n, stage, round_chain, train_tok, dist, device):
    """Round n: fine-tune pi_{n-1} with the SPO loss (E6) against pi_{n-1}, margin frozen."""
    path = chain.round_path(args.out, n, stage)
    state_path = path.replace(".safetensors", ".state.safetensors")
    beta = args.beta
    lambdas_n = chain.round_lambdas(args, n)
    schedule = step_schedule(len(train_tok), args.batch_size, args.steps, seed=args.seed * 1000 + n)
    # Score only the pairs this round will see; NaN elsewhere would surface any indexing bug.
    seen = sorted({i for idx in schedule for i in idx})
    frozen = frozen_round_inputs(round_chain, [train_tok[i] for i in seen], args, device)
    ref_chosen, ref_rejected, margin = (None if t is None else
                                        torch.full((len(train_tok),), math.nan).index_copy(0, torch.tensor(seen), t)
                                        for t in frozen)
    policy, _ = load_model(round_chain[-1]["path"], device=device)  # pi_theta starts as pi_{n-1}
    policy.train()
    ref_model = None
    if args.ref == "live":  # pi_{n-1} kept in memory, scored each step in the same kernel pass
        ref_model, _ = load_model(round_chain[-1]["path"], device=device)
        ref_model.eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = 0
    if args.resume and os.path.exists(state_path):
        start = chain.load_train_state(state_path, policy, opt, round_chain[-1]["path"])
        dist.print(f"[round {n}] resuming {stage} at step {start}")
    meta = {"kind": "round", "round": n, "stage": stage, "loss": args.loss, "beta": beta,
            "lambdas": lambdas_n, "margin_mode": args.margin, "alpha": args.alpha,
            "average_logps": args.average_logps, "seed": args.seed, "steps": args.steps,
            "data_fingerprint": data.fingerprint(train_tok),
            **chain.parent_fields(round_chain[-1]["path"])}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    bar = tqdm(range(start, args.steps), desc=f"round {n}: {stage} ({args.loss})",
               initial=start, total=args.steps, disable=not dist.is_main)
    for step in bar:
        idx = dist.shard(schedule[step])
        batch = {k: v.to(device) for k, v in data.collate_pairs([train_tok[i] for i in idx]).items()}
        b = len(idx)
        try:
            with autocast:
                policy_seq, live_ref = batch_sequence_logps(policy, batch, ref_model, average=args.average_logps,
                                                            logits=args.logits)
            finite = torch.isfinite(policy_seq).all()
        except losses.LossInputError:  # E9 refuses NaN/inf token log-probs
            finite = torch.tensor(False)
        # Every process must agree to stop, or the others would wait forever in all_reduce.
        if dist.mean(finite) < 1:
            raise TrainError(f"round {n} step {step}: loss is not finite; stopped. The last good "
                             f"state is {state_path if os.path.exists(state_path) else round_chain[-1]['path']} "
                             "(lower --lr or --beta, or use --dtype float32, then --resume)")
        rc, rr = (live_ref[:b], live_ref[b:]) if live_ref is not None else (ref_chosen[idx], ref_rejected[idx])
        rc, rr, m = rc.to(device), rr.to(device), margin[idx].to(device)
        if step == start and not args.no_grad_check:
            dist.print(f"[round {n}] gradient checks: {gradient_checks(policy, batch, rc, rr, m, beta)}")
        loss, metrics = losses.spo_loss(policy_seq[:b], policy_seq[b:], rc, rr, m, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(policy)
        opt.step()
        bar.set_postfix(loss=f"{dist.mean(loss):.3f}", acc=f"{dist.mean(metrics['rewards/accuracies']):.2f}")
        if dist.is_main and ((step + 1) % args.save_every == 0) and step + 1 < args.steps:
            chain.save_train_state(state_path, policy, opt, step + 1, meta)
        if args.crash_at_step is not None and step + 1 == args.crash_at_step:
            dist.barrier()
            os.kill(os.getpid(), 9)  # simulate kill -9 for the resume test
    if dist.is_main:
        save_model(policy, path, metadata=meta)
        if os.path.exists(state_path):
            os.remove(state_path)
    dist.barrier()
    return path


# ----------------------------------------------------------------------------- evaluation

def evaluate_round(args, n, stage, policy_path, base_path, tokenized, world, tokenizer, device, cache):
    """Held-out implicit-reward accuracy of every dimension so far, and (world) sampled scores."""
    policy, _ = load_model(policy_path, device=device)
    row = {"round": n, "stage": stage}
    for dim in args.stage[:n]:
        heldout = tokenized[dim][1][: args.eval_pairs]
        if dim not in cache:  # pi_0's held-out log-probs never change: score them once
            base, _ = load_model(base_path, device=device)
            cache[dim] = frozen_sequence_logps(base, heldout, average=args.average_logps, device=device)
        scores = evaluate.preference_accuracy(
            frozen_sequence_logps(policy, heldout, average=args.average_logps, device=device), cache[dim])
        row[f"acc/{dim}"], row[f"margin/{dim}"] = scores["accuracy"], scores["margin"]
    if world is not None:
        prompts = world.prompts["heldout"][: args.eval_prompts] * args.eval_samples
        responses = evaluate.sample_responses(policy, tokenizer, [p.text for p in prompts], seed=args.seed,
                                              temperature=args.eval_temperature, device=device)
        row.update(evaluate.world_scores(prompts, responses))
        row["sample"] = f"{prompts[0].text!r} -> {responses[0]!r}"
    return row


def main(argv=None):
    args = parse_args(argv)
    if args.logits == "full":
        # glibc: keep freed (N, V) logits for reuse. ~30% less CPU per step on the 2-core CPU
        # (616 vs 875 ms); no gain with "chunked" (886 vs 902 ms) and a higher peak RSS, so only
        # here. The measurement: spo_min/logps.py keep_freed_memory_in_process.
        keep_freed_memory_in_process()
    if not args.stage:
        raise TrainError("give at least one --stage, e.g. --stage helpful --stage harmless")
    dist = Distributed.from_env()
    device = dist.device(args.device)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        raise TrainError(f"cannot write to --out {args.out}: {err.strerror}") from None
    if not os.access(args.out, os.W_OK):
        raise TrainError(f"cannot write to --out {args.out}: permission denied")
    tokenizer = get_tokenizer()
    chain.resolve_hyperparameters(args)
    sources = stage_sources(args)  # an unknown stage fails now, not after the base SFT
    if args.resume:
        chain.check_chain_complete(args.out, args.stage)
    base_path = bootstrap_base(args, tokenizer, dist, device)
    block_size = read_config(base_path).block_size
    tokenized, world = load_stage_data(args, sources, tokenizer, block_size)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    cache, rows = {}, []
    if dist.is_main:
        rows.append(evaluate_round(args, 0, "base", base_path, base_path, tokenized, world, tokenizer, device, cache))
        evaluate.append_jsonl(metrics_path, rows[-1])
    round_chain = [{"path": base_path, **read_metadata(base_path)}]
    for n, stage in enumerate(args.stage, start=1):
        t0 = time.time()
        path = chain.round_path(args.out, n, stage)
        if args.resume and os.path.exists(path):
            chain.check_resumable(path, round_chain, stage, args)
            dist.print(f"[round {n}] {path} already complete; reusing it")
        else:
            path = train_round(args, n, stage, round_chain, tokenized[stage][0], dist, device)
        round_chain.append({"path": path, **read_metadata(path)})
        if dist.is_main:
            rows.append(evaluate_round(args, n, stage, path, base_path, tokenized, world, tokenizer, device, cache))
            rows[-1]["seconds"] = round(time.time() - t0, 1)
            evaluate.append_jsonl(metrics_path, rows[-1])
            print(evaluate.format_table(rows[-1:], evaluate_columns(rows)))
    if dist.is_main:
        print("\nResults (acc = held-out implicit-reward accuracy Delta log(pi_k/pi_0) > 0):")
        print(evaluate.format_table(rows, evaluate_columns(rows)))
        evaluate.plot_rounds(rows, os.path.join(args.out, "scores.png"))
        print(f"\ncheckpoints, {metrics_path} and scores.png are in {args.out}/")
    dist.close()


def evaluate_columns(rows):
    stages = dict.fromkeys(r["stage"] for r in rows[1:])  # round order, each dimension once
    keys = ["round", "stage"] + [f"acc/{s}" for s in stages]
    keys += [k for k in ("helpfulness", "harmlessness", "refusal_rate_benign", "compliance_rate_harmful")
             if any(k in r for r in rows)]
    return [(k, k.replace("_rate_", " ").replace("acc/", "acc ")) for k in keys]


if __name__ == "__main__":
    try:
        main()
    except (TrainError, CheckpointError, data.DataError, losses.HyperparameterError, losses.LossInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
