"""Quantized checkpoints (`nemodiff convert --quantize`, docs/QUANTIZATION.md "On disk") and quantized weights
under a mesh: written and read back bit for bit (safetensors and orbax), strict about every tensor, and every
mode gives the same tokens on a mesh as on one device."""

from __future__ import annotations

import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemodiff_jax
from nemodiff_jax import quant
from nemodiff_jax.cli import main as cli_main
from nemodiff_jax.config import Config, ConfigError
from nemodiff_jax.convert.hf import read_hf_tensors, save_hf
from nemodiff_jax.convert.safetensors_io import CheckpointError, write_file
from nemodiff_jax.embedded import ASSETS, DEMO_PROMPTS, default_model
from nemodiff_jax.generate import Generator
from nemodiff_jax.model import Transformer, quantize_weights
from nemodiff_jax.sharding import ShardedMatmul, make_mesh

EMB = Config.from_file(ASSETS / "config.json")  # the embedded model: the geometry these checks expect

# Every matmul dimension a multiple of 128 (int4 groups), heads that split over 2 model devices.
CFG = Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=64, max_position_embeddings=512, rope_theta=1e4, rope_factor=4.0,
             rope_original_max_position_embeddings=128, block_size=8, mask_token_id=3)
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
MODES = ("ar", "diffusion", "linear_spec")


def leaves(model):
    return jax.tree_util.tree_leaves(nnx.state(model))


def assert_same_weights(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).astype(np.float32), np.asarray(y).astype(np.float32))


@pytest.fixture(scope="module")
def embedded_dir(tmp_path_factory):
    return default_model()


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("to", ["hf", "orbax"])
def test_convert_quantize_round_trip(tmp_path, fmt, to):
    """`nemodiff convert SRC DST --quantize` writes what load(SRC, quantize=...) holds, and load(DST) reads it
    back bit for bit, with the same logits, in every format and container."""
    dst = tmp_path / "q"
    assert cli_main(["convert", str(default_model()), str(dst), "--to", to, "--quantize", fmt]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # copied by convert
        assert (dst / name).read_bytes() == (ASSETS / name).read_bytes()
    if to == "hf":
        cfg = json.loads((dst / "config.json").read_text())
        assert cfg["quantization_config"] == {"quant_method": "nemodiff", "format": fmt, "head_format": "int8",
                                              "group_size": 128}
        t = read_hf_tensors(dst)
        assert "encoder.layers.0.self_attn.q_proj.weight" not in t
        q, s = t["encoder.layers.0.mlp.down_proj.qweight"], t["encoder.layers.0.mlp.down_proj.scales"]
        d, f = EMB.hidden_size, EMB.intermediate_size
        assert (q.dtype, q.shape) == ((np.int8, (d, f)) if fmt == "int8" else (np.uint8, (d, f // 2)))
        assert s.shape == ((d,) if fmt == "int8" else (f // 128, d)) and s.dtype.name == "bfloat16"
        assert t["diffusion_head.qweight"].dtype == np.int8  # the head stays int8 in both formats
        assert t["encoder.embed_tokens.weight"].dtype.name == "bfloat16"
    want = nemodiff_jax.load(default_model(), progress=False, quantize=fmt)
    got = nemodiff_jax.load(dst, progress=False)
    assert got.config.quantization.format == fmt
    assert_same_weights(want.model, got.model)
    tokens = np.asarray([want.tokenizer.encode(p)[:8] for p in DEMO_PROMPTS], np.int32)
    np.testing.assert_array_equal(want.logits(tokens), got.logits(tokens))
    assert nemodiff_jax.load(dst, progress=False, quantize=fmt).config.quantization.format == fmt  # a no-op
    other = "int4" if fmt == "int8" else "int8"
    with pytest.raises(ValueError, match=f"quantized to {fmt}; it cannot be loaded as {other}"):
        nemodiff_jax.load(dst, progress=False, quantize=other)


@pytest.fixture(scope="module")
def int4_tensors(tmp_path_factory):
    """The embedded model as an int4 safetensors checkpoint: (dir, tensors, config dict)."""
    d = tmp_path_factory.mktemp("int4")
    model = quantize_weights(nemodiff_jax.load(default_model(), progress=False).model, "int4")
    save_hf(model, d / "ok")
    return d / "ok", read_hf_tensors(d / "ok"), json.loads((d / "ok" / "config.json").read_text())


def _write(tmp_path, tensors, cfg):
    d = tmp_path / "bad"
    d.mkdir()
    write_file(d / "model.safetensors", tensors)
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(ASSETS / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(ASSETS / "tokenizer_config.json", d / "tokenizer_config.json")
    return d


QW = "encoder.layers.1.self_attn.o_proj.qweight"
SC = "encoder.layers.1.self_attn.o_proj.scales"
D, O_IN, LAYERS = EMB.hidden_size, EMB.num_heads * EMB.head_dim, EMB.num_layers  # o_proj: O_IN -> D


@pytest.mark.parametrize("edit, match", [
    (lambda t, c: t.update({QW: t[QW][:, :-1]}), rf"{QW}' has shape \[{D}, {O_IN // 2 - 1}\], expected \[{D}, {O_IN // 2}\]"),
    (lambda t, c: t.update({QW: t[QW].view(np.int8)}), rf"{QW}' has dtype I8, expected one of \('U8',\)"),
    (lambda t, c: t.update({SC: t[SC][:1]}), rf"{SC}' has shape \[1, {D}\], expected \[{O_IN // 128}, {D}\]"),
    (lambda t, c: t.update({SC: t[SC].astype(np.float32)}), rf"{SC}' has dtype F32, expected one of \('BF16',\)"),
    (lambda t, c: t.pop(SC), rf"missing tensor\(s\) \['{SC}'\]"),
    (lambda t, c: t.update({"encoder.layers.0.mlp.up_proj.weight": t.pop("encoder.layers.0.mlp.up_proj.qweight")}),
     rf"unexpected tensor 'encoder.layers.0.mlp.up_proj.weight' \(not part of a {LAYERS}-layer NLD model quantized to "
     "int4"),
    (lambda t, c: c["quantization_config"].update(group_size=64),
     rf"\.scales' has shape \[(\d+), {D}\], expected \[(\d+), {D}\]"),  # twice as many groups
    (lambda t, c: c["quantization_config"].update(group_size=96), r"int4 group size 96 must be even and divide"),
    (lambda t, c: c["quantization_config"].update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
    (lambda t, c: c["quantization_config"].update(bits=4), r"unknown key\(s\) \['bits'\]"),
    (lambda t, c: c.pop("quantization_config"),
     rf"unexpected tensor '.*\.(qweight|scales)' \(not part of a {LAYERS}-layer NLD model\)"),
])
def test_strict_loading_names_the_problem(tmp_path, int4_tensors, edit, match):
    _, tensors, cfg = int4_tensors
    tensors, cfg = dict(tensors), json.loads(json.dumps(cfg))
    edit(tensors, cfg)
    d = _write(tmp_path, tensors, cfg)
    with pytest.raises((CheckpointError, ConfigError, ValueError), match=match):
        nemodiff_jax.load(d, progress=False)


def test_unchanged_tensors_load(tmp_path, int4_tensors):
    """The bad-checkpoint helper itself writes loadable files (so the failures above are the edits')."""
    _, tensors, cfg = int4_tensors
    assert nemodiff_jax.load(_write(tmp_path, dict(tensors), cfg), progress=False).config.quantization


def _quantized(fmt):
    m = Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    return quantize_weights(m, fmt)


def _tiled(model):
    """Every tileable QWeight in quant.tile's layout (what tile_quantized does on a Hopper GPU; a no-op here)."""
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(w := var.get_value(), quant.QWeight):
            var.set_value(quant.tile(w))
    return model


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU platform (tests/conftest.py)")
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantized_weights_shard_like_their_twins(tmp_path, fmt):
    """On (1, 2) and (2, 2) meshes the modes give the single-device tokens: a quantized checkpoint streamed
    straight into its shardings on both, and on (2, 2) also the weights made in memory, partitioned by XLA (the
    CPU's choice) and per device in shard_map (the GPU's, with a psum for o and down); q and the scales are
    split over "model" with their channels (qkv by kv heads, gate_up by the MLP, o and down by their inputs).
    Weights in the kernel's tiled layout (quant.tile) give the same tokens, alone and per device, split over
    their block indices. Every mode runs every matmul, so each generator checks one mode, in turn (CI time:
    a generator compiles each mode it runs), and each mode is checked on several of them."""
    ref = Generator(_quantized(fmt))
    want = {m: [r.tokens for r in ref.generate(PROMPTS, mode=m, max_new_tokens=12, stop_token_ids=[])]
            for m in MODES}
    modes = itertools.cycle(MODES)

    def check(g, what):
        m = next(modes)
        got = [r.tokens for r in g.generate(PROMPTS, mode=m, max_new_tokens=12, stop_token_ids=[])]
        assert got == want[m], (fmt, what, m)

    tiled = Generator(_tiled(_quantized(fmt)))
    assert tiled.model.layers[0].mlp.gate_up_proj.get_value().tiled
    check(tiled, "tiled")
    save_hf(ref.model, tmp_path / "q")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, tmp_path / "q" / name)
    for shape in [(1, 2), (2, 2)]:
        mesh = make_mesh(*shape)
        if shape == (2, 2) and fmt == "int4":  # tiled weights per device (the kernel's layout and partitioning)
            tiled = _tiled(_quantized(fmt))
            tiled.matmul_impl = ShardedMatmul(mesh, reference=True)
            tiled = Generator(tiled, mesh=mesh)
            assert tiled.model.layers[0].mlp.gate_up_proj.get_value().q.sharding.spec == jax.sharding.PartitionSpec(
                None, "model", None, None, None)  # [2, F/128, D/128, 128, 128]
            check(tiled, ("tiled", shape))
        generators = [nemodiff_jax.load(tmp_path / "q", dtype="float32", progress=False, mesh=mesh)]
        # (1, 2) checks the checkpoint streamed into its shardings (XLA partitions it); (2, 2) adds both
        # partitionings of the weights made in memory
        if shape == (2, 2):
            per_device = _quantized(fmt)  # shard_map with the reference per device: the kernel path's partitioning
            per_device.matmul_impl = ShardedMatmul(mesh, reference=True)
            generators = [Generator(_quantized(fmt), mesh=mesh), Generator(per_device, mesh=mesh), *generators]
        for g in generators:
            check(g, shape)
            layer = g.model.layers[0]
            P = jax.sharding.PartitionSpec
            qkv, gate_up = layer.self_attn.qkv_proj.get_value(), layer.mlp.gate_up_proj.get_value()
            o, down = layer.self_attn.o_proj.get_value(), layer.mlp.down_proj.get_value()
            assert qkv.q.sharding.spec == P("model", None, None, None)  # [K, G+2, H, D]
            assert gate_up.q.sharding.spec == P(None, "model", None)  # [2, F, D]
            assert o.q.sharding.spec == P(None, "model") and down.q.sharding.spec == P(None, "model")  # [D, K]
            if fmt == "int8":
                assert gate_up.scale.sharding.spec == P(None, "model") and down.scale.sharding.spec == P(None)
            else:  # [K/g, *out]: the groups go with the inputs
                assert gate_up.scale.sharding.spec == P(None, None, "model")
                assert down.scale.sharding.spec == P("model", None)


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("int4_ckpt") / "q"
    assert cli_main(["convert", str(default_model()), str(d), "--to", "hf", "--quantize", "int4"]) == 0
    return d


def test_batch_job_and_server_on_a_quantized_checkpoint(int4_dir, tmp_path):
    """`nemodiff batch` and `nemodiff serve` (a real server, the official openai client) on the int4 checkpoint
    give what the quantized model gives offline, greedy, in every mode."""
    from test_serve import Server

    server = Server("--model", str(int4_dir), "--slots", "2", "--max-prompt-tokens", "64")
    try:
        gen = nemodiff_jax.load(int4_dir, dtype="float32", progress=False)
        prompts = DEMO_PROMPTS[:2]
        results = {m: gen.generate(prompts, mode=m, max_new_tokens=10) for m in MODES}
        want = {m: [r.tokens for r in rs] for m, rs in results.items()}
        lines = [json.dumps({"id": f"{m}{i}", "prompt": p, "mode": m, "max_new_tokens": 10})
                 for m in MODES for i, p in enumerate(prompts)]
        (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
        assert cli_main(["batch", "--model", str(int4_dir), "--dtype", "float32", "--input",
                         str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--no-progress"]) == 0
        got = {r["id"]: r["tokens"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
        assert got == {f"{m}{i}": want[m][i] for m in MODES for i in range(len(prompts))}
        client = server.wait().client()
        name = client.models.list().data[0].id
        for m in MODES:
            for i, p in enumerate(prompts):
                r = client.completions.create(model=name, prompt=p, max_tokens=10, temperature=0.0,
                                              extra_body={"mode": m})
                assert r.choices[0].text == results[m][i].text, (m, i)
    finally:
        server.stop()


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_saved_tensors_are_each_hf_tensor_quantized_alone(tmp_path, fmt):
    """An independent check of the block placement in the fused qkv / gate_up weights: every `.qweight` /
    `.scales` written is exactly quant.quantize of that one HF tensor (the 16-bit export of the same float32
    model), not merely what the reader puts back."""
    from nemodiff_jax.convert.hf import model_tensors_hf

    master = Transformer(CFG, rngs=nnx.Rngs(1), dtype=jnp.float32)
    plain = model_tensors_hf(master)
    save_hf(quantize_weights(nnx.clone(master), fmt), tmp_path / "q")
    saved = read_hf_tensors(tmp_path / "q")
    checked = 0
    for name, w in plain.items():
        stem = name.removesuffix(".weight")
        if stem + ".qweight" not in saved:
            continue
        f = "int8" if stem == "diffusion_head" else fmt
        want = quant.quantize(jnp.asarray(w).T, f)  # HF [out, in] -> the logical [in, out]
        q = quant.pack_int4(quant.values(want)) if f == "int4" else want.q  # on disk: input order
        np.testing.assert_array_equal(saved[stem + ".qweight"], np.asarray(q), err_msg=name)
        np.testing.assert_array_equal(saved[stem + ".scales"], np.asarray(want.scale), err_msg=name)
        checked += 1
    assert checked == 7 * CFG.num_layers + 1  # q, k, v, o, gate, up, down per layer, and the head


def test_weights_are_tiled_where_the_kernel_reads_them(monkeypatch):
    """quantize_weights lays the weights out for the kernel (quant.tile) on a Hopper GPU only: here, on the
    CPU, they stay in rows; with the device described as an H200, every tileable one is tiled (qkv's 64-wide
    heads are not) and tiling again changes nothing."""
    from nemodiff_jax import attention
    from nemodiff_jax.model import tile_quantized

    m = _quantized("int4")
    assert not any(v.tiled for v in jax.tree.leaves(nnx.state(m), is_leaf=lambda x: isinstance(x, quant.QWeight))
                   if isinstance(v, quant.QWeight))
    monkeypatch.setattr(attention.DeviceInfo, "of", classmethod(lambda cls, d=None: attention.DeviceInfo(
        "cuda", "NVIDIA H200", (9, 0))))
    tile_quantized(m)
    layer = m.layers[0]
    assert layer.mlp.gate_up_proj.get_value().tiled and layer.mlp.down_proj.get_value().tiled
    assert layer.self_attn.o_proj.get_value().tiled and m.diffusion_head.get_value().tiled
    assert not layer.self_attn.qkv_proj.get_value().tiled  # head_dim 64: not a multiple of 128
    before = layer.mlp.down_proj.get_value().q
    assert tile_quantized(m).layers[0].mlp.down_proj.get_value().q is before


def test_requantizing_to_another_format_is_an_error():
    m = _quantized("int8")
    with pytest.raises(ValueError, match="already quantized to int8; it cannot become int4"):
        quantize_weights(m, "int4")
    assert quantize_weights(m, "int8").config.quantization.format == "int8"  # the same format: a no-op
