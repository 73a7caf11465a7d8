"""GPT-2 tokenizer: known ids, unicode round trip, and every offline path of get_tokenizer()."""

import shutil
import socket

import pytest
import tiktoken
import tiktoken.registry

import spo_min.tokenizer as tok
from spo_min.tokenizer import EOT_ID, VOCAB_SIZE, TokenizerError, get_tokenizer

TEXT = "naïve café — 東京 🚀 <b>x</b>\n\ttabs  and   spaces, ünïcödé, العربية, 1234567"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, an empty tiktoken cache, no env override, and fresh caches around the test."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    empty = tmp_path / "tiktoken-cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    monkeypatch.delenv("SPO_MIN_GPT2_TIKTOKEN", raising=False)
    # tiktoken keeps every encoding it built in a process-wide dict: hide it for this test.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    get_tokenizer.cache_clear()
    yield empty
    get_tokenizer.cache_clear()


def bundled_ranks():
    path = tok.whisper_ranks_path()
    if path is None:
        pytest.skip("openai-whisper (which ships gpt2.tiktoken) is not installed: pip install --no-deps openai-whisper==20250625")
    return path


def test_known_ids_and_round_trip(offline):
    bundled_ranks()
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert enc.n_vocab == VOCAB_SIZE == 50257 and enc.eot_token == EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    ids = enc.encode(TEXT)
    assert max(ids) < EOT_ID and enc.decode(ids) == TEXT  # byte-level BPE: lossless on any text
    assert get_tokenizer() is enc  # built once per process


def test_ranks_from_env_var_match_bundled(offline, monkeypatch, tmp_path):
    bundled, copy = bundled_ranks(), tmp_path / "gpt2.tiktoken"
    shutil.copy(bundled, copy)
    monkeypatch.setattr(tok, "whisper_ranks_path", lambda: None)
    monkeypatch.setenv("SPO_MIN_GPT2_TIKTOKEN", str(copy))
    ids = get_tokenizer().encode(TEXT)
    assert ids == tok.encoding_from_ranks_file(bundled).encode(TEXT)
    assert get_tokenizer().encode("Hello world") == [15496, 995]


def test_tiktoken_cache_used_offline(offline, shared_data):
    # tiktoken's own cache, filled with the two gpt2 files (names = sha1 of their URLs); tiktoken
    # checks their sha256 itself. This is the path machines with a warm cache take.
    for key, name in zip(tok._GPT2_CACHE_KEYS, ("vocab.bpe", "encoder.json")):
        shutil.copy(shared_data / "tokenizer" / name, offline / key)
    enc = get_tokenizer()
    assert "gpt2" in tiktoken.registry.ENCODINGS  # built by tiktoken itself, not by us
    assert enc.encode("Hello world") == [15496, 995] and enc.decode(enc.encode(TEXT)) == TEXT


def test_no_ranks_anywhere_says_how_to_get_them(offline, monkeypatch):
    monkeypatch.setattr(tok, "whisper_ranks_path", lambda: None)
    with pytest.raises(TokenizerError) as err:
        get_tokenizer()
    message = str(err.value)
    assert "pip install --no-deps openai-whisper==20250625" in message
    assert "SPO_MIN_GPT2_TIKTOKEN" in message and "TIKTOKEN_CACHE_DIR" in message
    assert "download failed" in message


def test_wrong_ranks_file_fails_its_sha256(offline, monkeypatch, tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"SGVsbG8= 0\nd29ybGQ= 1\n")  # well-formed, but not GPT-2's ranks
    monkeypatch.setenv("SPO_MIN_GPT2_TIKTOKEN", str(bad))
    with pytest.raises(TokenizerError, match=r"gpt2\.tiktoken: sha256 [0-9a-f]{64} is not the GPT-2 BPE ranks"):
        get_tokenizer()


def test_env_var_pointing_nowhere(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("SPO_MIN_GPT2_TIKTOKEN", str(tmp_path / "missing.tiktoken"))
    with pytest.raises(TokenizerError, match=r"SPO_MIN_GPT2_TIKTOKEN=.*missing\.tiktoken is not a file"):
        get_tokenizer()


def test_garbage_in_tiktoken_cache_falls_back_to_local_ranks(offline):
    # A cache whose files fail tiktoken's sha256: tiktoken would try to download them again
    # (a ConnectionError offline); the bundled ranks are used instead.
    bundled_ranks()
    for key in tok._GPT2_CACHE_KEYS:
        (offline / key).write_bytes(b"garbage")
    assert get_tokenizer().encode("Hello world") == [15496, 995]
