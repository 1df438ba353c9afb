"""HF safetensors <-> nnx conversion of the VLM (spec §12: the tower and projector inside `encoder`): the name
table and layouts, bit-exact round trips, strictness errors that name the tensor, orbax, quantization leaving the
tower alone; text-only checkpoints are unaffected (tests/test_convert.py)."""

import json
import math
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import nemodiff_jax
from nemodiff_jax import vision
from nemodiff_jax.config import PRESETS, VLM_PRESETS, Config, num_params
from nemodiff_jax.convert.hf import (INDEX_FILE, layout, load_model, model_tensors_hf, read_hf_tensors,
                                     save_hf)
from nemodiff_jax.convert.orbax_io import save_orbax
from nemodiff_jax.convert.safetensors_io import CheckpointError
from nemodiff_jax.model import abstract_model, quantize_weights
from test_convert import random_model  # random weights filled host-side

CFG = VLM_PRESETS["tiny-vlm"]
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
FIXTURE = Path(__file__).parent / "fixtures" / "vlm" / "two_rows_three_images"


def raw_bytes(arrays):
    return {k: v.tobytes() for k, v in arrays.items()}


def vision_names(names):
    return sorted(n for n in names if ".vision_tower." in n or ".multi_modal_projector." in n)


@pytest.fixture(scope="module")
def models():
    return {"float32": random_model(CFG, jnp.float32), "bfloat16": random_model(CFG, jnp.bfloat16)}


@pytest.fixture(scope="module")
def hf_tensors(models):
    return model_tensors_hf(models["float32"])


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return vision.patchify([rng.standard_normal((3, 16, 8)), rng.standard_normal((3, 8, 24))], CFG.vision)


def write_checkpoint(d, tensors, cfg=CFG):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / "model.safetensors"))
    return d


def load(d, cfg=CFG, dtype=jnp.float32):
    return load_model(d, cfg, dtype, progress=False)


# ------------------------------------------------------------------ the name table (spec §12)


def test_vlm_8b_tensor_names_and_shapes():
    cfg = VLM_PRESETS["VLM-8B"]
    shapes = {name: pc.hf_shape for name, pc in layout(cfg).items()}
    assert len(shapes) == (9 * 34 + 3) + (2 + 9 * 24) + 4
    # the text model's names and shapes are NLD-8B's (vocab 131073)
    text = {n: s for n, s in shapes.items() if n not in vision_names(shapes)}
    assert text == {name: pc.hf_shape for name, pc in layout(PRESETS["8B"].replace(vocab_size=131073)).items()}
    t, j = "encoder.vision_tower.", "encoder.multi_modal_projector."
    assert shapes[t + "patch_conv.weight"] == (1024, 3, 14, 14)
    assert shapes[t + "ln_pre.weight"] == (1024,)
    for i in (0, 23):
        p = f"{t}transformer.layers.{i}."
        for name in ("attention_norm", "ffn_norm"):
            assert shapes[p + name + ".weight"] == (1024,)
        for name in "qkvo":
            assert shapes[f"{p}attention.{name}_proj.weight"] == (1024, 1024)
        assert shapes[p + "feed_forward.gate_proj.weight"] == shapes[p + "feed_forward.up_proj.weight"] == (4096, 1024)
        assert shapes[p + "feed_forward.down_proj.weight"] == (1024, 4096)
    assert f"{t}transformer.layers.24.ffn_norm.weight" not in shapes
    assert shapes[j + "norm.weight"] == (1024,)
    assert shapes[j + "patch_merger.merging_layer.weight"] == (1024, 4096)
    assert shapes[j + "linear_1.weight"] == (4096, 1024)
    assert shapes[j + "linear_2.weight"] == (4096, 4096)
    assert not [n for n in shapes if n.endswith(".bias")]
    # the pieces tile the nnx params exactly, and num_params counts them all
    flat = list(nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)))
    sizes = {}
    for pc in layout(cfg).values():
        sizes[pc.path] = sizes.get(pc.path, 0) + math.prod(pc.hf_shape)
    assert sizes == {path: math.prod(var.shape) for path, var in flat}
    assert sum(math.prod(s) for s in shapes.values()) == num_params(cfg)


def test_hf_layout(models):
    """PyTorch [out, in] layout, element-wise against the nnx parameters (fused qkv, split heads, conv)."""
    m = models["float32"]
    t = model_tensors_hf(m)
    v = CFG.vision
    h = v.head_dim
    layer = m.vision_tower.layers[1]
    qkv, o = np.asarray(layer.attention.qkv[...]), np.asarray(layer.attention.o[...])  # [E,3,N,H], [N,H,E]
    p = "encoder.vision_tower.transformer.layers.1."
    for head, j, x in [(0, 0, 0), (1, 15, 31), (1, 3, 7)]:
        for q, name in enumerate("qkv"):
            assert t[f"{p}attention.{name}_proj.weight"][head * h + j, x] == qkv[x, q, head, j]
        assert t[p + "attention.o_proj.weight"][x, head * h + j] == o[head, j, x]
    gate_up = np.asarray(layer.feed_forward.gate_up[...])
    np.testing.assert_array_equal(t[p + "feed_forward.gate_proj.weight"], gate_up[:, 0].T)
    np.testing.assert_array_equal(t[p + "feed_forward.up_proj.weight"], gate_up[:, 1].T)
    np.testing.assert_array_equal(t[p + "feed_forward.down_proj.weight"], np.asarray(layer.feed_forward.down[...]).T)
    conv = np.asarray(m.vision_tower.patch_conv[...])  # [C, Y, X, E]
    np.testing.assert_array_equal(t["encoder.vision_tower.patch_conv.weight"], conv.transpose(3, 0, 1, 2))
    proj = m.multi_modal_projector
    for hf, param in (("patch_merger.merging_layer", proj.merging_layer), ("linear_1", proj.linear_1),
                      ("linear_2", proj.linear_2)):
        np.testing.assert_array_equal(t[f"encoder.multi_modal_projector.{hf}.weight"], np.asarray(param[...]).T)
    np.testing.assert_array_equal(t["encoder.multi_modal_projector.norm.weight"], np.asarray(proj.norm.weight[...]))


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "index"])
def test_round_trip_bit_exact(tmp_path, models, images, dtype, sharded):
    model = models[dtype]
    want = model_tensors_hf(model)
    assert {a.dtype for a in want.values()} == {np.dtype(np.float32) if dtype == "float32" else BF16}
    out = save_hf(model, tmp_path / "a", max_shard_bytes=20_000 if sharded else None)
    assert sharded == (out / INDEX_FILE).exists()
    on_disk = read_hf_tensors(out)
    assert set(vision_names(on_disk)) and set(on_disk) == set(want)
    assert raw_bytes(on_disk) == raw_bytes(want)
    cfg = Config.from_file(out / "config.json")
    assert cfg == CFG.replace(torch_dtype=dtype)
    reloaded = load(out, cfg, DTYPES[dtype])
    assert raw_bytes(model_tensors_hf(reloaded)) == raw_bytes(want)
    again = save_hf(reloaded, tmp_path / "b", max_shard_bytes=20_000 if sharded else None)
    for p in sorted(out.glob("*.safetensors")):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    np.testing.assert_array_equal(np.asarray(reloaded.encode_images(images)), np.asarray(model.encode_images(images)))


def test_transformers_fixture_round_trip(tmp_path):
    """The VLM checkpoint written from transformers' tensors (scripts/vlm_reference.py) survives load -> save
    bit-exactly: HF -> ours -> HF."""
    cfg = Config.from_file(FIXTURE / "config.json")
    out = save_hf(load(FIXTURE, cfg), tmp_path / "o")
    assert raw_bytes(read_hf_tensors(out)) == raw_bytes(read_hf_tensors(FIXTURE))
    assert Config.from_file(out / "config.json") == cfg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip(tmp_path, models, images, dtype):
    model = models[dtype]
    gen = nemodiff_jax.load(save_orbax(model, tmp_path / "ckpt"), dtype=dtype)
    assert gen.config == model.config and gen.config.vision == CFG.vision
    assert raw_bytes(model_tensors_hf(gen.model)) == raw_bytes(model_tensors_hf(model))
    np.testing.assert_array_equal(np.asarray(gen.model.encode_images(images)),
                                  np.asarray(model.encode_images(images)))


def test_quantized_vlm_keeps_the_tower_16_bit(tmp_path):
    """Weight-only quantization is for the text model's matmuls: the tower and projector stay as they are, in the
    model and in the exported checkpoint, which loads back bit for bit."""
    model = random_model(CFG, jnp.bfloat16)
    before = model_tensors_hf(model)
    quantize_weights(model, "int8")
    after = model_tensors_hf(model)
    tower = vision_names(before)
    assert vision_names(after) == tower
    assert raw_bytes({k: after[k] for k in tower}) == raw_bytes({k: before[k] for k in tower})
    assert "encoder.layers.0.self_attn.q_proj.qweight" in after
    out = save_hf(model, tmp_path / "q")
    cfg = Config.from_file(out / "config.json")
    assert cfg.quantization is not None and cfg.vision == CFG.vision
    assert raw_bytes(model_tensors_hf(load(out, cfg, jnp.bfloat16))) == raw_bytes(after)


# ------------------------------------------------------------------ strictness


@pytest.mark.parametrize("extra", ["encoder.vision_tower.patch_conv.bias",
                                   "encoder.vision_tower.transformer.layers.2.ffn_norm.weight",
                                   "encoder.multi_modal_projector.linear_1.bias",
                                   "encoder.vision_tower.transformer.norm.weight"])
def test_unexpected_vision_tensor(tmp_path, hf_tensors, extra):
    d = write_checkpoint(tmp_path / "m", hf_tensors | {extra: np.zeros((32,), np.float32)})
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{extra}' \(not part of a 2-layer NLD-VLM model "
                                              r"with a 2-layer tower\)") as e:
        load(d)
    assert str(d / "model.safetensors") in str(e.value)


@pytest.mark.parametrize("name", ["encoder.vision_tower.transformer.layers.1.attention.v_proj.weight",
                                  "encoder.multi_modal_projector.patch_merger.merging_layer.weight",
                                  "encoder.vision_tower.ln_pre.weight"])
def test_missing_vision_tensor(tmp_path, hf_tensors, name):
    d = write_checkpoint(tmp_path / "m", {k: v for k, v in hf_tensors.items() if k != name})
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) \['{name}'\]"):
        load(d)


@pytest.mark.parametrize("name,shape", [("encoder.vision_tower.patch_conv.weight", (32, 3, 14, 14)),
                                        ("encoder.multi_modal_projector.linear_1.weight", (32, 64)),
                                        ("encoder.vision_tower.transformer.layers.0.attention.q_proj.weight",
                                         (64, 32))])
def test_mis_shaped_vision_tensor(tmp_path, hf_tensors, name, shape):
    d = write_checkpoint(tmp_path / "m", hf_tensors | {name: np.zeros(shape, np.float32)})
    want = list(hf_tensors[name].shape)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[{', '.join(map(str, shape))}\], "
                                              rf"expected \[{', '.join(map(str, want))}\]"):
        load(d)


def test_text_checkpoint_with_vlm_config_names_missing_tower(tmp_path, hf_tensors):
    text_only = {k: v for k, v in hf_tensors.items() if k not in vision_names(hf_tensors)}
    d = write_checkpoint(tmp_path / "m", text_only)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['encoder.multi_modal_projector.linear_1.weight'"):
        load(d)


def test_vlm_checkpoint_with_text_config_names_the_tower(tmp_path, hf_tensors):
    d = write_checkpoint(tmp_path / "m", hf_tensors, cfg=PRESETS["tiny"])
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'encoder\.(vision_tower|multi_modal_projector)\."):
        load(d, PRESETS["tiny"])


def test_vlm_loads_onto_a_mesh(tmp_path, models, images):
    """Under tensor parallelism the text model shards as before and the tower is replicated (vision.py)."""
    from nemodiff_jax.sharding import make_mesh

    model = models["float32"]
    mesh = make_mesh(4, 2)  # 2 kv heads split over "model"
    gen = nemodiff_jax.load(save_hf(model, tmp_path / "hf"), dtype="float32", mesh=mesh, progress=False)
    tower = gen.model.vision_tower.layers[0].attention.qkv[...]
    assert tower.sharding.is_fully_replicated
    assert not gen.model.layers[0].self_attn.qkv_proj[...].sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(gen.model.encode_images(images)), np.asarray(model.encode_images(images)),
                               rtol=1e-6, atol=1e-6)
    ids = np.array([[1, 5, 100, 7, 255, 0, 42, 9]], np.int32)
    np.testing.assert_allclose(gen.logits(ids), nemodiff_jax.Generator(model).logits(ids), rtol=1e-5, atol=1e-5)
