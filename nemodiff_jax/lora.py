"""The linear-spec drafter LoRA: PEFT adapter on `o_proj` only, active in draft passes only (spec §3.7).

Effective o_proj while drafting: W_o + (alpha / r) * B @ A. Stored here as a [N,H,r], b [r,D] per layer.
`gate` ([B, T] or None) limits the adapter to some positions: drafter training (nemodiff_jax/drafter.py) runs
one forward over `[draft blocks | clean text]` with the adapter on the draft half only, as inference does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nemodiff_jax.config import Config

ADAPTER_CONFIG = "adapter_config.json"
DRAFTER_DIR = "linear_spec_lora"  # the drafter's directory inside a model directory (load() attaches it)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAME = re.compile(r"base_model\.model\.encoder\.layers\.(\d+)\.self_attn\.o_proj\.lora_([AB])\.weight")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
    a: tuple[jax.Array, ...]  # per layer [N, H, r]
    b: tuple[jax.Array, ...]  # per layer [r, D]
    scale: float = dataclasses.field(metadata=dict(static=True))
    gate: jax.Array | None = None  # [B, T]: the adapter's weight per position (None: everywhere)

    @property
    def rank(self) -> int:
        return self.a[0].shape[-1]


def load_lora(path: str | Path, cfg: Config, dtype=jnp.bfloat16) -> LoRA:
    """Loads a PEFT adapter directory strictly; errors name the file and the tensor."""
    # The safetensors reader lives in the converter, imported on use: `import nemodiff_jax` loads no converter.
    from nemodiff_jax.convert.safetensors_io import CheckpointError, Reader, read_header

    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT LoRA adapter directory)")
    try:
        ac = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if ac.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {ac.get('peft_type')!r} is not LORA")
    targets = ac.get("target_modules") or []
    if sorted(set(targets)) != ["o_proj"]:
        raise CheckpointError(f"{cfg_path}: target_modules {targets!r} not supported (only ['o_proj'])")
    if ac.get("lora_dropout", 0.0) not in (0, 0.0, None):
        raise CheckpointError(f"{cfg_path}: lora_dropout must be 0 for inference, got {ac['lora_dropout']}")
    if ac.get("use_dora") or ac.get("use_rslora"):
        raise CheckpointError(f"{cfg_path}: DoRA / rsLoRA adapters are not supported")
    r, alpha = int(ac["r"]), float(ac.get("lora_alpha", ac["r"]))
    infos, _ = read_header(path / ADAPTER_WEIGHTS)
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    a: list = [None] * cfg.num_layers
    b: list = [None] * cfg.num_layers
    with Reader(path / ADAPTER_WEIGHTS) as reader:
        for name, info in infos.items():
            m = _NAME.fullmatch(name)
            if m is None or int(m[1]) >= cfg.num_layers:
                raise CheckpointError(f"{info.file}: unexpected tensor {name!r} for a {cfg.num_layers}-layer model")
            layer, which = int(m[1]), m[2]
            want = (r, n * h) if which == "A" else (d, r)
            if info.shape != want:
                raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                      f"{list(want)} (is this LoRA for another model shape?)")
            arr = np.array(reader.get(info), dtype=np.float32)
            if which == "A":
                a[layer] = jnp.asarray(arr.T.reshape(n, h, r), dtype)
            else:
                b[layer] = jnp.asarray(arr.T, dtype)
    missing = [f"layer {i} lora_{w}" for i in range(cfg.num_layers) for w, t in (("A", a), ("B", b)) if t[i] is None]
    if missing:
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: missing {missing[:6]}")
    return LoRA(a=tuple(a), b=tuple(b), scale=alpha / r)


def save_lora(lora: LoRA, path: str | Path, cfg: Config) -> Path:
    """Writes a PEFT-format adapter directory (o_proj only)."""
    from nemodiff_jax.convert.safetensors_io import write_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (a, b) in enumerate(zip(lora.a, lora.b)):
        prefix = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(a, np.float32).reshape(-1, lora.rank).T.copy()
        tensors[f"{prefix}.lora_B.weight"] = np.asarray(b, np.float32).T.copy()
    write_file(path / ADAPTER_WEIGHTS, tensors)
    alpha = lora.scale * lora.rank
    (path / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "r": lora.rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["o_proj"], "bias": "none", "inference_mode": True, "task_type": "CAUSAL_LM"}, indent=2))
    return path


def random_lora(cfg: Config, key: jax.Array, rank: int = 8, alpha: float = 32.0, std: float = 0.05,
                dtype=jnp.float32) -> LoRA:
    """A random adapter (tests; speed runs)."""
    keys = jax.random.split(key, 2 * cfg.num_layers)
    a = tuple(jax.random.normal(keys[2 * i], (cfg.num_heads, cfg.head_dim, rank), dtype) * std
              for i in range(cfg.num_layers))
    b = tuple(jax.random.normal(keys[2 * i + 1], (rank, cfg.hidden_size), dtype) * std
              for i in range(cfg.num_layers))
    return LoRA(a=a, b=b, scale=alpha / rank)
