"""The user-facing object: load a checkpoint once, then score or generate with any mode per call."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import Config
from nemodiff_jax.model import Transformer
from nemodiff_jax.tokenizer import Tokenizer

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


class Generator:
    """A loaded NLD model: `.config`, `.model`, `.tokenizer` (or None), `.logits(...)`, `.generate(...)`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, path: Path | None = None):
        self.model = model
        self.config: Config = model.config
        self.tokenizer = tokenizer
        self.path = path
        self.dtype = model.dtype
        self._graphdef, self._params = nnx.split(model)
        # fp32 means fp32: without this, GPUs run float32 matmuls at reduced (tf32/bf16) precision.
        self._precision = "highest" if self.dtype == jnp.float32 else None

    def logits(self, token_ids, causal: bool = True) -> np.ndarray:
        """float32 [B, T, V] logits for token ids [B, T] at positions 0..T-1 with a fresh cache.

        causal=True: logits[t] predicts token t+1; causal=False: bidirectional over the whole input,
        logits[t] predicts token t itself (the diffusion head's semantics)."""
        tokens = np.asarray(token_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be a non-empty [B, T] integer array, got shape {tokens.shape} "
                             f"dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{tokens.min()}, "
                             f"{tokens.max()}]")
        with jax.default_matmul_precision(self._precision):
            out = _logits_fn(self._graphdef, self._params, jnp.asarray(tokens, jnp.int32), causal)
        return np.asarray(out, dtype=np.float32)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits_fn(graphdef, params, tokens, causal):
    model = nnx.merge(graphdef, params)
    b, t = tokens.shape
    cache = KVCache.init(model.config, b, t, model.dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = model(tokens, positions, cache, causal=causal)
    return logits


def load(path: str | Path, dtype: str = "bfloat16", drafter: str | Path | None = None, progress: bool = True,
         shardings: dict | None = None) -> Generator:
    """Loads an HF NLD directory (config.json + safetensors) or a nemodiff orbax directory."""
    from convert.hf import load_model
    from convert.orbax_io import is_orbax_dir, load_orbax

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected an HF model directory or an orbax checkpoint)")
    if is_orbax_dir(path):
        model = load_orbax(path, DTYPES[dtype], shardings=shardings)
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json")
        cfg = Config.from_file(path / "config.json")
        model = load_model(path, cfg, DTYPES[dtype], shardings=shardings, progress=progress)
    gen = Generator(model, Tokenizer.from_dir(path), path)
    if drafter is not None:
        gen.attach_drafter(drafter)
    return gen
