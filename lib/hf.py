"""Hugging Face checkpoint directories <-> Flax NNX parameters.

Our modules mirror the HF module tree, so one generic rule converts names:

    ours  encoder.layer.0.attention.self.query.kernel   [in, out]
    HF    encoder.layer.0.attention.self.query.weight   [out, in]   (transposed)

``kernel`` <-> ``weight`` (2-D, transposed), ``embedding`` <-> ``weight``, ``scale`` <->
``weight``, ``bias`` <-> ``bias``. What the rule cannot express (a ``bert.`` prefix, a fused
qkv matrix, a buffer to drop) each model family states explicitly in two functions that work on
HF-named dicts: ``hf_to_ours(state) -> state`` before loading and ``ours_to_hf(state) -> state``
before export. Loading is strict: a missing or left-over key is a ``UserError`` naming it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from lib.errors import UserError

StateDict = dict[str, np.ndarray]
Transform = Callable[[StateDict], StateDict]

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


# ----------------------------------------------------------------------------- reading


def check_model_dir(model_dir: str | os.PathLike, key: str = "model.path") -> Path:
    """Return ``model_dir`` as a Path, or raise a UserError saying how to point at one."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(
            f"model directory {str(path)!r} does not exist (--config.{key}): download the "
            "Hugging Face checkpoint on a connected machine and point the flag at its directory"
        )
    return path


def read_config(model_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of an HF checkpoint directory as a dict."""
    path = check_model_dir(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: an HF model directory needs its config.json")
    return _read_json_object(path)


def generation_eos_ids(model_dir: str | os.PathLike | None) -> tuple[int, ...]:
    """The ``eos_token_id`` (an id or a list) of ``model_dir/generation_config.json``, if the
    directory has one: HF ``generate`` stops at these too (Qwen2.5-Instruct lists both
    ``<|im_end|>`` and ``<|endoftext|>`` while its tokenizer's EOS is the first)."""
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return ()
    value = _read_json_object(path).get("eos_token_id")
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"{path}: eos_token_id must be an id or a list of ids, got {value!r}")
    return tuple(values)


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """Read a ``.safetensors`` file into numpy arrays (memory-mapped; bf16 via ml_dtypes)."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8 : 8 + header_len]))
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = data[base + start : base + end].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(state: StateDict, path: str | os.PathLike) -> None:
    """Write numpy arrays as one ``.safetensors`` file (keys sorted, 8-byte aligned header)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(state):
        arr = np.asarray(state[name], order="C")  # (ascontiguousarray makes a 0-d array 1-d)
        nbytes = arr.nbytes
        header[name] = {
            "dtype": _NUMPY_TO_SAFETENSORS[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        blobs.append(arr)
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in blobs:
            f.write(arr.tobytes())


def _read_torch_bin(path: Path) -> StateDict:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path} is a PyTorch .bin checkpoint: reading it needs PyTorch (CPU is enough: "
            "`pip install torch`), or convert the directory to safetensors"
        ) from None
    # weights_only=True: a checkpoint is data, never code to execute.
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            out[name] = tensor.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


def load_state_dict(model_dir: str | os.PathLike) -> StateDict:
    """All weights of an HF directory: ``model.safetensors``, a sharded safetensors index,
    ``pytorch_model.bin`` or a sharded ``.bin`` index (first found, in that order)."""
    root = check_model_dir(model_dir)
    for name, reader in (
        ("model.safetensors", read_safetensors),
        ("model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin", _read_torch_bin),
        ("pytorch_model.bin.index.json", _read_torch_bin),
    ):
        path = root / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return reader(path)
        index = json.loads(path.read_text(encoding="utf-8"))
        state: StateDict = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(reader(root / shard))
        return state
    raise UserError(
        f"{root} has no weights: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


# ----------------------------------------------------------------------------- naming


def _leaf_to_hf(leaf: str) -> str:
    return {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)


def param_names(model: nnx.Module) -> dict[str, tuple]:
    """Map each parameter's HF-style name to its NNX path, e.g.
    ``'encoder.layer.0.output.dense.weight' -> ('encoder', 'layer', 0, 'output', 'dense',
    'kernel')``."""
    names = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names[".".join(map(str, path[:-1] + (_leaf_to_hf(str(path[-1])),)))] = path
    return names


def _to_ours(path: tuple, value: np.ndarray) -> np.ndarray:
    return value.T if path[-1] == "kernel" and value.ndim == 2 else value


def load_into(
    model: nnx.Module, state: StateDict, hf_to_ours: Transform | None = None, *, where: str = ""
) -> None:
    """Copy an HF state dict into ``model``'s parameters (fp32), strictly.

    ``hf_to_ours`` renames/splits HF keys into our tree's HF-style names first. Every
    parameter must be present with the right shape and every key must be used; otherwise a
    ``UserError`` lists the offending names (``where`` says which directory, for the message).
    """
    if hf_to_ours is not None:
        state = hf_to_ours(dict(state))
    names = param_names(model)
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_clip(unexpected)}")
        raise UserError(
            f"checkpoint {where or ''} does not match the model: " + "; ".join(parts)
            + " (is --config.model.path a checkpoint of this architecture?)"
        )
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for name, path in names.items():
        var = flat[path]
        value = _to_ours(path, np.asarray(state[name]))
        if tuple(value.shape) != tuple(var.get_value().shape):
            # Both shapes in the checkpoint's (HF) layout, the layout of the key it names.
            expected = _to_ours(path, np.empty(var.get_value().shape, np.int8)).shape
            raise UserError(
                f"checkpoint {where} key {name!r} has shape {tuple(np.shape(state[name]))}, the "
                f"model expects {tuple(expected)} (does config.json match the weights?)"
            )
        # A copy, not a view: `value` may map a file that a later export to the same
        # directory overwrites (reading the parameter would then die with SIGBUS).
        var.set_value(np.array(value, dtype=np.float32))


def _clip(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"


def state_of(model: nnx.Module, ours_to_hf: Transform | None = None) -> StateDict:
    """The model's parameters as an HF-named numpy state dict (inverse of ``load_into``)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    state = {}
    for name, path in param_names(model).items():
        value = np.asarray(flat[path].get_value(), dtype=np.float32)
        state[name] = value.T if path[-1] == "kernel" and value.ndim == 2 else value
    return ours_to_hf(state) if ours_to_hf is not None else state


# ----------------------------------------------------------------------------- export


def save_pretrained(
    state: StateDict,
    hf_config: dict,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write an HF directory: ``config.json``, safetensors weights (sharded with an index
    above ``max_shard_bytes``) and the tokenizer files if a tokenizer is given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(hf_config, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    shards: list[StateDict] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        write_safetensors(shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, out / fname)
            weight_map.update({name: fname for name in shard})
        total = sum(a.nbytes for a in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- names


class NameMap:
    """Module names of a checkpoint family <-> ours, for ports whose HF module tree differs
    (GPT-2, ChatGLM, T5): whole-model pairs ``(theirs, ours)``, tried first, then per-layer
    pairs of each stack of layers (``stacks``: their layer prefix -> (our layer prefix,
    {theirs: ours} inside layer N), e.g. ``{"transformer.h.": ("model.layers.", {...})}``).
    Works on module paths (PEFT names) and on state-dict keys (a module path plus a leaf); a
    name it does not know is None."""

    def __init__(self, model: dict[str, str], stacks: dict[str, tuple[str, dict[str, str]]]):
        # Per direction: (whole-model table, [(source layer prefix, destination layer prefix,
        # per-layer table)]).
        self.sides = {
            "ours": (dict(model), [(theirs, ours, dict(table))
                                   for theirs, (ours, table) in stacks.items()]),
            "theirs": ({o: t for t, o in model.items()},
                       [(ours, theirs, {o: t for t, o in table.items()})
                        for theirs, (ours, table) in stacks.items()]),
        }

    def convert(self, name: str, to: str) -> str | None:
        """``name`` (module path or state key) in ``to``'s naming (``"ours"``/``"theirs"``)."""
        whole, stacks = self.sides[to]
        hit = _map_prefix(name, whole)
        if hit is not None:
            return hit
        for src, dst, table in stacks:
            if name.startswith(src):
                index, _, rest = name[len(src):].partition(".")
                hit = _map_prefix(rest, table)
                return None if hit is None else f"{dst}{index}.{hit}"
        return None

    def state(self, state: StateDict, to: str) -> StateDict:
        """A state dict with every key converted; unknown keys pass unchanged (so a strict
        load names them)."""
        return {self.convert(k, to) or k: v for k, v in state.items()}


def _map_prefix(name: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None
