"""The VLM config.json (spec §12): text keys at the root as the LM's, a Pixtral `vision_config`, the projector and
image-token keys at the root; read strictly (unknown or unsupported fields are errors naming them), round trips."""

import copy
import json

import pytest

from nemodiff_jax import rope
from nemodiff_jax.config import (IMAGE_TOKEN_ID, PRESETS, VLM_PRESETS, Config, ConfigError, VisionConfig,
                                 num_vision_params)

from test_config import nld_config


def vlm_config(**root) -> dict:
    """A VLM-8B config.json as spec §12 describes it (transformers-5 style), with a transformers 5.17 sub-config's
    generic keys in vision_config."""
    hf = nld_config() | {
        "architectures": ["NemotronLabsDiffusionVLMModel"],
        "model_type": "nemotron_labs_diffusion_vlm",
        "vocab_size": 131073,
        "vision_config": {
            "model_type": "pixtral", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
            "head_dim": 64, "intermediate_size": 4096, "patch_size": 14, "num_channels": 3, "image_size": 1540,
            "hidden_act": "silu", "attention_dropout": 0.0, "rope_parameters": {"rope_type": "axial",
                                                                                "rope_theta": 10000.0},
            "initializer_range": 0.02, "transformers_version": "5.17.0", "architectures": None, "dtype": None,
            "output_hidden_states": False, "return_dict": True, "chunk_size_feed_forward": 0,
            "is_encoder_decoder": False, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
            "problem_type": None, "_name_or_path": "", "output_attentions": False,
        },
        "spatial_merge_size": 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
        "image_token_id": 19,
    }
    return hf | root


def with_vision(**kw) -> dict:
    hf = vlm_config()
    hf["vision_config"] |= kw
    return hf


def without_vision(*keys) -> dict:
    hf = vlm_config()
    for k in keys:
        del hf["vision_config"][k]
    return hf


def test_vlm_8b_config_json_equals_preset():
    cfg = Config.from_hf_config(vlm_config())
    assert cfg == VLM_PRESETS["VLM-8B"]
    v = cfg.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.head_dim, v.intermediate_size, v.patch_size) == (
        1024, 24, 16, 64, 4096, 14)
    assert (v.rope_theta, v.rms_norm_eps, v.spatial_merge_size, v.projector_hidden_act) == (1e4, 1e-5, 2, "gelu")
    assert (v.image_start_token_id, v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (18, 19, 20, 21)
    # the text model is NLD-8B's but for the vocabulary (|<MASK>| appended; mask_token_id stays 100)
    assert cfg.replace(vision=None, vocab_size=131072) == PRESETS["8B"] and cfg.mask_token_id == 100
    assert hash(cfg)  # jit-static


def test_vision_param_count_of_vlm_8b():
    # tower 402.7 M + patch conv 0.6 M + projector 25.2 M (merging 4096x1024, linear_1 1024x4096, linear_2 4096^2)
    assert num_vision_params(VLM_PRESETS["VLM-8B"]) == 428_472_320


@pytest.mark.parametrize("name", sorted(VLM_PRESETS))
def test_to_hf_config_round_trip(name):
    cfg = VLM_PRESETS[name]
    hf = json.loads(json.dumps(cfg.to_hf_config()))
    assert hf["model_type"] == "nemotron_labs_diffusion_vlm"
    assert hf["architectures"] == ["NemotronLabsDiffusionVLMModel"]
    assert hf["vision_config"]["model_type"] == "pixtral"
    assert Config.from_hf_config(hf) == cfg


def test_to_hf_config_round_trip_variants():
    base = VLM_PRESETS["tiny-vlm"]
    v = base.vision
    for vision in (VisionConfig(**{**vars(v), "projector_hidden_act": "gelu_pytorch_tanh"}),
                   VisionConfig(**{**vars(v), "image_token_id": 40, "image_start_token_id": 41,
                                   "image_break_token_id": 42, "image_end_token_id": 43}),
                   VisionConfig(**{**vars(v), "rms_norm_eps": 1e-6, "rope_theta": 100.0, "spatial_merge_size": 1})):
        cfg = base.replace(vision=vision)
        assert Config.from_hf_config(json.loads(json.dumps(cfg.to_hf_config()))) == cfg, vision


def test_text_config_unchanged_by_vision_support():
    assert PRESETS["8B"].vision is None
    assert "vision_config" not in PRESETS["8B"].to_hf_config()
    assert PRESETS["8B"].to_hf_config()["model_type"] == "nemotron_labs_diffusion"


def test_input_dict_not_mutated():
    hf = vlm_config()
    before = copy.deepcopy(hf)
    Config.from_hf_config(hf)
    assert hf == before


# ------------------------------------------------------------------ accepted spellings


def test_top_level_vision_rope_theta():
    hf = without_vision("rope_parameters")
    hf["vision_config"]["rope_theta"] = 10000.0
    assert Config.from_hf_config(hf) == VLM_PRESETS["VLM-8B"]
    hf = with_vision(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert Config.from_hf_config(hf) == VLM_PRESETS["VLM-8B"]


def test_image_token_index_alias():
    hf = vlm_config()
    del hf["image_token_id"]
    assert Config.from_hf_config(hf | {"image_token_index": 19}) == VLM_PRESETS["VLM-8B"]
    assert Config.from_hf_config(hf).vision.image_token_id == IMAGE_TOKEN_ID  # absent: spec §12's id 19
    assert Config.from_hf_config(hf | {"image_token_index": 7}).vision.image_token_id == 7


@pytest.mark.parametrize("key", ["rms_norm_eps", "layer_norm_eps"])
def test_vision_norm_eps(key):
    assert Config.from_hf_config(with_vision(**{key: 1e-6})).vision.rms_norm_eps == 1e-6


def test_vision_rope_frequencies():
    """Pixtral 2-D RoPE: even-indexed frequencies turn with the row, odd-indexed with the column."""
    import jax.numpy as jnp
    import numpy as np

    v = VisionConfig(hidden_size=32, num_heads=2, rope_theta=100.0)  # head_dim 16: 8 frequencies
    inv = 1.0 / 100.0 ** (np.arange(0, 16, 2) / 16)
    cos, sin = rope.pixtral_cos_sin(v, jnp.array([3]), jnp.array([5]))
    want = np.concatenate([3 * inv[0::2], 5 * inv[1::2]] * 2)
    np.testing.assert_allclose(np.asarray(cos[0]), np.cos(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin[0]), np.sin(want), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ strictness


def test_unknown_vision_field_raises_naming_it():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['vision_config.num_key_value_heads'\]"):
        Config.from_hf_config(with_vision(num_key_value_heads=4))


def test_unknown_root_field_raises_naming_it():
    with pytest.raises(ConfigError, match="image_newline_token_id"):
        Config.from_hf_config(vlm_config(image_newline_token_id=12))


def test_unknown_vision_rope_key_raises_naming_it():
    with pytest.raises(ConfigError, match="mrope_section"):
        Config.from_hf_config(with_vision(rope_parameters={"rope_theta": 1e4, "mrope_section": [1, 2]}))


@pytest.mark.parametrize("hf,match", [
    (with_vision(hidden_act="gelu"), r"vision_config.hidden_act='gelu' is not supported"),
    (without_vision("hidden_act"), r"vision_config.hidden_act is missing \(transformers' Pixtral default "),
    (with_vision(model_type="siglip_vision_model"), "vision_config.model_type 'siglip_vision_model'"),
    (with_vision(head_dim=128), r"vision_config.head_dim=128 is not hidden_size/num_attention_heads"),
    (with_vision(attention_dropout=0.1), "vision_config.attention_dropout is not supported"),
    (with_vision(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "vision_config rope_type 'yarn'"),
    (with_vision(rope_parameters={"rope_type": "default"}), "vision_config.rope_parameters has no rope_theta"),
    (without_vision("rope_parameters"), "vision_config has no rope_theta"),
    (with_vision(rope_theta=1e5), "vision_config.rope_theta=100000.0 disagrees"),
    (with_vision(rms_norm_eps=1e-5, layer_norm_eps=1e-6), "vision_config norm eps values disagree"),
    (with_vision(patch_size=[14, 14]), r"vision_config.patch_size must be a positive int, got \[14, 14\]"),
    (with_vision(num_attention_heads=12, head_dim=None), "hidden_size/num_attention_heads must be an int"),
    (with_vision(num_attention_heads=512, head_dim=2), "divisible by 4"),  # 2-D RoPE needs head_dim % 4 == 0
    (without_vision("hidden_size"), "required key 'vision_config.hidden_size' is missing"),
    (without_vision("image_size"), "required key 'vision_config.image_size' is missing"),
    (vlm_config(vision_config=None), "needs a 'vision_config' object"),
    (vlm_config(multimodal_projector_bias=True), "multimodal_projector_bias=True is not supported"),
    (vlm_config(vision_feature_layer=-2), r"vision_feature_layer=-2 is not supported"),
    (vlm_config(vision_feature_layer=[-1, -2]), r"vision_feature_layer=\[-1, -2\] is not supported"),
    (vlm_config(projector_hidden_act="relu"), r"projector_hidden_act='relu' is not supported"),
    (vlm_config(image_token_index=10), "image token ids disagree"),
    (vlm_config(image_token_id=131073), r"image_token_id out of range: 131073"),
    (vlm_config(image_end_token_id=19), "the image token ids must differ"),
    (vlm_config(text_config={"model_type": "ministral3"}), r"unknown key\(s\) \['text_config'\]"),
])
def test_bad_vlm_config_raises_naming_the_field(hf, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_hf_config(hf)


def test_vision_keys_in_a_text_config_are_errors():
    """A text-only model_type with vision keys is not silently read as the text model."""
    hf = vlm_config(model_type="nemotron_labs_diffusion")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \[.*'vision_config'.*\]"):
        Config.from_hf_config(hf)


def test_from_file_names_file_and_vision_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(with_vision(use_cls_token=True)))
    with pytest.raises(ConfigError, match="vision_config.use_cls_token") as e:
        Config.from_file(path)
    assert str(path) in str(e.value)
