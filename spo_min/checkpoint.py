"""Checkpoints: GPT weights, their config and free-form metadata in one safetensors file.

A safetensors file is  [8-byte little-endian header length N][N bytes of JSON header][raw data].
The header maps each tensor name to {"dtype", "shape", "data_offsets"} and may hold
"__metadata__", a str -> str dict. We put JSON strings there:

    "spo_min.format"    FORMAT_TAG, marks files written by save_model
    "spo_min.layout"    "spo" (nn.Linear weights [out, in]) or "hf" (Conv1D weights [in, out])
    "spo_min.config"    GPTConfig.to_dict() as JSON
    "spo_min.metadata"  the caller's metadata as JSON (round, beta, lambdas, parent checkpoint ...)

so a chain of SPO policies pi_0 .. pi_{n-1} can be rebuilt and checked from the files alone.

load_model also reads Hugging Face GPT-2 files (e.g. the real 124M weights): keys with or without
the "transformer." prefix, Conv1D weights stored transposed, no lm_head (tied to wte), and the
causal-mask buffers attn.bias / attn.masked_bias, which are not weights and are skipped.
Their config is inferred from tensor shapes, except n_head, which no shape reveals.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from spo_min.model import GPT, GPTConfig, ModelError
from spo_min.tokenizer import VOCAB_SIZE

FORMAT_TAG = "spo-min-gpt2/1"
LAYOUTS = ("spo", "hf")
_KEY_FORMAT, _KEY_LAYOUT = "spo_min.format", "spo_min.layout"
_KEY_CONFIG, _KEY_METADATA = "spo_min.config", "spo_min.metadata"

_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# HF's Conv1D stores these four weights as [in, out]; our nn.Linear stores [out, in].
_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# HF GPT-2 files may carry the causal mask as buffers: constants, not weights (often uint8/bool).
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_TAG = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8"}
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a GPT-2 model, or a save that cannot happen."""


# ----------------------------------------------------------------------------------- writing


def atomic_write(path, write_fn, nbytes: int | None = None) -> None:
    """Call write_fn(tmp_path) on a temp file in path's folder, then rename it to path.

    os.replace is atomic within one filesystem: readers see the old file or the complete new
    one, never half a checkpoint. If write_fn fails, the temp file is removed, path is
    untouched, and the error (a full disk, most often) becomes a CheckpointError naming the
    path and the free space (nbytes: the size the file needs, when the caller knows it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_fn(str(tmp))
        with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 1e6
        need = "" if nbytes is None else f", {nbytes / 1e6:.1f} MB needed"
        raise CheckpointError(f"cannot write {path}: {err} ({free:.1f} MB free{need})") from None
    except BaseException:  # KeyboardInterrupt and the like: clean up, then let it through
        tmp.unlink(missing_ok=True)
        raise
    # The rename lives in the folder's entry table: fsync the folder so it survives a power cut.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file (the format at the top of this module) in a fixed byte order.

    safetensors.torch.save_file keeps "__metadata__" in a hash map whose order changes from
    process to process, so the same weights gave files with different sha256 (and it created
    them with mode 0600). Here the same tensors and metadata always give the same bytes:
    metadata keys in the caller's order, tensors by decreasing item size then name (as
    safetensors does: every tensor stays aligned), the header padded with spaces to 8 bytes.
    The file is created with open(), so it honours the umask like any other file.
    """
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_TAG[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:  # little-endian raw bytes, as the tensor holds them (x86, ARM)
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_model(model: GPT, path, metadata: dict | None = None, layout: str = "spo") -> None:
    """Write model's weights, config and metadata (JSON-serialisable dict) to path, atomically.

    layout="spo": our parameter names and orientation. layout="hf": the keys and Conv1D
    orientation of transformers' GPT2LMHeadModel, which loads the file unchanged (with a
    config.json beside it); load_model reads both.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"save_model: layout must be one of {LAYOUTS}, got {layout!r}")
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if not isinstance(model, GPT):
        raise CheckpointError(f"save_model: expected a spo_min GPT, got {type(model).__name__}")
    if layout == "hf" and not model.config.bias:
        raise CheckpointError("save_model: layout='hf' needs bias=True (GPT-2 always has biases)")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise CheckpointError(f"save_model: metadata must be a dict, got {type(metadata).__name__}")
    try:
        metadata_json = json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"save_model({path}): metadata is not JSON-serialisable: {err}") from None

    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if layout == "hf" and _CONV1D.fullmatch(name.removeprefix("transformer.")):
            t = t.t()
        tensors[name] = t.contiguous()
    header = {
        "format": "pt",  # transformers refuses safetensors files without it
        _KEY_FORMAT: FORMAT_TAG,
        _KEY_LAYOUT: layout,
        _KEY_CONFIG: json.dumps(model.config.to_dict()),
        _KEY_METADATA: metadata_json,
    }
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, header), nbytes)


# ----------------------------------------------------------------------------------- reading


def read_header(path) -> tuple[dict, dict]:
    """Parse and check a safetensors header without reading the tensors.

    Returns ({tensor name: {"dtype", "shape", "data_offsets"}}, {metadata str: str}).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    not_safetensors = (
        f"{path}: not a safetensors file (a safetensors file starts with an 8-byte header length "
        "and a JSON header). Convert PyTorch .bin/.pt checkpoints with safetensors.torch.save_file."
    )
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{not_safetensors} The file has only {size} bytes.")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER_BYTES:
                raise CheckpointError(not_safetensors)
            raw = f.read(n)
    except OSError as err:  # no read permission, an I/O error
        raise CheckpointError(f"{path}: cannot read it ({err.strerror or err}); make it readable "
                              f"(e.g. chmod a+r {path})") from None
    if not raw.startswith(b"{"):
        raise CheckpointError(not_safetensors)
    if len(raw) < n:
        raise CheckpointError(
            f"{path}: truncated: the header announces {n} bytes but the file ends after {len(raw)}; "
            "the file was cut short (interrupted copy or download?): copy or save it again"
        )
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except RecursionError:  # a hostile header nested thousands of levels deep
        raise CheckpointError(f"{not_safetensors} (the header is nested too deeply)") from None
    except ValueError as err:
        raise CheckpointError(f"{not_safetensors} ({err})") from None
    file_metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(file_metadata, dict) and all(isinstance(v, str) for v in file_metadata.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header: '__metadata__' must map strings to strings")
    data_bytes = size - 8 - n
    ranges = []
    for key, info in header.items():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for key '{key}': {str(info)[:200]}")
        shape, offsets = info["shape"], info["data_offsets"]
        is_count = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
        if not (isinstance(info["dtype"], str) and isinstance(shape, list) and all(map(is_count, shape))
                and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for key '{key}': expected a dtype "
                                  f"string, a shape of counts and data_offsets [begin, end], got {str(info)[:200]}")
        begin, end = offsets
        itemsize = _ITEMSIZE.get(info["dtype"])
        if itemsize is not None and end - begin != itemsize * math.prod(shape):
            raise CheckpointError(f"{path}: corrupt safetensors header: key '{key}' ({info['dtype']} {shape}) "
                                  f"needs {itemsize * math.prod(shape)} bytes, its data_offsets give {end - begin}")
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated: key '{key}' needs data bytes [{begin}, {end}) but the file holds "
                f"only {data_bytes}; the file was cut short (interrupted copy or save?): copy or save it again"
            )
        ranges.append((begin, end, key))
    # Tensors tile the data section: each one starts where the previous one ends (safetensors' rule).
    position = 0
    for begin, end, key in sorted(ranges):
        if begin != position:
            raise CheckpointError(f"{path}: corrupt safetensors header: key '{key}' starts at data byte {begin}, "
                                  f"expected {position} (tensors overlap or leave a gap)")
        position = end
    return header, file_metadata


def read_metadata(path) -> dict:
    """The metadata dict that save_model stored ({} for files not written by spo-min).
    Reads the header only."""
    return _parse_our_header(path, read_header(path)[1])[2]


def read_config(path, n_head: int | None = None) -> GPTConfig:
    """The GPTConfig of a checkpoint (recorded, or inferred for HF files). Reads the header only."""
    return _open(path, n_head)[-1]


def _parse_our_header(path, file_metadata: dict) -> tuple[str, dict | None, dict]:
    """(layout, config dict or None, user metadata) from the header metadata."""
    if _KEY_FORMAT not in file_metadata:
        return "hf", None, {}  # a foreign file: Hugging Face conventions
    if file_metadata[_KEY_FORMAT] != FORMAT_TAG:
        raise CheckpointError(
            f"{path}: format {file_metadata[_KEY_FORMAT]!r} is not {FORMAT_TAG!r}; "
            "it was written by another spo-min version"
        )
    layout = file_metadata.get(_KEY_LAYOUT)
    if layout not in LAYOUTS:
        raise CheckpointError(f"{path}: metadata '{_KEY_LAYOUT}' is {layout!r}, expected one of {LAYOUTS}")
    try:
        config = json.loads(file_metadata[_KEY_CONFIG])
        metadata = json.loads(file_metadata[_KEY_METADATA])
        if not (isinstance(config, dict) and isinstance(metadata, dict)):
            raise ValueError("config and metadata must be JSON objects")
    except (KeyError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt spo-min metadata in the header ({err!r})") from None
    return layout, config, metadata


def _read_hf_config(path: Path, inferred: dict) -> dict:
    """The Hugging Face config.json beside the weights, if any, checked against the shapes."""
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        return {}
    try:
        hf = json.loads(config_path.read_text())
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: a JSON {type(hf).__name__}; expected an object like transformers' GPT-2 config")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{config_path}: model_type is {hf.get('model_type')!r}, expected 'gpt2'")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{config_path}: activation_function {hf['activation_function']!r} is not GPT-2's tanh GELU")
    # Types and ranges first: "n_embd": "32" is a string, not the 32 the weights have.
    is_number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    for key in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"):
        value = hf.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise CheckpointError(f"{config_path}: {key} is {type(value).__name__} {value!r}; expected a positive "
                                  "integer: fix config.json")
    eps = hf.get("layer_norm_epsilon")
    if eps is not None and not (is_number(eps) and math.isfinite(eps) and eps > 0):
        raise CheckpointError(f"{config_path}: layer_norm_epsilon is {type(eps).__name__} {eps!r}; expected a "
                              "positive number (GPT-2's is 1e-05): fix config.json")
    for hf_key, ours in (("n_embd", "n_embd"), ("n_layer", "n_layer"), ("vocab_size", "vocab_size"), ("n_positions", "block_size")):
        if hf_key in hf and hf[hf_key] != inferred[ours]:
            raise CheckpointError(
                f"{config_path}: {hf_key}={hf[hf_key]} but the weights in {path.name} have {ours}={inferred[ours]}; "
                "this config.json belongs to another model"
            )
    return hf


def _infer_config(path: Path, infos: dict, names: dict, prefix: str, n_head: int | None) -> GPTConfig:
    """GPTConfig of a foreign (HF) file from its tensor shapes (+ config.json for n_head)."""

    def shape(name):
        if name not in names:
            raise CheckpointError(f"{path}: missing key '{prefix}{name}', needed to infer the model size")
        return infos[names[name]]["shape"]

    for name in ("wte.weight", "wpe.weight"):
        if len(shape(name)) != 2:
            raise CheckpointError(f"{path}: key '{names[name]}': expected a matrix, found shape {shape(name)}")
    vocab_size, n_embd = shape("wte.weight")
    block_size = shape("wpe.weight")[0]
    layers = [int(m.group(1)) for name in names if (m := re.match(r"h\.(\d+)\.", name))]
    if not layers:
        raise CheckpointError(f"{path}: no transformer blocks (keys '{prefix}h.<i>.*') found")
    inferred = dict(vocab_size=vocab_size, n_embd=n_embd, block_size=block_size, n_layer=max(layers) + 1)
    hf = _read_hf_config(path, inferred)
    if n_head is None:
        n_head = hf.get("n_head")
    if n_head is None:  # no shape reveals the number of heads: fall back on GPT-2's 64-dim heads
        if n_embd % 64:
            raise CheckpointError(
                f"{path}: cannot tell n_head from the weights (n_embd={n_embd} is not a multiple of GPT-2's "
                "head size 64) and there is no config.json beside the file: pass load_model(..., n_head=...)"
            )
        n_head = n_embd // 64
        warnings.warn(
            f"{path}: n_head not recorded; assuming GPT-2's 64-dim heads, n_head={n_head}. "
            "Put the model's config.json beside the file or pass load_model(..., n_head=...) to be sure.",
            stacklevel=3,
        )
    try:
        return GPTConfig(
            **inferred,
            n_head=n_head,
            bias="ln_f.bias" in names,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        )
    except ModelError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _show(keys: list[str], limit: int = 6) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(f"'{k}'" for k in keys[:limit]) + more


def _open(path, n_head: int | None):
    """(infos, layout, metadata, prefix, names, stray, config) of a checkpoint, from its header."""
    path = Path(path)
    infos, file_metadata = read_header(path)
    layout, config_dict, metadata = _parse_our_header(path, file_metadata)

    # Names: strip the optional "transformer." prefix; skip mask buffers. `names` maps our
    # bare name ("h.0.attn.c_attn.weight") to the key as written in the file.
    prefix = "transformer." if any(k.startswith("transformer.") for k in infos) else ""
    names, stray = {}, []
    for key in infos:
        if key.startswith(prefix):
            name = key[len(prefix) :]
        elif key == "lm_head.weight":
            name = key
        else:
            stray.append(key)  # a prefixed file with an unprefixed key
            continue
        if _MASK_BUFFER.fullmatch(name):
            continue
        dtype_tag = infos[key]["dtype"]
        if dtype_tag not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: key '{key}' has dtype {dtype_tag}; model weights must be floating point "
                f"({', '.join(_FLOAT_DTYPES)})"
            )
        names[name] = key

    # Config: recorded by save_model, else inferred from the shapes.
    if config_dict is not None:
        try:
            config = GPTConfig.from_dict(config_dict if n_head is None else {**config_dict, "n_head": n_head})
        except (ModelError, TypeError) as err:
            raise CheckpointError(f"{path}: bad config in the header: {err}") from None
    else:
        config = _infer_config(path, infos, names, prefix, n_head)
    return infos, layout, metadata, prefix, names, stray, config


def load_model(path, device="cpu", n_head: int | None = None, dtype: torch.dtype | None = torch.float32,
               vocab_size: int | None = VOCAB_SIZE):
    """Read a checkpoint written by save_model, or a Hugging Face GPT-2 safetensors file.

    Returns (model in eval mode on device, metadata dict as given to save_model; {} for HF
    files). n_head overrides the recorded/inferred head count. Weights are cast to dtype
    (float32 by default; None keeps the stored dtype). A padded vocabulary (more token rows
    than vocab_size, GPT-2's 50257 by default; None keeps them all) is cut to vocab_size, see
    step 5. Raises CheckpointError naming the file, the key, and what was expected vs found.
    """
    path = Path(path)
    # 1-2. Key names and config, from the header alone.
    infos, layout, metadata, prefix, names, stray, config = _open(path, n_head)

    # 3. Expected keys and shapes come from the model itself, built on the meta device
    #    (no memory, no random numbers drawn).
    with torch.device("meta"):
        model = GPT(config)
    expected = {}
    for key, t in model.state_dict().items():
        name = key.removeprefix("transformer.")
        transposed = layout == "hf" and _CONV1D.fullmatch(name)
        expected[name] = tuple(t.shape[::-1]) if transposed else tuple(t.shape)
    tied_head = "lm_head.weight" in names
    if tied_head:
        expected["lm_head.weight"] = expected["wte.weight"]
    missing = [prefix + name for name in expected if name not in names]
    unexpected = stray + [key for name, key in names.items() if name not in expected]
    if missing or unexpected:
        parts = [f"missing keys {_show(missing)}"] if missing else []
        parts += [f"unexpected keys {_show(unexpected)}"] if unexpected else []
        raise CheckpointError(
            f"{path}: {'; '.join(parts)}. Expected a GPT-2 checkpoint with config {config.to_dict()} "
            f"(layout '{layout}'); the file is incomplete or holds another architecture."
        )
    for name, want in expected.items():
        found = tuple(infos[names[name]]["shape"])
        if found != want:
            raise CheckpointError(
                f"{path}: key '{names[name]}': expected shape {list(want)}, found {list(found)} "
                f"(config {config.to_dict()}, layout '{layout}')"
            )

    # 4. Read the tensors, back to our orientation.
    state = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in expected:
            t = f.get_tensor(names[name])
            if layout == "hf" and _CONV1D.fullmatch(name):
                t = t.t().contiguous()
            state[name] = t if dtype is None else t.to(dtype)
    if tied_head:  # GPT-2's head is the embedding; a different lm_head would be another model
        lm_head = state.pop("lm_head.weight")
        if not torch.equal(lm_head, state["wte.weight"]):
            raise CheckpointError(
                f"{path}: key 'lm_head.weight' differs from '{names['wte.weight']}'; spo-min ties the "
                "output head to the token embedding, so an untied head cannot be loaded"
            )
    # 5. A padded vocabulary: nanoGPT-style checkpoints round GPT-2's 50257 tokens up to 50304
    #    (a multiple of 64, for faster matmuls). The extra rows are no token's. Kept, they could be
    #    sampled (an id the tokenizer cannot decode) and their mass would sit in every softmax.
    #    Cut, every real token's logit is unchanged: the padding is never sampled, never scored.
    if vocab_size is not None and config.vocab_size > vocab_size:
        state["wte.weight"] = state["wte.weight"][:vocab_size].clone()
        config = dataclasses.replace(config, vocab_size=vocab_size)
        with torch.device("meta"):
            model = GPT(config)
    model.load_state_dict({"transformer." + k: v for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval(), metadata
