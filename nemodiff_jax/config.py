"""Model configuration: a frozen, hashable (jit-static) dataclass and the strict HF `config.json` reader.

Every key a real NLD `config.json` carries is either used or explicitly ignored; any other key with a
non-default value is an error that names it, so a checkpoint we do not understand never loads silently.
The VLM (spec §12) is the same Config with `vision` set: its text keys sit at the root exactly like the LM's,
plus a Pixtral `vision_config` and a few root keys for the projector and the image placeholder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

MODEL_TYPE = "nemotron_labs_diffusion"
VLM_MODEL_TYPE = "nemotron_labs_diffusion_vlm"
VLM_ARCHITECTURE = "NemotronLabsDiffusionVLMModel"
VISION_MODEL_TYPE = "pixtral"

# Image special tokens of the VLM tokenizer (spec §12, high confidence; a config.json may override each one):
# `<|image_start|>`, then per row of merged patches that many `<|image_pad|>` placeholders (replaced by the
# image features) followed by `<|image_break|>`, except the last row, which ends with `<|image_end|>`.
IMAGE_START_TOKEN_ID = 18
IMAGE_TOKEN_ID = 19  # <|image_pad|>: the placeholder the features replace
IMAGE_BREAK_TOKEN_ID = 20
IMAGE_END_TOKEN_ID = 21
# The projector activation when config.json names none: transformers' Mistral3Config default "gelu", which is
# the exact (erf) GELU; "gelu_pytorch_tanh" selects the tanh approximation. Which one NVIDIA's remote code uses
# is not known (spec §12): config.json decides.
PROJECTOR_HIDDEN_ACT = "gelu"
PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh")


class ConfigError(ValueError):
    """A config.json we cannot represent exactly."""


QUANT_METHOD = "nemodiff"  # the only quantization_config.quant_method we read: checkpoints `convert --quantize` wrote
QUANT_FORMATS = ("int8", "int4")  # = nemodiff_jax.quant.FORMATS (config stays free of jax)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How a checkpoint's matmul weights are stored (docs/QUANTIZATION.md, "On disk"): `format` for qkv, o,
    gate_up and down, `head_format` for the head, int4 in groups of `group_size` inputs."""

    format: str
    head_format: str = "int8"
    group_size: int = 128

    def __post_init__(self):
        for name in ("format", "head_format"):
            if getattr(self, name) not in QUANT_FORMATS:
                raise ConfigError(f"quantization_config.{name} must be one of {QUANT_FORMATS}, "
                                  f"got {getattr(self, name)!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"quantization_config.group_size must be an even int >= 2, got {self.group_size!r}")

    def fmt(self, param: str) -> str:
        return self.head_format if param == "diffusion_head" else self.format

    @classmethod
    def from_dict(cls, d: Any) -> Quantization:
        if not isinstance(d, dict):
            raise ConfigError(f"quantization_config must be an object, got {d!r}")
        d = dict(d)
        method = d.pop("quant_method", None)
        if method != QUANT_METHOD:
            raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (only {QUANT_METHOD!r}: "
                              "checkpoints written by `nemodiff convert --quantize`)")
        if "format" not in d:
            raise ConfigError("quantization_config: 'format' is missing")
        unknown = set(d) - {"format", "head_format", "group_size"}
        if unknown:
            raise ConfigError(f"quantization_config: unknown key(s) {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": self.format, "head_format": self.head_format,
                "group_size": self.group_size}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The VLM's Pixtral vision tower and Mistral3 projector (spec §12): config.json's `vision_config` plus the
    root keys `spatial_merge_size`, `projector_hidden_act` and the image token ids. Defaults: VLM-8B."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    num_channels: int = 3
    image_size: int = 1540  # longest side (pixels) the tower takes
    rope_theta: float = 10000.0
    # The tower's RMSNorms (transformers hard-codes 1e-5 in Pixtral; a config.json value wins here). The
    # projector's norm uses the text model's rms_norm_eps, as transformers' Mistral3MultiModalProjector does.
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"  # gated MLP activation
    spatial_merge_size: int = 2
    projector_hidden_act: str = PROJECTOR_HIDDEN_ACT
    image_token_id: int = IMAGE_TOKEN_ID
    image_start_token_id: int = IMAGE_START_TOKEN_ID
    image_break_token_id: int = IMAGE_BREAK_TOKEN_ID
    image_end_token_id: int = IMAGE_END_TOKEN_ID

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "num_channels",
                     "image_size", "spatial_merge_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"vision_config.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            # Pixtral's head_dim is hidden/heads, and its 2-D RoPE splits head_dim/2 frequencies into rows/cols.
            raise ConfigError(f"vision_config: hidden_size/num_attention_heads must be an int divisible by 4: "
                              f"{self.hidden_size=} {self.num_heads=}")
        if self.hidden_act != "silu":
            raise ConfigError(f"vision_config.hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        if self.projector_hidden_act not in PROJECTOR_ACTS:
            raise ConfigError(f"projector_hidden_act={self.projector_hidden_act!r} is not supported "
                              f"(one of {PROJECTOR_ACTS})")
        ids = self.special_token_ids
        if len(set(ids.values())) != len(ids):
            raise ConfigError(f"the image token ids must differ: {ids}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {"image_token_id": self.image_token_id, "image_start_token_id": self.image_start_token_id,
                "image_break_token_id": self.image_break_token_id, "image_end_token_id": self.image_end_token_id}

    @classmethod
    def take_from_hf(cls, hf: dict[str, Any]) -> VisionConfig:
        """Pops `vision_config` and the VLM's root keys out of a (copied) root config.json dict, strictly."""
        vc = hf.pop("vision_config", None)
        if not isinstance(vc, dict):
            raise ConfigError(f"config.json: a {VLM_MODEL_TYPE} config needs a 'vision_config' object, got {vc!r}")
        vc = dict(vc)
        vtype = vc.pop("model_type", VISION_MODEL_TYPE)
        if vtype != VISION_MODEL_TYPE:
            raise ConfigError(f"config.json: vision_config.model_type {vtype!r} is not supported "
                              f"(only {VISION_MODEL_TYPE!r})")
        # Generic PretrainedConfig keys transformers writes into every sub-config, and ones that say nothing
        # about the tower: transformers' default Mistral3 vision config carries a meaningless vocab_size.
        for key in _IGNORED_KEYS + ("dtype", "torch_dtype", "vocab_size"):
            vc.pop(key, None)
        for key, default in {**_MUST_BE_DEFAULT, "attention_dropout": 0.0}.items():
            if key in vc and vc.pop(key) != default:
                raise ConfigError(f"config.json: vision_config.{key} is not supported with a value other than "
                                  f"{default!r}")

        take = _taker(vc, "vision_config.")

        kw: dict[str, Any] = dict(
            hidden_size=take("hidden_size"), intermediate_size=take("intermediate_size"),
            num_layers=take("num_hidden_layers"), num_heads=take("num_attention_heads"),
            patch_size=take("patch_size"), num_channels=take("num_channels", 3), image_size=take("image_size"))
        if "hidden_act" not in vc:  # transformers' PixtralVisionConfig would default to "gelu": not our tower
            raise ConfigError("config.json: vision_config.hidden_act is missing (transformers' Pixtral default "
                              "would be 'gelu'; only the gated 'silu' MLP is supported)")
        kw["hidden_act"] = take("hidden_act")
        head_dim = take("head_dim", None)
        if head_dim is not None and head_dim * kw["num_heads"] != kw["hidden_size"]:
            raise ConfigError(f"config.json: vision_config.head_dim={head_dim} is not hidden_size/num_attention_"
                              f"heads = {kw['hidden_size']}/{kw['num_heads']} (Pixtral derives it that way)")
        eps = {k: float(vc.pop(k)) for k in ("rms_norm_eps", "layer_norm_eps") if k in vc}
        if len(set(eps.values())) > 1:
            raise ConfigError(f"config.json: vision_config norm eps values disagree: {eps}")
        kw["rms_norm_eps"] = next(iter(eps.values()), 1e-5)
        kw["rope_theta"] = _vision_rope_theta(vc.pop("rope_parameters", None), vc.pop("rope_theta", None))
        if vc:
            raise ConfigError(f"config.json: unknown key(s) {sorted('vision_config.' + k for k in vc)} "
                              "(not supported; refusing to guess)")

        def take_root(key, default):
            return hf.pop(key) if key in hf else default

        if take_root("multimodal_projector_bias", False) is not False:
            raise ConfigError("config.json: multimodal_projector_bias=True is not supported (only False)")
        layer = take_root("vision_feature_layer", -1)
        if layer != -1:
            raise ConfigError(f"config.json: vision_feature_layer={layer!r} is not supported (only -1, the "
                              "tower's last hidden state)")
        kw["spatial_merge_size"] = take_root("spatial_merge_size", 2)
        kw["projector_hidden_act"] = take_root("projector_hidden_act", PROJECTOR_HIDDEN_ACT)
        # transformers' Mistral3Config calls the placeholder `image_token_index` (`image_token_id` an alias).
        names = [k for k in ("image_token_id", "image_token_index") if k in hf]
        values = {k: hf.pop(k) for k in names}
        if len(set(values.values())) > 1:
            raise ConfigError(f"config.json: image token ids disagree: {values}")
        kw["image_token_id"] = next(iter(values.values()), IMAGE_TOKEN_ID)
        kw["image_start_token_id"] = take_root("image_start_token_id", IMAGE_START_TOKEN_ID)
        kw["image_break_token_id"] = take_root("image_break_token_id", IMAGE_BREAK_TOKEN_ID)
        kw["image_end_token_id"] = take_root("image_end_token_id", IMAGE_END_TOKEN_ID)
        return cls(**kw)

    def to_hf_root(self) -> dict[str, Any]:
        """The root keys of a VLM config.json that describe this (vision_config included)."""
        return {
            "vision_config": {
                "model_type": VISION_MODEL_TYPE,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "head_dim": self.head_dim,
                "patch_size": self.patch_size,
                "num_channels": self.num_channels,
                "image_size": self.image_size,
                "hidden_act": self.hidden_act,
                "attention_dropout": 0.0,
                "rms_norm_eps": self.rms_norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            },
            "spatial_merge_size": self.spatial_merge_size,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": False,
            "vision_feature_layer": -1,
            **self.special_token_ids,
        }


def _vision_rope_theta(rope: Any, theta_top: Any) -> float:
    """Pixtral's RoPE base: transformers-5 `rope_parameters` (rope_type "default", or "axial" as 5.17 writes
    it), or a top-level `rope_theta` as older exporters write it."""
    if rope is None:
        if theta_top is None:
            raise ConfigError("config.json: vision_config has no rope_theta (neither rope_parameters nor "
                              "top-level)")
        return float(theta_top)
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json: vision_config.rope_parameters must be an object, got {rope!r}")
    unknown = set(rope) - {"rope_type", "type", "rope_theta"}
    if unknown:
        raise ConfigError(f"config.json: unknown vision_config rope parameter(s) {sorted(unknown)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "axial"):
        raise ConfigError(f"config.json: vision_config rope_type {rope_type!r} is not supported "
                          "(Pixtral's 2-D RoPE: 'default' or 'axial')")
    theta = rope.get("rope_theta", theta_top)
    if theta is None:
        raise ConfigError("config.json: vision_config.rope_parameters has no rope_theta")
    if theta_top is not None and float(theta_top) != float(theta):
        raise ConfigError(f"config.json: vision_config.rope_theta={theta_top} disagrees with "
                          f"vision_config.rope_parameters.rope_theta={theta}")
    return float(theta)


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    # RoPE. rope_type "yarn" (the released checkpoints) or "default" (plain RoPE, for tests).
    rope_type: str = "yarn"
    rope_theta: float = 1e6
    rope_factor: float = 16.0
    rope_original_max_position_embeddings: int = 16384
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = 1.0
    rope_mscale_all_dim: float | None = 1.0
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    # Llama-4 query temperature, applied to q after RoPE; None disables it.
    llama_4_scaling_beta: float | None = 0.1
    tie_word_embeddings: bool = False
    mask_token_id: int = 100
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 11
    pad_token_id: int | None = None
    block_size: int = 32
    # dtype the checkpoint declares (informational; the load dtype is chosen by the caller).
    torch_dtype: str = dataclasses.field(default="bfloat16", compare=False)
    # How the checkpoint stores its matmul weights (None: 16-bit). A property of the files, not of the model.
    quantization: Quantization | None = dataclasses.field(default=None, compare=False)
    # The VLM's vision tower and projector (None: the text-only LM).
    vision: VisionConfig | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "block_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads must be a multiple of num_kv_heads: {self.num_heads=} {self.num_kv_heads=}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotate-half RoPE: {self.head_dim=}")
        if self.rope_type not in ("yarn", "default"):
            raise ConfigError(f"unsupported rope_type {self.rope_type!r} (supported: 'yarn', 'default')")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"mask_token_id out of range: {self.mask_token_id=} {self.vocab_size=}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.vision is not None:
            for name, token in self.vision.special_token_ids.items():
                if not isinstance(token, int) or not 0 <= token < self.vocab_size:
                    raise ConfigError(f"{name} out of range: {token!r} (vocab_size {self.vocab_size})")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> Config:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Config:
        """Builds a Config from a parsed `config.json`, strictly (see module docstring)."""
        hf = dict(hf)
        model_type = hf.pop("model_type", MODEL_TYPE)
        if model_type not in (MODEL_TYPE, VLM_MODEL_TYPE, "ministral3", "ministral", "mistral"):
            raise ConfigError(f"config.json: model_type {model_type!r} is not a Nemotron-Labs-Diffusion model")
        # A text-only model_type leaves any vision keys in `hf`: they fail below as unknown keys.
        vision = VisionConfig.take_from_hf(hf) if model_type == VLM_MODEL_TYPE else None
        for key in _IGNORED_KEYS:
            hf.pop(key, None)
        for key, default in _MUST_BE_DEFAULT.items():
            if key in hf:
                value = hf.pop(key)
                if value != default:
                    raise ConfigError(f"config.json: {key}={value!r} is not supported (only {default!r})")
        act = hf.pop("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act={act!r} is not supported (only 'silu')")

        take = _taker(hf)

        kw: dict[str, Any] = dict(
            vocab_size=take("vocab_size"),
            hidden_size=take("hidden_size"),
            intermediate_size=take("intermediate_size"),
            num_layers=take("num_hidden_layers"),
            num_heads=take("num_attention_heads"),
        )
        kw["num_kv_heads"] = take("num_key_value_heads", kw["num_heads"])
        head_dim = take("head_dim", None)
        kw["head_dim"] = head_dim if head_dim is not None else kw["hidden_size"] // kw["num_heads"]
        kw["rms_norm_eps"] = float(take("rms_norm_eps", 1e-5))
        kw["max_position_embeddings"] = take("max_position_embeddings", 262144)
        kw["tie_word_embeddings"] = bool(take("tie_word_embeddings", False))
        kw["mask_token_id"] = take("mask_token_id", 100)
        kw["bos_token_id"] = take("bos_token_id", 1)
        eos = take("eos_token_id", 11)
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
        kw["pad_token_id"] = take("pad_token_id", None)
        block_size = take("block_size", 32)
        kw["block_size"] = 32 if block_size is None else block_size
        kw["torch_dtype"] = str(take("torch_dtype", None) or take("dtype", "bfloat16"))
        hf.pop("dtype", None)
        quantization = take("quantization_config", None)
        kw["quantization"] = None if quantization is None else Quantization.from_dict(quantization)

        # RoPE: transformers-5 `rope_parameters` first, then `rope_scaling` + top-level `rope_theta`.
        rope = hf.pop("rope_parameters", None)
        legacy = hf.pop("rope_scaling", None)
        theta_top = hf.pop("rope_theta", None)
        if rope is None:
            rope = dict(legacy or {})
            if theta_top is not None:
                rope.setdefault("rope_theta", theta_top)
        else:
            rope = dict(rope)
            if theta_top is not None:  # an older exporter may keep theta only at the top level
                rope.setdefault("rope_theta", theta_top)
                if rope["rope_theta"] != theta_top:
                    raise ConfigError(f"config.json: rope_theta={theta_top} disagrees with "
                                      f"rope_parameters.rope_theta={rope['rope_theta']}")
        kw.update(_rope_from_dict(rope))
        kw["vision"] = vision
        if hf:
            raise ConfigError(f"config.json: unknown key(s) {sorted(hf)} (not supported; refusing to guess)")
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_config(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The NLD `config.json` for this config (round-trips through from_hf_config)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            rope.update(factor=self.rope_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings,
                        beta_fast=self.rope_beta_fast, beta_slow=self.rope_beta_slow,
                        mscale=self.rope_mscale, mscale_all_dim=self.rope_mscale_all_dim)
            if self.rope_attention_factor is not None:
                rope["attention_factor"] = self.rope_attention_factor
            if not self.rope_truncate:
                rope["truncate"] = False
        if self.llama_4_scaling_beta is not None:
            rope["llama_4_scaling_beta"] = self.llama_4_scaling_beta
            rope.setdefault("original_max_position_embeddings", self.rope_original_max_position_embeddings)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        vlm = self.vision is not None
        return {
            "architectures": [VLM_ARCHITECTURE if vlm else "NemotronLabsDiffusionModel"],
            "model_type": VLM_MODEL_TYPE if vlm else MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mask_token_id": self.mask_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "block_size": self.block_size,
            "dlm_paradigm": "bidirectional",
            "torch_dtype": self.torch_dtype,
            **({"quantization_config": self.quantization.to_dict()} if self.quantization else {}),
            **(self.vision.to_hf_root() if vlm else {}),
        }


_REQUIRED = object()


def _taker(d: dict, prefix: str = ""):
    """take(key, default=required): pops `key` from the config dict `d`; a missing required key is an error
    naming it (with `prefix`, e.g. "vision_config.")."""

    def take(key, default=_REQUIRED):
        if key in d:
            return d.pop(key)
        if default is _REQUIRED:
            raise ConfigError(f"config.json: required key {prefix + key!r} is missing")
        return default

    return take

# Keys of real NLD configs that do not change inference: metadata, training-only switches, HF plumbing.
_IGNORED_KEYS = (
    "architectures", "auto_map", "transformers_version", "_name_or_path", "dlm_paradigm", "dlm_type",
    "dlm_loss_weight", "ar_loss_weight", "dp_varying_mask_ratio", "attn_implementation", "_attn_implementation",
    "use_cache", "initializer_range", "output_attentions", "output_hidden_states", "return_dict",
    "use_return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "torchscript", "id2label", "label2id",
    "problem_type", "tokenizer_class", "num_labels", "pretraining_tp", "layer_types",
)

# HF keys whose only supported value is the "feature off" default.
_MUST_BE_DEFAULT: dict[str, Any] = {
    "sliding_window": None,
    "use_sliding_window": False,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "tie_encoder_decoder": False,
    "add_cross_attention": False,
    "is_decoder": False,
    "cross_attention_hidden_size": None,
    "pruned_heads": {},
}

_ROPE_KEYS = {
    "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "llama_4_scaling_beta", "attention_factor", "truncate",
}


def _rope_from_dict(rope: dict[str, Any]) -> dict[str, Any]:
    unknown = set(rope) - _ROPE_KEYS
    if unknown:
        raise ConfigError(f"config.json: unknown rope parameter(s) {sorted(unknown)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if "rope_theta" not in rope:
        raise ConfigError("config.json: rope_theta is missing (neither rope_parameters nor top-level)")
    out: dict[str, Any] = dict(rope_type=rope_type, rope_theta=float(rope["rope_theta"]))
    beta4 = rope.get("llama_4_scaling_beta")
    out["llama_4_scaling_beta"] = None if beta4 is None else float(beta4)
    if "original_max_position_embeddings" in rope:
        out["rope_original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    if rope_type == "yarn":
        if "factor" not in rope or "original_max_position_embeddings" not in rope:
            raise ConfigError("config.json: yarn rope needs 'factor' and 'original_max_position_embeddings'")
        out.update(
            rope_factor=float(rope["factor"]),
            rope_beta_fast=float(rope.get("beta_fast") or 32.0),
            rope_beta_slow=float(rope.get("beta_slow") or 1.0),
            rope_mscale=None if rope.get("mscale") is None else float(rope["mscale"]),
            rope_mscale_all_dim=None if rope.get("mscale_all_dim") is None else float(rope["mscale_all_dim"]),
            rope_attention_factor=None if rope.get("attention_factor") is None else float(rope["attention_factor"]),
            rope_truncate=bool(rope.get("truncate", True)),
        )
    elif rope_type == "default":
        extra = {"factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"} & set(rope)
        if extra:
            raise ConfigError(f"config.json: rope parameter(s) {sorted(extra)} make no sense for rope_type 'default'")
    return out


# ------------------------------------------------------------------ presets (spec §2.1)

def _preset(hidden, layers, inter, theta, **kw) -> Config:
    return Config(vocab_size=131072, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                  num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=theta, **kw)


PRESETS: dict[str, Config] = {
    "3B": _preset(3072, 26, 9216, 1e6),
    "8B": _preset(4096, 34, 14336, 1e6),
    "14B": _preset(5120, 40, 16384, 1e9),
    # Tiny test size: GQA, head_dim != hidden/heads, yarn with a small original context so tests cross it.
    "tiny": Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=32, max_position_embeddings=256, rope_theta=1e4, rope_factor=4.0,
                   rope_original_max_position_embeddings=64, block_size=8),
}


# The VLM (spec §12): NLD-8B's text model with the VLM tokenizer's vocabulary (|<MASK>| added at 131072; the
# model's mask_token_id stays 100), a Pixtral tower and a Mistral3 projector. Kept apart from PRESETS, which
# name the text models the benchmarks and the CLI size choices iterate over.
VLM_PRESETS: dict[str, Config] = {
    "VLM-8B": PRESETS["8B"].replace(vocab_size=131073, vision=VisionConfig()),
    # Tiny test size: two images of different grids in one tower pass stay cheap; 4-pixel patches.
    "tiny-vlm": PRESETS["tiny"].replace(vision=VisionConfig(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=4, image_size=64)),
}


def num_params(cfg: Config) -> int:
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    vision = 0 if cfg.vision is None else num_vision_params(cfg)
    return cfg.num_layers * per_layer + cfg.vocab_size * d + head + d + vision


def num_vision_params(cfg: Config) -> int:
    """The tower (patch conv, ln_pre, layers) and the projector (norm, merging layer, two linears)."""
    v, d = cfg.vision, cfg.hidden_size
    dv, fv, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    tower = dv * v.num_channels * v.patch_size ** 2 + dv + v.num_layers * (4 * dv * dv + 3 * dv * fv + 2 * dv)
    return tower + dv + m2 * dv * dv + dv * d + d * d


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
