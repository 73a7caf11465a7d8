"""Preference data: loading real files, tokenizing, batching (the data path of design.md).

    file (HH-RLHF / PKU-SafeRLHF / generic jsonl)  --load_pairs-->     PreferencePair(prompt, chosen, rejected)
    PreferencePair  --tokenize_pairs-->  TokenizedPair(prompt_ids, chosen_ids, rejected_ids)
    [TokenizedPair] --collate_pairs-->   {"input_ids": (2B, T), "labels": (2B, T)}

Batch convention (shared with the model and the log-prob kernel): rows 0..B-1 are the chosen
responses, rows B..2B-1 the rejected ones, each row = prompt ids + response ids + EOT, right
padded with EOT. Labels are ALREADY SHIFTED: labels[b, t] = input_ids[b, t + 1] when that next
token belongs to the response (the EOT included), else -100. So position t scores the token the
model predicts there, and token_logprobs(model(input_ids), labels) summed over a row is
log pi(response | prompt) (E9). The last prompt position scores the first response token; no
position scores a prompt token.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from spo_min.tokenizer import EOT_ID

DIMENSIONS = ("helpful", "harmless")
FORMATS = ("auto", "hh", "pku", "generic")
ASSISTANT = "\n\nAssistant:"

# What each format's rows must hold (used in error messages too).
EXPECTED = {
    "hh": 'an object {"chosen": str, "rejected": str}, both whole "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues',
    "pku": 'an object {"prompt": str, "response_0": str, "response_1": str, '
           '"better_response_id": 0|1, "safer_response_id": 0|1}',
    "generic": 'an object {"prompt": str, "chosen": str, "rejected": str}',
}
PKU_LABEL = {"helpful": "better_response_id", "harmless": "safer_response_id"}
# The way past a bad row or an unlabelled PKU file, from Python (train.py says it with its flags).
SKIP_BAD_HINT = "or pass skip_bad=True to skip and count bad rows"
DIMENSION_HINT = f"pass dimension= one of {DIMENSIONS}"
GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """Bad data or a bad data option; the message names the file, the line and what was expected."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # the response preferred on this dimension (y_w)
    rejected: str  # y_l


# ----------------------------------------------------------------------------- loading

@dataclass
class LoadReport:
    path: str
    fmt: str
    dimension: str | None
    read: int = 0  # non-blank lines
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # data quirks, always dropped: reason -> count
    skipped: Counter = field(default_factory=Counter)  # bad rows skipped with skip_bad=True
    examples: list[str] = field(default_factory=list)  # the first few skip messages

    def __str__(self) -> str:
        def counts(c):
            return ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))
        dim = f", dimension {self.dimension}" if self.dimension else ""
        text = f"{self.path} ({self.fmt}{dim}): read {self.read}, kept {self.kept}"
        if self.dropped:
            text += f", dropped {sum(self.dropped.values())} ({counts(self.dropped)})"
        if self.skipped:
            text += f", skipped {sum(self.skipped.values())} bad rows ({counts(self.skipped)})"
        return text


class _BadRow(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of a .jsonl or .jsonl.gz file; decoding happens per line so a
    non-UTF-8 byte is reported with its line number. Gzip is told by the suffix or by the
    file's first two bytes, peeked without a second read, so a pipe (<(cat pairs.jsonl.gz)) works."""
    try:
        with open(path, "rb") as raw_file:
            is_gzip = path.endswith(".gz") or raw_file.peek(2)[:2] == GZIP_MAGIC
            with (gzip.GzipFile(fileobj=raw_file) if is_gzip else raw_file) as f:
                for number, raw in enumerate(f, start=1):
                    yield number, raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # BadGzipFile is an OSError: first
        raise DataError(f"{path}: not a readable gzip file ({err}); expected gzip-compressed JSON lines") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err}); expected a readable file") from None


def _field(row: dict, key: str, kind: type, fmt: str):
    if key not in row:
        raise _BadRow("missing field", f"missing key '{key}'; expected {EXPECTED[fmt]}")
    value = row[key]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value in (0, 1)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _BadRow("wrong type", f"key '{key}' is {type(value).__name__} {str(value)[:40]!r}; "
                                    f"expected {EXPECTED[fmt]}")
    return value


def _parse_hh(row: dict) -> PreferencePair | str:
    chosen, rejected = _field(row, "chosen", str, "hh"), _field(row, "rejected", str, "hh")
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise _BadRow("no assistant turn", f"'chosen' has no {ASSISTANT!r}; expected {EXPECTED['hh']}")
    prompt = chosen[: cut + len(ASSISTANT)]  # the prompt ends with "\n\nAssistant:"
    if not rejected.startswith(prompt):
        return "prefix differs"  # a quirk of the real files (README: 2 / 4 / 0 / 1 rows)
    if chosen == rejected:
        return "chosen == rejected"
    return PreferencePair(prompt, chosen[len(prompt):], rejected[len(prompt):])


def _parse_pku(row: dict, dimension: str) -> PreferencePair | str:
    prompt = _field(row, "prompt", str, "pku")
    responses = (_field(row, "response_0", str, "pku"), _field(row, "response_1", str, "pku"))
    better = _field(row, PKU_LABEL[dimension], int, "pku")
    if responses[0] == responses[1]:
        return "chosen == rejected"
    return PreferencePair(prompt, responses[better], responses[1 - better])


def _parse_generic(row: dict) -> PreferencePair | str:
    pair = PreferencePair(*(_field(row, k, str, "generic") for k in ("prompt", "chosen", "rejected")))
    return "chosen == rejected" if pair.chosen == pair.rejected else pair


def _sniff(row: dict) -> str | None:
    keys = set(row)
    if {"prompt", "response_0", "response_1"} <= keys:
        return "pku"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "generic"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    return None


def load_pairs(path, fmt: str = "auto", dimension: str | None = None,
               skip_bad: bool = False) -> tuple[list[PreferencePair], LoadReport]:
    """Read preference pairs from a JSON-lines file (.jsonl, or .jsonl.gz).

    fmt: "hh" (Anthropic HH-RLHF: the prompt is the chosen dialogue up to and including its last
         "\\n\\nAssistant:"; rows whose rejected dialogue does not share that prefix, or equal
         the chosen one, are dropped and counted), "pku" (PKU-SafeRLHF: dimension "helpful"
         reads better_response_id, "harmless" safer_response_id), "generic" ({prompt, chosen,
         rejected}), or "auto" (told apart by the keys of the first valid row).
    dimension: None or one of DIMENSIONS (required for pku, a label otherwise).
    skip_bad: a malformed row raises DataError (file, line, expected) unless this is True, in
         which case it is counted in report.skipped.
    Prompts and responses are returned exactly as stored (no stripping).
    """
    path = os.fspath(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format '{fmt}'; expected one of {FORMATS}")
    if dimension is not None and dimension not in DIMENSIONS:
        raise DataError(f"{path}: unknown dimension '{dimension}'; expected one of {DIMENSIONS}")
    if fmt == "pku" and dimension is None:
        raise DataError(f"{path}: PKU-SafeRLHF rows label two dimensions; {DIMENSION_HINT}")
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder; expected a .jsonl or .jsonl.gz file of preference pairs")
    if not os.path.exists(path):  # not isfile: a pipe is read once, like a file
        raise DataError(f"{path}: no such file; expected a .jsonl or .jsonl.gz file of preference pairs")
    report = LoadReport(path, fmt, dimension)
    pairs: list[PreferencePair] = []
    for number, raw in _lines(path):
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _BadRow("not utf-8", f"byte {raw[err.start:err.start + 1]!r} at column {err.start + 1} "
                                           "is not UTF-8; expected UTF-8 text") from None
            text = text.lstrip("\ufeff") if number == 1 else text  # tolerate a byte-order mark
            if not text.strip():
                continue  # blank lines (e.g. a trailing one) are not rows
            report.read += 1
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise _BadRow("bad json", f"invalid JSON ({err.msg} at column {err.colno}); "
                                          "expected one JSON object per line") from None
            except RecursionError:  # a line nested thousands of levels deep
                raise _BadRow("bad json", "JSON nested too deeply; expected one flat JSON object per line") from None
            if not isinstance(row, dict):
                raise _BadRow("bad json", f"a JSON {type(row).__name__}, not an object; expected one object per line")
            if report.fmt == "auto":
                sniffed = _sniff(row)
                if sniffed is None:
                    raise DataError(f"{path}:{number}: cannot tell the format from keys {sorted(row)}; expected "
                                    f"{EXPECTED['hh']}, or {EXPECTED['generic']}, or {EXPECTED['pku']}; "
                                    "or pass fmt=")
                if sniffed == "pku" and dimension is None:
                    raise DataError(f"{path}: looks like PKU-SafeRLHF, whose rows label two dimensions; "
                                    f"{DIMENSION_HINT}")
                report.fmt = sniffed
            if report.fmt == "hh":
                result = _parse_hh(row)
            elif report.fmt == "pku":
                result = _parse_pku(row, dimension)
            else:
                result = _parse_generic(row)
        except _BadRow as bad:
            message = f"{path}:{number}: {bad}"
            if not skip_bad:
                raise DataError(f"{message} (fix the row, {SKIP_BAD_HINT})") from None
            report.skipped[bad.reason] += 1
            if len(report.examples) < 5:
                report.examples.append(message)
            continue
        if isinstance(result, str):
            report.dropped[result] += 1
        else:
            pairs.append(result)
    report.kept = len(pairs)
    if report.read == 0:
        raise DataError(f"{path}: the file has no rows; expected JSON lines of preference pairs")
    if not pairs:
        raise DataError(f"{path}: no usable pairs ({report}); expected at least one valid row")
    return pairs, report


def split_by_prompt(pairs: Sequence, heldout_fraction: float = 0.05,
                    seed: int = 0) -> tuple[list, list]:
    """(train, heldout): every pair of a prompt lands on the same side, so held-out prompts are
    never seen in training. Deterministic in the seed; order within each side is preserved."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    prompts = sorted({p.prompt for p in pairs})
    random.Random(f"split {seed}").shuffle(prompts)
    held = set(prompts[: round(heldout_fraction * len(prompts))])
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


# ----------------------------------------------------------------------------- tokenizing

@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response ids + EOT
    rejected_ids: list[int]


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int]  # response ids + EOT


@dataclass
class TokenizeReport:
    total: int = 0
    kept: int = 0
    prompt_truncated: int = 0  # kept, with the prompt's start cut off
    dropped_too_long: int = 0  # a response (with EOT) longer than block_size - 1

    def __str__(self) -> str:
        return (f"{self.kept} of {self.total} kept, {self.prompt_truncated} prompts left-truncated, "
                f"{self.dropped_too_long} dropped (response longer than the block)")


def _fit(prompt_ids: list[int], longest_response: int, block_size: int,
         report: TokenizeReport) -> list[int] | None:
    """The prompt cut from the left so prompt + longest response <= block_size; None to drop.

    The response is kept whole (it is what the loss scores) and at least one prompt token must
    stay, because the first response token is predicted from the position before it.
    """
    room = block_size - longest_response
    if room < 1:
        report.dropped_too_long += 1
        return None
    if len(prompt_ids) > room:
        report.prompt_truncated += 1
        prompt_ids = prompt_ids[-room:]  # keep the end: "...\n\nAssistant:" stays next to the reply
    report.kept += 1
    return prompt_ids


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    # An empty prompt gets EOT as a start token: something must predict the first response token.
    return tokenizer.encode_ordinary(prompt) or [EOT_ID]


def _encode_response(tokenizer, response: str) -> list[int]:
    # encode_ordinary: the text "<|endoftext|>" inside data is plain text, never the special id.
    return tokenizer.encode_ordinary(response) + [EOT_ID]


def _check_block(block_size: int):
    if not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size must be an int >= 2 (one prompt token + EOT), got {block_size!r}")


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, block_size: int
                   ) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Prompt and responses tokenized SEPARATELY (no BPE merge across the boundary), EOT appended
    to each response; prompts left-truncated to fit, pairs with a too-long response dropped."""
    _check_block(block_size)
    report, out = TokenizeReport(total=len(pairs)), []
    for pair in pairs:
        chosen, rejected = _encode_response(tokenizer, pair.chosen), _encode_response(tokenizer, pair.rejected)
        prompt = _fit(_encode_prompt(tokenizer, pair.prompt), max(len(chosen), len(rejected)), block_size, report)
        if prompt is not None:
            out.append(TokenizedPair(prompt, chosen, rejected))
    return out, report


def tokenize_sft(examples: Sequence[tuple[str, str]], tokenizer, block_size: int
                 ) -> tuple[list[TokenizedExample], TokenizeReport]:
    """(prompt, response) examples, with the same rules as tokenize_pairs."""
    _check_block(block_size)
    report, out = TokenizeReport(total=len(examples)), []
    for prompt_text, response_text in examples:
        response = _encode_response(tokenizer, response_text)
        prompt = _fit(_encode_prompt(tokenizer, prompt_text), len(response), block_size, report)
        if prompt is not None:
            out.append(TokenizedExample(prompt, response))
    return out, report


# ----------------------------------------------------------------------------- batching

def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """rows of (prompt ids, response ids) -> right-padded input_ids and shifted labels."""
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        sequence = prompt + response
        input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        # Position t predicts token t + 1. The response occupies positions len(prompt) ..
        # len(sequence) - 1, so the positions that predict it are len(prompt) - 1 .. len(sequence) - 2.
        start = len(prompt) - 1
        labels[i, start : len(sequence) - 1] = torch.tensor(response, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def collate_pairs(items: Sequence[TokenizedPair], pad_id: int = EOT_ID) -> dict[str, torch.Tensor]:
    """{"input_ids": (2B, T), "labels": (2B, T)}: chosen rows first, then rejected rows."""
    if not items:
        raise DataError("collate_pairs got an empty list; expected at least one TokenizedPair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in items] + [(p.prompt_ids, p.rejected_ids) for p in items]
    return _collate(rows, pad_id)


def collate_sft(items: Sequence[TokenizedExample], pad_id: int = EOT_ID) -> dict[str, torch.Tensor]:
    """{"input_ids": (B, T), "labels": (B, T)} with the same conventions as collate_pairs."""
    if not items:
        raise DataError("collate_sft got an empty list; expected at least one TokenizedExample")
    return _collate([(e.prompt_ids, e.response_ids) for e in items], pad_id)


def fingerprint(items: Sequence) -> str:
    """sha256 (16 hex digits) of a list of pairs, tokenized pairs or examples, in order: recorded
    in checkpoints so a round can be matched to the exact data it saw."""
    h = hashlib.sha256()
    for item in items:
        values = item.__dict__.values() if hasattr(item, "__dict__") else item
        h.update(json.dumps(list(values), ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]
