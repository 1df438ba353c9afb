"""The attention path table (nemodiff_jax.attention.choose_impl / why_not), driven with fake device
descriptions: every GPU a user may have, ROCm and the CPU. A forced path where it cannot run is a clear error
naming the device, never a compiler crash."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemodiff_jax import attention as attn
from nemodiff_jax.attention import DeviceInfo, choose_impl, why_not
from nemodiff_jax.config import PRESETS
from nemodiff_jax.generate import Generator
from nemodiff_jax.model import Transformer

H200 = DeviceInfo("cuda", "NVIDIA H200", (9, 0), 91000)
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 91000)
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), 91000)
RTX3090 = DeviceInfo("cuda", "NVIDIA GeForce RTX 3090", (8, 6), 91000)
RTX4090 = DeviceInfo("cuda", "NVIDIA GeForce RTX 4090", (8, 9), 91000)
L40S = DeviceInfo("cuda", "NVIDIA L40S", (8, 9), 91000)
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0), 91000)
GB300_OLD_CUDNN = DeviceInfo("cuda", "NVIDIA GB300", (10, 3), 91000)
GB300 = DeviceInfo("cuda", "NVIDIA GB300", (10, 3), 91100)
RTX5090 = DeviceInfo("cuda", "NVIDIA GeForce RTX 5090", (12, 0), 91000)
V100 = DeviceInfo("cuda", "Tesla V100-SXM2-32GB", (7, 0), 91000)
MI300 = DeviceInfo("rocm", "AMD Instinct MI300X", None, None)
CPU = DeviceInfo("cpu", "cpu")
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def pick(device, dtype=BF16, head_dim=128, batch=1, t=1, capacity=4096, causal=True):
    return choose_impl(device, dtype, head_dim, batch, t, capacity, causal)


@pytest.mark.parametrize("device", [H200, H100])
def test_hopper_takes_the_kernel_in_its_domain(device):
    for t, causal, batch in ((1, True, 1), (32, True, 1), (32, False, 64)):
        assert pick(device, t=t, causal=causal, batch=batch) == "pallas"
    assert pick(device, dtype=F16, head_dim=64) == "pallas"
    # outside the kernel's domain: cuDNN where it runs, else XLA
    assert pick(device, dtype=F32) == "xla"
    assert pick(device, head_dim=256) == "cudnn"  # cuDNN takes up to 256 on Hopper
    assert pick(device, head_dim=96) == "cudnn"
    assert pick(device, head_dim=100) == "xla"  # not a multiple of 8
    assert pick(device, capacity=4100) == "cudnn"  # not a multiple of the kernel's 8-slot TMA tile
    assert pick(device, capacity=32) == "cudnn"  # below one KV block


@pytest.mark.parametrize("device", [A100, RTX3090, RTX4090, L40S, B200, GB300, RTX5090])
def test_other_nvidia_gpus_never_get_the_hopper_kernel(device):
    assert why_not("pallas", device, BF16, 128, 4096) is not None
    assert "9.x" in why_not("pallas", device, BF16, 128, 4096)
    # AR decode steps: cuDNN at any batch and context
    for batch in (1, 8, 64):
        for capacity in (128, 4096, 32768):
            assert pick(device, batch=batch, capacity=capacity) == "cudnn"
    # 32-token chunks: cuDNN where it beat XLA on the H200 (batch >= 8, or short bidirectional caches), else XLA
    assert pick(device, t=32, causal=False, batch=8, capacity=32768) == "cudnn"
    assert pick(device, t=32, causal=False, batch=1, capacity=1024) == "cudnn"
    assert pick(device, t=32, causal=False, batch=1, capacity=4096) == "xla"
    assert pick(device, t=32, causal=True, batch=8, capacity=32768) == "cudnn"
    assert pick(device, t=32, causal=True, batch=1, capacity=1024) == "xla"  # the mask costs more than it saves
    assert pick(device, t=32, causal=True, batch=7, capacity=256) == "xla"
    assert pick(device, dtype=F32) == "xla"


def test_head_dim_limits_follow_the_architecture():
    assert pick(A100, head_dim=256) == "xla"  # cuDNN takes <= 128 before Hopper
    assert "<= 128" in why_not("cudnn", A100, BF16, 256, 4096)
    assert pick(B200, head_dim=256) == "cudnn"


def test_devices_without_a_fast_path_take_xla():
    for device in (V100, MI300, CPU, GB300_OLD_CUDNN):
        for t, causal, batch in ((1, True, 1), (32, True, 64), (32, False, 8)):
            assert pick(device, t=t, causal=causal, batch=batch) == "xla", device
    assert "9.11" in why_not("cudnn", GB300_OLD_CUDNN, BF16, 128, 4096)
    assert "8.0" in why_not("cudnn", V100, BF16, 128, 4096)
    assert why_not("xla", CPU, F32, 100, 7) is None


def test_describe_this_machine():
    d = DeviceInfo.of()
    assert d.platform == jax.devices()[0].platform == "cpu" and d.compute_capability is None
    assert "cpu" in str(d)
    assert str(H200) == "NVIDIA H200 (cuda, compute capability 9.0)"


def test_forced_path_that_cannot_run_is_a_clear_error():
    q = jnp.zeros((1, 1, 4, 64), BF16)
    kc = vc = jnp.zeros((1, 128, 2, 64), BF16)
    lens = jnp.zeros((1,), jnp.int32)
    for impl, why in (("pallas", "compute capability 9.x"), ("cudnn", "compute capability >= 8.0")):
        with pytest.raises(ValueError, match=f"{impl}.*cannot run on .*cpu.*{why}"):
            attn.chunk_attention(q, kc, vc, lens, causal=True, impl=impl)
        with pytest.raises(ValueError, match=f"{impl}.*cannot run on .*{why}"):  # and at load time
            Generator(Transformer(PRESETS["tiny"], rngs=nnx.Rngs(0), dtype=BF16), attention=impl)
        # inside jit, too: the error comes from tracing, before any compiler sees the kernel
        with pytest.raises(ValueError, match="cannot run on"):
            jax.jit(lambda q: attn.chunk_attention(q, kc, vc, lens, causal=True, impl=impl))(q)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        attn.chunk_attention(q, kc, vc, lens, causal=True, impl="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        Generator(Transformer(PRESETS["tiny"], rngs=nnx.Rngs(0), dtype=BF16), attention="flash")
    # a fake device description drives the same entry point: the A100 row forbids the kernel too
    with pytest.raises(ValueError, match="A100.*compute capability 8.0.*9.x"):
        attn.chunk_attention(q, kc, vc, lens, causal=True, impl="pallas", device=A100)


def test_auto_on_a_fake_gpu_routes_to_the_chosen_path(monkeypatch):
    """chunk_attention(impl="auto", device=...) calls the path the table names (the path functions are
    replaced by recorders: the real cuDNN and Mosaic GPU paths cannot run on a CPU)."""
    import nemodiff_jax.pallas_kernels.chunk_attention as kernel

    calls = []
    monkeypatch.setattr(attn, "cudnn_chunk_attention", lambda q, *a, **k: calls.append("cudnn") or q)
    monkeypatch.setattr(kernel, "chunk_attention_pallas", lambda q, *a, **k: calls.append("pallas") or q)
    q = jnp.ones((2, 32, 4, 64), BF16)
    kc = vc = jnp.ones((2, 128, 2, 64), BF16)
    lens = jnp.array([3, 50], jnp.int32)
    for device, want in ((H200, "pallas"), (RTX4090, "cudnn"), (MI300, "xla")):
        calls.clear()
        out = attn.chunk_attention(q, kc, vc, lens, causal=False, impl="auto", device=device)
        assert calls == ([] if want == "xla" else [want]), device
        assert out.shape == q.shape


def test_cudnn_chunk_semantics_match_the_reference_through_xla():
    """cudnn_chunk_attention's arguments (kv lengths = length + T, the bottom-right mask for causal T > 1)
    give the chunk semantics: checked by running the same call with jax's XLA implementation on the CPU (the
cuDNN run itself is tests/test_gpu.py's)."""
    rng = np.random.default_rng(0)
    b, s, n, k, h = 3, 96, 4, 2, 16
    for t, causal in ((1, True), (5, True), (5, False)):
        q = jnp.asarray(rng.standard_normal((b, t, n, h)), F32)
        kc = jnp.asarray(rng.standard_normal((b, s, k, h)), F32)
        vc = jnp.asarray(rng.standard_normal((b, s, k, h)), F32)
        lens = jnp.array([0, 17, s - t], jnp.int32)
        want = attn.chunk_attention(q, kc, vc, lens, causal=causal, impl="xla")
        got = attn.cudnn_chunk_attention(q, kc, vc, lens, causal=causal, implementation="xla")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU platform")
def test_mesh_applies_the_table_per_device(monkeypatch):
    """Under a mesh of (pretend) GPUs attention runs per device in shard_map, and the table decides on each
    device's own shapes: rows / data, kv heads / model. The devices are described as RTX 4090s (cuDNN; the
    path function is a recorder, the real one cannot run on a CPU)."""
    from nemodiff_jax.sharding import make_mesh

    monkeypatch.setattr(attn, "_describe", lambda device: RTX4090)
    seen = []

    def record(q, k, v, lengths, *, causal, within=None):
        assert within is None
        seen.append((q.shape, k.shape, lengths.shape, causal))
        return q

    monkeypatch.setattr(attn, "cudnn_chunk_attention", record)
    mesh = make_mesh(2, 2)
    impl = attn.mesh_impl(mesh, num_kv_heads=2)
    assert impl == attn.Sharded(mesh, "auto")
    q = jnp.ones((4, 1, 4, 64), BF16)  # B=4 rows, N=4 heads, K=2 kv heads
    kc = vc = jnp.ones((4, 128, 2, 64), BF16)
    out = attn.chunk_attention(q, kc, vc, jnp.arange(4, dtype=jnp.int32), causal=True, impl=impl)
    assert out.shape == q.shape
    assert seen == [((2, 1, 2, 64), (2, 128, 1, 64), (2,), True)]  # traced once, for one device's block
    # kv heads that do not split: the partitioner's XLA path; a forced per-device path there is an error
    assert attn.mesh_impl(make_mesh(1, 4), num_kv_heads=2) == "xla"
    with pytest.raises(ValueError, match="split evenly"):
        attn.mesh_impl(make_mesh(1, 4), num_kv_heads=2, impl="cudnn")


def test_within_chunk_mask():
    """A structured chunk (`within` [T, T]): the cache before each row's length is seen whole, the chunk as
    `within` says, nothing past it. tril(within) == the causal chunk, ones == the bidirectional one; a
    quadratic_spec canvas through XLA and through the cuDNN call's arguments (run by XLA here) equals sdpa under
    the mask built by hand; "auto" on this CPU takes a path with masks (XLA), as does a forced "pallas" with a
    table that is not a canvas (the kernel computes only the canvas's)."""
    from nemodiff_jax.decoding import quadratic

    b, t, s = 3, 6, 40
    lens = jnp.array([0, 9, s - t], jnp.int32)
    tril, ones = np.tril(np.ones((t, t), bool)), np.ones((t, t), bool)
    np.testing.assert_array_equal(attn.within_mask(lens, tril, s), attn.chunk_mask(lens, t, s, True))
    np.testing.assert_array_equal(attn.within_mask(lens, ones, s), attn.chunk_mask(lens, t, s, False))
    within = quadratic.canvas(2)[1]  # T = 6
    by_hand = np.zeros((b, t, s), bool)
    for r, n in enumerate(np.asarray(lens)):
        by_hand[r, :, :n] = True
        by_hand[r, :, n:n + t] = within
    np.testing.assert_array_equal(attn.within_mask(lens, within, s), by_hand)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((b, t, 4, 16)), F32)
    kc, vc = (jnp.asarray(rng.standard_normal((b, s, 2, 16)), F32) for _ in range(2))
    want = attn.sdpa(q, kc, vc, jnp.asarray(by_hand))
    got = attn.chunk_attention(q, kc, vc, lens, causal=True, impl="xla", within=within)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    via_cudnn_args = attn.cudnn_chunk_attention(q, kc, vc, lens, causal=True, implementation="xla", within=within)
    np.testing.assert_allclose(via_cudnn_args, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(attn.chunk_attention(q, kc, vc, lens, causal=True, impl="xla"), want, atol=1e-3)
    out = attn.chunk_attention(q, kc, vc, lens, causal=True, impl="auto", within=within)  # a CPU: XLA
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    # the kernel computes the canvas itself: forced "pallas" takes it, so on a CPU that is the forced-path error
    with pytest.raises(ValueError, match="'pallas' cannot run on cpu"):
        attn.chunk_attention(q, kc, vc, lens, causal=True, impl="pallas", within=within)
    other = within.copy()
    other[0, 1] = True  # not a canvas: forced "pallas" falls back to a path with masks (XLA here)
    out = attn.chunk_attention(q, kc, vc, lens, causal=True, impl="pallas", within=other)
    np.testing.assert_allclose(out, attn.sdpa(q, kc, vc, jnp.asarray(attn.within_mask(lens, other, s))),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not match the chunk"):
        attn.chunk_attention(q, kc, vc, lens, causal=True, impl="xla", within=tril[:4, :4])


def test_auto_takes_the_kernel_for_the_canvas_on_hopper(monkeypatch):
    """"auto" routes quadratic_spec's canvas of a GPU-tested chain (KERNEL_CANVAS_CHAINS) to the Pallas kernel,
    which computes the mask itself, where the kernel runs; any other chain or structured chunk goes to cuDNN with
    its mask, and so does every canvas elsewhere (recorders stand in for the two GPU paths, which cannot run on
    a CPU)."""
    from nemodiff_jax.decoding import quadratic
    from nemodiff_jax.pallas_kernels import chunk_attention as kernel

    seen = []
    monkeypatch.setattr(kernel, "chunk_attention_pallas", lambda q, k, v, lens, *, causal, chain: seen.append(
        ("pallas", chain)) or q)
    monkeypatch.setattr(attn, "cudnn_chunk_attention", lambda q, k, v, lens, *, causal, within=None: seen.append(
        ("cudnn", within is not None)) or q)
    kc = vc = jnp.ones((1, 128, 2, 64), BF16)
    lens = jnp.array([3], jnp.int32)
    assert 3 not in attn.KERNEL_CANVAS_CHAINS
    canvas, untested = quadratic.canvas(8)[1], quadratic.canvas(3)[1]
    other = canvas.copy()
    other[0, 1] = True
    for device, within in ((H200, canvas), (H200, other), (H200, untested), (RTX4090, canvas)):
        q = jnp.ones((1, within.shape[0], 4, 64), BF16)
        attn.chunk_attention(q, kc, vc, lens, causal=True, impl="auto", device=device, within=within)
    assert seen == [("pallas", 8), ("cudnn", True), ("cudnn", True), ("cudnn", True)]
