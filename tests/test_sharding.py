"""Every mode gives the same tokens on every mesh shape as on one device (CPU fake 8-device platform)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import nemodiff_jax
from nemodiff_jax.convert.hf import save_hf
from nemodiff_jax.config import PRESETS
from nemodiff_jax.generate import Generator
from nemodiff_jax.model import Transformer
from nemodiff_jax.sharding import make_mesh, param_shardings, spec_for

CFG = PRESETS["tiny"]
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]  # 3 rows: padded on data=2
MODES = ("ar", "diffusion", "linear_spec")


def fresh():
    return Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32)


@pytest.fixture(scope="module")
def reference():
    g = Generator(fresh())
    return {m: [r.tokens for r in g.generate(PROMPTS, mode=m, max_new_tokens=20, stop_token_ids=[])]
            for m in MODES}


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU platform (tests/conftest.py)")
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 2), (2, 4), (1, 8)])
def test_modes_match_single_device(shape, reference):
    g = Generator(fresh(), mesh=make_mesh(*shape))
    for mode in MODES:
        got = [r.tokens for r in g.generate(PROMPTS, mode=mode, max_new_tokens=20, stop_token_ids=[])]
        assert got == reference[mode], f"mesh {shape} mode {mode}"
    # tensor parallel really happened: the MLP is split over "model"
    spec = g.model.layers[0].mlp.gate_up_proj[...].sharding.spec
    assert spec == jax.sharding.PartitionSpec(None, None, "model" if shape[1] > 1 else None) or shape[1] == 1


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU platform")
def test_load_streams_into_shardings(tmp_path, reference):
    save_hf(fresh(), tmp_path)
    mesh = make_mesh(2, 4)
    g = nemodiff_jax.load(tmp_path, dtype="float32", mesh=mesh, progress=False)
    want = param_shardings(g.model, mesh)
    for path, var in nnx.to_flat_state(nnx.state(g.model, nnx.Param)):
        assert var[...].sharding.is_equivalent_to(want[path], var[...].ndim), path
    got = [r.tokens for r in g.generate(PROMPTS, mode="linear_spec", max_new_tokens=20, stop_token_ids=[])]
    assert got == reference["linear_spec"]


def test_indivisible_dimensions_stay_replicated():
    mesh = make_mesh(1, 8)
    # 2 kv heads cannot be split 8 ways: replicated; 128-wide MLP can
    assert spec_for((64, 2, 4, 32), ("embed", "kv_heads", None, "head_dim"), mesh) == jax.sharding.PartitionSpec(
        None, None, None, None)
    assert spec_for((64, 2, 128), ("embed", None, "mlp"), mesh) == jax.sharding.PartitionSpec(None, None, "model")
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(4, 4)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU platform")
@pytest.mark.parametrize("shape", [(1, 2), (2, 2)])
def test_attention_kernel_partitioning_under_shard_map(shape, reference):
    """The kernel path under a mesh runs per device in shard_map (rows over data, head groups over model).
    Here the kernel file's jnp reference stands in for the GPU kernel (tested on its own, interpret + GPU)."""
    from nemodiff_jax.attention import Sharded, mesh_impl

    mesh = make_mesh(*shape)
    g = Generator(fresh(), mesh=mesh)
    assert g.attn_impl == "xla"  # on CPU the XLA path is the default under a mesh
    g.attn_impl = mesh_impl(mesh, CFG.num_kv_heads, reference=True)
    assert isinstance(g.attn_impl, Sharded)
    for mode in MODES:
        got = [r.tokens for r in g.generate(PROMPTS, mode=mode, max_new_tokens=20, stop_token_ids=[])]
        assert got == reference[mode], f"mesh {shape} mode {mode}"
    # kv heads that do not split over "model" fall back to the partitioner-split XLA path
    assert mesh_impl(make_mesh(1, 8), CFG.num_kv_heads, reference=True) == "xla"
    with pytest.raises(ValueError, match="kv heads to split evenly"):
        mesh_impl(make_mesh(1, 8), CFG.num_kv_heads, impl="pallas")


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU platform")
@pytest.mark.parametrize("tied", [False, True])
def test_tensor_parallel_forward_collectives(tied):
    """A TP decode forward costs two hidden-sized all-reduces per layer and nothing that scales with a weight:
    the untied embedding table is replicated, so the lookup is local (split over vocab, the GPU partitioner
    all-gathered the whole table every forward). A tied table stays split: it is the head as well."""
    import dataclasses
    import re

    from nemodiff_jax.cache import KVCache
    from nemodiff_jax.sharding import cache_sharding, shard_model

    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    mesh = make_mesh(1, 2)
    model = shard_model(Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16), mesh)
    table = param_shardings(model, mesh)[("embed_tokens",)].spec
    assert table == (jax.sharding.PartitionSpec("model", None) if tied else jax.sharding.PartitionSpec(None, None))
    graphdef, params = nnx.split(model)

    @jax.jit
    def fwd(params, tokens, cache):
        m = nnx.merge(graphdef, params)
        return m(tokens, cache.lengths[:, None], cache, causal=True, attn_impl="xla")[0][:, -1].argmax(-1)

    cache = KVCache.init(cfg, 1, 64, jnp.bfloat16, lengths=jnp.full((1,), 8, jnp.int32),
                         sharding=cache_sharding(cfg, 1, mesh))
    hlo = fwd.lower(params, jnp.ones((1, 1), jnp.int32), cache).compile().as_text()
    collectives = re.findall(r"= (\S+) (all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\(", hlo)
    hidden = [c for c in collectives if c[1] == "all-reduce" and f",{cfg.hidden_size}]" in c[0]]
    assert len(hidden) == 2 * cfg.num_layers + (1 if tied else 0), collectives
    # the rest are the argmax's per-shard winners: never anything the size of a weight or a logits row
    for shape, _ in collectives:
        dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])[1:]]
        assert max(dims) <= max(cfg.hidden_size, 2), collectives


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU platform")
def test_sharded_kernel_path_falls_back_per_device():
    """Under a mesh, inputs outside the kernel's domain (here: the CPU, float32) take the XLA path on each
    device instead of reaching the kernel; the result equals unsharded attention."""
    from nemodiff_jax.attention import Sharded, chunk_attention

    b, t, s, n, k, h = 2, 3, 64, 8, 4, 16
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kc, vc = jax.random.normal(keys[1], (b, s, k, h)), jax.random.normal(keys[2], (b, s, k, h))
    lens = jnp.array([5, 20], jnp.int32)
    want = chunk_attention(q, kc, vc, lens, causal=True, impl="xla")
    got = chunk_attention(q, kc, vc, lens, causal=True, impl=Sharded(make_mesh(2, 2)))
    assert jnp.allclose(got, want, atol=1e-5)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU platform")
def test_quadratic_spec_canvas_under_a_mesh():
    """quadratic_spec's structured canvas mask under a (2, 2) mesh, through the partitioner-split XLA path and
    per device in shard_map (attention.Sharded): the single-device tokens, which are ar's."""
    from nemodiff_jax.attention import mesh_impl

    kw = dict(max_new_tokens=20, stop_token_ids=[])
    want = [r.tokens for r in Generator(fresh()).generate(PROMPTS, mode="quadratic_spec", block_size=4, **kw)]
    assert want == [r.tokens for r in Generator(fresh()).generate(PROMPTS, mode="ar", **kw)]
    mesh = make_mesh(2, 2)
    g = Generator(fresh(), mesh=mesh)
    for impl in ("xla", mesh_impl(mesh, CFG.num_kv_heads, reference=True)):
        g.attn_impl = impl
        assert [r.tokens for r in g.generate(PROMPTS, mode="quadratic_spec", block_size=4, **kw)] == want, impl
