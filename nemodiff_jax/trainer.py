"""Training as library code: `run(TrainJob(...))` trains an NLD model from text with the joint AR + diffusion
objective and exports it in NLD HF format; `nemodiff train` is its command line (cli.py maps flags 1:1 onto
TrainJob), `scripts/train_tiny.py` the same with the embedded model's data paths as defaults.

    nemodiff train --train data/code/train.txt --val data/code/val.txt --out out/code --minutes 4
                                                    # the embedded model (the default preset): 4 min on one H100
    nemodiff train ... --steps 1200 --resume        # continue exactly from <work-dir>/ckpt
    nemodiff train ... --preset micro --steps 5     # CPU smoke run
    nemodiff train ... --tokenizer DIR              # another corpus and tokenizer: vocab and special ids come
                                                    # from DIR/tokenizer.json (default: the package's)

Objective, optimizer, checkpoints and data live in nemodiff_jax/training.py; this is the loop around them:
time budget, evaluation, best-params export, checkpoints, a JSONL log and a progress bar.

<out> is the NLD HF directory (config.json, model.safetensors, tokenizer files, generation_config.json; loads
with `nemodiff_jax.load(out)`) plus train_log.jsonl (train and val metrics per objective) and
train_summary.json. The work directory (default <out>.work) holds the orbax checkpoints of --resume (ckpt/), the
live log (log.jsonl) and summary.json, outside the export so that it can be embedded as is.

A resumed run continues bit for bit (params, optimizer state, data position and rng are all in the
checkpoint, or pure functions of the step). Its log is appended to, after dropping the records of steps past
the checkpoint that a kill left behind (they are redone), so no step is logged twice.

`minutes` fits the cosine horizon to a wall-clock budget (measured after warm-up, refitted at every eval), so
the learning rate reaches its floor near the deadline; `export="best"` exports the params of the best
validation loss. The embedded model's corpus (scripts/code_corpus.py, 7.45M training tokens) is 2 epochs for
its 4-minute run on an H100 (897 steps), where validation loss was still falling: longer runs should help.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nemodiff_jax import training as T
from nemodiff_jax.config import Config
from nemodiff_jax.sharding import make_mesh
from nemodiff_jax.tokenizer import DEFAULT_TOKENIZER_DIR, Tokenizer


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    warmup: int
    eval_every: int
    ckpt_every: int
    log_every: int
    val_rows: int | None = None  # cap on validation rows (None: the whole val split)


PRESETS = {
    # The embedded model (docs/EMBEDDED_MODEL.md): 12.59M params (2 x 4096 x 384 of them embedding and untied
    # head) -> 25.2 MB in bf16. Rows of 256 tokens (the block-diffusion doubled sequence is 512), batch 64.
    "default": Preset(hidden=384, layers=6, heads=6, kv_heads=2, head_dim=64, intermediate=1024, seq_len=256,
                      batch=64, steps=2000, lr=2e-3, warmup=100, eval_every=200, ckpt_every=1000, log_every=20,
                      val_rows=256),
    # CPU smoke test: same vocab and special ids, everything else minimal.
    "micro": Preset(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, seq_len=64,
                    batch=8, steps=5, lr=3e-3, warmup=2, eval_every=5, ckpt_every=5, log_every=1, val_rows=32),
}

BLOCK_SIZE = 32  # the inference block size of the released models (spec §2.1)
YARN_FACTOR = 4.0
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
EXPORTS = ("best", "final")


def model_config(p: Preset, tokenizer: Tokenizer) -> Config:
    """NLD geometry scaled down: yarn with the training length as its original context and 4x headroom,
    the Llama-4 query scale switched on past it, as the released models do at 16384 (spec §3.4-3.5). Vocab
    and special ids come from the tokenizer."""
    return Config(vocab_size=tokenizer.vocab_size, hidden_size=p.hidden, intermediate_size=p.intermediate,
                  num_layers=p.layers, num_heads=p.heads, num_kv_heads=p.kv_heads, head_dim=p.head_dim,
                  max_position_embeddings=int(YARN_FACTOR * p.seq_len), rope_type="yarn", rope_theta=1e4,
                  rope_factor=YARN_FACTOR, rope_original_max_position_embeddings=p.seq_len,
                  llama_4_scaling_beta=0.1, tie_word_embeddings=False,
                  mask_token_id=tokenizer.mask_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, block_size=BLOCK_SIZE)


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One training run. Geometry and schedule come from `preset`; every field left None takes the preset's
    value. Paths may be given as strings."""

    train: Path  # training text (documents separated by training.DOC_SEP)
    val: Path  # validation text
    out: Path  # the HF export directory
    preset: str = "default"
    # model geometry (None: the preset's)
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    intermediate: int | None = None
    # schedule and data (None: the preset's)
    seq_len: int | None = None  # tokens per row (one half of the doubled sequence)
    batch: int | None = None  # global batch (rows), sharded over the devices
    steps: int | None = None  # optimizer steps; with `minutes`: as many as fit (measured after warm-up)
    minutes: float | None = None  # wall-clock budget from start to export
    lr: float | None = None
    warmup: int | None = None
    eval_every: int | None = None
    ckpt_every: int | None = None
    log_every: int | None = None
    val_rows: int | None = None  # cap on validation rows; 0: the whole val split
    alpha: float = T.DEFAULT_ALPHA  # L = L_AR + alpha L_diff
    weight_decay: float = 0.1
    seed: int = 0
    devices: int | None = None  # data parallel over the first N devices (None: all)
    tokenizer: Path | None = None  # a directory with tokenizer.json (None: the package's, Tokenizer.default())
    work_dir: Path | None = None  # checkpoints, the live log and summary (None: <out>.work)
    eos_between_docs: bool = True  # EOS between documents (the only place the model learns to stop)
    compute_dtype: str = "auto"  # forward/backward dtype (params stay fp32); auto: bf16 on GPU, fp32 on CPU
    export: str = "best"  # the params of the best validation loss, or of the last step
    resume: bool = False  # continue from the latest checkpoint in <work>/ckpt (if any)
    progress: bool = True  # a tqdm bar over steps (on a TTY only)
    sample_prompt: str = "ROMEO:\n"  # greedy AR sample from the export ("" or sample_tokens=0: none)
    sample_tokens: int = 48
    stop_after: int | None = None  # end after this step as a kill would: no checkpoint, no export

    def __post_init__(self):
        for name in ("train", "val", "out", "tokenizer", "work_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.export not in EXPORTS:
            raise ValueError(f"export must be one of {EXPORTS}, got {self.export!r}")
        for name in ("steps", "val_rows", "sample_tokens", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch", "seq_len", "eval_every", "ckpt_every", "log_every", "devices"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")

    def settings(self) -> Preset:
        """The preset with this job's overrides."""
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(Preset)
                     if f.name != "steps" and getattr(self, f.name) is not None}
        if overrides.get("val_rows") == 0:
            overrides["val_rows"] = None
        return dataclasses.replace(PRESETS[self.preset], **overrides)

    @property
    def work(self) -> Path:
        return self.work_dir or self.out.with_name(self.out.name + ".work")


def load_tokenizer(directory: Path | None) -> Tokenizer:
    if directory is None:
        return Tokenizer.default()
    tok = Tokenizer.from_dir(directory)
    if tok is None:
        raise FileNotFoundError(f"{directory}: no tokenizer.json")
    return tok


class JsonlLog:
    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a" if append else "w")

    def write(self, **record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def keep_log_until(path: Path, step: int) -> None:
    """Before a resume from the checkpoint of `step`: keep the log's records up to it and drop later ones (a
    kill between checkpoints left them behind, and the resumed run redoes those steps) and any torn line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def _floats(d) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)  # above the bar when there is one
    sys.stdout.flush()


def run(job: TrainJob) -> dict:
    """Trains, evaluates, checkpoints and exports as `job` says; returns the summary (also written to
    <work>/summary.json and <out>/train_summary.json). A run ended by `stop_after` exports nothing and returns
    {"stopped": True, "step", "checkpoint_step", ...}."""
    t0 = time.time()
    p = job.settings()
    on_gpu = jax.default_backend() == "gpu"
    compute_dtype = jnp.dtype({"auto": "bfloat16" if on_gpu else "float32"}.get(job.compute_dtype,
                                                                              job.compute_dtype))
    out = job.out
    work = job.work
    ckpt_dir = work / "ckpt"

    tokenizer = load_tokenizer(job.tokenizer)
    tokenizer_dir = job.tokenizer or DEFAULT_TOKENIZER_DIR
    cfg = model_config(p, tokenizer)
    train_windows = T.TokenWindows(T.tokenize_corpus(job.train, tokenizer, eos_between_docs=job.eos_between_docs),
                                   p.seq_len, cfg.bos_token_id)
    val_windows = T.TokenWindows(T.tokenize_corpus(job.val, tokenizer, eos_between_docs=job.eos_between_docs),
                                 p.seq_len, cfg.bos_token_id)

    if job.devices is not None and job.devices > jax.device_count():
        raise ValueError(f"devices={job.devices}, but there are {jax.device_count()} devices")
    devices = jax.devices()[:job.devices] if job.devices else jax.devices()
    mesh = make_mesh(len(devices), devices=devices)  # data parallel: params replicated, rows split
    budgeted = job.minutes is not None and job.steps is None
    steps = job.steps or (10 ** 6 if budgeted else p.steps)  # budgeted: provisional horizon, set after warm-up
    optimizer = T.make_optimizer(p.lr, warmup_steps=p.warmup, total_steps=steps, weight_decay=job.weight_decay)
    seed = job.seed
    graphdef, state, opt_state = T.init_train_state(cfg, optimizer, mesh, seed=seed)
    n_params = sum(x.size for x in jax.tree.leaves(state))

    resumed_from = None
    if job.resume and T.latest_checkpoint_step(ckpt_dir) is not None:
        state, opt_state, meta = T.restore_checkpoint(ckpt_dir, state, opt_state)
        if meta["config"] != cfg.to_hf_config() or meta["batch"] != p.batch:
            raise ValueError(f"{ckpt_dir}: checkpoint was made with another model config or batch size")
        seed = meta["seed"]
        resumed_from = meta["step"]
        budgeted = False  # the horizon was fixed by the run that made the checkpoint
        if job.steps is not None:
            opt_state = T.set_total_steps(opt_state, job.steps)
        steps = T.total_steps_of(opt_state)
        keep_log_until(work / "log.jsonl", resumed_from)
    log = JsonlLog(work / "log.jsonl", append=resumed_from is not None)

    train_step = T.make_train_step(optimizer, mesh, block=BLOCK_SIZE, alpha=job.alpha, compute_dtype=compute_dtype)
    eval_step = T.make_eval_step(mesh, block=BLOCK_SIZE, compute_dtype=compute_dtype)
    eval_batch = p.batch
    rng = jax.random.key(seed)

    def run_eval(st):
        batches = val_windows.sequential(eval_batch)
        if p.val_rows is not None:
            batches = itertools.islice(batches, -(-p.val_rows // eval_batch))
        return T.evaluate(eval_step, graphdef, st, batches, mesh, alpha=job.alpha)

    def checkpoint(step):
        T.save_checkpoint(ckpt_dir, state, opt_state, {
            "seed": seed, "data_step": step, "batch": p.batch, "seq_len": p.seq_len,
            "rng": [int(x) for x in np.asarray(jax.random.key_data(rng)).ravel()],
            "config": cfg.to_hf_config(), "preset": job.preset})

    _say(f"[train] {job.preset}: {n_params / 1e6:.2f}M params ({2 * n_params / 1e6:.1f} MB bf16), vocab "
         f"{cfg.vocab_size}, {len(train_windows.stream):,} train / {len(val_windows.stream):,} val tokens, batch "
         f"{p.batch} x {p.seq_len} (doubled to {2 * p.seq_len}), block {BLOCK_SIZE}, {mesh.size} "
         f"{jax.default_backend()} device(s), compute {compute_dtype.name}"
         + (f", resumed at step {resumed_from}" if resumed_from is not None else ""))

    deadline = t0 + 60 * job.minutes if job.minutes is not None else float("inf")
    reserve = 20.0 if on_gpu else 5.0  # final eval + export + sample
    step = T.optimizer_step(opt_state)
    best = {"loss": float("inf"), "step": None, "state": None, "metrics": None}
    last_val = None
    pending, window_t, window_step = [], time.time(), step
    calib = None  # (step, time) once compiled and warm
    tokens_per_step = p.batch * p.seq_len
    tok_s = float("nan")
    out_of_time = False

    def stop_now():
        return job.stop_after is not None and step >= job.stop_after

    # disable=None: tqdm's own rule, no bar where stderr is not a terminal (logs keep the periodic lines).
    bar = tqdm(total=None if budgeted else steps, initial=step, desc="train", unit="step", mininterval=1.0,
               dynamic_ncols=True, disable=None if job.progress else True)
    try:
        while step < steps and not stop_now():
            batch = T.shard_batch(train_windows.sample(seed, step, p.batch), mesh)
            state, opt_state, metrics = train_step(graphdef, state, opt_state, batch, jax.random.fold_in(rng, step))
            step += 1
            pending.append(metrics)
            bar.update(1)

            # Time budget: once compiled and warm, fit the cosine horizon to the remaining time; refit at every
            # eval from the measured rate (evals, checkpoints and any slowdown included) so the lr reaches its
            # floor close to the deadline instead of being cut off mid-decay.
            if budgeted and calib is None and step == 5:
                jax.block_until_ready(metrics)
                calib = (step, time.time())
            elif budgeted and calib is not None and (step == calib[0] + 20 or step % p.eval_every == 0):
                jax.block_until_ready(metrics)
                step_time = (time.time() - calib[1]) / (step - calib[0])
                new_steps = step + max(1, int((deadline - reserve - time.time()) / step_time))
                if abs(new_steps - steps) > 0.01 * steps:
                    steps = new_steps
                    opt_state = T.set_total_steps(opt_state, steps)
                    bar.total = steps
                    bar.refresh()
                    _say(f"[train] {step_time * 1e3:.1f} ms/step -> horizon {steps} steps")

            if step % p.log_every == 0 or step == steps:
                host = [_floats(jax.device_get(m)) for m in pending]
                avg = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
                now = time.time()
                tok_s = (step - window_step) * tokens_per_step / (now - window_t)
                log.write(split="train", step=step, tokens_per_s=tok_s, elapsed=now - t0, **avg)
                pending, window_t, window_step = [], now, step
                bar.set_postfix({"loss": f"{avg['loss']:.4f}", "l_ar": f"{avg['l_ar']:.4f}",
                                 "l_diff": f"{avg['l_diff']:.4f}", "tok/s": f"{tok_s:,.0f}"}, refresh=False)
                if step % (p.log_every * 4) == 0 or step == steps:
                    _say(f"step {step:6d}  loss {avg['loss']:.4f}  l_ar {avg['l_ar']:.4f}  "
                         f"l_diff {avg['l_diff']:.4f}  lr {avg['lr']:.2e}  {tok_s:,.0f} tok/s  {now - t0:.0f}s")

            out_of_time = time.time() > deadline - reserve
            if step % p.eval_every == 0 or step == steps or out_of_time:
                t_eval = time.time()
                last_val = run_eval(state)
                log.write(split="val", step=step, elapsed=time.time() - t0, **last_val)
                _say(f"  val {step:6d}  loss {last_val['loss']:.4f}  l_ar {last_val['l_ar']:.4f}  "
                     f"l_diff {last_val['l_diff']:.4f}  acc_ar {last_val['acc_ar']:.3f}  "
                     f"acc_diff {last_val['acc_diff']:.3f}  ({time.time() - t_eval:.1f}s)")
                if last_val["loss"] < best["loss"]:
                    best = {"loss": last_val["loss"], "step": step, "metrics": last_val,
                            "state": jax.tree.map(jnp.copy, state) if job.export == "best" else None}
                window_t += time.time() - t_eval  # evals do not count against throughput
            if step % p.ckpt_every == 0 or step == steps or out_of_time:
                checkpoint(step)
            if out_of_time:
                _say(f"[train] time budget reached at step {step}")
                break
    finally:
        bar.close()
        log.close()

    if step < steps and not out_of_time and stop_now():  # ended as a kill would: no checkpoint, no export
        ckpt_step = T.latest_checkpoint_step(ckpt_dir)
        _say(f"[train] stopped after step {step} (stop_after); latest checkpoint: step {ckpt_step}")
        return {"preset": job.preset, "stopped": True, "step": step, "checkpoint_step": ckpt_step,
                "resumed_from": resumed_from, "wall_s": time.time() - t0, "work_dir": str(work)}

    if last_val is None:  # nothing left to train (resumed at the end)
        last_val = run_eval(state)
        best = {"loss": last_val["loss"], "step": step, "metrics": last_val, "state": None}
    use_best = job.export == "best" and best["state"] is not None
    export_state, export_step, export_metrics = ((best["state"], best["step"], best["metrics"]) if use_best
                                                 else (state, step, last_val))
    hf_dir = T.export_hf(graphdef, export_state, out, tokenizer_dir=tokenizer_dir)
    size = (hf_dir / "model.safetensors").stat().st_size

    sample = None
    if job.sample_tokens and job.sample_prompt:
        from nemodiff_jax.generate import load  # load the export back: what we ship is what we sampled from

        gen = load(hf_dir, dtype="float32", progress=False)
        prompt = gen.tokenizer.encode(job.sample_prompt)
        ids = gen.generate([prompt], mode="ar", max_new_tokens=job.sample_tokens)[0].tokens  # greedy
        body = prompt[1:] if prompt and prompt[0] == gen.config.bos_token_id else prompt
        sample = gen.tokenizer.decode(body + ids)

    summary = {
        "preset": job.preset, "step": step, "resumed_from": resumed_from, "params": int(n_params),
        "vocab_size": cfg.vocab_size, "safetensors_bytes": size, "export_step": export_step, "val": export_metrics,
        "final_val": last_val, "tokens_per_s": tok_s, "wall_s": time.time() - t0, "hf_dir": str(hf_dir),
        "sample": sample, "device": f"{mesh.size}x {devices[0].device_kind}",
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.copy(work / "log.jsonl", hf_dir / "train_log.jsonl")
    shutil.copy(work / "summary.json", hf_dir / "train_summary.json")

    rows = [("steps", f"{step}" + (f" (resumed from {resumed_from})" if resumed_from is not None else "")),
            ("params", f"{n_params / 1e6:.2f}M"), ("model.safetensors", f"{size / 1e6:.2f} MB"),
            ("exported step", f"{export_step} ({job.export})"),
            ("val loss", f"{export_metrics['loss']:.4f}"), ("val L_AR", f"{export_metrics['l_ar']:.4f}"),
            ("val L_diff", f"{export_metrics['l_diff']:.4f}"),
            ("val acc AR / diff", f"{export_metrics['acc_ar']:.3f} / {export_metrics['acc_diff']:.3f}"),
            ("train tokens/s", f"{tok_s:,.0f}"), ("wall", f"{time.time() - t0:.0f} s"), ("export", str(hf_dir))]
    width = max(len(k) for k, _ in rows)
    _say("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    if sample is not None:
        _say(f"  sample: {sample!r}")
    return summary
