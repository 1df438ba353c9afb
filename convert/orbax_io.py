"""Converted weights as an orbax checkpoint: fast (optionally sharded) restore without re-converting.

Layout: `<dir>/nemodiff.json` (format marker, HF config, dtype) + `<dir>/state/` (orbax PyTree of the nnx
parameters) + any tokenizer files copied beside them. A quantized weight is saved as {"q", "scale"}: q int8, or
int4 packed two per byte as uint8 [*out, K/2] (quant.pack_int4, as on disk in safetensors); the config's
quantization_config says which.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from nemodiff_jax import quant
from nemodiff_jax.convert.safetensors_io import CheckpointError
from nemodiff_jax.config import Config
from nemodiff_jax.model import Transformer, abstract_model

MARKER = "nemodiff.json"
FORMAT = "nemodiff-orbax-v1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


def is_orbax_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).exists()


def save_orbax(model: Transformer, out_dir: str | Path, *, copy_from: str | Path | None = None) -> Path:
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = jax.tree.map(_stored, nnx.to_pure_dict(nnx.state(model, nnx.Param)), is_leaf=_is_q)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_dir / "state", state)
    if copy_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(copy_from) / name).exists():
                shutil.copy(Path(copy_from) / name, out_dir / name)
    dtype = str(state["norm"]["weight"].dtype)
    meta = {"format": FORMAT, "dtype": dtype, "config": model.config.to_hf_config()}
    # The marker goes last: a directory without it is not a (complete) checkpoint.
    (out_dir / MARKER).write_text(json.dumps(meta, indent=2))
    return out_dir


def _is_q(x) -> bool:
    return isinstance(x, quant.QWeight)


def _stored(x):
    """A parameter as saved: arrays as they are, a QWeight as {"q", "scale"} (int4 packed into uint8)."""
    if not _is_q(x):
        return x
    return {"q": quant.to_stored(x), "scale": x.scale}


def _marker(path: Path) -> dict:
    """The checkpoint's marker (format, dtype, config), its format checked."""
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / MARKER}: unknown format {meta.get('format')!r}")
    return meta


def orbax_config(path: str | Path) -> Config:
    return Config.from_hf_config(_marker(Path(path))["config"])


def load_orbax(path: str | Path, dtype=None, shardings: dict | None = None) -> Transformer:
    path = Path(path).absolute()
    meta = _marker(path)
    cfg = Config.from_hf_config(meta["config"])
    saved_dtype = jnp.dtype(meta["dtype"])
    load_dtype = saved_dtype if dtype is None else jnp.dtype(dtype)
    # Built in the load dtype: Transformer.dtype also sets the KV-cache dtype and the matmul precision.
    abstract = abstract_model(cfg, load_dtype)
    graphdef, abstract_state = nnx.split(abstract)
    target = nnx.to_pure_dict(abstract_state)

    def saved_leaf(path_keys, leaf):
        key = tuple(k.key if hasattr(k, "key") else k.idx for k in path_keys)
        sharding = (shardings or {}).get(key)
        if not _is_q(leaf):
            return jax.ShapeDtypeStruct(leaf.shape, saved_dtype, sharding=sharding)
        q = quant.stored_q(leaf.fmt, leaf.q.shape)
        return {"q": jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=sharding.q if sharding is not None else None),
                "scale": jax.ShapeDtypeStruct(leaf.scale.shape, jnp.bfloat16,
                                              sharding=sharding.scale if sharding is not None else None)}

    abstract_q = target
    target = jax.tree_util.tree_map_with_path(saved_leaf, target, is_leaf=_is_q)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path / "state", target)

    def loaded(like, value):
        if not _is_q(like):
            return value.astype(load_dtype) if load_dtype != saved_dtype else value
        return quant.QWeight(quant.from_stored(value["q"], like.fmt), value["scale"], like.fmt, like.shape,
                             like.in_dims, like.group)

    restored = jax.tree.map(loaded, abstract_q, restored, is_leaf=_is_q)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
