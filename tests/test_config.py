"""Config: the strict HF config.json reader, presets, round trip; YaRN frequencies and the Llama-4 query scale
(spec §2.1, §3.4-3.5)."""

import copy
import json
import math

import numpy as np
import pytest

from nemodiff_jax import rope
from nemodiff_jax.config import PRESETS, Config, ConfigError

MODEL_FIELDS = [f for f in Config.__dataclass_fields__ if f != "torch_dtype"]


def nld_config(hidden=4096, layers=34, inter=14336, theta=1e6) -> dict:
    """A config.json as the released NLD checkpoints ship it (spec §2.1), transformers-5 style."""
    rope_parameters = {
        "rope_type": "yarn", "rope_theta": theta, "factor": 16.0, "original_max_position_embeddings": 16384,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
    }
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "auto_map": {
            "AutoConfig": "configuration_nemotron_labs_diffusion.NemotronLabsDiffusionConfig",
            "AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel",
        },
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": 131072,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 262144,
        "rope_parameters": rope_parameters,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "mask_token_id": 100,
        "bos_token_id": 1,
        "eos_token_id": 11,
        "pad_token_id": None,
        "block_size": 32,
        "dlm_paradigm": "bidirectional",
        "dlm_loss_weight": None,
        "ar_loss_weight": 1.0,
        "dp_varying_mask_ratio": False,
        "attn_implementation": "sdpa",
        "use_cache": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "5.0.0",
    }


def model_fields(cfg: Config) -> dict:
    return {f: getattr(cfg, f) for f in MODEL_FIELDS}


# ------------------------------------------------------------------ from_hf_config


def test_8b_config_json_equals_preset():
    cfg = Config.from_hf_config(nld_config())
    assert model_fields(cfg) == model_fields(PRESETS["8B"])
    assert cfg.torch_dtype == "bfloat16"
    assert cfg == PRESETS["8B"]


def test_14b_config_json_equals_preset():
    cfg = Config.from_hf_config(nld_config(hidden=5120, layers=40, inter=16384, theta=1e9))
    assert cfg.rope_theta == 1e9
    assert model_fields(cfg) == model_fields(PRESETS["14B"])


def test_config_with_legacy_mirrors_equals_preset():
    # The HF config class mirrors rope_parameters into rope_scaling and a top-level rope_theta.
    hf = nld_config(hidden=5120, layers=40, inter=16384, theta=1e9)
    hf["rope_scaling"] = dict(hf["rope_parameters"])
    hf["rope_theta"] = 1e9
    assert model_fields(Config.from_hf_config(hf)) == model_fields(PRESETS["14B"])


def test_rope_parameters_win_over_rope_scaling():
    hf = nld_config(theta=1e9)
    hf["rope_scaling"] = {**hf["rope_parameters"], "rope_theta": 1e6, "factor": 8.0, "beta_fast": 16.0}
    cfg = Config.from_hf_config(hf)
    assert (cfg.rope_theta, cfg.rope_factor, cfg.rope_beta_fast) == (1e9, 16.0, 32.0)


def test_fallback_to_rope_scaling_and_top_level_theta():
    hf = nld_config()
    params = hf.pop("rope_parameters")
    hf["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"} | {"factor": 8.0}
    hf["rope_theta"] = 1e9
    cfg = Config.from_hf_config(hf)
    assert cfg.rope_theta == 1e9
    assert cfg.rope_factor == 8.0
    assert cfg.rope_type == "yarn"
    assert cfg.llama_4_scaling_beta == 0.1
    assert model_fields(cfg) == model_fields(PRESETS["8B"].replace(rope_theta=1e9, rope_factor=8.0))


def test_legacy_type_key_in_rope_scaling():
    hf = nld_config()
    params = hf.pop("rope_parameters")
    hf["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in params.items() if k != "rope_theta"}
    hf["rope_theta"] = 1e6
    assert model_fields(Config.from_hf_config(hf)) == model_fields(PRESETS["8B"])


def test_rope_parameters_without_theta_fall_back_to_top_level():
    hf = nld_config()
    del hf["rope_parameters"]["rope_theta"]
    hf["rope_theta"] = 1e9
    assert model_fields(Config.from_hf_config(hf)) == model_fields(PRESETS["8B"].replace(rope_theta=1e9))


def test_rope_theta_disagreement_raises():
    hf = nld_config(theta=1e9)
    hf["rope_theta"] = 1e6
    with pytest.raises(ConfigError, match="rope_theta"):
        Config.from_hf_config(hf)


def test_missing_rope_theta_raises():
    hf = nld_config()
    del hf["rope_parameters"]["rope_theta"]
    with pytest.raises(ConfigError, match="rope_theta is missing"):
        Config.from_hf_config(hf)


def test_unknown_key_raises_naming_it():
    hf = nld_config()
    hf["num_experts_per_tok"] = 2
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        Config.from_hf_config(hf)


def test_unknown_rope_key_raises_naming_it():
    hf = nld_config()
    hf["rope_parameters"]["short_factor"] = [1.0]
    with pytest.raises(ConfigError, match="short_factor"):
        Config.from_hf_config(hf)


@pytest.mark.parametrize("key,value", [
    ("sliding_window", 4096),
    ("use_sliding_window", True),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("attention_dropout", 0.1),
    ("hidden_act", "gelu"),
])
def test_unsupported_non_default_value_raises_naming_it(key, value):
    hf = nld_config()
    hf[key] = value
    with pytest.raises(ConfigError, match=rf"{key}={value!r} is not supported"):
        Config.from_hf_config(hf)


def test_default_values_of_unsupported_features_are_accepted():
    hf = nld_config() | {"sliding_window": None, "use_sliding_window": False, "hidden_act": "silu"}
    assert model_fields(Config.from_hf_config(hf)) == model_fields(PRESETS["8B"])


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads"])
def test_missing_required_key_raises_naming_it(key):
    hf = nld_config()
    del hf[key]
    with pytest.raises(ConfigError, match=f"required key '{key}' is missing"):
        Config.from_hf_config(hf)


def test_wrong_model_type_raises():
    with pytest.raises(ConfigError, match="'llama'"):
        Config.from_hf_config(nld_config() | {"model_type": "llama"})


def test_eos_list_becomes_tuple():
    cfg = Config.from_hf_config(nld_config() | {"eos_token_id": [11, 2]})
    assert cfg.eos_token_id == (11, 2) and cfg.eos_token_ids == (11, 2)
    assert hash(cfg)  # jit-static


def test_input_dict_not_mutated():
    hf = nld_config()
    before = copy.deepcopy(hf)
    Config.from_hf_config(hf)
    assert hf == before


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_config_round_trip(name):
    cfg = PRESETS[name]
    hf = cfg.to_hf_config()
    assert Config.from_hf_config(json.loads(json.dumps(hf))) == cfg


def test_to_hf_config_round_trip_variants():
    base = PRESETS["tiny"]
    for cfg in (base.replace(tie_word_embeddings=True), base.replace(eos_token_id=(11, 2), pad_token_id=0),
                base.replace(llama_4_scaling_beta=None), base.replace(rope_attention_factor=1.5),
                base.replace(rope_truncate=False), base.replace(rope_type="default", rope_factor=16.0),
                # plain RoPE without the query scale: the yarn-only fields are unused and not written
                base.replace(rope_type="default", llama_4_scaling_beta=None, rope_factor=16.0,
                             rope_original_max_position_embeddings=16384),
                base.replace(torch_dtype="float32")):
        assert Config.from_hf_config(json.loads(json.dumps(cfg.to_hf_config()))) == cfg, cfg


def test_from_file_invalid_json_names_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 1,,}')
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        Config.from_file(path)
    assert str(path) in str(e.value)


def test_from_file_bad_key_names_file_and_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(nld_config() | {"sliding_window": 4096}))
    with pytest.raises(ConfigError, match="sliding_window") as e:
        Config.from_file(path)
    assert str(path) in str(e.value)


def test_from_file_reads_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(nld_config()))
    assert Config.from_file(path) == PRESETS["8B"]


@pytest.mark.parametrize("kw,match", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(head_dim=33), "head_dim must be even"),
    (dict(mask_token_id=256), "mask_token_id out of range"),
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(rope_type="linear"), "unsupported rope_type"),
])
def test_invalid_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        PRESETS["tiny"].replace(**kw)


# ------------------------------------------------------------------ YaRN and the Llama-4 query scale


@pytest.mark.parametrize("theta,low,high", [(1e6, 20, 37), (1e9, 13, 25)])
def test_yarn_inv_freq(theta, low, high):
    cfg = PRESETS["8B"].replace(rope_theta=theta)
    inv_freq, attention_factor = rope.inv_freq_and_attention_factor(cfg)
    assert attention_factor == 1.0  # no 0.1*ln(16)+1 magnitude scaling for this checkpoint
    assert inv_freq.shape == (64,) and inv_freq.dtype == np.float32
    i = np.arange(64)
    original = theta ** (-2.0 * i / 128)
    # High-frequency dims keep their frequency, low-frequency dims are interpolated by the factor 16.
    np.testing.assert_allclose(inv_freq[: low + 1], original[: low + 1], rtol=1e-6)
    np.testing.assert_allclose(inv_freq[high:], original[high:] / 16, rtol=1e-6)
    ratio = original / inv_freq
    assert np.all((ratio[low + 1 : high] > 1.001) & (ratio[low + 1 : high] < 15.99)), ratio
    # The linear ramp in between, exactly the transformers formula.
    ramp = np.clip((i - low) / (high - low), 0, 1)
    np.testing.assert_allclose(inv_freq, original / 16 * ramp + original * (1 - ramp), rtol=1e-6)


def test_yarn_ramp_boundaries_from_correction_dims():
    # The spec's low/high come from floor/ceil of the correction dims; recompute independently.
    for theta, low, high in [(1e6, 20, 37), (1e9, 13, 25)]:
        corr = lambda r: 128 * math.log(16384 / (2 * math.pi * r)) / (2 * math.log(theta))  # noqa: E731
        assert (math.floor(corr(32)), math.ceil(corr(1))) == (low, high)


def test_default_rope_is_plain():
    cfg = PRESETS["tiny"].replace(rope_type="default", llama_4_scaling_beta=None)
    inv_freq, attention_factor = rope.inv_freq_and_attention_factor(cfg)
    assert attention_factor == 1.0
    np.testing.assert_allclose(inv_freq, 1e4 ** (-np.arange(0, 32, 2) / 32), rtol=1e-6)


def test_llama4_query_scale():
    cfg = PRESETS["8B"]
    pos = np.array([[0, 1, 100, 16383, 16384, 32767, 32768, 49152]], np.int32)
    s = np.asarray(rope.llama4_query_scale(cfg, pos))
    want = [1, 1, 1, 1, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3),
            1 + 0.1 * math.log(4)]
    assert s.dtype == np.float32
    assert np.all(s[0, :4] == 1.0)  # exactly 1 below the original context
    np.testing.assert_allclose(s[0], want, rtol=1e-6)
    assert rope.llama4_query_scale(cfg.replace(llama_4_scaling_beta=None), pos) is None
