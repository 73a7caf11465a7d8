"""What a run trains on (spo_min/stages.py): the SFT corpus of its base, --sft-data.

DPO's recipe when no SFT model exists is to fine-tune on the preferred responses of the
preference data; with --data files and no --init that is the default, and the base records it.
"""

import json

import pytest

import train
from spo_min import data, runs, stages
from spo_min.checkpoint import read_metadata
from spo_min.model import GPTConfig
from spo_min.tokenizer import get_tokenizer

FAST = ["--model", "nano", "--sft-steps", "2", "--no-grad-check", "--eval-samples", "0", "--eval-pairs", "4",
        "--batch-size", "4", "--steps", "1", "--save-every", "1000"]


def write_pairs(path, n_prompts):
    rows = [{"prompt": f"\n\nHuman: Question {i}?\n\nAssistant:", "chosen": f" Answer {i}.", "rejected": f" No {i}."}
            for i in range(n_prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


pytestmark = pytest.mark.usefixtures("torch_backend")  # train.py's CPU path (tests/conftest.py)


def test_the_stages_corpus_is_their_training_pairs_preferred_responses(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", 60)
    args = train.parse_args(["--stage", "honest", "--data", f"honest={path}"])
    sources = stages.stage_sources(args)
    assert stages.sft_choice(args, sources) == "stages"  # the default once a stage comes from a file
    pairs, world = stages.load_stage_pairs(args, sources)
    examples, what = stages.sft_examples(args, "stages", pairs)
    train_pairs, heldout = pairs["honest"]
    assert world is None and len(heldout) == 3 and "held-out prompts never" in what
    assert examples == [(p.prompt, p.chosen) for p in train_pairs]
    assert not {p.prompt for p in heldout} & {prompt for prompt, _ in examples}  # held-out prompts never
    assert all(response.startswith(" Answer") for _, response in examples)  # preferred responses only
    # Without --data files the default stays the built-in world; --sft-data overrides either way.
    world_args = train.parse_args(["--stage", "helpful"])
    assert stages.sft_choice(world_args, stages.stage_sources(world_args)) == "world"
    args = train.parse_args(["--stage", "honest", "--data", f"honest={path}", "--sft-data", f"{path}:generic"])
    assert stages.sft_choice(args, sources) == (path, "generic")


def test_sft_data_is_refused_where_it_would_be_ignored_or_is_missing(tmp_path):
    args = train.parse_args(["--stage", "helpful", "--init", "x.safetensors", "--sft-data", "world"])
    with pytest.raises(stages.StageError, match="only a run that makes its own base uses it; this one starts from --init"):
        stages.sft_choice(args, {"helpful": "world"})
    args = train.parse_args(["--stage", "helpful", "--sft-data", str(tmp_path / "nope.jsonl")])
    with pytest.raises(runs.RunError, match="--sft-data .*nope.jsonl: no such file"):
        stages.sft_choice(args, {"helpful": "world"})


def test_two_bases_are_told_apart_and_never_reused_for_each_other(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", 60)
    run = ["--stage", "honest", "--data", f"honest={path}", *FAST]
    train.main([*run, "--out", str(tmp_path / "stages")])
    train.main([*run, "--sft-data", "world", "--out", str(tmp_path / "world")])
    meta_s = read_metadata(tmp_path / "stages" / "base.safetensors")
    meta_w = read_metadata(tmp_path / "world" / "base.safetensors")
    assert (meta_s["sft_data"], meta_w["sft_data"]) == ("stages", "world")
    # The stages base's fingerprint is that of the preferred responses of the training split,
    # tokenized here independently of train.py.
    args = train.parse_args(run)
    pairs, _ = stages.load_stage_pairs(args, stages.stage_sources(args))
    sft, _ = data.tokenize_sft([(p.prompt, p.chosen) for p in pairs["honest"][0]], get_tokenizer(),
                               GPTConfig.preset("nano").block_size)
    assert meta_s["data_fingerprint"] == data.fingerprint(sft) != meta_w["data_fingerprint"]
    # A base made one way is never reused for the other: the message names the flag.
    reuse = tmp_path / "reuse"
    reuse.mkdir()
    (reuse / "base.safetensors").write_bytes((tmp_path / "stages" / "base.safetensors").read_bytes())
    with pytest.raises(runs.RunError, match=r"sft_data='stages', this run has sft_data='world' \(set by --sft-data\)"):
        train.main([*run, "--sft-data", "world", "--out", str(reuse)])
