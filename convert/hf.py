"""HF NLD checkpoint (safetensors, single file or index) <-> nnx model, strictly; the VLM's vision tower and
projector (spec §12) are part of the same name table when the config has them.

One name table (`layout(cfg)`: every HF tensor -> nnx path, layout kind, block of a fused param, HF shape) and
one transform per kind; the HF shape is checked before a tensor is touched. Unmapped, missing, duplicate, mis-shaped or wrongly typed tensors, and truncated
or corrupt files, are errors that name the file and the tensor. Tensors stream one at a time from a
memory map straight to their device (and sharding): peak host memory ~ the largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nemodiff_jax.convert.safetensors_io import DTYPE_NAMES, DTYPES, CheckpointError, Reader, TensorInfo, read_header, write_file
from nemodiff_jax import quant
from nemodiff_jax.config import Config
from nemodiff_jax.model import QUANTIZABLE, Transformer, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_DTYPES = ("BF16", "F16", "F32")
# Non-weight buffers some exporters leave behind; dropped by name, never by accident.
DROPPED = (re.compile(r"encoder\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)

@dataclasses.dataclass(frozen=True)
class Piece:
    """Where one HF tensor lives in the nnx model: `block` indexes its part of the nnx param (fused params,
    qkv_proj [D,K,G+2,H] and gate_up_proj [D,2,F], are filled from several HF tensors)."""

    hf: str
    path: tuple
    kind: str  # same | linear | heads_in | qkv | conv | vision_heads_out | vision_heads_in
    hf_shape: tuple[int, ...]
    block: tuple = np.s_[...]


def layout(cfg: Config) -> dict[str, Piece]:
    """Every HF tensor of an NLD model with this config (the one name table, generated from the config)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    n, k, h, g = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.group_size
    pieces = [Piece("encoder.embed_tokens.weight", ("embed_tokens",), "same", (v, d)),
              Piece("encoder.norm.weight", ("norm", "weight"), "same", (d,))]
    if not cfg.tie_word_embeddings:
        pieces.append(Piece("diffusion_head.weight", ("diffusion_head",), "linear", (v, d)))
    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        attn, mlp = ("layers", i, "self_attn"), ("layers", i, "mlp")
        pieces += [
            Piece(p + "input_layernorm.weight", ("layers", i, "input_layernorm", "weight"), "same", (d,)),
            Piece(p + "post_attention_layernorm.weight", ("layers", i, "post_attention_layernorm", "weight"),
                  "same", (d,)),
            Piece(p + "self_attn.q_proj.weight", attn + ("qkv_proj",), "qkv", (n * h, d), np.s_[:, :, :g]),
            Piece(p + "self_attn.k_proj.weight", attn + ("qkv_proj",), "qkv", (k * h, d), np.s_[:, :, g:g + 1]),
            Piece(p + "self_attn.v_proj.weight", attn + ("qkv_proj",), "qkv", (k * h, d),
                  np.s_[:, :, g + 1:g + 2]),
            Piece(p + "self_attn.o_proj.weight", attn + ("o_proj",), "heads_in", (d, n * h)),
            Piece(p + "mlp.gate_proj.weight", mlp + ("gate_up_proj",), "linear", (f, d), np.s_[:, 0]),
            Piece(p + "mlp.up_proj.weight", mlp + ("gate_up_proj",), "linear", (f, d), np.s_[:, 1]),
            Piece(p + "mlp.down_proj.weight", mlp + ("down_proj",), "linear", (d, f)),
        ]
    if cfg.vision is not None:
        pieces += _vision_pieces(cfg)
    return {pc.hf: pc for pc in pieces}


def _vision_pieces(cfg: Config) -> list[Piece]:
    """The VLM's tower and projector (spec §12: inside `encoder`, no biases); nnx paths as in vision.py."""
    v = cfg.vision
    e, f, c, p, d = v.hidden_size, v.intermediate_size, v.num_channels, v.patch_size, cfg.hidden_size
    r = v.spatial_merge_size ** 2
    t, j = "encoder.vision_tower.", "encoder.multi_modal_projector."
    pieces = [Piece(t + "patch_conv.weight", ("vision_tower", "patch_conv"), "conv", (e, c, p, p)),
              Piece(t + "ln_pre.weight", ("vision_tower", "ln_pre", "weight"), "same", (e,)),
              Piece(j + "norm.weight", ("multi_modal_projector", "norm", "weight"), "same", (e,)),
              Piece(j + "patch_merger.merging_layer.weight", ("multi_modal_projector", "merging_layer"), "linear",
                    (e, e * r)),
              Piece(j + "linear_1.weight", ("multi_modal_projector", "linear_1"), "linear", (d, e)),
              Piece(j + "linear_2.weight", ("multi_modal_projector", "linear_2"), "linear", (d, d))]
    for i in range(v.num_layers):
        h, layer = f"{t}transformer.layers.{i}.", ("vision_tower", "layers", i)
        attn, ffn = layer + ("attention",), layer + ("feed_forward",)
        pieces += [
            Piece(h + "attention_norm.weight", layer + ("attention_norm", "weight"), "same", (e,)),
            Piece(h + "ffn_norm.weight", layer + ("ffn_norm", "weight"), "same", (e,)),
            *(Piece(h + f"attention.{name}_proj.weight", attn + ("qkv",), "vision_heads_out", (e, e), np.s_[:, q])
              for q, name in enumerate("qkv")),
            Piece(h + "attention.o_proj.weight", attn + ("o",), "vision_heads_in", (e, e)),
            Piece(h + "feed_forward.gate_proj.weight", ffn + ("gate_up",), "linear", (f, e), np.s_[:, 0]),
            Piece(h + "feed_forward.up_proj.weight", ffn + ("gate_up",), "linear", (f, e), np.s_[:, 1]),
            Piece(h + "feed_forward.down_proj.weight", ffn + ("down",), "linear", (e, f)),
        ]
    return pieces


def _to_nnx(arr: np.ndarray, pc: Piece, cfg: Config) -> np.ndarray:
    """HF [out, in] tensor -> the nnx block it fills (PyTorch layout transposed, heads split)."""
    if pc.kind == "same":
        return arr
    if pc.kind == "linear":
        return arr.T
    if pc.kind == "heads_in":  # [D, N*H] -> [N, H, D]
        return arr.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)
    if pc.kind == "qkv":  # [K*G*H, D] (q) or [K*H, D] (k, v) -> [D, K, G|1, H]
        return arr.reshape(cfg.num_kv_heads, -1, cfg.head_dim, cfg.hidden_size).transpose(3, 0, 1, 2)
    if pc.kind == "conv":  # Conv2d [E, C, Y, X] -> [C, Y, X, E]
        return arr.transpose(1, 2, 3, 0)
    if pc.kind == "vision_heads_out":  # [N*H, E] -> [E, N, H]
        return arr.T.reshape(arr.shape[1], cfg.vision.num_heads, cfg.vision.head_dim)
    if pc.kind == "vision_heads_in":  # [E, N*H] -> [N, H, E]
        return arr.T.reshape(cfg.vision.num_heads, cfg.vision.head_dim, arr.shape[0])
    raise AssertionError(pc.kind)


def _to_hf(block: np.ndarray, pc: Piece) -> np.ndarray:
    """Inverse of _to_nnx, from the piece's block of the nnx param."""
    if pc.kind == "same":
        return block
    if pc.kind == "linear":
        return block.T
    if pc.kind in ("heads_in", "vision_heads_in"):
        return block.reshape(-1, block.shape[-1]).T
    if pc.kind == "qkv":
        return block.transpose(1, 2, 3, 0).reshape(-1, block.shape[0])
    if pc.kind == "conv":
        return block.transpose(3, 0, 1, 2)
    if pc.kind == "vision_heads_out":
        return block.reshape(block.shape[0], -1).T
    raise AssertionError(pc.kind)


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
    has_head = "diffusion_head.weight" in names or "diffusion_head.qweight" in names
    if cfg.tie_word_embeddings and has_head:
        return cfg.replace(tie_word_embeddings=False)
    return cfg


def _qblock(pc: Piece) -> tuple:
    """The block a piece fills in the out-major quantized arrays [*out, K] (its 16-bit block minus the leading
    input axis): q/k/v [:, :G] etc. of qkv [K, G+2, H, D], gate/up [0]/[1] of gate_up [2, F, D], else all."""
    return pc.block[1:] if isinstance(pc.block, tuple) else ()


def _quantized_names(pc: Piece) -> tuple[str, str]:
    stem = pc.hf.removesuffix(".weight")
    return stem + ".qweight", stem + ".scales"


def expected_tensors(cfg: Config) -> dict[str, tuple[Piece, str, tuple[int, ...], tuple[str, ...]]]:
    """Every tensor a checkpoint of this config holds: name -> (piece, role, shape, allowed dtypes). Roles:
    "weight" (16-bit), "qweight" (int8 [out, in] or packed int4 uint8 [out, in/2]) and "scales" (bf16 [out]
    for int8, [in/group, out] for int4): docs/QUANTIZATION.md, "On disk"."""
    q = cfg.quantization
    out = {}
    for name, pc in layout(cfg).items():
        if q is None or pc.path[-1] not in QUANTIZABLE:
            out[name] = (pc, "weight", pc.hf_shape, WEIGHT_DTYPES)
            continue
        fmt = q.fmt(pc.path[-1])
        rows, k = pc.hf_shape
        qname, sname = _quantized_names(pc)
        q_shape, q_dtype = ((rows, k), ("I8",)) if fmt == "int8" else ((rows, k // 2), ("U8",))
        out[qname] = (pc, "qweight", q_shape, q_dtype)
        out[sname] = (pc, "scales", (rows,) if fmt == "int8" else (k // q.group_size, rows), ("BF16",))
    return out


def load_model(model_dir: str | Path, cfg: Config, dtype=jnp.bfloat16, shardings: dict | None = None,
               progress: bool = True) -> Transformer:
    """Builds the nnx Transformer from an HF directory, streaming tensor by tensor; a quantized checkpoint
    (config.json's quantization_config) gives quant.QWeight matmul weights, bit for bit as written.

    `shardings` maps nnx paths to `jax.sharding.Sharding`s (see sharding.py; for a quantized weight, a
    quant.QWeight of them); default: the default device."""
    model_dir = Path(model_dir)
    dtype = jnp.dtype(dtype)
    tensors = checkpoint_tensors(model_dir)
    cfg = effective_config(cfg, tensors)
    abstract = abstract_model(cfg, dtype)
    graphdef, abstract_state = nnx.split(abstract)
    expected = {path: var for path, var in nnx.to_flat_state(abstract_state)}

    wanted = expected_tensors(cfg)
    plan: list[tuple[TensorInfo, Piece, str]] = []
    for name, info in tensors.items():
        if any(p.fullmatch(name) for p in DROPPED):
            continue
        if name not in wanted:
            kind = "NLD model" if cfg.vision is None else f"NLD-VLM model with a {cfg.vision.num_layers}-layer tower"
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} (not part of a "
                                  f"{cfg.num_layers}-layer {kind}"
                                  + (f" quantized to {cfg.quantization.format})" if cfg.quantization else ")"))
        pc, role, shape, dtypes = wanted[name]
        if info.shape != shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{list(shape)}")
        if info.dtype not in dtypes:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected one of "
                                  f"{dtypes}")
        plan.append((info, pc, role))
    missing = sorted(set(wanted) - {info.name for info, _, _ in plan})
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor(s) {missing[:8]}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    # A param is sent to its device as soon as all its pieces are in; only params in flight sit on the host.
    todo = {path: 0 for path in expected}
    for _, pc, _ in plan:
        todo[pc.path] += 1
    host: dict[tuple, object] = {}
    readers: dict[Path, Reader] = {}
    values: dict[tuple, jax.Array] = {}
    bar = tqdm(total=sum(i.end - i.begin for i, _, _ in plan), unit="B", unit_scale=True,
               desc=f"loading {model_dir.name}", disable=not progress)
    try:
        for info, pc, role in sorted(plan, key=lambda x: (str(x[0].file), x[0].begin)):
            reader = readers.get(info.file) or readers.setdefault(info.file, Reader(info.file))
            arr = reader.get(info)
            if role == "weight":
                buf = host.get(pc.path)
                if buf is None:
                    buf = host[pc.path] = np.empty(tuple(expected[pc.path].shape), dtype)
                buf[pc.block] = _to_nnx(arr, pc, cfg)  # an owned copy: the mmap closes later
            else:
                bufs = host.get(pc.path) or host.setdefault(pc.path, _quantized_buffers(cfg, pc, expected[pc.path]))
                _fill_quantized(bufs, role, arr, pc)
            del arr  # a view of the memory map, which closes below
            todo[pc.path] -= 1
            if todo[pc.path] == 0:
                values[pc.path] = _to_device(host.pop(pc.path), (shardings or {}).get(pc.path))
            bar.update(info.end - info.begin)
    finally:
        bar.close()
        for r in readers.values():
            r.close()
    for path, var in nnx.to_flat_state(abstract_state):
        var.set_value(values[path])
    return nnx.merge(graphdef, abstract_state)


@dataclasses.dataclass
class _QBuffers:
    """A quantized param being assembled on the host from its pieces (2 tensors per piece)."""
    q: np.ndarray  # int8 [*out, K] | uint8 [*out, K/2] (int4, packed as on disk)
    scale: np.ndarray  # bf16 [*out] | [K/group, *out]
    fmt: str
    shape: tuple[int, ...]
    in_dims: int
    group: int


def _quantized_buffers(cfg: Config, pc: Piece, var) -> _QBuffers:
    name = pc.path[-1]
    fmt, in_dims, group = cfg.quantization.fmt(name), QUANTIZABLE[name], cfg.quantization.group_size
    shapes = quant.storage_shapes(fmt, tuple(var.shape), in_dims, group)
    q = quant.stored_q(fmt, shapes["q"])
    return _QBuffers(np.empty(q.shape, q.dtype),
                     np.empty(shapes["scale"], DTYPES["BF16"]), fmt, tuple(var.shape), in_dims,
                     group if fmt == "int4" else 0)


def _fill_quantized(bufs: _QBuffers, role: str, arr: np.ndarray, pc: Piece):
    """One piece's tensor into its block of the out dims: qweight [rows, K or K/2], scales [rows] (int8) or
    [K/group, rows] (int4: the out dims come after the groups)."""
    block = _qblock(pc)
    if role == "scales" and bufs.fmt == "int4":
        block = (slice(None),) + block
    target = (bufs.q if role == "qweight" else bufs.scale)[block]
    target[...] = arr.reshape(target.shape)


def _to_device(value, sharding):
    if not isinstance(value, _QBuffers):
        return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
    put = lambda a, s: jax.device_put(a, s) if s is not None else jnp.asarray(a)
    sq, ss = (sharding.q, sharding.scale) if sharding is not None else (None, None)
    q = put(value.q, sq)
    if value.fmt == "int4":  # the packed bytes are the int4 array's own bytes (a bitcast), kept in q's sharding
        q = jax.jit(quant.from_stored, static_argnums=1, out_shardings=sq)(q, "int4")
    return quant.QWeight(q, put(value.scale, ss), value.fmt, value.shape, value.in_dims, value.group)


def model_tensors_hf(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights as HF-named numpy arrays in PyTorch layout (dtype kept); quantized weights as
    `<name>.qweight` / `<name>.scales` (docs/QUANTIZATION.md, "On disk")."""
    params = {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    host: dict[tuple, object] = {}
    out = {}
    for name, pc in layout(model.config).items():
        value = params[pc.path].get_value()
        if pc.path not in host:
            if isinstance(value, quant.QWeight):
                host[pc.path] = (np.asarray(jax.device_get(quant.to_stored(value))),
                                 np.asarray(jax.device_get(value.scale)))
            else:
                host[pc.path] = np.asarray(jax.device_get(value))
        if not isinstance(value, quant.QWeight):
            out[name] = np.ascontiguousarray(_to_hf(host[pc.path][pc.block], pc))
            continue
        q, scale = host[pc.path]
        block = _qblock(pc)
        qname, sname = _quantized_names(pc)
        qb = q[block]
        out[qname] = np.ascontiguousarray(qb.reshape(-1, qb.shape[-1]))
        if value.fmt == "int8":
            out[sname] = np.ascontiguousarray(scale[block].reshape(-1))
        else:
            sb = scale[(slice(None),) + block]
            out[sname] = np.ascontiguousarray(sb.reshape(sb.shape[0], -1))
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
        DTYPE_NAMES[tensors["encoder.norm.weight"].dtype]]
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


__all__ = ["CheckpointError", "DTYPES", "Piece", "layout", "load_model", "save_hf", "checkpoint_tensors",
           "read_hf_tensors", "model_tensors_hf"]
