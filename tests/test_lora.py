"""The PEFT drafter adapter: strict loading, round trip, `load(path, drafter=...)`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import nemodiff_jax
from nemodiff_jax.convert.hf import save_hf
from nemodiff_jax.convert.safetensors_io import CheckpointError
from nemodiff_jax.config import PRESETS
from nemodiff_jax.lora import load_lora, random_lora, save_lora
from nemodiff_jax.model import Transformer

CFG = PRESETS["tiny"]
PREFIX = "base_model.model.encoder.layers.{}.self_attn.o_proj.lora_{}.weight"


@pytest.fixture()
def adapter(tmp_path):
    lora = random_lora(CFG, jax.random.key(1), rank=8, alpha=32.0, std=0.3)
    return lora, save_lora(lora, tmp_path / "linear_spec_lora", CFG)


def test_round_trip_is_exact(adapter):
    lora, path = adapter
    back = load_lora(path, CFG, jnp.float32)
    assert back.scale == pytest.approx(4.0) and back.rank == 8
    for a, b in zip(lora.a + lora.b, back.a + back.b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    t = safetensors.numpy.load_file(str(path / "adapter_model.safetensors"))
    # PEFT layout: A [r, N*H], B [D, r]
    assert t[PREFIX.format(0, "A")].shape == (8, CFG.num_heads * CFG.head_dim)
    assert t[PREFIX.format(1, "B")].shape == (CFG.hidden_size, 8)


def edit(path, config=None, tensors=None):
    if config is not None:
        c = json.loads((path / "adapter_config.json").read_text())
        c.update(config)
        (path / "adapter_config.json").write_text(json.dumps(c))
    if tensors is not None:
        t = safetensors.numpy.load_file(str(path / "adapter_model.safetensors"))
        t = tensors(t)
        safetensors.numpy.save_file(t, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("change,msg", [
    (dict(config={"target_modules": ["q_proj", "o_proj"]}), r"target_modules \['q_proj', 'o_proj'\] not supported"),
    (dict(config={"lora_dropout": 0.1}), "lora_dropout must be 0"),
    (dict(config={"peft_type": "IA3"}), "is not LORA"),
    (dict(tensors=lambda t: {k: v for k, v in t.items() if "layers.1." not in k}), r"missing \['layer 1 lora_A'"),
    (dict(tensors=lambda t: {**t, PREFIX.format(0, "A"): np.zeros((8, 7), np.float32)}),
     r"lora_A.weight' has shape \[8, 7\], expected \[8, 128\] \(is this LoRA for another model shape\?\)"),
    (dict(tensors=lambda t: {**t, PREFIX.format(5, "A"): np.zeros((8, 128), np.float32)}),
     "unexpected tensor .*layers.5.*for a 2-layer model"),
])
def test_strict_errors(adapter, change, msg):
    _, path = adapter
    edit(path, **change)
    with pytest.raises(CheckpointError, match=msg):
        load_lora(path, CFG)


def test_not_an_adapter_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_lora(tmp_path, CFG)


def test_load_with_drafter_keeps_output_and_changes_drafts(tmp_path, adapter):
    _, lora_dir = adapter
    save_hf(Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32), tmp_path / "m")
    plain = nemodiff_jax.load(tmp_path / "m", dtype="float32", progress=False)
    drafted = nemodiff_jax.load(tmp_path / "m", dtype="float32", progress=False, drafter=lora_dir)
    assert plain.drafter is None and drafted.drafter is not None
    prompts = [[1, 5, 6, 7], [1, 9]]
    ar = [r.tokens for r in plain.generate(prompts, mode="ar", max_new_tokens=24, stop_token_ids=[])]
    a = plain.generate(prompts, mode="linear_spec", max_new_tokens=24, stop_token_ids=[], threshold=0.3)
    b = drafted.generate(prompts, mode="linear_spec", max_new_tokens=24, stop_token_ids=[], threshold=0.3)
    assert [r.tokens for r in a] == [r.tokens for r in b] == ar  # the verifier never sees the LoRA
    assert [r.stats["decode_forward_passes"] for r in a] != [r.stats["decode_forward_passes"] for r in b]
