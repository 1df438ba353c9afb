"""Training objective (spec §7): the block-diffusion mask (by brute force and by gradients), corruption
statistics, training-vs-inference consistency, optimisation, data parallelism, exact checkpoint resume,
the data pipeline and the train_tiny smoke run."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemodiff_jax import training as T
from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import Config
from nemodiff_jax.model import Transformer
from nemodiff_jax.sharding import make_mesh

# Small enough that every test compiles in a few seconds on CPU; GQA and yarn stay on.
CFG = Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, max_position_embeddings=256, rope_theta=1e4, rope_factor=4.0,
             rope_original_max_position_embeddings=64, block_size=8)
N, BLOCK = 24, 8  # 3 blocks per half


def _model(seed: int = 0, cfg: Config = CFG) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "causal"))
def _forward(graphdef, state, tokens, positions, cache=None, causal=True, mask=None):
    return nnx.merge(graphdef, state)(tokens, positions, cache, causal=causal, mask=mask)


def _jit_forward(model: Transformer):
    """model(tokens, positions, cache, causal=, mask=), compiled once per shape for every model of CFG (eager
    op-by-op dispatch is slower on CPU, and tests share compilations through the module-level jit)."""
    graphdef, state = nnx.split(model)
    return lambda *a, **kw: _forward(graphdef, state, *a, **kw)


def _brute_force_mask(n: int, block: int) -> np.ndarray:
    out = np.zeros((2 * n, 2 * n), bool)
    for q, k in itertools.product(range(2 * n), repeat=2):
        q_noisy, k_noisy = q < n, k < n
        bq, bk = (q % n) // block, (k % n) // block
        if q_noisy and k_noisy:
            out[q, k] = bq == bk
        elif q_noisy:
            out[q, k] = bk < bq
        elif not k_noisy:
            out[q, k] = k <= q
    return out


# ------------------------------------------------------------------ mask


@pytest.mark.parametrize("n,block", [(24, 8), (32, 32), (20, 8), (16, 1), (12, 5)])
def test_mask_matches_brute_force(n, block):
    np.testing.assert_array_equal(T.block_diff_mask(n, block), _brute_force_mask(n, block))


def test_mask_is_transitively_closed():
    # Stacked layers propagate information along paths of allowed edges; closure means depth adds no edge,
    # so the gradient test below can compare a 2-layer model against the one-layer mask.
    m = T.block_diff_mask(N, BLOCK).astype(np.int64)
    assert np.array_equal((m @ m) > 0, m > 0)


def test_clean_half_never_sees_noisy_half():
    m = T.block_diff_mask(N, BLOCK)
    assert not m[N:, :N].any()
    assert np.array_equal(m[N:, N:], np.tril(np.ones((N, N), bool)))


def test_gradients_zero_exactly_on_forbidden_edges():
    """d logits[q] / d input embedding[k] is exactly 0 where the mask forbids q->k (through all layers), and
    non-zero where it allows it. Inputs are 2n distinct tokens, so row k of the embedding-table gradient is
    the gradient w.r.t. input position k (model.py stays untouched)."""
    model = _model(1)
    graphdef, state = nnx.split(model)
    tokens = jnp.arange(2 * N, dtype=jnp.int32)[None] + 40  # distinct, and none is the mask id
    positions = jnp.concatenate([jnp.arange(N), jnp.arange(N)])[None].astype(jnp.int32)
    mask = jnp.asarray(T.block_diff_mask(N, BLOCK))[None]
    probe = jax.random.normal(jax.random.key(3), (CFG.vocab_size,))  # generic direction: no accidental zeros

    def out(table):
        st = jax.tree.map(lambda x: x, state)
        st["embed_tokens"].set_value(table)
        logits, _ = nnx.merge(graphdef, st)(tokens, positions, None, mask=mask)
        return logits[0] @ probe  # [2n]

    jac = jax.jit(jax.jacrev(out))(state["embed_tokens"][...])  # [2n, V, D]
    influence = np.asarray(jnp.abs(jac[:, tokens[0], :]).max(-1))  # [q, k]
    allowed = T.block_diff_mask(N, BLOCK)
    assert np.all(influence[~allowed] == 0.0), np.argwhere((influence != 0) & ~allowed)[:5]
    assert np.all(influence[allowed] > 1e-8), np.argwhere((influence <= 1e-8) & allowed)[:5]


# ------------------------------------------------------------------ corruption


def test_corrupt_statistics():
    b, n = 4096, 64
    x0 = jax.random.randint(jax.random.key(0), (b, n), 101, 128)
    loss_mask = jnp.ones((b, n), bool).at[:, :4].set(False)
    x_t, masked, p = T.corrupt(jax.random.key(1), x0, loss_mask, 1e-3, mask_id=100)
    x_t, masked, p = map(np.asarray, (x_t, masked, p))
    assert p.min() >= 1e-3 and p.max() <= 1.0
    assert abs(p.mean() - 0.5) < 0.02 and abs(np.mean(p < 0.25) - 0.25) < 0.03  # p ~ U(eps, 1)
    assert not masked[:, :4].any()  # never outside loss_mask
    np.testing.assert_array_equal(x_t, np.where(masked, 100, np.asarray(x0)))
    frac = masked[:, 4:].mean(1)
    assert abs(np.mean(frac - p)) < 0.005  # per-row rate is p
    assert np.corrcoef(frac, p)[0, 1] > 0.98
    # Independence within a row: the per-row variance is binomial.
    assert abs(np.mean((frac - p) ** 2) / np.mean(p * (1 - p) / 60) - 1) < 0.1
    # Different rows, different rates; same key, same draw.
    assert len(np.unique(p)) > 0.99 * b
    np.testing.assert_array_equal(np.asarray(T.corrupt(jax.random.key(1), x0, loss_mask, mask_id=100)[1]),
                                  masked)


# ------------------------------------------------------------------ training forward == inference forwards


def test_doubled_forward_matches_inference_passes():
    """Clean half == a plain causal forward of x0 (the AR mode); noisy block b == a bidirectional peek of
    x_t's block b over a causal cache of x0's first b blocks (the diffusion mode, spec §7.4)."""
    model = _jit_forward(_model(2))
    x0 = jax.random.randint(jax.random.key(5), (2, N), 101, 128).at[:, 0].set(1)
    x_t, _, _ = T.corrupt(jax.random.key(6), x0, jnp.ones_like(x0, bool).at[:, 0].set(False), mask_id=100)
    tokens, positions, mask = T.doubled_inputs(x_t, x0, BLOCK)
    logits, _ = model(tokens, positions, None, mask=mask)

    pos = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (2, N))
    causal, _ = model(x0, pos, None, causal=True)
    np.testing.assert_allclose(logits[:, N:], causal, rtol=1e-5, atol=1e-5)

    for b in range(N // BLOCK):
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        cache = KVCache.init(CFG, 2, N, jnp.float32)
        if lo:
            _, cache = model(x0[:, :lo], pos[:, :lo], cache, causal=True)
            cache = cache.advance(jnp.full((2,), lo))
        peek, _ = model(x_t[:, lo:hi], pos[:, lo:hi], cache, causal=False)
        np.testing.assert_allclose(logits[:, lo:hi], peek, rtol=1e-5, atol=1e-5)


def test_joint_loss_by_hand():
    model = _model(3)
    x0 = jax.random.randint(jax.random.key(7), (2, N), 101, 128)
    lm = jnp.ones_like(x0, bool).at[:, 0].set(False)
    key = jax.random.key(8)
    loss, m = nnx.jit(T.joint_loss, static_argnums=(4, 5))(model, x0, lm, key, BLOCK, 0.3)
    model = _jit_forward(model)
    x_t, masked, p = T.corrupt(key, x0, lm, mask_id=100)
    tokens, positions, mask = T.doubled_inputs(x_t, x0, BLOCK)
    logp = jax.nn.log_softmax(model(tokens, positions, None, mask=mask)[0], -1)
    ce_d = -jnp.take_along_axis(logp[:, :N], x0[..., None], -1)[..., 0]
    ce_a = -jnp.take_along_axis(logp[:, N:-1], x0[:, 1:, None], -1)[..., 0]
    l_diff = jnp.sum(jnp.where(masked, ce_d / p[:, None], 0)) / masked.sum()
    l_ar = ce_a.mean()
    np.testing.assert_allclose(m["l_diff"], l_diff, rtol=1e-5)
    np.testing.assert_allclose(m["l_ar"], l_ar, rtol=1e-5)
    np.testing.assert_allclose(loss, l_ar + 0.3 * l_diff, rtol=1e-5)
    assert 0 < m["mask_frac"] < 1 and 0 <= m["acc_ar"] <= 1


# ------------------------------------------------------------------ optimisation, data parallel, resume


def _stream(length: int = 4000) -> np.ndarray:
    # Learnable but not trivial: a few interleaved periodic patterns.
    i = np.arange(length)
    return (101 + (i % 7) + 7 * ((i // 7) % 3)).astype(np.uint16)


def _setup(mesh):
    # make_optimizer / make_train_step / init are cached per configuration: tests on the same mesh share one
    # compiled step (the horizon lives in the optimizer state, so it needs no separate optimizer).
    opt = T.make_optimizer(3e-3, warmup_steps=4, total_steps=1000)
    graphdef, state, opt_state = T.init_train_state(CFG, opt, mesh, seed=0)
    step = T.make_train_step(opt, mesh, block=BLOCK)
    return opt, graphdef, state, opt_state, step


def _run(step, graphdef, state, opt_state, mesh, steps, start=0, batch=8):
    windows = T.TokenWindows(_stream(), N)
    history = []
    for i in range(start, start + steps):
        b = T.shard_batch(windows.sample(0, i, batch), mesh)
        state, opt_state, m = step(graphdef, state, opt_state, b, jax.random.fold_in(jax.random.key(0), i))
        history.append(jax.device_get(m))
    return state, opt_state, history


def test_few_steps_lower_the_loss_and_horizon_is_settable():
    mesh = make_mesh(1, devices=jax.devices()[:1])
    _, graphdef, state, opt_state, step = _setup(mesh)
    state, opt_state, hist = _run(step, graphdef, state, opt_state, mesh, 25)
    first = np.mean([h["loss"] for h in hist[:3]])
    last = np.mean([h["loss"] for h in hist[-3:]])
    assert last < 0.6 * first, (first, last)
    assert hist[-1]["l_ar"] < 0.5 * hist[0]["l_ar"]
    assert hist[-1]["l_diff"] < hist[0]["l_diff"]
    assert hist[2]["lr"] < hist[3]["lr"] and hist[3]["lr"] == pytest.approx(3e-3, rel=1e-5)  # warmup of 4

    # A time-budgeted run sets the cosine horizon once it knows its step time: no recompilation.
    opt_state = T.set_total_steps(opt_state, 26)
    assert T.total_steps_of(opt_state) == 26 and T.optimizer_step(opt_state) == 25
    _, _, hist = _run(step, graphdef, state, opt_state, mesh, 2, start=25)
    np.testing.assert_allclose(hist[-1]["lr"], 0.1 * 3e-3, rtol=1e-5)  # past the horizon: the floor
    assert step._cache_size() == 1


def test_data_parallel_matches_single_device():
    if jax.device_count() < 2:
        pytest.skip("needs several (fake) devices; tests/conftest.py asks for 8")
    n_dev = 8 if jax.device_count() >= 8 else 2
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:n_dev]):
        mesh = make_mesh(len(devices), devices=devices)
        _, graphdef, state, opt_state, step = _setup(mesh)
        state, _, hist = _run(step, graphdef, state, opt_state, mesh, 3)
        results.append((state, hist))
        assert state["embed_tokens"][...].sharding.is_fully_replicated
    (s1, h1), (s8, h8) = results
    for a, b in zip(h1, h8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_resume_is_bitwise_exact(tmp_path):
    mesh = make_mesh(len(jax.devices()))
    batch = max(8, jax.device_count())
    opt, graphdef, state, opt_state, step = _setup(mesh)
    state, opt_state, _ = _run(step, graphdef, state, opt_state, mesh, 3, batch=batch)
    T.save_checkpoint(tmp_path / "ckpt", state, opt_state, {"seed": 0, "data_step": 3})
    ref_state, ref_opt, ref_hist = _run(step, graphdef, state, opt_state, mesh, 2, start=3, batch=batch)

    # A fresh process would rebuild templates from the config and optimizer, then restore.
    _, template, opt_template = T.init_train_state(CFG, opt, mesh, seed=99)
    assert T.latest_checkpoint_step(tmp_path / "ckpt") == 3
    r_state, r_opt, meta = T.restore_checkpoint(tmp_path / "ckpt", template, opt_template)
    assert meta["step"] == 3 and meta["data_step"] == 3
    assert T.optimizer_step(r_opt) == 3
    r_state, r_opt, hist = _run(step, graphdef, r_state, r_opt, mesh, 2, start=meta["data_step"], batch=batch)
    for a, b in zip(ref_hist, hist):
        assert all(np.array_equal(a[k], b[k]) for k in a), (a, b)
    for a, b in zip(jax.tree.leaves((ref_state, ref_opt)), jax.tree.leaves((r_state, r_opt))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ data


def test_windows_are_deterministic_and_start_with_bos():
    w = T.TokenWindows(_stream(), 16, bos_id=1)
    a, b = w.sample(5, 10, 4), w.sample(5, 10, 4)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], w.sample(5, 11, 4)["tokens"])
    assert (a["tokens"][:, 0] == 1).all() and a["tokens"].dtype == np.int32
    assert not a["loss_mask"][:, 0].any() and a["loss_mask"][:, 1:].all()
    rows = list(w.sequential(7))
    n_real = w.num_sequential_rows()
    assert sum(int(r["loss_mask"].any(1).sum()) for r in rows) == n_real
    body = np.concatenate([r["tokens"][:, 1:] for r in rows])[:n_real].reshape(-1)
    np.testing.assert_array_equal(body, _stream()[:len(body)])  # consecutive, non-overlapping


def test_tokenize_corpus_puts_eos_between_documents(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("To be, or not to be.\n\nThat is the question." + T.DOC_SEP + "Exit, pursued by a bear.")
    stream = T.tokenize_corpus(text, cache_dir=tmp_path / "cache")
    assert (stream == 11).sum() == 2 and stream[-1] == 11
    assert list((tmp_path / "cache").glob("*.npy"))
    np.testing.assert_array_equal(T.tokenize_corpus(text, cache_dir=tmp_path / "cache"), stream)
    no_eos = T.tokenize_corpus(text, eos_between_docs=False, cache_dir=tmp_path / "cache")
    assert (no_eos == 11).sum() == 0 and len(no_eos) == len(stream) - 2


# ------------------------------------------------------------------ the script, end to end


def test_train_tiny_micro_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny", Path(__file__).parents[1] / "scripts/train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_tiny  # dataclasses look their module up there
    spec.loader.exec_module(train_tiny)
    text = "\n".join(f"Line {i}: the quality of mercy is not strained." for i in range(300))
    (tmp_path / "train.txt").write_text(text + T.DOC_SEP + text[::-1])
    (tmp_path / "val.txt").write_text(text[:4000])
    out = tmp_path / "out"
    args = ["--preset", "micro", "--steps", "3", "--out", str(out), "--train", str(tmp_path / "train.txt"),
            "--val", str(tmp_path / "val.txt"), "--eval-every", "2", "--ckpt-every", "2", "--sample-tokens", "8"]
    first = summary = train_tiny.main(args)
    assert summary["step"] == 3
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["split"] for r in log} >= {"train", "val"}
    assert all(np.isfinite(r["l_ar"]) and np.isfinite(r["l_diff"]) for r in log if "l_ar" in r)
    hf_dir = out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json", "train_summary.json"):
        assert (hf_dir / name).is_file(), name
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_labs_diffusion" and cfg["torch_dtype"] == "bfloat16"
    assert (cfg["block_size"], cfg["mask_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (32, 100, 1, 11)

    import nemodiff_jax

    gen = nemodiff_jax.load(hf_dir, dtype="float32", progress=False)
    logits = gen.logits(gen.tokenizer.encode("The quality of mercy"))
    assert np.isfinite(logits).all() and logits.shape[-1] == cfg["vocab_size"]

    # --resume restores the last checkpoint (exact continuation is test_checkpoint_resume_is_bitwise_exact);
    # with nothing left to train it re-evaluates and re-exports over the previous export.
    summary = train_tiny.main(args[:-1] + ["0", "--resume"])
    assert summary["step"] == 3 and summary["resumed_from"] == 3
    assert summary["final_val"]["loss"] == pytest.approx(first["final_val"]["loss"], rel=1e-6)
    assert (hf_dir / "model.safetensors").is_file() and not (tmp_path / "out.partial").exists()
    assert {p.name for p in tmp_path.iterdir()} == {".cache", "out", "out.work", "train.txt", "val.txt"}
