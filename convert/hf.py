"""HF NLD checkpoint (safetensors, single file or index) <-> nnx model, strictly.

One name table (regex over HF names -> nnx path + layout kind) and one transform per kind that asserts the
HF shape before touching it. Unmapped, missing, duplicate, mis-shaped or wrongly typed tensors, and truncated
or corrupt files, are errors that name the file and the tensor. Tensors stream one at a time from a
memory map straight to their device (and sharding): peak host memory ~ the largest tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convert.safetensors_io import DTYPE_NAMES, DTYPES, CheckpointError, Reader, TensorInfo, read_header, write_file
from nemodiff_jax.config import Config
from nemodiff_jax.model import Transformer, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_DTYPES = ("BF16", "F16", "F32")
# Non-weight buffers some exporters leave behind; dropped by name, never by accident.
DROPPED = (re.compile(r"encoder\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)

# HF name -> (nnx path, kind). Kinds: see _hf_shape / _to_nnx / _to_hf.
_TABLE: list[tuple[re.Pattern, Callable[[re.Match], tuple], str]] = [
    (re.compile(r"encoder\.embed_tokens\.weight"), lambda m: ("embed_tokens",), "same"),
    (re.compile(r"encoder\.norm\.weight"), lambda m: ("norm", "weight"), "same"),
    (re.compile(r"diffusion_head\.weight"), lambda m: ("diffusion_head",), "linear"),
    (re.compile(r"encoder\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight"),
     lambda m: ("layers", int(m[1]), m[2], "weight"), "same"),
    (re.compile(r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.weight"),
     lambda m: ("layers", int(m[1]), "self_attn", m[2]), "split_out"),
    (re.compile(r"encoder\.layers\.(\d+)\.self_attn\.o_proj\.weight"),
     lambda m: ("layers", int(m[1]), "self_attn", "o_proj"), "split_in"),
    (re.compile(r"encoder\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight"),
     lambda m: ("layers", int(m[1]), "mlp", m[2]), "linear"),
]


def nnx_path(name: str) -> tuple[tuple, str] | None:
    for pattern, path, kind in _TABLE:
        m = pattern.fullmatch(name)
        if m:
            return path(m), kind
    return None


def hf_name(path: tuple) -> str:
    """Inverse of nnx_path."""
    if path == ("embed_tokens",):
        return "encoder.embed_tokens.weight"
    if path == ("norm", "weight"):
        return "encoder.norm.weight"
    if path == ("diffusion_head",):
        return "diffusion_head.weight"
    _, i, *rest = path
    return f"encoder.layers.{i}." + ".".join(rest) + ("" if rest[-1] == "weight" else ".weight")


def _hf_shape(nnx_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "same":
        return nnx_shape
    if kind == "linear":  # [in, out] <- [out, in]
        return nnx_shape[::-1]
    if kind == "split_out":  # [D, heads, H] <- [heads*H, D]
        return (nnx_shape[1] * nnx_shape[2], nnx_shape[0])
    if kind == "split_in":  # [heads, H, D] <- [D, heads*H]
        return (nnx_shape[2], nnx_shape[0] * nnx_shape[1])
    raise AssertionError(kind)


def _to_nnx(arr: np.ndarray, nnx_shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == "same":
        return arr
    if kind == "linear":
        return arr.T
    if kind == "split_out":
        return arr.T.reshape(nnx_shape)
    if kind == "split_in":
        return arr.T.reshape(nnx_shape)
    raise AssertionError(kind)


def _to_hf(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "same":
        return arr
    if kind == "linear":
        return arr.T
    if kind == "split_out":
        return arr.reshape(arr.shape[0], -1).T
    if kind == "split_in":
        return arr.reshape(-1, arr.shape[-1]).T
    raise AssertionError(kind)


# ------------------------------------------------------------------ checkpoint files


def checkpoint_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of an HF directory (single file or index), validated: no duplicates, index consistent."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: corrupt index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_path}: corrupt index (weight_map must map tensor names to file names)")
        files = sorted(set(weight_map.values()))
    elif (model_dir / SINGLE_FILE).exists():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        infos, _ = read_header(model_dir / fname)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"duplicate tensor {name!r}: in {tensors[name].file.name} and {fname}")
            if weight_map is not None and weight_map.get(name) != fname:
                raise CheckpointError(f"{model_dir / fname}: tensor {name!r} is not listed for this file in "
                                      f"{INDEX_FILE} (index says {weight_map.get(name)!r})")
            tensors[name] = info
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index_path}: lists tensor(s) not found in their files: {absent[:5]}")
    return tensors


def effective_config(cfg: Config, names) -> Config:
    """The tied-head fallback applies only when the checkpoint really has no `diffusion_head.weight`."""
    has_head = "diffusion_head.weight" in names
    if cfg.tie_word_embeddings and has_head:
        return cfg.replace(tie_word_embeddings=False)
    return cfg


def load_model(model_dir: str | Path, cfg: Config, dtype=jnp.bfloat16, shardings: dict | None = None,
               progress: bool = True) -> Transformer:
    """Builds the nnx Transformer from an HF directory, streaming tensor by tensor.

    `shardings` maps nnx paths to `jax.sharding.Sharding`s (see sharding.py); default: the default device."""
    model_dir = Path(model_dir)
    dtype = jnp.dtype(dtype)
    tensors = checkpoint_tensors(model_dir)
    cfg = effective_config(cfg, tensors)
    abstract = abstract_model(cfg, dtype)
    graphdef, abstract_state = nnx.split(abstract)
    expected = {path: var for path, var in nnx.to_flat_state(abstract_state)}

    plan: list[tuple[TensorInfo, tuple, str]] = []
    for name, info in tensors.items():
        if any(p.fullmatch(name) for p in DROPPED):
            continue
        mapped = nnx_path(name)
        if mapped is None or mapped[0] not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} (not part of a "
                                  f"{cfg.num_layers}-layer NLD model)")
        path, kind = mapped
        want = _hf_shape(tuple(expected[path].shape), kind)
        if info.shape != want:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected {list(want)}")
        if info.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected one of "
                                  f"{WEIGHT_DTYPES}")
        plan.append((info, path, kind))
    missing = sorted(set(expected) - {p for _, p, _ in plan})
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor(s) {[hf_name(p) for p in missing][:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    readers: dict[Path, Reader] = {}
    values: dict[tuple, jax.Array] = {}
    bar = tqdm(total=sum(i.end - i.begin for i, _, _ in plan), unit="B", unit_scale=True,
               desc=f"loading {model_dir.name}", disable=not progress)
    try:
        for info, path, kind in sorted(plan, key=lambda x: (str(x[0].file), x[0].begin)):
            reader = readers.get(info.file) or readers.setdefault(info.file, Reader(info.file))
            # Always an owned copy: the mmap closes after loading, and jax may alias host buffers.
            arr = np.array(_to_nnx(reader.get(info), tuple(expected[path].shape), kind), dtype=dtype,
                           order="C", copy=True)
            sharding = shardings.get(path) if shardings else None
            values[path] = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)
            bar.update(info.end - info.begin)
    finally:
        bar.close()
        for r in readers.values():
            r.close()
    for path, var in nnx.to_flat_state(abstract_state):
        var.set_value(values[path]) if hasattr(var, "set_value") else setattr(var, "value", values[path])
    return nnx.merge(graphdef, abstract_state)


def model_tensors_hf(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights as HF-named numpy arrays in PyTorch layout (dtype kept)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        _, kind = nnx_path(hf_name(path))
        out[hf_name(path)] = np.asarray(jax.device_get(var[...]))
        out[hf_name(path)] = np.ascontiguousarray(_to_hf(out[hf_name(path)], kind))
    return out


def save_hf(model: Transformer, out_dir: str | Path, *, max_shard_bytes: int | None = None,
            extra_files: dict[str, str] | None = None, progress: bool = False) -> Path:
    """Exports config.json + model.safetensors (or shards + index when `max_shard_bytes` is set)."""
    out_dir = Path(out_dir)
    # Never mix with an earlier export: a stale index would be loaded instead of the new single file.
    existing = sorted(p.name for p in out_dir.glob("*.safetensors")) + [INDEX_FILE] * (out_dir / INDEX_FILE).exists()
    if existing:
        raise FileExistsError(f"{out_dir}: already holds checkpoint files {existing[:3]}; refusing to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg: Config = model.config
    tensors = model_tensors_hf(model)
    torch_dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[
        DTYPE_NAMES[next(iter(tensors.values())).dtype]]
    if max_shard_bytes is None:
        write_file(out_dir / SINGLE_FILE, tensors)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        for name, arr in tensors.items():
            if shards[-1] and sum(a.nbytes for a in shards[-1].values()) + arr.nbytes > max_shard_bytes:
                shards.append({})
            shards[-1][name] = arr
        weight_map = {}
        for i, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress)):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_file(out_dir / fname, shard)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        _write_text(out_dir / INDEX_FILE, json.dumps(index, indent=2))
    for name, text in (extra_files or {}).items():
        _write_text(out_dir / name, text)
    hf_cfg = cfg.replace(torch_dtype=torch_dtype).to_hf_config()
    _write_text(out_dir / "config.json", json.dumps(hf_cfg, indent=2))
    return out_dir


def read_hf_tensors(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory as numpy (copies; for tests and small models)."""
    out = {}
    for name, info in checkpoint_tensors(Path(model_dir)).items():
        with Reader(info.file) as r:
            out[name] = np.array(r.get(info))
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["CheckpointError", "DTYPES", "load_model", "save_hf", "checkpoint_tensors", "read_hf_tensors",
           "model_tensors_hf", "nnx_path", "hf_name"]
