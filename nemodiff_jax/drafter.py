"""Training the linear-spec drafter LoRA by self-distillation (`nemodiff train --drafter`).

What linear_spec's draft pass sees at inference: the committed prefix in the cache (written by causal passes
with the adapter off) and one block `[seed, mask x (L-1)]`, attended bidirectionally with the o_proj LoRA on;
slot i's logits fill slot i. The verify pass then keeps the longest prefix of drafts that greedy AR would have
emitted. So the drafter's target is the model's own greedy AR continuation of the prefix.

The data are exactly that. A prompt of p corpus tokens is rolled out greedily (ar, no stop ids) to n tokens.
Greedy decoding is deterministic, so for every block start s >= p, the rollout's tokens s+1..s+L-1 are the
greedy continuation of its first s+1 tokens: each rollout gives (n - p) / L training blocks whose prefixes
are model-written text, as they are when linear_spec runs. Prompt lengths vary so block starts fall anywhere
in the text.

One forward over the doubled sequence `[draft blocks | rollout]` under training.block_diff_mask computes
every block's draft pass at once: a draft block sees itself and the clean tokens before it. The adapter is
gated to the draft half (LoRA.gate), so the clean half's keys and values are the adapter-free ones the cache
holds at inference. The loss is the mean cross-entropy of slots 1..L-1 of the blocks that start inside the
rollout, up to its first EOS (linear_spec ends a row there); the base weights are frozen, only the adapter
(A random, B zero: it starts as the base model) learns. What is trained is the default drafting: one pass
(threshold 0) over blocks of the model's block size; threshold drafting's later passes, which see partly
filled blocks, are not in the training data.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemodiff_jax import training as T
from nemodiff_jax.lora import DRAFTER_DIR, LoRA, save_lora


@dataclasses.dataclass(frozen=True)
class DrafterJob:
    """A drafter training run. `model`: the HF model directory; `train`: the text whose windows become the
    rollout prompts (documents separated as in training.tokenize_corpus); the adapter goes to
    `out` (default <model>/linear_spec_lora) and the token cache, log and summary to `work_dir` (default
    <model>.drafter.work, beside the model directory, never inside it)."""

    model: Path
    train: Path
    val: Path | None = None  # held-out text for the validation rollouts (None: the last rows of `train`'s)
    out: Path | None = None
    work_dir: Path | None = None
    rank: int = 16
    alpha: float = 32.0
    rollouts: int = 512  # rows rolled out (each gives (seq_len - prompt) / block training blocks)
    seq_len: int = 256  # prompt + rollout; a multiple of the block size
    prompt_min: int = 16
    prompt_max: int = 128
    steps: int = 300
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0
    dtype: str = "float32"  # the model's dtype for the rollouts and the frozen weights (the adapter is float32);
    # the targets are greedy tokens in this dtype, so train in the dtype linear_spec will run in
    progress: bool = True


def rollout_rows(gen, windows: T.TokenWindows, job: DrafterJob, count: int, seed: int,
                 log=print) -> dict[str, np.ndarray]:
    """`tokens` [R, seq_len] (prompt + greedy rollout), `start` [R] (the prompt length p) and `stop` [R] (the
    position of the rollout's first EOS, or seq_len) for `count` rows; prompts are windows of `windows`
    (BOS first) of p tokens, p uniform in [prompt_min, prompt_max]."""
    rng = np.random.default_rng((seed, 1))
    n = job.seq_len
    rows = windows.sample(seed, 0, count)["tokens"]  # [R, windows.seq_len], BOS first
    starts = rng.integers(job.prompt_min, job.prompt_max + 1, size=count)
    out = np.zeros((count, n), np.int32)
    stops = np.full((count,), n, np.int32)
    eos = set(gen.config.eos_token_ids)
    chunk = 64
    t0 = time.perf_counter()
    for lo in range(0, count, chunk):
        hi = min(lo + chunk, count)
        prompts = [rows[i, :starts[i]].tolist() for i in range(lo, hi)]
        results = gen.generate(prompts, mode="ar", max_new_tokens=n - job.prompt_min, stop_token_ids=[])
        for i, (p, r) in enumerate(zip(prompts, results)):
            out[lo + i] = (p + r.tokens)[:n]
            stops[lo + i] = next((len(p) + k for k, t in enumerate(r.tokens) if t in eos and len(p) + k < n), n)
        log(f"[drafter] rolled out {hi}/{count} prompts ({time.perf_counter() - t0:.0f} s)")
    return {"tokens": out, "start": starts.astype(np.int32), "stop": stops}


def draft_inputs(tokens: jax.Array, start: jax.Array, stop: jax.Array, block: int, mask_id: int):
    """(x_t [B,n] draft half: each block's slot 0 kept, the rest masked; weights [B,n] float32: 1 on slots
    1..L-1 of the blocks that start at or after the row's prompt length, up to its first EOS included:
    linear_spec ends a row there, so nothing past it is ever drafted)."""
    b, n = tokens.shape
    pos = jnp.arange(n)
    slot = pos % block
    x_t = jnp.where(slot[None, :] == 0, tokens, mask_id)
    block_start = pos - slot
    weights = ((slot[None, :] > 0) & (block_start[None, :] >= start[:, None])
               & (pos[None, :] <= stop[:, None])).astype(jnp.float32)
    return x_t, weights


def init_lora(cfg, key: jax.Array, rank: int, alpha: float) -> LoRA:
    """PEFT's initialisation: A ~ uniform(+-1/sqrt(in)), B = 0, so the adapter starts as a no-op."""
    keys = jax.random.split(key, cfg.num_layers)
    fan_in = cfg.num_heads * cfg.head_dim
    bound = 1.0 / np.sqrt(fan_in)
    a = tuple(jax.random.uniform(k, (cfg.num_heads, cfg.head_dim, rank), jnp.float32, -bound, bound) for k in keys)
    b = tuple(jnp.zeros((rank, cfg.hidden_size), jnp.float32) for _ in range(cfg.num_layers))
    return LoRA(a=a, b=b, scale=alpha / rank)


def draft_loss(model, lora: LoRA, tokens, start, stop, block: int):
    """(mean CE over the weighted draft slots, (CE sum, correct sum, count, first-slot correct, first-slot
    count)) of one doubled forward with the adapter gated to the draft half."""
    cfg = model.config
    x_t, weights = draft_inputs(tokens, start, stop, block, cfg.mask_token_id)
    inputs, positions, mask = T.doubled_inputs(x_t, tokens, block)
    b, n = tokens.shape
    gate = jnp.concatenate([jnp.ones((b, n), jnp.float32), jnp.zeros((b, n), jnp.float32)], axis=1)
    h, _ = model.hidden(inputs, positions, None, mask=mask, lora=dataclasses.replace(lora, gate=gate))
    logits = model.head(h[:, :n])  # the draft half only: the clean half has no targets here
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    correct = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
    first = weights * (jnp.arange(n) % block == 1)[None, :]
    count = jnp.sum(weights)
    sums = (jnp.sum(ce * weights), jnp.sum(correct * weights), count, jnp.sum(correct * first), jnp.sum(first))
    return sums[0] / jnp.maximum(count, 1.0), sums


def make_step(graphdef, optimizer, block: int):
    """train_step(params, lora, opt_state, tokens, start) -> (lora, opt_state, metrics); the base params
    are an argument, not a constant (no 40 MB literal in the program), and get no gradient."""

    def step(params, lora, opt_state, tokens, start, stop):
        model = nnx.merge(graphdef, params)

        def loss_fn(lo):
            return draft_loss(model, lo, tokens, start, stop, block)

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        return lora, opt_state, {"loss": loss, "acc": sums[1] / jnp.maximum(sums[2], 1.0),
                                 "acc_slot1": sums[3] / jnp.maximum(sums[4], 1.0)}

    return jax.jit(step, donate_argnums=(1, 2))


def make_eval(graphdef, block: int):
    def evaluate(params, lora, tokens, start, stop):
        return draft_loss(nnx.merge(graphdef, params), lora, tokens, start, stop, block)[1]

    return jax.jit(evaluate)


def run(job: DrafterJob, log=print) -> dict:
    """Rolls out, trains the adapter, saves it (PEFT layout) and returns the summary (also written as
    <work>/summary.json; the per-step log is <work>/log.jsonl)."""
    from tqdm import tqdm

    from nemodiff_jax.generate import load

    t_start = time.perf_counter()
    gen = load(job.model, dtype=job.dtype, drafter=False, progress=False)
    cfg, block = gen.config, gen.config.block_size
    if job.seq_len % block or job.seq_len <= job.prompt_max:
        raise ValueError(f"seq_len {job.seq_len} must be a multiple of the block size {block} and longer than "
                         f"prompt_max {job.prompt_max}")
    if not 1 <= job.prompt_min <= job.prompt_max:
        raise ValueError(f"need 1 <= prompt_min <= prompt_max, got {job.prompt_min}, {job.prompt_max}")
    if job.rollouts < 2 or job.batch < 1 or job.steps < 1 or job.rank < 1:
        raise ValueError(f"need rollouts >= 2, batch, steps and rank >= 1, got {job.rollouts}, {job.batch}, "
                         f"{job.steps}, {job.rank}")
    if job.prompt_max + job.seq_len - job.prompt_min > cfg.max_position_embeddings:
        raise ValueError(f"prompt_max + seq_len - prompt_min = {job.prompt_max + job.seq_len - job.prompt_min} "
                         f"exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    if gen.tokenizer is None:
        raise ValueError(f"{job.model}: no tokenizer.json: the prompts' text cannot be tokenized")
    model_dir = Path(job.model)
    out = Path(job.out) if job.out is not None else model_dir / DRAFTER_DIR
    work = (Path(job.work_dir) if job.work_dir is not None
            else model_dir.with_name(model_dir.name + ".drafter.work"))
    work.mkdir(parents=True, exist_ok=True)

    def windows(text: Path) -> T.TokenWindows:
        return T.TokenWindows(T.tokenize_corpus(text, gen.tokenizer, cache_dir=work / "tokens"), job.prompt_max,
                              cfg.bos_token_id)

    n_val = max(1, job.rollouts // 16)
    if job.val is not None:  # held-out prompts: the draft accuracy of text never trained on
        train_rows = rollout_rows(gen, windows(job.train), job, job.rollouts, job.seed, log=log)
        val_rows = rollout_rows(gen, windows(job.val), job, n_val, job.seed + 1, log=log)
    else:  # the last rows: prompts from the same text, rollouts never trained on
        data = rollout_rows(gen, windows(job.train), job, job.rollouts + n_val, job.seed, log=log)
        train_rows = {k: v[:-n_val] for k, v in data.items()}
        val_rows = {k: v[-n_val:] for k, v in data.items()}

    graphdef, params = nnx.split(gen.model)  # frozen, in the dtype the rollouts ran in
    precision = gen.runtime.precision
    lora = init_lora(cfg, jax.random.key(job.seed), job.rank, job.alpha)
    schedule = optax.warmup_cosine_decay_schedule(0.0, job.lr, job.warmup, max(job.steps, job.warmup + 1),
                                                  job.lr * 0.1)
    optimizer = optax.adamw(schedule, weight_decay=0.0)
    opt_state = optimizer.init(lora)
    step_fn, eval_fn = make_step(graphdef, optimizer, block), make_eval(graphdef, block)

    def evaluate(lo) -> dict[str, float]:
        tot = np.zeros(5)
        for i in range(0, n_val, job.batch):
            with jax.default_matmul_precision(precision):
                sums = eval_fn(params, lo, *(val_rows[k][i:i + job.batch] for k in ("tokens", "start", "stop")))
            tot += np.array([float(x) for x in sums])
        return {"val_loss": tot[0] / tot[2], "val_acc": tot[1] / tot[2], "val_acc_slot1": tot[3] / tot[4]}

    before = evaluate(lora)
    log(f"[drafter] before training (the adapter is a no-op): {json.dumps(before)}")
    rng = np.random.default_rng((job.seed, 2))
    n_train = len(train_rows["tokens"])
    logf = (work / "log.jsonl").open("w")
    bar = tqdm(range(job.steps), disable=not job.progress, desc="drafter", mininterval=1.0)
    t0 = time.perf_counter()
    metrics = {}
    for step in bar:
        idx = rng.integers(0, n_train, size=job.batch)
        with jax.default_matmul_precision(precision):
            lora, opt_state, m = step_fn(params, lora, opt_state,
                                         *(train_rows[k][idx] for k in ("tokens", "start", "stop")))
        if (step + 1) % 10 == 0 or step + 1 == job.steps:
            metrics = {k: float(v) for k, v in m.items()}
            rate = (step + 1) * job.batch * job.seq_len * 2 / (time.perf_counter() - t0)
            logf.write(json.dumps({"step": step + 1, **metrics, "tokens_per_s": rate}) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}", tok_s=f"{rate:,.0f}")
    logf.close()
    after = evaluate(lora)
    log(f"[drafter] after {job.steps} steps: {json.dumps(after)}")
    save_lora(jax.device_get(lora), out, cfg)
    summary = {"out": str(out), "steps": job.steps, "rank": job.rank, "alpha": job.alpha,
               "rollouts": job.rollouts, "seq_len": job.seq_len, "before": before, "after": after,
               "last_train": metrics, "wall_s": time.perf_counter() - t_start}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
