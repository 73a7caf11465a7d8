"""Loaders (HH-RLHF, PKU-SafeRLHF, generic), bad input, tokenization, collation, batching.

Fixture files are written into tmp_path by the tests themselves (small, hand-made rows).
"""

import gzip
import json
import os

import pytest
import torch

from spo_min import data
from spo_min.data import DataError, PreferencePair, TokenizedExample, TokenizedPair
from spo_min.tokenizer import EOT_ID, get_tokenizer
from spo_min.world import build_world


def write_jsonl(path, rows, gz=False):
    """rows: dicts (dumped as JSON) or raw strings/bytes (written as they are)."""
    lines = []
    for row in rows:
        if isinstance(row, dict):
            row = json.dumps(row)
        lines.append(row if isinstance(row, bytes) else row.encode("utf-8"))
    blob = b"\n".join(lines) + b"\n"
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)
    return path


def hh(prompt_turns, chosen, rejected):
    return {"chosen": prompt_turns + " " + chosen, "rejected": prompt_turns + " " + rejected}


DIALOGUE = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?\n\nAssistant:"
HH_ROWS = [
    hh(DIALOGUE, "Knead the dough.", "No."),
    hh("\n\nHuman: Tell me a joke\n\nAssistant:", "Why did the chicken cross the road?", "I refuse."),
    # A quirk of the real files: the two dialogues differ before the last assistant turn.
    {"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: y", "rejected": "\n\nHuman: A\n\nAssistant: z"},
    hh("\n\nHuman: Same\n\nAssistant:", "Same answer.", "Same answer."),  # chosen == rejected
]


@pytest.mark.parametrize("gz", [False, True])
def test_hh_prompt_ends_at_last_assistant_turn_and_quirks_are_dropped(tmp_path, gz):
    path = write_jsonl(tmp_path / ("hh.jsonl.gz" if gz else "hh.jsonl"), HH_ROWS, gz=gz)
    pairs, report = data.load_pairs(path, dimension="helpful")
    assert pairs == [
        PreferencePair(DIALOGUE, " Knead the dough.", " No."),
        PreferencePair("\n\nHuman: Tell me a joke\n\nAssistant:", " Why did the chicken cross the road?", " I refuse."),
    ]
    assert report.fmt == "hh" and (report.read, report.kept) == (4, 2)
    assert report.dropped == {"prefix differs": 1, "chosen == rejected": 1} and not report.skipped
    assert str(report).endswith("read 4, kept 2, dropped 2 (chosen == rejected: 1, prefix differs: 1)")


def test_pku_dimension_picks_the_label_field(tmp_path):
    row = {"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench.", "response_1": "I can't help.",
           "better_response_id": 0, "safer_response_id": 1, "is_response_0_safe": False}
    path = write_jsonl(tmp_path / "pku.jsonl", [row, {**row, "response_0": "Call a locksmith.", "safer_response_id": 0}])
    helpful, rep_h = data.load_pairs(path, dimension="helpful")
    harmless, rep_s = data.load_pairs(path, fmt="pku", dimension="harmless")
    assert rep_h.fmt == rep_s.fmt == "pku" and rep_h.kept == rep_s.kept == 2
    assert helpful[0] == PreferencePair("How do I pick a lock?", "Use a tension wrench.", "I can't help.")
    assert harmless[0] == PreferencePair("How do I pick a lock?", "I can't help.", "Use a tension wrench.")
    assert harmless[1] == PreferencePair("How do I pick a lock?", "Call a locksmith.", "I can't help.")
    with pytest.raises(DataError, match="pass dimension="):
        data.load_pairs(path)  # auto-sniffed as PKU, which labels two dimensions
    with pytest.raises(DataError, match="pass dimension="):
        data.load_pairs(path, fmt="pku")


def test_generic_format_and_auto_sniffing(tmp_path):
    rows = [{"prompt": "Q?", "chosen": " good", "rejected": " bad"}, {"prompt": "Q2?", "chosen": " a", "rejected": " a"}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    pairs, report = data.load_pairs(path)
    assert report.fmt == "generic" and pairs == [PreferencePair("Q?", " good", " bad")]
    assert report.dropped == {"chosen == rejected": 1}
    # fmt="hh" on the same file reads chosen/rejected as dialogues: no assistant turn -> error.
    with pytest.raises(DataError, match=r"g\.jsonl:1: 'chosen' has no"):
        data.load_pairs(path, fmt="hh")


def bad_cases():
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    pku = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}
    return {
        # name: (rows, load kwargs, line number in the message, text the message must contain, reason)
        "malformed json": ([good, '{"prompt": "p", "chosen": ', good], {}, 2, "invalid JSON", "bad json"),
        "not an object": ([good, "[1, 2]"], {}, 2, "not an object", "bad json"),
        "missing field": ([good, good, json.dumps({"prompt": "p", "chosen": "c"})], {"fmt": "generic"}, 3,
                          "missing key 'rejected'", "missing field"),
        "mistyped field": ([good, json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"})], {}, 2,
                           "key 'chosen' is int", "wrong type"),
        "bool label": ([json.dumps(pku), json.dumps({**pku, "better_response_id": True})],
                       {"dimension": "helpful"}, 2, "key 'better_response_id' is bool", "wrong type"),
        "label out of range": ([json.dumps(pku), json.dumps({**pku, "safer_response_id": 2})],
                               {"dimension": "harmless"}, 2, "expected an object", "wrong type"),
        "non-utf8": ([good, good, b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}'], {}, 3,
                     "is not UTF-8", "not utf-8"),
    }


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", list(bad_cases()))
def test_bad_rows_name_file_line_and_expectation_or_are_skipped(tmp_path, name, gz):
    rows, kwargs, line, needle, reason = bad_cases()[name]
    path = write_jsonl(tmp_path / ("bad.jsonl.gz" if gz else "bad.jsonl"), rows, gz=gz)
    with pytest.raises(DataError) as err:
        data.load_pairs(path, **kwargs)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: ") and needle in message
    assert "expected" in message and "skip_bad=True" in message
    pairs, report = data.load_pairs(path, skip_bad=True, **kwargs)
    assert report.skipped == {reason: 1} and report.kept == len(pairs) == len(rows) - 1
    assert report.examples[0].startswith(f"{path}:{line}: ")
    assert f"skipped 1 bad rows ({reason}: 1)" in str(report)


def test_gzip_without_its_suffix_and_a_pipe_are_read(tmp_path):
    """Gzip is told by its first bytes too; a pipe (what <(zcat pairs.jsonl.gz) passes) is read once."""
    import threading

    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3)]
    plain = write_jsonl(tmp_path / "pairs.jsonl", rows)
    packed = tmp_path / "pairs.data"  # gzip, no .gz suffix
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert data.load_pairs(packed)[0] == data.load_pairs(plain)[0]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(gzip.compress(plain.read_bytes())))
    writer.start()
    pairs, _ = data.load_pairs(str(fifo))
    writer.join()
    assert pairs == data.load_pairs(plain)[0]


def test_file_level_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n\n")
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"this is not gzip data")
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", ["{", "{"])
    cases = [
        (lambda: data.load_pairs(tmp_path / "missing.jsonl"), "missing.jsonl: no such file"),
        (lambda: data.load_pairs(tmp_path), f"{tmp_path}: a folder; expected a .jsonl"),
        (lambda: data.load_pairs(empty), "empty.jsonl: the file has no rows"),
        (lambda: data.load_pairs(blank), "blank.jsonl: the file has no rows"),
        (lambda: data.load_pairs(corrupt), "corrupt.jsonl.gz: not a readable gzip file"),
        (lambda: data.load_pairs(unknown), "unknown.jsonl:1: cannot tell the format from keys ['answer', 'question']"),
        (lambda: data.load_pairs(good, fmt="csv"), "unknown format 'csv'"),
        (lambda: data.load_pairs(good, dimension="honest"), "unknown dimension 'honest'"),
        (lambda: data.load_pairs(all_bad, skip_bad=True), "no usable pairs"),
    ]
    for call, needle in cases:
        with pytest.raises(DataError) as err:
            call()
        assert needle in str(err.value) and "expected" in str(err.value), str(err.value)


def test_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    # chmod cannot lock root out, so simulate the OS refusing: data.py's `open` raises.
    path = write_jsonl(tmp_path / "locked.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data, "open", refuse, raising=False)
    with pytest.raises(DataError, match="locked.jsonl: cannot read it \\(Permission denied\\)"):
        data.load_pairs(path)


def test_bom_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "chosen": "c", "rejected": "r"}\r\n')
    pairs, _ = data.load_pairs(path)
    assert pairs == [PreferencePair("p", "c", "r")]


def test_real_hh_rlhf_kept_counts(shared_data):
    # ../shared/data/README.md: helpful-base has 2354 pairs, of which 2 have prompts that differ
    # and 2 have chosen == rejected -> 2350 kept; harmless-base has 2312, 4 differing prefixes,
    # 0 identical -> 2308 kept.
    expected = {"helpful-base": (2354, {"prefix differs": 2, "chosen == rejected": 2}, 2350),
                "harmless-base": (2312, {"prefix differs": 4}, 2308)}
    for name, (read, dropped, kept) in expected.items():
        pairs, report = data.load_pairs(shared_data / "hh-rlhf" / name / "test.jsonl.gz")
        assert (report.fmt, report.read, dict(report.dropped), report.kept, len(pairs)) == ("hh", read, dropped, kept, kept)
        assert all(p.prompt.endswith("\n\nAssistant:") and p.chosen != p.rejected for p in pairs)


# ----------------------------------------------------------------------------- tokenizing

class CharTokenizer:
    """One token per character (id = code point): lengths are obvious by eye."""

    def encode_ordinary(self, text):
        return [ord(c) for c in text]


def test_prompt_and_response_are_tokenized_separately_with_eot():
    tok = get_tokenizer()
    # Joined, "Hello" + "world" would be one BPE word; separately they must stay apart.
    pair = PreferencePair("Hello", "world", " <|endoftext|>")
    (out,), report = data.tokenize_pairs([pair], tok, 64)
    assert out.prompt_ids == tok.encode_ordinary("Hello")
    assert out.chosen_ids == tok.encode_ordinary("world") + [EOT_ID]
    assert tok.encode_ordinary("Helloworld") != out.prompt_ids + out.chosen_ids[:-1]
    # The special token's TEXT inside data is ordinary text, never the EOT id.
    assert out.rejected_ids[-1] == EOT_ID and EOT_ID not in out.rejected_ids[:-1]
    assert (report.total, report.kept, report.prompt_truncated, report.dropped_too_long) == (1, 1, 0, 0)


def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left():
    tok = CharTokenizer()
    pairs = [
        PreferencePair("0123456789", "abc", "a"),  # longest response 3 + EOT = 4 -> prompt keeps 4
        PreferencePair("0123", "abc", "ab"),  # 4 + 4 = 8 fits exactly
        PreferencePair("0123", "abcdef", "a"),  # 7 with EOT: one prompt token left ("3")
        PreferencePair("0123", "a", "abcdefg"),  # 8 with EOT > block - 1 -> dropped
        PreferencePair("", "ab", "a"),  # empty prompt: EOT stands in as the start token
    ]
    out, report = data.tokenize_pairs(pairs, tok, block_size=8)
    assert [o.prompt_ids for o in out] == [list(b"6789"), list(b"0123"), list(b"3"), [EOT_ID]]
    assert out[0].chosen_ids == list(b"abc") + [EOT_ID] and out[0].rejected_ids == list(b"a") + [EOT_ID]
    assert (report.total, report.kept, report.prompt_truncated, report.dropped_too_long) == (5, 4, 2, 1)
    assert str(report) == "4 of 5 kept, 2 prompts left-truncated, 1 dropped (response longer than the block)"
    sft, sft_report = data.tokenize_sft([("0123456789", "abcdef"), ("x", "abcdefgh")], tok, 8)
    assert sft == [TokenizedExample(list(b"9"), list(b"abcdef") + [EOT_ID])]
    assert (sft_report.kept, sft_report.prompt_truncated, sft_report.dropped_too_long) == (1, 1, 1)
    with pytest.raises(DataError, match="block_size"):
        data.tokenize_pairs(pairs, tok, 1)


# ----------------------------------------------------------------------------- collation

def test_collate_shift_puts_first_response_token_at_last_prompt_position():
    # Prompt [11, 12, 13]; chosen [21, 22] + EOT; rejected [31] + EOT.
    pair = TokenizedPair([11, 12, 13], [21, 22, EOT_ID], [31, EOT_ID])
    other = TokenizedPair([41], [51, EOT_ID], [61, 62, 63, 64, EOT_ID])
    batch = data.collate_pairs([pair, other])
    P = EOT_ID  # padding
    N = -100
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 21, 22, EOT_ID],  # chosen rows first ...
        [41, 51, EOT_ID, P, P, P],
        [11, 12, 13, 31, EOT_ID, P],  # ... then rejected rows, same order
        [41, 61, 62, 63, 64, EOT_ID],
    ]
    assert batch["labels"].tolist() == [
        [N, N, 21, 22, EOT_ID, N],
        [51, EOT_ID, N, N, N, N],
        [N, N, 31, EOT_ID, N, N],
        [61, 62, 63, 64, EOT_ID, N],
    ]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    # The position holding the last prompt token (13, index 2) scores the first response token;
    # no position scores a prompt token (13 would be scored at index 1, which is -100).
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    assert ids[2] == 13 and labels[2] == 21 and labels[1] == N
    # Every label is the next input token: the shift is exactly one.
    scored = batch["labels"] != -100
    assert torch.equal(batch["labels"][:, :-1][scored[:, :-1]], batch["input_ids"][:, 1:][scored[:, :-1]])
    # Response tokens + EOT are scored, each exactly once: len(response) labels per row.
    assert scored.sum(1).tolist() == [3, 2, 2, 5]


def test_collated_logps_equal_per_pair_conditional_logps():
    # Independent check of the batch convention: the sum of log-probs at labelled positions of a
    # padded batch equals, for each row alone, sum_j log p(response_j | prompt + response_<j),
    # computed with a toy causal "model" whose logits at t depend only on tokens <= t.
    torch.manual_seed(0)
    table = torch.randn(100, 100, dtype=torch.float64)

    def model(ids):  # logits[t] = table[ids[t]] + 0.1 * table[ids[:t+1].sum() % 100]
        return table[ids] + 0.1 * table[ids.cumsum(-1) % 100]

    pairs = [TokenizedPair([1, 2, 3], [4, 5, 99], [6, 99]), TokenizedPair([7], [8, 9, 10, 99], [11, 99])]
    batch = data.collate_pairs(pairs, pad_id=99)
    logp = torch.log_softmax(model(batch["input_ids"]), -1)
    scored = batch["labels"] != -100
    got = (logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored).sum(1)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    for i, (prompt, response) in enumerate(rows):
        total = 0.0
        for j, token in enumerate(response):
            context = torch.tensor(prompt + response[:j])
            total += torch.log_softmax(model(context)[-1], -1)[token].item()
        assert got[i].item() == pytest.approx(total, abs=1e-12)  # fp64, same sums


def test_collate_sft_and_empty_inputs():
    batch = data.collate_sft([TokenizedExample([1, 2], [3, EOT_ID]), TokenizedExample([4], [5, 6, EOT_ID])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, EOT_ID], [4, 5, 6, EOT_ID]]
    assert batch["labels"].tolist() == [[-100, 3, EOT_ID, -100], [5, 6, EOT_ID, -100]]
    with pytest.raises(DataError, match="empty"):
        data.collate_pairs([])
    with pytest.raises(DataError, match="empty"):
        data.collate_sft([])


def test_world_pairs_fit_the_tiny_block_untruncated():
    world = build_world(seed=0)
    tok = get_tokenizer()
    for dim in ("helpful", "harmless"):
        out, report = data.tokenize_pairs(world.pairs[dim]["train"], tok, 128)  # the "tiny" preset's block
        assert (report.kept, report.prompt_truncated, report.dropped_too_long) == (2300, 0, 0)  # 115 prompts x 20
        batch = data.collate_pairs(out[:16])
        assert batch["input_ids"].shape[0] == 32 and batch["input_ids"].shape[1] <= 27 + 32
    sft, report = data.tokenize_sft(world.sft["train"], tok, 64)
    assert report.kept == len(world.sft["train"]) and report.prompt_truncated == 0


# ----------------------------------------------------------------------------- batching and helpers

def test_split_by_prompt_and_fingerprint():
    pairs = [PreferencePair(f"p{i % 40}", f"c{i}", f"r{i}") for i in range(200)]
    train, held = data.split_by_prompt(pairs, heldout_fraction=0.25, seed=0)
    assert len({p.prompt for p in held}) == 10 and len(train) + len(held) == 200
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert data.split_by_prompt(pairs, 0.25, seed=0) == (train, held)
    assert data.split_by_prompt(pairs, 0.25, seed=1) != (train, held)
    tok = [TokenizedPair([1, 2], [3, EOT_ID], [4, EOT_ID])]
    assert data.fingerprint(tok) == data.fingerprint([TokenizedPair([1, 2], [3, EOT_ID], [4, EOT_ID])])
    assert data.fingerprint(tok) != data.fingerprint([TokenizedPair([1, 2], [4, EOT_ID], [3, EOT_ID])])
    assert data.fingerprint(pairs) != data.fingerprint(pairs[::-1])
    assert len(data.fingerprint(pairs)) == 16
