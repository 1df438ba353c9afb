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
    x_t, w = D.draft_inputs(tokens, start, jnp.asarray([N, N]), BLOCK, 100)
    slot = np.arange(N) % BLOCK
    np.testing.assert_array_equal(np.asarray(x_t), np.where(slot == 0, np.asarray(tokens), 100))
    # row 0 (prompt of 3): blocks starting at 8 and 16 train; row 1 (prompt of 8): the same two blocks;
    # block 0 starts inside both prompts (its seed is no rollout token), and slot 0 is never a target
    want = np.zeros((2, N), np.float32)
    want[:, 9:16] = want[:, 17:24] = 1
    np.testing.assert_array_equal(np.asarray(w), want)
    x_t, w = D.draft_inputs(tokens, jnp.asarray([9, 0]), jnp.asarray([N, 12]), BLOCK, 100)
    assert np.asarray(w)[0, :17].sum() == 0 and np.asarray(w)[0, 17:].sum() == 7
    # row 1 stops at its EOS at 12: slots 1..7 of block 0 and 9..12 of block 1 (the EOS itself is drafted)
    np.testing.assert_array_equal(np.nonzero(np.asarray(w)[1])[0], [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12])


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
    x_t, _ = D.draft_inputs(tokens, jnp.zeros((2,), jnp.int32), jnp.full((2,), N), BLOCK, CFG.mask_token_id)
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
    job = D.DrafterJob(model=model_dir, train=text, seq_len=32, prompt_min=4, prompt_max=12)
    windows = T.TokenWindows(T.tokenize_corpus(text, gen.tokenizer, cache_dir=tmp_path), 12, 1)
    rows = D.rollout_rows(gen, windows, job, 3, 0, log=lambda *_: None)
    source = windows.sample(0, 0, 3)["tokens"]
    assert rows["tokens"].shape == (3, 32) and np.all(rows["tokens"][:, 0] == 1)
    for toks, p, stop, src in zip(rows["tokens"], rows["start"], rows["stop"], source):
        assert 4 <= p <= 12 and toks[:p].tolist() == src[:p].tolist()  # the prompt is the corpus window
        rest = gen.generate([toks[:p].tolist()], mode="ar", max_new_tokens=32 - p, stop_token_ids=[])[0].tokens
        assert rest == toks[p:].tolist()  # the whole rollout is greedy ar's
        eos = [i for i in range(p, 32) if toks[i] == 11]
        assert stop == (eos[0] if eos else 32)
        # and so is every block's continuation after its seed
        for s in range(-(-p // 8) * 8, 32, 8):
            want = gen.generate([toks[:s + 1].tolist()], mode="ar", max_new_tokens=7, stop_token_ids=[])[0].tokens
            assert want == toks[s + 1:s + 8].tolist()


def test_drafter_training_end_to_end(model_dir, tmp_path):
    """A short run lowers the held-out draft loss; the adapter is saved where load() attaches it by default,
    `drafter=False` leaves it off, and greedy linear_spec with it still equals greedy ar (float32)."""
    import shutil

    import nemodiff_jax

    model_dir = shutil.copytree(model_dir, tmp_path / "model")  # the shared model stays drafter-free
    text = tmp_path / "train.txt"
    text.write_text(T.DOC_SEP.join(f"class C{i}:\n    def get(self):\n        return self.v{i}\n" for i in range(60)))
    val = tmp_path / "val.txt"
    val.write_text(T.DOC_SEP.join(f"class D{i}:\n    def put(self):\n        self.w{i} = 1\n" for i in range(20)))
    job = D.DrafterJob(model=model_dir, train=text, val=val, rollouts=32, seq_len=32, prompt_min=4,
                       prompt_max=12, steps=40, batch=8, lr=1e-2, rank=4, progress=False)
    summary = D.run(job, log=lambda *_: None)
    assert summary["after"]["val_loss"] < summary["before"]["val_loss"] - 0.05
    assert (model_dir / DRAFTER_DIR / "adapter_config.json").is_file()
    work = tmp_path / "model.drafter.work"  # beside the model directory, not in it
    assert not (model_dir / "linear_spec_lora.work").exists()
    lines = (work / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("loss" in line for line in lines)

    gen = nemodiff_jax.load(model_dir, dtype="float32", progress=False)
    assert gen.drafter is not None and gen.drafter.rank == 4
    assert nemodiff_jax.load(model_dir, dtype="float32", progress=False, drafter=False).drafter is None
    prompts = ["class C3:\n", "def get(self"]
    ar = [r.tokens for r in gen.generate(prompts, mode="ar", max_new_tokens=24)]
    with_lora = gen.generate(prompts, mode="linear_spec", max_new_tokens=24)
    without = gen.generate(prompts, mode="linear_spec", max_new_tokens=24, lora=False)
    assert [r.tokens for r in with_lora] == ar == [r.tokens for r in without]

    # the drafter travels with a converted checkpoint, and --no-drafter leaves it off
    from nemodiff_jax import cli

    dst = tmp_path / "converted"
    assert cli.main(["convert", str(model_dir), str(dst), "--to", "hf", "--dtype", "float32"]) == 0
    assert (dst / DRAFTER_DIR / "adapter_model.safetensors").is_file()
    assert nemodiff_jax.load(dst, dtype="float32", progress=False).drafter.rank == 4
    args = cli.build_parser().parse_args(["generate", "--model", str(dst), "--prompt", "x", "--no-drafter"])
    assert cli.drafter_arg(args) is False


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
    assert (model_dir.parent / f"{model_dir.name}.drafter.work" / "summary.json").is_file()
    assert "drafter saved to" in capsys.readouterr().out
