"""The drafter LoRA's self-distillation (nemodiff_jax/drafter.py): the training forward is the inference draft
pass, the targets are the model's own greedy continuations, and a trained adapter is saved, attached by load()
and keeps greedy linear_spec equal to ar."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nemodiff_jax import drafter as D
from nemodiff_jax import training as T
from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import Config
from nemodiff_jax.lora import DRAFTER_DIR, random_lora
from nemodiff_jax.model import Transformer

CFG = Config(vocab_size=160, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, max_position_embeddings=256, rope_theta=1e4, block_size=8, mask_token_id=100,
             bos_token_id=1, eos_token_id=11)
N, BLOCK = 24, 8


def test_draft_inputs_mask_and_weights():
    tokens = jnp.arange(2 * N, dtype=jnp.int32).reshape(2, N) + 101
    start = jnp.asarray([3, 8])
    x_t, w = D.draft_inputs(tokens, start, BLOCK, 100)
    slot = np.arange(N) % BLOCK
    np.testing.assert_array_equal(np.asarray(x_t), np.where(slot == 0, np.asarray(tokens), 100))
    # row 0 (prompt of 3): blocks starting at 8 and 16 train; row 1 (prompt of 8): the same two blocks;
    # block 0 starts inside both prompts (its seed is no rollout token), and slot 0 is never a target
    want = np.zeros((2, N), np.float32)
    want[:, 9:16] = want[:, 17:24] = 1
    np.testing.assert_array_equal(np.asarray(w), want)
    x_t, w = D.draft_inputs(tokens, jnp.asarray([9, 0]), BLOCK, 100)
    assert np.asarray(w)[0, :17].sum() == 0 and np.asarray(w)[0, 17:].sum() == 7
    assert np.asarray(w)[1].sum() == 3 * 7


def test_gate_selects_positions():
    model = Transformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32)
    lora = random_lora(CFG, jax.random.key(1), rank=4, std=0.3)
    x = jax.random.randint(jax.random.key(2), (2, N), 101, 160)
    pos = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (2, N))
    plain, _ = model(x, pos, causal=True)
    on, _ = model(x, pos, causal=True, lora=lora)
    ones, _ = model(x, pos, causal=True, lora=dataclasses.replace(lora, gate=jnp.ones((2, N))))
    zeros, _ = model(x, pos, causal=True, lora=dataclasses.replace(lora, gate=jnp.zeros((2, N))))
    np.testing.assert_array_equal(np.asarray(ones), np.asarray(on))
    np.testing.assert_array_equal(np.asarray(zeros), np.asarray(plain))
    assert np.abs(np.asarray(on) - np.asarray(plain)).max() > 1e-3  # the adapter does something


def test_training_forward_is_the_inference_draft_pass():
    """Each draft block of the doubled, gated forward == linear_spec's draft pass: the prefix written to the
    cache by a causal pass without the adapter, then [seed, mask...] bidirectionally with the adapter."""
    model = Transformer(CFG, rngs=nnx.Rngs(3), dtype=jnp.float32)
    lora = random_lora(CFG, jax.random.key(4), rank=4, std=0.3)
    tokens = jax.random.randint(jax.random.key(5), (2, N), 101, 160).at[:, 0].set(1)
    x_t, _ = D.draft_inputs(tokens, jnp.zeros((2,), jnp.int32), BLOCK, CFG.mask_token_id)
    inputs, positions, mask = T.doubled_inputs(x_t, tokens, BLOCK)
    gate = jnp.concatenate([jnp.ones((2, N)), jnp.zeros((2, N))], axis=1)
    logits, _ = model(inputs, positions, None, mask=mask, lora=dataclasses.replace(lora, gate=gate))
    pos = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (2, N))
    for b in range(N // BLOCK):
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        cache = KVCache.init(CFG, 2, N, jnp.float32)
        if lo:
            _, cache = model(tokens[:, :lo], pos[:, :lo], cache, causal=True)
            cache = cache.advance(jnp.full((2,), lo))
        draft, _ = model(x_t[:, lo:hi], pos[:, lo:hi], cache, causal=False, lora=lora)
        np.testing.assert_allclose(logits[:, lo:hi], draft, rtol=1e-5, atol=1e-5)


def test_init_lora_is_a_no_op():
    lora = D.init_lora(CFG, jax.random.key(0), 8, 16.0)
    assert lora.rank == 8 and lora.scale == 2.0
    assert all(float(jnp.abs(b).max()) == 0.0 for b in lora.b)
    assert all(float(jnp.abs(a).max()) > 0.0 for a in lora.a)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with the embedded tokenizer (its ids 1/11/100), exported as an HF directory."""
    from nemodiff_jax.tokenizer import Tokenizer

    tok = Tokenizer.default()
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size, block_size=8)
    state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(7), dtype=jnp.float32))
    graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(7), dtype=jnp.float32))
    return T.export_hf(graphdef, state, tmp_path_factory.mktemp("drafter") / "model", dtype=jnp.float32)


def test_rollouts_are_greedy_continuations(model_dir, tmp_path):
    """Every training block's targets are what greedy ar emits after its prefix."""
    import nemodiff_jax

    text = tmp_path / "train.txt"
    text.write_text(T.DOC_SEP.join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(40)))
    gen = nemodiff_jax.load(model_dir, dtype="float32", progress=False)
    job = D.DrafterJob(model=model_dir, train=text, rollouts=3, seq_len=32, prompt_min=4, prompt_max=12)
    windows = T.TokenWindows(T.tokenize_corpus(text, gen.tokenizer, cache_dir=tmp_path), 12, 1)
    rows = D.rollout_rows(gen, windows, job, 8, log=lambda *_: None)
    assert rows["tokens"].shape == (3, 32) and np.all(rows["tokens"][:, 0] == 1)
    for toks, p in zip(rows["tokens"], rows["start"]):
        assert 4 <= p <= 12
        s = int(-(-p // 8) * 8)  # the first block starting inside the rollout
        want = gen.generate([toks[:s + 1].tolist()], mode="ar", max_new_tokens=7, stop_token_ids=[])[0].tokens
        assert want == toks[s + 1:s + 8].tolist()


def test_drafter_training_end_to_end(model_dir, tmp_path):
    """A short run lowers the held-out draft loss; the adapter is saved where load() attaches it by default,
    `drafter=False` leaves it off, and greedy linear_spec with it still equals greedy ar (float32)."""
    import nemodiff_jax

    text = tmp_path / "train.txt"
    text.write_text(T.DOC_SEP.join(f"class C{i}:\n    def get(self):\n        return self.v{i}\n" for i in range(60)))
    job = D.DrafterJob(model=model_dir, train=text, rollouts=32, seq_len=32, prompt_min=4, prompt_max=12,
                       steps=40, batch=8, lr=1e-2, rank=4, progress=False, work_dir=tmp_path / "work")
    summary = D.run(job, log=lambda *_: None)
    assert summary["after"]["val_loss"] < summary["before"]["val_loss"] - 0.05
    assert (model_dir / DRAFTER_DIR / "adapter_config.json").is_file()
    lines = (tmp_path / "work" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("loss" in line for line in lines)

    gen = nemodiff_jax.load(model_dir, dtype="float32", progress=False)
    assert gen.drafter is not None and gen.drafter.rank == 4
    assert nemodiff_jax.load(model_dir, dtype="float32", progress=False, drafter=False).drafter is None
    prompts = ["class C3:\n", "def get(self"]
    ar = [r.tokens for r in gen.generate(prompts, mode="ar", max_new_tokens=24)]
    with_lora = gen.generate(prompts, mode="linear_spec", max_new_tokens=24)
    without = gen.generate(prompts, mode="linear_spec", max_new_tokens=24, lora=False)
    assert [r.tokens for r in with_lora] == ar == [r.tokens for r in without]


def test_bad_jobs_are_clear_errors(model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x = 1\n")
    with pytest.raises(ValueError, match="multiple of the block size"):
        D.run(D.DrafterJob(model=model_dir, train=text, seq_len=30, prompt_max=12), log=lambda *_: None)
    with pytest.raises(ValueError, match="prompt_min"):
        D.run(D.DrafterJob(model=model_dir, train=text, seq_len=32, prompt_min=0, prompt_max=12),
              log=lambda *_: None)


def test_cli_trains_the_drafter(model_dir, tmp_path, capsys):
    """`nemodiff train --drafter` writes the adapter to --out with its log and summary."""
    from nemodiff_jax import cli

    text = tmp_path / "train.txt"
    text.write_text(T.DOC_SEP.join(f"x{i} = {i}\n" for i in range(30)))
    out = tmp_path / "lora"
    assert cli.main(["train", "--drafter", "--model", str(model_dir), "--train", str(text), "--out", str(out),
                     "--rollouts", "8", "--seq-len", "32", "--prompt-min", "4", "--prompt-max", "12", "--steps",
                     "2", "--batch", "4", "--rank", "2", "--no-progress"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora.work" / "summary.json").is_file()
    assert "drafter saved to" in capsys.readouterr().out
