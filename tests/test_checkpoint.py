"""Checkpoint I/O: our GPT against transformers' GPT2LMHeadModel, round trips, bad files.

Tolerance for logits vs transformers: max |diff| <= 1e-5 in fp32. Both sides compute the same
function with the same fp32 weights; they differ only in operation order (GELU formula, fused
vs unfused attention, matmul blocking), i.e. in rounding: ~1e-7 relative per op, ~1e-6 after a
few layers at logits of order 1. A real mistake (a missing transpose, a swapped bias, a wrong
head split, an off-by-one position) changes logits by 0.1 or more.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from gpt2_oracle import hf_config, hf_logits, make_hf_gpt2, randomized_gpt, read_tensors, save_hf
from safetensors.torch import save_file

import spo_min.checkpoint as checkpoint
from spo_min.checkpoint import CheckpointError, atomic_write, load_model, read_config, read_metadata, save_model
from spo_min.model import GPT, GPTConfig

TOL = 1e-5  # see the module docstring

# (n_embd, n_layer, n_head, n_positions, vocab_size)
PLAIN = (64, 2, 4, 32, 211)
ODD = (48, 3, 3, 37, 97)  # 16-dim heads, 3 of them, and an odd context length


def random_ids(vocab_size, shape, seed=0):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))




@pytest.fixture(scope="module")
def odd_hf(tmp_path_factory):
    """The odd-sized random HF model and its save_pretrained folder (with config.json)."""
    model = make_hf_gpt2(*ODD, seed=3)
    directory = tmp_path_factory.mktemp("odd_hf")
    return model, save_hf(model, directory)


# --------------------------------------------------------------------- logits vs transformers


@pytest.mark.parametrize("sizes", [PLAIN, ODD], ids=["plain", "odd"])
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "bare"])
def test_logits_match_transformers(tmp_path, sizes, prefix):
    n_embd, n_layer, n_head, n_positions, vocab_size = sizes
    hf = make_hf_gpt2(*sizes, seed=1)
    if prefix:  # save_pretrained's own file; n_head comes from the config.json beside it
        path = save_hf(hf, tmp_path, prefix=True)
        model, metadata = load_model(path)
    else:  # bare keys, file alone: n_head must be given
        path = save_hf(hf, tmp_path, prefix=False, config_json=False)
        assert not any(k.startswith("transformer.") for k in read_tensors(path)[0])
        model, metadata = load_model(path, n_head=n_head)
    assert metadata == {}
    expected = GPTConfig(block_size=n_positions, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    assert model.config == expected and read_config(path, n_head=None if prefix else n_head) == expected
    idx = random_ids(vocab_size, (3, n_positions))  # full context: every position embedding used
    ours, theirs = model(idx), hf_logits(hf, idx)
    assert theirs.std() > 0.3  # logits of order 1, so TOL is a tight relative bound too
    assert (ours - theirs).abs().max().item() <= TOL


def test_n_head_default_rule_warns_and_matches(tmp_path):
    # 128-wide with two 64-dim heads: GPT-2's head size, the rule used when nothing records n_head.
    hf = make_hf_gpt2(128, 1, 2, 16, 97, seed=2)
    path = save_hf(hf, tmp_path, prefix=False, config_json=False)
    with pytest.warns(UserWarning, match="assuming GPT-2's 64-dim heads, n_head=2"):
        model, _ = load_model(path)
    idx = random_ids(97, (2, 16))
    assert (model(idx) - hf_logits(hf, idx)).abs().max().item() <= TOL


def test_n_head_unknowable_is_a_clear_error(tmp_path, odd_hf):
    hf, _ = odd_hf
    path = save_hf(hf, tmp_path, prefix=False, config_json=False)
    with pytest.raises(CheckpointError, match=r"cannot tell n_head .* pass load_model\(\.\.\., n_head=\.\.\.\)"):
        load_model(path)


def test_hf_legacy_mask_buffers_ignored_and_tied_lm_head_accepted(tmp_path, odd_hf):
    hf, hf_path = odd_hf
    tensors, metadata = read_tensors(hf_path)
    n = ODD[3]
    for i in range(ODD[1]):  # what older transformers versions saved: uint8 mask + a float scalar
        tensors[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8))[None, None]
        tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata=metadata)
    model, _ = load_model(path, n_head=3)
    idx = random_ids(ODD[4], (2, n))
    assert (model(idx) - hf_logits(hf, idx)).abs().max().item() <= TOL


# --------------------------------------------------------------------------- round trips


def test_hf_layout_loads_in_transformers_unchanged(tmp_path):
    import transformers

    n_embd, n_layer, n_head, n_positions, vocab_size = ODD
    config = GPTConfig(block_size=n_positions, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    ours = randomized_gpt(config, seed=4, scale=0.1)
    save_model(ours, tmp_path / "model.safetensors", metadata={"round": 1}, layout="hf")
    hf_config(*ODD).save_pretrained(tmp_path)  # config.json only

    # Same key names as transformers' own save (which omits the tied lm_head).
    reference_dir = tmp_path / "reference"
    reference_keys = set(read_tensors(save_hf(make_hf_gpt2(*ODD), reference_dir))[0])
    assert set(read_tensors(tmp_path / "model.safetensors")[0]) == reference_keys

    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    idx = random_ids(vocab_size, (3, n_positions))
    assert (ours(idx) - hf_logits(hf, idx)).abs().max().item() <= TOL

    # and our loader reads the hf layout back bit-exactly, metadata included
    back, metadata = load_model(tmp_path / "model.safetensors")
    assert metadata == {"round": 1}
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("bias", [True, False])
def test_own_layout_round_trip_is_bit_exact(tmp_path, bias):
    config = GPTConfig(block_size=24, vocab_size=101, n_layer=2, n_head=2, n_embd=32, bias=bias, dropout=0.1)
    model = randomized_gpt(config, seed=5, scale=0.1)
    metadata = {
        "dimension": "harmless",
        "beta": 0.1,
        "lambdas": [[], [0.5]],
        "parent": "runs/round1.safetensors",
        "data": {"sha256": "ab" * 32, "pairs": 2312},
        "note": None,
    }
    path = tmp_path / "ckpt.safetensors"
    save_model(model, path, metadata=metadata)
    back, got = load_model(path)
    assert got == metadata and read_metadata(path) == metadata
    assert back.config == config and read_config(path) == config
    assert list(back.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert back.state_dict()[k].dtype == torch.float32 and torch.equal(back.state_dict()[k], v), k
    idx = random_ids(101, (2, 24))
    assert torch.equal(back(idx), model(idx))
    assert not back.training  # loaded models come back in eval mode


def test_stored_dtype_kept_when_asked(tmp_path):
    model = randomized_gpt(GPTConfig.preset("nano", vocab_size=53), seed=6, scale=0.1).to(torch.bfloat16)
    save_model(model, tmp_path / "bf16.safetensors")
    back, _ = load_model(tmp_path / "bf16.safetensors", dtype=None)
    for k, v in model.state_dict().items():
        assert back.state_dict()[k].dtype == torch.bfloat16 and torch.equal(back.state_dict()[k], v), k
    up, _ = load_model(tmp_path / "bf16.safetensors")  # default: float32, an exact upcast
    assert torch.equal(up.transformer.wte.weight, model.transformer.wte.weight.float())


# ------------------------------------------------------------------------------ bad files


def write(path, tensors, metadata=None):
    save_file(tensors, path, metadata=metadata)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load_model(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is a text file, not weights\n", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"],
    ids=["empty", "text", "bad-header"],
)
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        load_model(path)


def test_torch_pickle_is_not_safetensors(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"wte.weight": torch.zeros(3, 2)}, path)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a safetensors file.*safetensors\.torch\.save_file"):
        load_model(path)


@pytest.mark.parametrize("keep", [-100, 20], ids=["data-cut", "header-cut"])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "model.safetensors"
    save_model(GPT(GPTConfig.preset("nano", vocab_size=53), seed=0), path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: .*cut short"):
        load_model(path)


def test_missing_key(tmp_path, odd_hf):
    tensors, metadata = read_tensors(odd_hf[1])
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    path = write(tmp_path / "model.safetensors", tensors, metadata)
    with pytest.raises(CheckpointError, match=r"missing keys 'transformer\.h\.1\.mlp\.c_fc\.bias'\. Expected"):
        load_model(path, n_head=3)


def test_missing_key_in_own_layout(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_model(GPT(GPTConfig.preset("nano", vocab_size=53), seed=0), path)
    tensors, metadata = read_tensors(path)
    del tensors["transformer.ln_f.bias"]
    write(path, tensors, metadata)
    with pytest.raises(CheckpointError, match=r"missing keys 'transformer\.ln_f\.bias'.*layout 'spo'"):
        load_model(path)


def test_unexpected_key(tmp_path, odd_hf):
    tensors, metadata = read_tensors(odd_hf[1])
    tensors["transformer.h.0.attn.rotary.weight"] = torch.zeros(4)
    path = write(tmp_path / "model.safetensors", tensors, metadata)
    with pytest.raises(CheckpointError, match=r"unexpected keys 'transformer\.h\.0\.attn\.rotary\.weight'"):
        load_model(path, n_head=3)


def test_wrong_shape(tmp_path, odd_hf):
    # An HF file whose c_attn was saved in nn.Linear orientation [out, in] instead of Conv1D's [in, out].
    tensors, metadata = read_tensors(odd_hf[1])
    key = "transformer.h.2.attn.c_attn.weight"
    tensors[key] = tensors[key].t().contiguous()
    path = write(tmp_path / "model.safetensors", tensors, metadata)
    with pytest.raises(CheckpointError, match=rf"key '{key}': expected shape \[48, 144\], found \[144, 48\]"):
        load_model(path, n_head=3)


def test_non_float_dtype(tmp_path, odd_hf):
    tensors, metadata = read_tensors(odd_hf[1])
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].to(torch.int64)
    path = write(tmp_path / "model.safetensors", tensors, metadata)
    with pytest.raises(CheckpointError, match=r"key 'transformer\.wpe\.weight' has dtype I64; .* floating point"):
        load_model(path, n_head=3)


def test_untied_lm_head_rejected(tmp_path, odd_hf):
    tensors, metadata = read_tensors(odd_hf[1])
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    path = write(tmp_path / "model.safetensors", tensors, metadata)
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' differs from 'transformer\.wte\.weight'"):
        load_model(path, n_head=3)


def test_config_json_of_another_model_rejected(tmp_path, odd_hf):
    tensors, metadata = read_tensors(odd_hf[1])
    write(tmp_path / "model.safetensors", tensors, metadata)
    hf_config(64, 3, 4, 37, 97).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json: n_embd=64 but the weights in model\.safetensors have n_embd=48"):
        load_model(tmp_path / "model.safetensors")


def test_bad_save_arguments_write_nothing(tmp_path):
    model = GPT(GPTConfig.preset("nano", vocab_size=53), seed=0)
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(CheckpointError, match="metadata is not JSON-serialisable"):
        save_model(model, path, metadata={"tensor": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"layout must be one of \('spo', 'hf'\), got 'pt'"):
        save_model(model, path, layout="pt")
    with pytest.raises(CheckpointError, match="layout='hf' needs bias=True"):
        save_model(GPT(GPTConfig.preset("nano", vocab_size=53, bias=False)), path, layout="hf")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- atomicity


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "out.bin"

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(CheckpointError, match=r"cannot write .*out\.bin: disk full \(.* MB free\)"):
        atomic_write(target, half_then_fail)
    assert list((tmp_path / "sub").iterdir()) == []

    atomic_write(target, lambda tmp: pathlib.Path(tmp).write_bytes(b"complete"))
    assert target.read_bytes() == b"complete" and os.listdir(tmp_path / "sub") == ["out.bin"]


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_model(GPT(GPTConfig.preset("nano", vocab_size=53), seed=0), path, metadata={"round": 1})
    before = path.read_bytes()

    def crash_midway(filename, tensors, metadata):  # a write that dies after some bytes
        with open(filename, "wb") as f:
            f.write(before[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_safetensors", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_model(GPT(GPTConfig.preset("nano", vocab_size=53), seed=1), path, metadata={"round": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(path)[1] == {"round": 1}


def test_header_metadata_is_json_strings(tmp_path):
    # The header's __metadata__ must be str -> str; config and metadata are JSON inside it.
    path = tmp_path / "ckpt.safetensors"
    config = GPTConfig.preset("nano", vocab_size=53)
    save_model(GPT(config, seed=0), path, metadata={"beta": 0.1})
    _, header = read_tensors(path)
    assert json.loads(header["spo_min.config"]) == config.to_dict()
    assert json.loads(header["spo_min.metadata"]) == {"beta": 0.1}
    assert header["spo_min.layout"] == "spo" and header["spo_min.format"] == checkpoint.FORMAT_TAG


def test_same_weights_give_the_same_bytes_in_any_process(tmp_path):
    """The header is written in a fixed order: the same model and metadata, saved here and in a
    fresh process, give byte-identical files (safetensors' own writer ordered "__metadata__" by a
    per-process hash seed). The file is also what safetensors reads back, key for key."""
    from safetensors.torch import load_file

    model = GPT(GPTConfig.preset("nano", vocab_size=53), seed=0)
    meta = {"kind": "round", "round": 1, "beta": 0.1, "lambdas": [0.5], "parent": "base.safetensors"}
    save_model(model, tmp_path / "a.safetensors", metadata=meta)
    script = ("import sys; from spo_min.checkpoint import save_model; from spo_min.model import GPT, GPTConfig; "
              "save_model(GPT(GPTConfig.preset('nano', vocab_size=53), seed=0), sys.argv[1], "
              f"metadata={meta!r})")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "b.safetensors")], check=True, timeout=120)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    _, header = checkpoint.read_header(tmp_path / "a.safetensors")  # in file order (safe_open's is not)
    assert list(header) == ["format", "spo_min.format", "spo_min.layout", "spo_min.config", "spo_min.metadata"]
    loaded = load_file(tmp_path / "a.safetensors")
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_model(GPT(GPTConfig.preset("nano", vocab_size=53), seed=0), tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_padded_vocabulary_is_cut_to_the_tokenizer(tmp_path):
    """A nanoGPT-style padded vocabulary (50304 rows): the real tokens' logits are the file's, the
    padding rows are gone, so they can be neither sampled nor part of a softmax."""
    model = GPT(GPTConfig.preset("nano", vocab_size=50304), seed=0)
    save_model(model, tmp_path / "padded.safetensors")
    cut, _ = load_model(tmp_path / "padded.safetensors")
    kept, _ = load_model(tmp_path / "padded.safetensors", vocab_size=None)
    assert cut.config.vocab_size == 50257 and kept.config.vocab_size == 50304
    ids = random_ids(50257, (2, 9))
    with torch.no_grad():
        assert torch.equal(cut(ids), kept(ids)[..., :50257])  # same numbers, the padding columns dropped


def raw_safetensors(path, header):
    """A file with exactly this JSON header (bytes or dict) and 16 data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    return path


F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, needle", [
    (b"{" + b'"a":' * 1 + b"[" * 200_000 + b"]" * 200_000 + b"}", "the header is nested too deeply"),
    ({"w": {**F32, "data_offsets": "0-16"}}, "corrupt safetensors header entry for key 'w': expected a dtype"),
    ({"w": {**F32, "shape": "2x2"}}, "corrupt safetensors header entry for key 'w': expected a dtype"),
    ({"w": {**F32, "data_offsets": [16, 0]}}, "corrupt safetensors header entry for key 'w'"),
    ({"w": {**F32, "shape": [3, 2]}}, "key 'w' (F32 [3, 2]) needs 24 bytes, its data_offsets give 16"),
    ({"a": {**F32, "shape": [2], "data_offsets": [0, 8]}, "b": {**F32, "shape": [2], "data_offsets": [4, 12]}},
     "key 'b' starts at data byte 4, expected 8 (tensors overlap or leave a gap)"),
    ({"w": F32, "__metadata__": ["not", "a", "dict"]}, "'__metadata__' must map strings to strings"),
    ({"w": F32, "__metadata__": {"spo_min.format": "spo-min-gpt2/1", "spo_min.layout": "spo",
                                 "spo_min.config": "{}", "spo_min.metadata": "[1, 2]"}},
     "corrupt spo-min metadata in the header"),
], ids=["deep", "offsets-type", "shape-type", "offsets-reversed", "size", "overlap", "metadata-list",
        "user-metadata-list"])
def test_hostile_headers_give_one_clear_error(tmp_path, header, needle):
    path = raw_safetensors(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert needle in str(err.value) and "bad.safetensors" in str(err.value)


def test_hf_config_json_that_is_not_an_object(tmp_path, odd_hf):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(odd_hf[1], folder / "model.safetensors")
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match=r"config\.json: a JSON list; expected an object"):
        load_model(folder / "model.safetensors")


def test_atomic_write_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced = []  # what each fsync was called on, in order
    real_fsync = os.fsync

    def record(fd):
        synced.append("folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", record)
    atomic_write(tmp_path / "x.bin", lambda tmp: pathlib.Path(tmp).write_bytes(b"data"))
    assert synced == ["file", "folder"]  # data on disk before the rename, the rename after it
