"""Joint AR + block-diffusion training (spec §7): the doubled-sequence objective, an AdamW train step that is
data-parallel over a mesh axis "data", exact-resume orbax checkpoints, and a tiny deterministic data pipeline.

One forward over `[x_t | x_0]` (length 2n, both halves at RoPE positions 0..n-1) under `block_diff_mask` gives
both objectives: the clean half is an ordinary causal LM (L_AR, next-token targets) and every noisy block sees
itself bidirectionally plus the clean blocks before it, which is exactly what a diffusion denoise pass sees at
inference (a causal prefix cache + a bidirectional block), so L_diff trains the same-position predictions the
diffusion and self-speculation decoders use.

Loss normalisation (spec §7.3 lists three codebases): we use Automodel's —
    loss = L_AR + alpha * L_diff,   L_AR = sum(AR CE) / N_ar,   L_diff = sum_masked(CE / p) / N_masked,
with alpha = 0.3 as in both NVIDIA recipes. Per-term means keep the two terms on comparable scales whatever
the batch's mask ratio (Megatron's pooled (0.3 sum_diff + sum_ar)/(N_masked + N_ar) lets the AR term's weight
swing with how many tokens happened to be masked), and they are what we log and compare across runs.
Sums and counts are taken over the whole global batch inside one jitted step, so the loss is the same on one
device or sharded over many (no per-shard averaging).

Shapes: B batch, n sequence length (one half), V vocab. Masks are bool.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nemodiff_jax.config import Config
from nemodiff_jax.model import Transformer, abstract_model
from nemodiff_jax.tokenizer import DEFAULT_TOKENIZER_DIR, Tokenizer

DEFAULT_ALPHA = 0.3  # dlm_loss_weight / ar_loss_alpha of both NVIDIA recipes (spec §7.1)
DEFAULT_EPS = 1e-3  # minimum mask probability (spec §7.2): keeps the 1/p weight bounded


# ------------------------------------------------------------------ the objective


def block_diff_mask(n: int, block: int) -> np.ndarray:
    """bool [2n, 2n] attention mask over `[x_t | x_0]` (spec §7.2), query rows, key columns.

    noisy q -> noisy k: same block;  noisy q -> clean k: block(k) < block(q);  clean q -> clean k: k <= q;
    clean q -> noisy k: never.  Block id = (index mod n) // block; a ragged last block is allowed.
    Numpy on purpose: under jit it is a compile-time constant.
    """
    if n <= 0 or block <= 0:
        raise ValueError(f"need n > 0 and block > 0, got {n=} {block=}")
    idx = np.arange(2 * n)
    noisy = idx < n
    pos = idx % n
    blk = pos // block
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    q_blk, k_blk = blk[:, None], blk[None, :]
    noisy_noisy = q_noisy & k_noisy & (q_blk == k_blk)
    noisy_clean = q_noisy & ~k_noisy & (k_blk < q_blk)
    clean_clean = ~q_noisy & ~k_noisy & (pos[None, :] <= pos[:, None])
    return noisy_noisy | noisy_clean | clean_clean


def corrupt(key: jax.Array, x0: jax.Array, loss_mask: jax.Array, eps: float = DEFAULT_EPS, *,
            mask_id: int = 100) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Uniform-rate masking (spec §7.2): t ~ U(0,1) per row, p = (1-eps) t + eps, each position with
    loss_mask masked independently with probability p. Returns (x_t [B,n], masked bool [B,n], p [B])."""
    k_t, k_m = jax.random.split(key)
    b, n = x0.shape
    t = jax.random.uniform(k_t, (b,), jnp.float32)
    p = (1.0 - eps) * t + eps
    masked = (jax.random.uniform(k_m, (b, n), jnp.float32) < p[:, None]) & loss_mask
    return jnp.where(masked, jnp.asarray(mask_id, x0.dtype), x0), masked, p


def doubled_inputs(x_t: jax.Array, x0: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens [B,2n], positions [B,2n] (both halves 0..n-1, spec §7.2 step 3) and mask [B,2n,2n]."""
    b, n = x0.shape
    tokens = jnp.concatenate([x_t, x0], axis=1)
    pos = jnp.concatenate([jnp.arange(n, dtype=jnp.int32)] * 2)
    positions = jnp.broadcast_to(pos, (b, 2 * n))
    mask = jnp.broadcast_to(jnp.asarray(block_diff_mask(n, block)), (b, 2 * n, 2 * n))
    return tokens, positions, mask


def loss_sums(model: Transformer, x0: jax.Array, loss_mask: jax.Array, key: jax.Array, block: int, *,
              eps: float = DEFAULT_EPS) -> dict[str, jax.Array]:
    """Additive statistics of one doubled forward (sums and counts; summing them over batches is exact)."""
    loss_mask = loss_mask.astype(bool)
    n = x0.shape[1]
    x_t, masked, p = corrupt(key, x0, loss_mask, eps, mask_id=model.config.mask_token_id)
    tokens, positions, mask = doubled_inputs(x_t, x0, block)
    logits, _ = model(tokens, positions, None, mask=mask)

    # One CE over all 2n rows instead of two over slices (no copies of the [B, 2n, V] fp32 logits): the noisy
    # half predicts its own token, the clean half the next one; the last clean row has no target (weight 0).
    targets = jnp.concatenate([x0, x0[:, 1:], x0[:, :1]], axis=1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    m = masked.astype(jnp.float32)
    ar_w = loss_mask[:, 1:].astype(jnp.float32)
    ce_diff, ce_ar = ce[:, :n], ce[:, n:-1]
    return {
        "diff_weighted": jnp.sum(ce_diff * m / p[:, None]),
        "diff_ce": jnp.sum(ce_diff * m),
        "diff_correct": jnp.sum(correct[:, :n] * m),
        "n_masked": jnp.sum(m),
        "ar_ce": jnp.sum(ce_ar * ar_w),
        "ar_correct": jnp.sum(correct[:, n:-1] * ar_w),
        "n_ar": jnp.sum(ar_w),
        "n_maskable": jnp.sum(loss_mask.astype(jnp.float32)),
    }


def metrics_from_sums(s: dict[str, Any], alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """loss = L_AR + alpha L_diff with per-term token means (module docstring); works on jnp or numpy."""
    # max(., 1): a batch where nothing got masked (tiny p, short rows) contributes 0, not NaN.
    n_masked = jnp.maximum(s["n_masked"], 1.0)
    n_ar = jnp.maximum(s["n_ar"], 1.0)
    l_ar = s["ar_ce"] / n_ar
    l_diff = s["diff_weighted"] / n_masked
    return {
        "loss": l_ar + alpha * l_diff,
        "l_ar": l_ar,
        "l_diff": l_diff,
        "ce_diff": s["diff_ce"] / n_masked,  # unweighted CE on masked tokens: the readable diffusion number
        "acc_ar": s["ar_correct"] / n_ar,
        "acc_diff": s["diff_correct"] / n_masked,
        "mask_frac": s["n_masked"] / jnp.maximum(s["n_maskable"], 1.0),
    }


def joint_loss(model: Transformer, x0: jax.Array, loss_mask: jax.Array, key: jax.Array, block: int,
               alpha: float = DEFAULT_ALPHA, *, eps: float = DEFAULT_EPS) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of the joint objective for clean tokens x0 [B,n] (int) and loss_mask [B,n] (bool).

    loss_mask marks the tokens that may be corrupted and the AR targets (position i+1 of each pair)."""
    metrics = metrics_from_sums(loss_sums(model, x0, loss_mask, key, block, eps=eps), alpha)
    return metrics["loss"], metrics


# ------------------------------------------------------------------ optimizer


class ScheduleState(NamedTuple):
    count: jax.Array  # int32: updates applied so far
    total_steps: jax.Array  # int32: cosine horizon; host-settable (time-budgeted runs learn it after warm-up)
    lr: jax.Array  # float32: the lr of the last update (for logging)


def lr_at(step, total_steps, *, peak_lr: float, warmup_steps: int, min_lr_ratio: float) -> jax.Array:
    """Linear warmup to peak_lr over warmup_steps, then cosine down to min_lr_ratio * peak_lr at total_steps."""
    step = jnp.asarray(step, jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    warm = peak_lr * (step + 1) / max(warmup_steps, 1)
    frac = jnp.clip((step - warmup_steps) / jnp.maximum(total - warmup_steps, 1.0), 0.0, 1.0)
    cos = peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
    return jnp.where(step < warmup_steps, warm, cos)


def scale_by_warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                           min_lr_ratio: float) -> optax.GradientTransformation:
    """-lr(step) * updates, with the horizon kept in the optimizer state rather than baked into the jitted
    step: a time-budgeted run can set it once it knows its step time without recompiling, and it is
    checkpointed with everything else."""

    def init(params):
        del params
        return ScheduleState(jnp.zeros((), jnp.int32), jnp.asarray(total_steps, jnp.int32),
                             jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del params
        lr = lr_at(state.count, state.total_steps, peak_lr=peak_lr, warmup_steps=warmup_steps,
                   min_lr_ratio=min_lr_ratio)
        updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
        return updates, ScheduleState(state.count + 1, state.total_steps, lr)

    return optax.GradientTransformation(init, update)


@functools.lru_cache(maxsize=None)  # same hyperparameters, same object: jitted steps built on it are reused
def make_optimizer(peak_lr: float = 3e-3, *, warmup_steps: int = 100, total_steps: int = 1000,
                   weight_decay: float = 0.1, clip: float = 1.0, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, min_lr_ratio: float = 0.1) -> optax.GradientTransformation:
    """AdamW (clip -> Adam -> decoupled decay -> warmup+cosine lr). Only matrices decay: norm gains are
    scale parameters whose decay toward 0 would fight the normalisation."""
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=_matrices),
        scale_by_warmup_cosine(peak_lr, warmup_steps, total_steps, min_lr_ratio),
    )


def _matrices(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def _schedule_state(opt_state) -> ScheduleState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScheduleState))
             if isinstance(s, ScheduleState)]
    if len(found) != 1:
        raise ValueError(f"expected one ScheduleState in the optimizer state, found {len(found)}")
    return found[0]


def optimizer_step(opt_state) -> int:
    return int(_schedule_state(opt_state).count)


def total_steps_of(opt_state) -> int:
    return int(_schedule_state(opt_state).total_steps)


def set_total_steps(opt_state, total_steps: int):
    """The same optimizer state with a new cosine horizon (placed like the old value)."""
    def fix(x):
        if isinstance(x, ScheduleState):
            new = jnp.asarray(total_steps, jnp.int32)
            sharding = getattr(x.total_steps, "sharding", None)
            return x._replace(total_steps=jax.device_put(new, sharding) if sharding is not None else new)
        return x
    return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, ScheduleState))


# ------------------------------------------------------------------ train / eval steps (data parallel)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def cast_floats(tree, dtype):
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_train_state(cfg, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int = 0,
                     param_dtype=jnp.float32):
    """(graphdef, params State, opt_state), params and optimizer state replicated over the mesh."""
    graphdef = nnx.graphdef(abstract_model(cfg, param_dtype))
    state, opt_state = _init_fn(cfg, optimizer, mesh, jnp.dtype(param_dtype))(jnp.asarray(seed, jnp.int32))
    return graphdef, state, opt_state


@functools.lru_cache(maxsize=None)
def _init_fn(cfg, optimizer, mesh, param_dtype):
    # One compiled init (seed traced) rather than an eager random draw per parameter shape, and RBG keys:
    # XLA compiles threefry for these shapes in seconds on CPU, RBG in a fraction of that. Only the initial
    # values depend on it (restored runs never re-initialise; corruption keys stay threefry).
    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def init(seed):
        key = jax.random.key(seed, impl="rbg")
        state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(key), dtype=param_dtype))
        return state, optimizer.init(state)

    return init


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    size = mesh.shape["data"]
    for name, x in batch.items():
        if x.shape[0] % size:
            raise ValueError(f"batch[{name!r}] has {x.shape[0]} rows, not a multiple of the {size} data-parallel "
                             f"devices")
    # Single-process: the host holds the global batch. Multi-host would need make_array_from_process_local_data.
    return jax.device_put(batch, batch_sharding(mesh))


@functools.lru_cache(maxsize=None)  # one compiled step per configuration, however often it is asked for
def make_train_step(optimizer: optax.GradientTransformation, mesh: Mesh, *, block: int,
                    alpha: float = DEFAULT_ALPHA, eps: float = DEFAULT_EPS, compute_dtype=jnp.float32):
    """`train_step(graphdef, state, opt_state, batch, key) -> (state, opt_state, metrics)`, jitted, state and
    optimizer state donated. Params stay in their own dtype (fp32 master weights) and are cast to
    compute_dtype for the forward; gradients flow back through the cast in fp32."""
    rep, data = replicated(mesh), batch_sharding(mesh)

    def step(graphdef, state, opt_state, batch, key):
        def loss_fn(params):
            model = nnx.merge(graphdef, cast_floats(params, compute_dtype))
            return joint_loss(model, batch["tokens"], batch["loss_mask"], key, block, alpha, eps=eps)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=_schedule_state(opt_state).lr)
        return state, opt_state, metrics

    return jax.jit(step, static_argnums=0, donate_argnums=(1, 2),
                   in_shardings=(rep, rep, data, rep), out_shardings=(rep, rep, rep))


@functools.lru_cache(maxsize=None)
def make_eval_step(mesh: Mesh, *, block: int, eps: float = DEFAULT_EPS, compute_dtype=jnp.float32):
    """`eval_step(graphdef, state, batch, key) -> sums` (see loss_sums); sum over batches, then metrics."""
    rep, data = replicated(mesh), batch_sharding(mesh)

    def step(graphdef, state, batch, key):
        model = nnx.merge(graphdef, cast_floats(state, compute_dtype))
        return loss_sums(model, batch["tokens"], batch["loss_mask"], key, block, eps=eps)

    return jax.jit(step, static_argnums=0, in_shardings=(rep, data, rep), out_shardings=rep)


def evaluate(eval_step, graphdef, state, batches, mesh: Mesh, seed: int = 1234,
             alpha: float = DEFAULT_ALPHA) -> dict[str, float]:
    """Metrics over all `batches` with a fixed corruption key per batch, so evaluations are comparable."""
    total = None
    for i, batch in enumerate(batches):
        sums = eval_step(graphdef, state, shard_batch(batch, mesh), jax.random.fold_in(jax.random.key(seed), i))
        sums = jax.device_get(sums)
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
    if total is None:
        raise ValueError("evaluate: no batches")
    return {k: float(v) for k, v in metrics_from_sums(total, alpha).items()}


# ------------------------------------------------------------------ checkpoints (exact resume)


def _ckpt_tree(state, opt_state) -> dict[str, Any]:
    # Optimizer state by leaf index: optax's namedtuples (and empty ones) are not what orbax stores well, and
    # the template's tree structure rebuilds them exactly on restore.
    return {"params": nnx.to_pure_dict(state),
            "opt_state": {f"{i:04d}": x for i, x in enumerate(jax.tree.leaves(opt_state))}}


def _manager(ckpt_dir: str | Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(ckpt_dir).absolute(), options=options)


def save_checkpoint(ckpt_dir: str | Path, state, opt_state, meta: dict[str, Any], *,
                    max_to_keep: int | None = 2) -> int:
    """Saves params, optimizer state and `meta` (JSON: seeds, data position, config, ...) under the optimizer's
    step count; returns that step. Everything the next step depends on is in here, so a resumed run continues
    bit for bit: the step's rng key and data batch are pure functions of (seeds, step)."""
    step = optimizer_step(opt_state)
    mngr = _manager(ckpt_dir, max_to_keep)
    try:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_ckpt_tree(state, opt_state)),
                                                meta=ocp.args.JsonSave(dict(meta, step=step))))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return step


def latest_checkpoint_step(ckpt_dir: str | Path) -> int | None:
    if not Path(ckpt_dir).is_dir():
        return None
    mngr = _manager(ckpt_dir)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def restore_checkpoint(ckpt_dir: str | Path, state_template, opt_template, step: int | None = None):
    """(state, opt_state, meta) of `step` (default: the latest), placed like the templates (same shapes,
    dtypes and shardings; e.g. from init_train_state). The templates are not modified."""
    mngr = _manager(ckpt_dir)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint found")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                _ckpt_tree(state_template, opt_template))
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    state = jax.tree.map(lambda x: x, state_template)  # a fresh State to fill, not the caller's
    nnx.replace_by_pure_dict(state, restored.state["params"])
    opt_leaves = [restored.state["opt_state"][f"{i:04d}"] for i in range(len(jax.tree.leaves(opt_template)))]
    opt_state = jax.tree.unflatten(jax.tree.structure(opt_template), opt_leaves)
    return state, opt_state, dict(restored.meta)


# ------------------------------------------------------------------ data


DOC_SEP = "\n\n\n\n"  # document separator of data/*.txt (scripts/train_tokenizer.py)


def tokenize_corpus(text_path: str | Path, tokenizer: Tokenizer | None = None, *, eos_between_docs: bool = True,
                    cache_dir: str | Path | None = None) -> np.ndarray:
    """The corpus as one token stream `doc_0 [EOS] doc_1 [EOS] ...` (no BOS: windows get their own).

    EOS after each document is the only place the model can learn to stop. Cached as .npy (uint16 when the
    vocab fits) under a key of the text, the tokenizer and the flags, so a changed tokenizer never reuses a
    stale cache."""
    text_path = Path(text_path)
    tokenizer = Tokenizer.default() if tokenizer is None else tokenizer
    raw = text_path.read_bytes()
    key = hashlib.sha256(raw + tokenizer.backend.to_str().encode() + f"eos={eos_between_docs}".encode())
    cache_dir = text_path.parent / ".cache" if cache_dir is None else Path(cache_dir)
    cache = cache_dir / f"{text_path.stem}-{key.hexdigest()[:16]}.npy"
    if cache.exists():
        return np.load(cache)
    eos = tokenizer.eos_token_id
    if eos_between_docs and eos is None:
        raise ValueError(f"{tokenizer.source}: tokenizer has no EOS token; pass eos_between_docs=False")
    docs = [d for d in raw.decode("utf-8").split(DOC_SEP) if d.strip()]
    pieces = []
    for enc in tokenizer.backend.encode_batch(docs, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, np.int64))
        if eos_between_docs:
            pieces.append(np.asarray([eos], np.int64))
    stream = np.concatenate(pieces)
    stream = stream.astype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".partial.npy")
    np.save(tmp, stream)
    tmp.replace(cache)
    return stream


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """Fixed-length training rows cut from a token stream, each starting with BOS (as every prompt does at
    inference; position 0 is excluded from the loss mask, so BOS is never corrupted and never a target).

    `sample(seed, step, batch)` is a pure function of its arguments: the data position of a run is its step."""

    stream: np.ndarray
    seq_len: int
    bos_id: int = 1

    def __post_init__(self):
        if len(self.stream) < self.seq_len - 1:
            raise ValueError(f"token stream of {len(self.stream)} tokens is shorter than one window "
                             f"({self.seq_len - 1} tokens after BOS)")

    def _rows(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        body = self.stream[starts[:, None] + np.arange(self.seq_len - 1)[None, :]].astype(np.int32)
        tokens = np.concatenate([np.full((len(starts), 1), self.bos_id, np.int32), body], axis=1)
        loss_mask = np.ones(tokens.shape, bool)
        loss_mask[:, 0] = False
        return {"tokens": tokens, "loss_mask": loss_mask}

    def sample(self, seed: int, step: int, batch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((seed, step))
        return self._rows(rng.integers(0, len(self.stream) - (self.seq_len - 1) + 1, size=batch))

    def sequential(self, batch: int) -> Iterator[dict[str, np.ndarray]]:
        """Non-overlapping windows covering the stream once (evaluation); the last batch is padded with rows
        whose loss mask is all False, which add nothing to any sum."""
        starts = self._sequential_starts()
        for i in range(0, len(starts), batch):
            rows = self._rows(starts[i:i + batch])
            pad = batch - len(rows["tokens"])
            if pad:
                rows = {"tokens": np.pad(rows["tokens"], ((0, pad), (0, 0)), constant_values=self.bos_id),
                        "loss_mask": np.pad(rows["loss_mask"], ((0, pad), (0, 0)), constant_values=False)}
            yield rows

    def num_sequential_rows(self) -> int:
        return len(self._sequential_starts())

    def _sequential_starts(self) -> np.ndarray:
        return np.arange(0, len(self.stream) - (self.seq_len - 1) + 1, self.seq_len - 1)


# ------------------------------------------------------------------ export


def default_generation_config(cfg: Config) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}


def export_hf(graphdef, state, out_dir: str | Path, *, dtype=jnp.bfloat16,
              tokenizer_dir: str | Path = DEFAULT_TOKENIZER_DIR) -> Path:
    """NLD HF directory: config.json, model.safetensors (in `dtype`), tokenizer + chat template +
    generation_config.json (copied from tokenizer_dir; generation_config synthesised if it has none)."""
    from nemodiff_jax.convert.hf import save_hf  # convert/ depends on the library, not the other way round

    params = jax.device_get(cast_floats(state, dtype))
    model = nnx.merge(graphdef, params)
    tokenizer_dir = Path(tokenizer_dir)
    extra = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_dir / name).is_file():
            extra[name] = (tokenizer_dir / name).read_text(encoding="utf-8")
    extra.setdefault("generation_config.json", json.dumps(default_generation_config(model.config), indent=2) + "\n")
    # Write beside, then swap: a re-export never mixes with the previous files, and a crash mid-write leaves
    # the previous export intact.
    out_dir = Path(out_dir)
    staging, old = out_dir.with_name(out_dir.name + ".partial"), out_dir.with_name(out_dir.name + ".old")
    for d in (staging, old):
        shutil.rmtree(d, ignore_errors=True)
    save_hf(model, staging, extra_files=extra)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
