"""HF safetensors <-> nnx conversion (DESIGN §6): bit-exact round trips, every strictness error with a message
that names the file and the tensor, the tied-head fallback, orbax, and the preset shapes of spec §2.2/§3.1."""

import json
import math
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import nemodiff_jax
from nemodiff_jax.convert.hf import (INDEX_FILE, checkpoint_tensors, layout, load_model, model_tensors_hf, read_hf_tensors,
                        save_hf)
from nemodiff_jax.convert.orbax_io import save_orbax
from nemodiff_jax.convert.safetensors_io import CheckpointError
from nemodiff_jax.config import PRESETS, Config, num_params
from nemodiff_jax.generate import Generator
from nemodiff_jax.model import Transformer, abstract_model

CFG = PRESETS["tiny"]
BF16 = np.dtype(ml_dtypes.bfloat16)
IDS = np.array([[1, 5, 100, 7, 255, 0, 42, 9]], np.int32)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def random_model(cfg: Config = CFG, dtype=jnp.float32, seed: int = 0) -> Transformer:
    """A model with random weights filled in host-side (no per-shape RNG compiles)."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        scale = 0.1 if len(leaf.shape) == 1 else leaf.shape[0] ** -0.5
        base = 1.0 if len(leaf.shape) == 1 else 0.0
        return jnp.asarray((base + scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype))

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def logits(model, ids=IDS, causal=True) -> np.ndarray:
    return Generator(model).logits(ids, causal=causal)


def raw_bytes(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in arrays.items()}


@pytest.fixture(scope="module")
def models():
    return {"float32": random_model(dtype=jnp.float32), "bfloat16": random_model(dtype=jnp.bfloat16)}


@pytest.fixture(scope="module")
def hf_tensors(models):
    """The float32 model's tensors, HF names and layout: material for hand-made (bad) checkpoints."""
    return model_tensors_hf(models["float32"])


def write_checkpoint(d, tensors, cfg=CFG, fname="model.safetensors"):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / fname))
    return d


def write_sharded(d, shards: dict[str, dict[str, np.ndarray]], weight_map: dict[str, str], cfg=CFG):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    for fname, tensors in shards.items():
        safetensors.numpy.save_file(tensors, str(d / fname))
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def load(d, dtype=jnp.float32, cfg=CFG):
    return load_model(d, cfg, dtype, progress=False)


# ------------------------------------------------------------------ round trips


def test_hf_layout(models):
    """PyTorch [out, in] layout, checked element-wise against the nnx [in, out] / split-head parameters."""
    m = models["float32"]
    t = model_tensors_hf(m)
    d, n, k, h, f = CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, CFG.intermediate_size
    assert len(t) == 9 * CFG.num_layers + 3
    attn = m.layers[1].self_attn
    qkv, o = np.asarray(attn.qkv_proj[...]), np.asarray(attn.o_proj[...])  # [D, K, G+2, H], [N, H, D]
    g = CFG.group_size
    assert t["encoder.layers.1.self_attn.q_proj.weight"].shape == (n * h, d)
    assert t["encoder.layers.1.self_attn.k_proj.weight"].shape == (k * h, d)
    assert t["encoder.layers.1.self_attn.o_proj.weight"].shape == (d, n * h)
    for head, j, x in [(0, 0, 0), (3, 31, 63), (2, 7, 11), (1, 16, 40)]:
        kv = head // g  # query head -> its kv head (HF repeat_kv order)
        assert t["encoder.layers.1.self_attn.q_proj.weight"][head * h + j, x] == qkv[x, kv, head % g, j]
        assert t["encoder.layers.1.self_attn.o_proj.weight"][x, head * h + j] == o[head, j, x]
        assert t["encoder.layers.1.self_attn.k_proj.weight"][kv * h + j, x] == qkv[x, kv, g, j]
        assert t["encoder.layers.1.self_attn.v_proj.weight"][kv * h + j, x] == qkv[x, kv, g + 1, j]
    gate_up = np.asarray(m.layers[0].mlp.gate_up_proj[...])  # [D, 2, F]
    np.testing.assert_array_equal(t["encoder.layers.0.mlp.gate_proj.weight"], gate_up[:, 0].T)
    np.testing.assert_array_equal(t["encoder.layers.0.mlp.up_proj.weight"], gate_up[:, 1].T)
    down = np.asarray(m.layers[0].mlp.down_proj[...])
    np.testing.assert_array_equal(t["encoder.layers.0.mlp.down_proj.weight"], down.T)
    assert t["encoder.layers.0.mlp.gate_proj.weight"].shape == (f, d)
    np.testing.assert_array_equal(t["diffusion_head.weight"], np.asarray(m.diffusion_head[...]).T)
    np.testing.assert_array_equal(t["encoder.embed_tokens.weight"], np.asarray(m.embed_tokens[...]))
    np.testing.assert_array_equal(t["encoder.norm.weight"], np.asarray(m.norm.weight[...]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "index"])
def test_round_trip_bit_exact(tmp_path, models, dtype, sharded):
    model = models[dtype]
    want = model_tensors_hf(model)
    assert {a.dtype for a in want.values()} == {np.dtype(np.float32) if dtype == "float32" else BF16}
    max_shard = 20_000 if sharded else None
    out = save_hf(model, tmp_path / "a", max_shard_bytes=max_shard)
    if sharded:
        index = json.loads((out / INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and set(index["weight_map"]) == set(want)
        assert sorted(p.name for p in out.glob("*.safetensors")) == shards
        assert not (out / "model.safetensors").exists()
        assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
    else:
        assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
        assert not (out / INDEX_FILE).exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype

    on_disk = read_hf_tensors(out)
    assert {k: (v.dtype, v.shape) for k, v in on_disk.items()} == {k: (v.dtype, v.shape) for k, v in want.items()}
    assert raw_bytes(on_disk) == raw_bytes(want)

    cfg = Config.from_file(out / "config.json")
    assert cfg == CFG.replace(torch_dtype=dtype)
    reloaded = load_model(out, cfg, DTYPES[dtype], progress=False)
    assert raw_bytes(model_tensors_hf(reloaded)) == raw_bytes(want)
    again = save_hf(reloaded, tmp_path / "b", max_shard_bytes=max_shard)
    for p in sorted(out.glob("*.safetensors")):  # the files themselves are reproduced byte for byte
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    np.testing.assert_array_equal(logits(reloaded), logits(model))


def test_load_converts_dtype(tmp_path, models):
    out = save_hf(models["float32"], tmp_path / "f32")
    m = load(out, jnp.bfloat16)
    got = model_tensors_hf(m)
    want = {k: v.astype(BF16) for k, v in model_tensors_hf(models["float32"]).items()}
    assert raw_bytes(got) == raw_bytes(want)


def test_save_refuses_existing_checkpoint(tmp_path, models):
    # A stale index (or single file) beside a new export would be loaded instead of it: refuse, keep the old one.
    out = save_hf(models["bfloat16"], tmp_path / "x", max_shard_bytes=20_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=rf"{out}: already holds checkpoint files .*refusing to overwrite"):
        save_hf(models["float32"], out)
    with pytest.raises(FileExistsError, match="model-00001-of-"):
        save_hf(models["float32"], out, max_shard_bytes=10**9)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_parity_fixture_round_trip(tmp_path):
    """A checkpoint written by another tool (the transformers parity script) survives load -> save bit-exactly."""
    from pathlib import Path

    src = Path(__file__).parent / "fixtures" / "parity" / "theta1e9_gqa"
    if not (src / "model.safetensors").exists():
        pytest.skip("parity fixture missing")
    cfg = Config.from_file(src / "config.json")
    model = load_model(src, cfg, jnp.float32, progress=False)
    out = save_hf(model, tmp_path / "o")
    assert raw_bytes(read_hf_tensors(out)) == raw_bytes(read_hf_tensors(src))


# ------------------------------------------------------------------ strictness


@pytest.mark.parametrize("extra", ["encoder.layers.99.mlp.gate_proj.weight", "lm_head.weight",
                                   "encoder.layers.0.self_attn.q_norm.weight"])
def test_unexpected_tensor(tmp_path, hf_tensors, extra):
    d = write_checkpoint(tmp_path / "m", hf_tensors | {extra: np.zeros((128, 64), np.float32)})
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{extra}'") as e:
        load(d)
    assert str(d / "model.safetensors") in str(e.value)


def test_missing_tensor(tmp_path, hf_tensors):
    name = "encoder.layers.1.self_attn.k_proj.weight"
    d = write_checkpoint(tmp_path / "m", {k: v for k, v in hf_tensors.items() if k != name})
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) \['{name}'\]") as e:
        load(d)
    assert str(d) in str(e.value)


def test_missing_head_of_untied_model(tmp_path, hf_tensors):
    d = write_checkpoint(tmp_path / "m", {k: v for k, v in hf_tensors.items() if k != "diffusion_head.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['diffusion_head.weight'\]"):
        load(d)


def test_many_missing_tensors_are_counted(tmp_path, hf_tensors):
    d = write_checkpoint(tmp_path / "m", {"encoder.norm.weight": hf_tensors["encoder.norm.weight"]})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \[.*\] and 12 more"):
        load(d)


def test_duplicate_tensor_across_shards(tmp_path, hf_tensors):
    names = sorted(hf_tensors)
    dup = "encoder.layers.0.mlp.up_proj.weight"
    a = {k: hf_tensors[k] for k in names[:10]}
    b = {k: hf_tensors[k] for k in names[10:]} | {dup: hf_tensors[dup]}
    assert dup in a
    d = write_sharded(tmp_path / "m", {"a.safetensors": a, "b.safetensors": b},
                      {k: ("a.safetensors" if k in a else "b.safetensors") for k in names})
    with pytest.raises(CheckpointError, match=rf"duplicate tensor '{dup}': in a.safetensors and b.safetensors"):
        load(d)


def test_index_lists_tensor_in_wrong_file(tmp_path, hf_tensors):
    names = sorted(hf_tensors)
    a, b = {k: hf_tensors[k] for k in names[:10]}, {k: hf_tensors[k] for k in names[10:]}
    moved = names[12]
    weight_map = {k: ("a.safetensors" if k in a else "b.safetensors") for k in names} | {moved: "a.safetensors"}
    d = write_sharded(tmp_path / "m", {"a.safetensors": a, "b.safetensors": b}, weight_map)
    with pytest.raises(CheckpointError, match=rf"tensor '{moved}' is not listed for this file .*'a.safetensors'") as e:
        load(d)
    assert str(d / "b.safetensors") in str(e.value)


def test_index_lists_tensor_absent_from_its_file(tmp_path, hf_tensors):
    names = sorted(hf_tensors)
    a, b = {k: hf_tensors[k] for k in names[:10]}, {k: hf_tensors[k] for k in names[10:]}
    weight_map = {k: ("a.safetensors" if k in a else "b.safetensors") for k in names}
    weight_map["encoder.layers.0.mlp.extra.weight"] = "b.safetensors"
    d = write_sharded(tmp_path / "m", {"a.safetensors": a, "b.safetensors": b}, weight_map)
    with pytest.raises(CheckpointError, match=r"lists tensor\(s\) not found in their files: "
                                              r"\['encoder.layers.0.mlp.extra.weight'\]") as e:
        load(d)
    assert INDEX_FILE in str(e.value)


def test_tensor_missing_from_index(tmp_path, hf_tensors):
    names = sorted(hf_tensors)
    a, b = {k: hf_tensors[k] for k in names[:10]}, {k: hf_tensors[k] for k in names[10:]}
    weight_map = {k: ("a.safetensors" if k in a else "b.safetensors") for k in names}
    unlisted = names[3]
    del weight_map[unlisted]
    d = write_sharded(tmp_path / "m", {"a.safetensors": a, "b.safetensors": b}, weight_map)
    with pytest.raises(CheckpointError, match=rf"'{unlisted}' is not listed .*index says None"):
        load(d)


def test_index_names_missing_file(tmp_path, hf_tensors):
    a = {k: v for k, v in hf_tensors.items() if k != "encoder.norm.weight"}
    d = write_sharded(tmp_path / "m", {"a.safetensors": a},
                      {k: "a.safetensors" for k in a} | {"encoder.norm.weight": "gone.safetensors"})
    with pytest.raises(CheckpointError, match="gone.safetensors: file not found"):
        load(d)


@pytest.mark.parametrize("text", ['{"weight_map": ', '{"metadata": {}}', '[]', '{"weight_map": ["a.safetensors"]}',
                                  '{"weight_map": {"encoder.norm.weight": 3}}'])
def test_corrupt_index(tmp_path, hf_tensors, text):
    d = write_sharded(tmp_path / "m", {"a.safetensors": dict(hf_tensors)}, {})
    (d / INDEX_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=rf"{d / INDEX_FILE}: corrupt index"):
        load(d)


def test_no_weights(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json found"):
        load(d)


def test_wrong_shape(tmp_path, hf_tensors):
    name = "encoder.layers.1.self_attn.q_proj.weight"
    d = write_checkpoint(tmp_path / "m", hf_tensors | {name: np.ascontiguousarray(hf_tensors[name].T)})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[64, 128\], expected \[128, 64\]") as e:
        load(d)
    assert str(d / "model.safetensors") in str(e.value)


@pytest.mark.parametrize("np_dtype,st_name", [(np.int32, "I32"), (np.float64, "F64"), (np.int8, "I8")])
def test_wrong_dtype(tmp_path, hf_tensors, np_dtype, st_name):
    name = "encoder.layers.0.mlp.down_proj.weight"
    d = write_checkpoint(tmp_path / "m", hf_tensors | {name: hf_tensors[name].astype(np_dtype)})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype {st_name}, expected one of") as e:
        load(d)
    assert str(d / "model.safetensors") in str(e.value)


def test_float16_checkpoint_loads(tmp_path, hf_tensors):
    d = write_checkpoint(tmp_path / "m", {k: v.astype(np.float16) for k, v in hf_tensors.items()})
    got = model_tensors_hf(load(d, jnp.float32))
    assert raw_bytes(got) == raw_bytes({k: v.astype(np.float16).astype(np.float32) for k, v in hf_tensors.items()})


@pytest.mark.parametrize("cut", [4, 100, 5000, -1])
def test_truncated_file(tmp_path, hf_tensors, cut):
    d = write_checkpoint(tmp_path / "m", hf_tensors)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load(d)
    assert str(path) in str(e.value)


def write_raw(path, header: dict | bytes, data: bytes = b""):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def test_corrupt_header(tmp_path, hf_tensors):
    d = write_checkpoint(tmp_path / "m", hf_tensors)
    write_raw(d / "model.safetensors", b'{"encoder.norm.weight": {"dtype": "F32", garbage', b"\0" * 256)
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as e:
        load(d)
    assert str(d / "model.safetensors") in str(e.value)


@pytest.mark.parametrize("header,match", [
    ([1, 2], "not a JSON object"),
    ({"encoder.norm.weight": {"dtype": "F32", "shape": [64]}}, r"tensor 'encoder.norm.weight': malformed"),
    ({"encoder.norm.weight": {"dtype": "Q4", "shape": [64], "data_offsets": [0, 256]}},
     r"tensor 'encoder.norm.weight': unknown dtype 'Q4'"),
    ({"encoder.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 200]}},
     r"tensor 'encoder.norm.weight': data_offsets \[0, 200\) hold 200 bytes but F32\[64\] needs 256"),
])
def test_malformed_header_entries(tmp_path, hf_tensors, header, match):
    d = write_checkpoint(tmp_path / "m", hf_tensors)
    write_raw(d / "model.safetensors", header, b"\0" * 256)
    with pytest.raises(CheckpointError, match=match) as e:
        load(d)
    assert str(d / "model.safetensors") in str(e.value)


def test_inv_freq_buffers_are_dropped(tmp_path, hf_tensors, models):
    extra = {f"encoder.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(CFG.head_dim // 2, np.float32)
             for i in range(CFG.num_layers)}
    d = write_checkpoint(tmp_path / "m", hf_tensors | extra)
    assert set(extra) <= set(checkpoint_tensors(d))
    m = load(d)
    assert raw_bytes(model_tensors_hf(m)) == raw_bytes(hf_tensors)
    np.testing.assert_array_equal(logits(m), logits(models["float32"]))
    # only that buffer, by name: a similar-looking stray tensor is still an error
    d2 = write_checkpoint(tmp_path / "m2", hf_tensors | {"encoder.layers.0.self_attn.rotary_emb.cos": extra[
        "encoder.layers.0.self_attn.rotary_emb.inv_freq"]})
    with pytest.raises(CheckpointError, match="unexpected tensor 'encoder.layers.0.self_attn.rotary_emb.cos'"):
        load(d2)


# ------------------------------------------------------------------ tied head


def test_tied_fallback_uses_embedding(tmp_path, hf_tensors):
    tied = CFG.replace(tie_word_embeddings=True)
    d = write_checkpoint(tmp_path / "m", {k: v for k, v in hf_tensors.items() if k != "diffusion_head.weight"},
                         cfg=tied)
    m = load(d, cfg=Config.from_file(d / "config.json"))
    assert m.config.tie_word_embeddings and m.diffusion_head is None
    # the same weights with the embedding copied into an explicit head
    explicit = write_checkpoint(tmp_path / "e",
                                hf_tensors | {"diffusion_head.weight": hf_tensors["encoder.embed_tokens.weight"]})
    want = logits(load(explicit))
    got = logits(m)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(got - logits(load(write_checkpoint(tmp_path / "u", hf_tensors)))).max() > 1e-2
    assert len(model_tensors_hf(m)) == 9 * CFG.num_layers + 2
    out = save_hf(m, tmp_path / "re")  # exports without a head, config says tied
    assert "diffusion_head.weight" not in read_hf_tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_tied_config_with_head_uses_head(tmp_path, hf_tensors, models):
    d = write_checkpoint(tmp_path / "m", hf_tensors, cfg=CFG.replace(tie_word_embeddings=True))
    m = load(d, cfg=Config.from_file(d / "config.json"))
    assert m.diffusion_head is not None and not m.config.tie_word_embeddings
    np.testing.assert_array_equal(logits(m), logits(models["float32"]))


# ------------------------------------------------------------------ orbax


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip(tmp_path, models, dtype):
    model = models[dtype]
    out = save_orbax(model, tmp_path / "ckpt")
    gen = nemodiff_jax.load(out, dtype=dtype)
    assert gen.config == model.config and gen.model.dtype == jnp.dtype(DTYPES[dtype])
    assert raw_bytes(model_tensors_hf(gen.model)) == raw_bytes(model_tensors_hf(model))
    np.testing.assert_array_equal(gen.logits(IDS), logits(model))
    if dtype == "bfloat16":  # restoring into another dtype casts
        gen32 = nemodiff_jax.load(out, dtype="float32")
        assert gen32.model.dtype == jnp.float32
        want = {k: v.astype(np.float32) for k, v in model_tensors_hf(model).items()}
        assert raw_bytes(model_tensors_hf(gen32.model)) == raw_bytes(want)
        # a float32 model in every respect (KV cache dtype, matmul precision), like the same weights from HF files
        from_hf = load(save_hf(model, tmp_path / "hf"), jnp.float32)
        np.testing.assert_array_equal(gen32.logits(IDS), logits(from_hf))


def test_orbax_refuses_non_empty_dir(tmp_path, models):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        save_orbax(models["float32"], d)
    assert [p.name for p in d.iterdir()] == ["keep.txt"] and (d / "keep.txt").read_text() == "precious"


def test_hf_dir_loads_through_public_api(tmp_path, models):
    out = save_hf(models["bfloat16"], tmp_path / "hf")
    gen = nemodiff_jax.load(out, dtype="bfloat16", progress=False)
    np.testing.assert_array_equal(gen.logits(IDS), logits(models["bfloat16"]))


# ------------------------------------------------------------------ presets (spec §2.2, §3.1)


def expected_hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    d, n, k, h, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                        cfg.vocab_size)
    out = {"encoder.embed_tokens.weight": (v, d), "encoder.norm.weight": (d,), "diffusion_head.weight": (v, d)}
    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (n * h, d), p + "self_attn.k_proj.weight": (k * h, d),
                p + "self_attn.v_proj.weight": (k * h, d), p + "self_attn.o_proj.weight": (d, n * h),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f)}
    return out


@pytest.mark.parametrize("name,count,billions,gib", [("3B", 237, 3.83, 7.14), ("8B", 309, 8.49, 15.81),
                                                     ("14B", 363, 13.51, 25.16)])
def test_preset_shapes_and_counts(name, count, billions, gib):
    cfg = PRESETS[name]
    model = abstract_model(cfg)
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert all(isinstance(var.get_value(), jax.ShapeDtypeStruct) for _, var in flat)  # nothing allocated
    pieces = layout(cfg)
    shapes = {name: pc.hf_shape for name, pc in pieces.items()}
    assert len(shapes) == count == 9 * cfg.num_layers + 3
    assert shapes == expected_hf_shapes(cfg)
    # the pieces tile the nnx params exactly: every param covered, element counts equal
    sizes = {}
    for pc in pieces.values():
        sizes[pc.path] = sizes.get(pc.path, 0) + math.prod(pc.hf_shape)
    assert sizes == {path: math.prod(var.shape) for path, var in flat}
    n = sum(math.prod(s) for s in shapes.values())
    assert n == num_params(cfg)
    assert round(n / 1e9, 2) == billions
    assert round(2 * n / 2**30, 2) == gib


def test_14b_shapes_from_spec():
    cfg = PRESETS["14B"]
    pieces = layout(cfg)

    def hf(name):
        return pieces[name].hf_shape

    assert hf("encoder.layers.39.self_attn.q_proj.weight") == (4096, 5120)
    assert hf("encoder.layers.39.self_attn.k_proj.weight") == hf("encoder.layers.0.self_attn.v_proj.weight") == (
        1024, 5120)
    assert hf("encoder.layers.7.self_attn.o_proj.weight") == (5120, 4096)
    assert hf("encoder.layers.0.mlp.gate_proj.weight") == (16384, 5120)
    assert hf("encoder.layers.0.mlp.down_proj.weight") == (5120, 16384)
    assert hf("diffusion_head.weight") == (131072, 5120)
    assert hf("encoder.embed_tokens.weight") == (131072, 5120)
    flat = dict(nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)))
    assert tuple(flat[("layers", 39, "self_attn", "qkv_proj")].shape) == (5120, 8, 6, 128)
    assert tuple(flat[("layers", 0, "mlp", "gate_up_proj")].shape) == (5120, 2, 16384)


def test_num_params_tied():
    cfg = PRESETS["3B"].replace(tie_word_embeddings=True)
    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))
    assert num_params(cfg) == sum(math.prod(v.shape) for _, v in flat) == num_params(PRESETS["3B"]) - 131072 * 3072
