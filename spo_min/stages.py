"""What a run trains on: each stage's pairs, and the SFT corpus of its base pi_0.

A stage's pairs come from the built-in world (the default) or from a file (`--data
STAGE=PATH[:FORMAT]`); either way they are loaded, split and tokenized once per run, before any
training, so bad data fails in seconds.

The base pi_0 (round 0, without --init) is a short SFT. What it is fine-tuned on matters: DPO
and SPO only move probability between responses the base already produces, so a base that never
saw the preference data's kind of text starts every round from the wrong place. DPO's recipe
when no SFT model exists (Rafailov et al. 2023, section 6) is to fine-tune on the preferred
responses of the preference data first. `--sft-data` makes the choice explicit:

    world   the built-in world's dialogues: every response style of every training prompt (the
            base must put mass on each style for the rounds to have something to move)
    stages  the preferred responses of the run's own stages' TRAINING pairs (held-out prompts
            never), the default when any --data file is given
    PATH    the preferred responses of a pairs file (PATH[:FORMAT], as --data; PKU files: the
            more helpful response)
"""

from __future__ import annotations

import functools

from spo_min import data, runs
from spo_min.world import DIMENSIONS, build_world

SFT_CHOICES = ("world", "stages")  # or a path


class StageError(ValueError):
    """A --stage, --data or --sft-data the run cannot use; printed as one line."""


def stage_sources(args):
    """Where each stage's pairs come from: "world", or (path, format). Checked before any training."""
    # With --branch, the earlier rounds' dimensions too: they are evaluated (train.main sets all_stages).
    stages = getattr(args, "all_stages", args.stage)
    files = runs.data_flags(args.data, stages, data.FORMATS)
    sources = {}
    for stage in stages:
        if stage not in files and stage not in DIMENSIONS:
            raise StageError(f"unknown stage '{stage}'{runs.closest(stage, DIMENSIONS)}: known dimensions are "
                             f"{sorted(DIMENSIONS)} (the built-in world's), or give its pairs as --data {stage}=PATH")
        sources[stage] = files.get(stage, "world")
    return sources


def make_world(args):
    """The built-in world of this run (its raters set by the --world-* options)."""
    return _world(args.seed, args.world_temperature, args.world_cautious, not args.world_no_redirect)


@functools.lru_cache(maxsize=4)
def _world(seed, temperature, cautious, redirect):
    # Deterministic and never modified: one process running several rounds (spo_min.compare)
    # builds it once instead of spending seconds on it per run.
    return build_world(seed=seed, temperature=temperature, cautious=cautious, redirect=redirect)


def _load_file(path, fmt, dimension):
    # A dimension of our own naming is just a label (only PKU files need helpful/harmless).
    try:
        return data.load_pairs(path, fmt=fmt, dimension=dimension if dimension in data.DIMENSIONS else None)
    except data.DataError as err:
        raise runs.data_error_for_flags(err) from None


def load_stage_pairs(args, sources):
    """{stage: (train pairs, held-out pairs)} as text, and the world (None when no stage uses it)."""
    world, pairs = None, {}
    for stage, source in sources.items():
        if source == "world":
            world = world or make_world(args)
            pairs[stage] = (world.pairs[stage]["train"], world.pairs[stage]["heldout"])
        else:
            loaded, report = _load_file(source[0], source[1], stage)
            print(f"[data] {stage}: {report}")
            pairs[stage] = data.split_by_prompt(loaded, heldout_fraction=0.05, seed=args.seed)
    return pairs, world


def tokenize_stages(pairs, tokenizer, block_size):
    """{stage: (tokenized train pairs, tokenized held-out pairs)}; a stage left with none is refused."""
    tokenized = {}
    for stage, (train, heldout) in pairs.items():
        train_tok, report = data.tokenize_pairs(train, tokenizer, block_size)
        heldout_tok, _ = data.tokenize_pairs(heldout, tokenizer, block_size)
        print(f"[data] {stage}: {len(train_tok)} train / {len(heldout_tok)} held-out pairs ({report})")
        if not train_tok:
            raise StageError(f"stage '{stage}' has no training pairs left after tokenization")
        tokenized[stage] = (train_tok, heldout_tok)
    return tokenized


def sft_choice(args, sources):
    """--sft-data checked before any work: "world", "stages" or (path, format); default: "stages"
    when any stage's pairs come from a file, else "world"."""
    if args.sft_data is None:
        return "stages" if any(source != "world" for source in sources.values()) else "world"
    if args.init or args.branch:
        raise StageError(f"--sft-data {args.sft_data}: only a run that makes its own base uses it; "
                         f"this one starts from --{'init' if args.init else 'branch'}")
    if args.sft_data in SFT_CHOICES:
        return args.sft_data
    return runs.data_source(f"--sft-data {args.sft_data}", args.sft_data, data.FORMATS)


def sft_examples(args, choice, pairs):
    """(prompt, response) examples of the base's SFT, and what they are in words (one line).

    pairs: load_stage_pairs' text pairs of the run's stages (their training split is used).
    """
    if choice == "world":
        return make_world(args).sft["train"], "the built-in world's dialogues, every response style"
    if choice == "stages":
        examples = [(p.prompt, p.chosen) for stage in args.stage for p in pairs[stage][0]]
        counts = ", ".join(f"{stage} {len(pairs[stage][0])}" for stage in args.stage)
        return examples, f"the preferred responses of the stages' training pairs ({counts}; held-out prompts never)"
    path, fmt = choice
    loaded, _ = _load_file(path, fmt, "helpful")
    return [(p.prompt, p.chosen) for p in loaded], f"the preferred responses of {path} ({len(loaded)} pairs)"


def sft_label(choice):
    """How a base records its SFT corpus (with the corpus's fingerprint beside it)."""
    return choice if choice in SFT_CHOICES else "file"
