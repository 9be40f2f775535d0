"""Hugging Face checkpoint directories in and out: config.json + safetensors (single file or sharded).

    model = from_pretrained("path/to/Qwen2.5-Math-1.5B", dtype=torch.bfloat16, device="cuda")
    save_pretrained(model, "out/step-100", tokenizer=tok)   # transformers / vLLM load it unchanged

Loading builds the model on the meta device, then reads each tensor straight onto `device` and casts
it alone to `dtype`, so peak memory is the model plus one tensor (no float32 copy of the whole
model). Our parameter names are Hugging Face's without the "model." prefix (lm_head.weight as is).
Every way a checkpoint can be wrong raises an error naming the file or tensor at fault; a path that
is not a model directory is a MissingPathError (cir.errors), with a hint when the model is near
(a training checkpoint's `model/`, a run directory's latest checkpoint). A directory with a
manifest.json (every model a training checkpoint writes) is checked against it first: a damaged file
is a `cir.manifest.DamagedFileError` (a UserError) naming it. Without one, a truncated or padded
safetensors file is still caught (its header must cover the file exactly), a flipped bit is not.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cir import manifest
from cir.errors import MissingPathError, UserError
from cir.model.config import ModelConfig
from cir.model.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Tensors some published checkpoints carry that the model recomputes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_name(hf: str) -> str:
    return hf.removeprefix("model.")


def model_dir_hint(path: str | os.PathLike) -> str | None:
    """Where the model is when `path` is near one but is not one: a training checkpoint (step_K/,
    the model in its model/) or a run directory (the latest checkpoint's model/)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "model", "config.json")):
        return f"it is a training checkpoint; its model is in {os.path.join(path, 'model')}"
    steps = os.path.join(path, "checkpoints")
    if os.path.isdir(steps):
        done = sorted(n for n in os.listdir(steps) if n.startswith("step_") and not n.endswith(".tmp"))
        if done:
            return f"it is a run directory; its latest model is in {os.path.join(steps, done[-1], 'model')}"
    return None


def _not_a_model_dir(path: str, what: str) -> MissingPathError:
    return MissingPathError(what, hint=model_dir_hint(path) if os.path.isdir(path) else None)


def weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory; FileNotFoundError naming what is missing."""
    if not os.path.isdir(path):
        raise MissingPathError(f"checkpoint directory not found: {path}")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index ({e!r})") from None
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise MissingPathError(f"missing shard file {file} (listed in {index})")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise _not_a_model_dir(path, f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors checkpoints are read)")


def _resolve_dtype(dtype: torch.dtype | str, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (config.torch_dtype or "float32") if dtype == "auto" else dtype
    resolved = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                    device: torch.device | str = "cpu", verify: bool = True) -> Transformer:
    """Load an HF model directory (config.json + safetensors) into a Transformer, in eval mode.
    `verify`: check the files against the directory's manifest.json first, when it has one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"checkpoint directory not found: {path}")
    if verify:
        manifest.verify(path)
    if not os.path.isfile(os.path.join(path, "config.json")) and model_dir_hint(path):
        raise _not_a_model_dir(path, f"no config.json in {path}")
    try:
        config = ModelConfig.from_file(os.path.join(path, "config.json"))
    except FileNotFoundError as e:
        raise MissingPathError(str(e)) from None
    except ValueError as e:  # config.json is the user's file: every complaint about it is theirs
        raise UserError(str(e)) from None
    files = weight_files(path)
    dtype = _resolve_dtype(dtype, config)
    device = torch.device(device)

    # 1) the skeleton, no memory
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}

    # 2) each tensor onto the device, cast alone, checked by name and shape
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in files:
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    name = our_name(key)
                    if key.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    if name not in expected:
                        unexpected.append(key)
                        continue
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[name]:
                        raise UserError(f"shape mismatch for tensor {key} in {file}: "
                                         f"expected {list(expected[name])}, got {list(shape)}")
                    state[name] = f.get_tensor(key).to(dtype)
        except SafetensorError as e:
            raise UserError(f"corrupt or truncated safetensors file {file}: {e}") from None
    if unexpected:
        raise UserError(f"unexpected tensor(s) in checkpoint {path}: {', '.join(sorted(unexpected))}")
    missing = [hf_name(name) for name in expected if name not in state]
    if missing:
        raise UserError(f"missing tensor(s) in checkpoint {path}: {', '.join(missing)}")

    # 3) the loaded tensors become the parameters
    model.load_state_dict(state, strict=True, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    generation_config = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_config):
        with open(generation_config) as f:
            model.generation_config = json.load(f)
    return model.eval()


def save_pretrained(model: Transformer, path: str | os.PathLike, tokenizer=None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write config.json, generation_config.json, safetensors (sharded above max_shard_bytes, with an
    index), and the tokenizer files when a tokenizer (anything with .save(path)) is given."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # stale weights of an earlier save would shadow or mix with these
        if name in (INDEX_FILE, manifest.MANIFEST) or (name.startswith("model") and name.endswith(".safetensors")):
            os.remove(os.path.join(path, name))  # (an earlier manifest describes files rewritten now)

    # 1) group tensors into shards, in parameter order
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total_bytes = 0
    for name, tensor in model.state_dict().items():
        num_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + num_bytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][hf_name(name)] = tensor
        shard_bytes += num_bytes
        total_bytes += num_bytes

    # 2) write them
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {key: t.detach().to("cpu").contiguous() for key, t in shard.items()}
        save_file(tensors, os.path.join(path, file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    if len(shards) > 1:
        _write_json(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})

    # 3) configs and tokenizer
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    _write_json(os.path.join(path, "config.json"), model.config.to_hf_dict(torch_dtype=dtype))
    _write_json(os.path.join(path, "generation_config.json"), _generation_config(model))
    if tokenizer is not None:
        tokenizer.save(path)


def _generation_config(model: Transformer) -> dict:
    existing = getattr(model, "generation_config", None)
    if existing:
        return existing
    config = model.config
    eos = config.eos_token_id[0] if len(config.eos_token_id) == 1 else (config.eos_token_id or None)
    fields = {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}
    return {key: value for key, value in fields.items() if value is not None}


def _write_json(file: str, obj: dict) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
