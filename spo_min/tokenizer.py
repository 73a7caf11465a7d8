"""The GPT-2 tokenizer (tiktoken "gpt2", 50257 ids), found offline.

tiktoken normally downloads the BPE ranks on first use. spo-min must run with no network, so
`get_tokenizer()` looks for the ranks in this order:

1. tiktoken's own cache (TIKTOKEN_CACHE_DIR, or its default temp dir): the ecosystem's normal
   path, used unchanged whenever it is already populated.
2. The file named by the environment variable SPO_MIN_GPT2_TIKTOKEN (any copy of gpt2.tiktoken).
3. `whisper/assets/gpt2.tiktoken`, shipped by `pip install --no-deps openai-whisper==20250625`.
   We locate it with importlib (whisper itself is never imported: it needs packages we skip).
4. tiktoken's normal download, which works where the network does.

Every file we read ourselves is checked against the sha256 that tiktoken pins for r50k_base
(the same ranks as "gpt2"), so a corrupted or different file can never change token ids.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import tiktoken

EOT_ID = 50256  # <|endoftext|>: appended to every response, used as padding
VOCAB_SIZE = 50257
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken caches each download under sha1(url); "gpt2" needs these two (vocab.bpe and
# encoder.json). When both are present, tiktoken.get_encoding("gpt2") loads offline.
_GPT2_CACHE_KEYS = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
# The regex that splits text before BPE (identical for gpt2 and r50k_base).
_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

HOW_TO_GET_RANKS = (
    "spo-min needs the GPT-2 BPE ranks (gpt2.tiktoken) and found none offline. Do one of:\n"
    "  pip install --no-deps openai-whisper==20250625   (ships whisper/assets/gpt2.tiktoken)\n"
    "  export SPO_MIN_GPT2_TIKTOKEN=/path/to/gpt2.tiktoken\n"
    "  or run once with network access so tiktoken fills its cache (TIKTOKEN_CACHE_DIR)."
)


class TokenizerError(RuntimeError):
    pass


def _tiktoken_cache_dir() -> str:
    # Mirrors tiktoken.load.read_file_cached, so we only call it when it will not download.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _tiktoken_cache_is_populated() -> bool:
    cache = _tiktoken_cache_dir()
    if not cache:
        return False
    have = lambda key: os.path.exists(os.path.join(cache, key))  # noqa: E731
    return all(have(k) for k in _GPT2_CACHE_KEYS)


def whisper_ranks_path() -> Path | None:
    """Path of whisper's bundled gpt2.tiktoken, without importing whisper."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "assets" / "gpt2.tiktoken"
        if path.is_file():
            return path
    return None


def encoding_from_ranks_file(path: str | os.PathLike) -> tiktoken.Encoding:
    """Build the GPT-2 encoding from a gpt2.tiktoken file, after checking its sha256."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_TIKTOKEN_SHA256:
        raise TokenizerError(
            f"{path}: sha256 {digest} is not the GPT-2 BPE ranks ({GPT2_TIKTOKEN_SHA256}). "
            "Use an unmodified gpt2.tiktoken.\n" + HOW_TO_GET_RANKS
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding: 50257 ids, <|endoftext|> = 50256. Never downloads if a local copy exists."""
    if _tiktoken_cache_is_populated():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:  # a corrupt cache: tiktoken then tries to download again; use our copies
            pass
    env_path = os.environ.get("SPO_MIN_GPT2_TIKTOKEN")
    if env_path:
        if not os.path.isfile(env_path):
            raise TokenizerError(f"SPO_MIN_GPT2_TIKTOKEN={env_path} is not a file.\n" + HOW_TO_GET_RANKS)
        return encoding_from_ranks_file(env_path)
    bundled = whisper_ranks_path()
    if bundled is not None:
        return encoding_from_ranks_file(bundled)
    try:  # the normal tiktoken path: downloads where a network exists
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # no network, proxy error, hash mismatch ...
        raise TokenizerError(f"{HOW_TO_GET_RANKS}\n(tiktoken's download failed: {err})") from None
