"""Train the embedded default model (a ~10M-parameter NLD on Shakespeare + Milton) and export it in NLD HF format.

    python scripts/train_tiny.py --out out/tiny                  # 900 steps: ~4.5 min on one H200, 21 MB bf16
    python scripts/train_tiny.py --minutes 8 --out out/tiny      # fill a time budget (horizon fitted to it)
    python scripts/train_tiny.py --out out/tiny --steps 1200 --resume   # continue from <out>.work/ckpt
    python scripts/train_tiny.py --preset micro --steps 5 --out /tmp/tt   # CPU smoke run

Objective, optimizer, checkpoints and data live in nemodiff_jax/training.py; this is argparse around them.
<out> is the NLD HF directory (config.json, model.safetensors, tokenizer files, generation_config.json; loads
with `nemodiff_jax.load(out)`) plus train_log.jsonl (train and val metrics per objective) and
train_summary.json. Orbax checkpoints for --resume go to <work-dir>/ckpt (default <out>.work), outside the
export so that it can be embedded as is.

The corpus is small (1.68M training tokens): at batch 64 x 512 an epoch is 51 steps, and validation L_AR stops
improving after ~10-15 epochs (measured on an H200: best val loss near step 750 both for a 900-step schedule
and for an 8-minute, 1600-step one, whose AR loss then rises while train loss keeps falling). Hence the default
of 900 steps with a full cosine decay, and `--export best` (the params of the best validation loss).
"""

from __future__ import annotations

import argparse
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

from nemodiff_jax import training as T
from nemodiff_jax.config import Config
from nemodiff_jax.sharding import make_mesh
from nemodiff_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


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
    # 10.49M params (untied head: 2 x 8192 x 256 of them are embedding/head) -> 20.98 MB in bf16.
    # Deep and narrow rather than 3 layers of 384: the byte budget is half embeddings either way.
    "default": Preset(hidden=256, layers=8, heads=4, kv_heads=2, head_dim=64, intermediate=768, seq_len=512,
                      batch=64, steps=900, lr=2e-3, warmup=200, eval_every=150, ckpt_every=300, log_every=50),
    # CPU smoke test: same vocab and special ids, everything else minimal.
    "micro": Preset(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, seq_len=64,
                    batch=8, steps=5, lr=3e-3, warmup=2, eval_every=5, ckpt_every=5, log_every=1, val_rows=32),
}

BLOCK_SIZE = 32  # the inference block size of the released models (spec §2.1)
YARN_FACTOR = 4.0


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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "tiny", help="HF export directory")
    ap.add_argument("--work-dir", type=Path, help="checkpoints and the live log (default: <out>.work)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the preset's; with --minutes: as many "
                                              "as fit, measured after warm-up)")
    ap.add_argument("--minutes", type=float, help="wall-clock budget from start to export")
    ap.add_argument("--batch", type=int, help="global batch (rows), sharded over all devices")
    ap.add_argument("--seq-len", type=int, help="tokens per row (one half of the doubled sequence)")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--alpha", type=float, default=T.DEFAULT_ALPHA, help="L = L_AR + alpha L_diff")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--train", type=Path, default=REPO / "data" / "train.txt")
    ap.add_argument("--val", type=Path, default=REPO / "data" / "val.txt")
    ap.add_argument("--no-eos", action="store_true", help="do not put EOS (11) between documents")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", type=int, help="data-parallel over the first N devices (default: all)")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--ckpt-every", type=int)
    ap.add_argument("--log-every", type=int)
    ap.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="forward/backward dtype (params stay fp32); auto = bf16 on GPU, fp32 on CPU")
    ap.add_argument("--export", choices=["best", "final"], default="best",
                    help="export the params of the best validation loss or of the last step")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in <out>/ckpt")
    ap.add_argument("--sample-tokens", type=int, default=48, help="greedy AR sample from the export (0: none)")
    return ap.parse_args(argv)


class JsonlLog:
    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a" if append else "w")

    def write(self, **record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()


def _floats(d) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


def main(argv=None) -> dict:
    t0 = time.time()
    args = parse_args(argv)
    p = PRESETS[args.preset]
    p = dataclasses.replace(p, **{k: v for k, v in dict(
        seq_len=args.seq_len, batch=args.batch, lr=args.lr, eval_every=args.eval_every,
        ckpt_every=args.ckpt_every, log_every=args.log_every).items() if v is not None})
    on_gpu = jax.default_backend() == "gpu"
    compute_dtype = jnp.dtype({"auto": "bfloat16" if on_gpu else "float32"}.get(args.compute_dtype,
                                                                               args.compute_dtype))
    out: Path = args.out
    work = args.work_dir or out.with_name(out.name + ".work")
    ckpt_dir = work / "ckpt"

    tokenizer = Tokenizer.default()
    cfg = model_config(p, tokenizer)
    train_windows = T.TokenWindows(T.tokenize_corpus(args.train, tokenizer, eos_between_docs=not args.no_eos),
                                   p.seq_len, cfg.bos_token_id)
    val_windows = T.TokenWindows(T.tokenize_corpus(args.val, tokenizer, eos_between_docs=not args.no_eos),
                                 p.seq_len, cfg.bos_token_id)

    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    mesh = make_mesh(len(devices), devices=devices)  # data parallel: params replicated, rows split
    budgeted = args.minutes is not None and args.steps is None
    steps = args.steps or (10 ** 6 if budgeted else p.steps)  # budgeted: provisional horizon, set after warm-up
    optimizer = T.make_optimizer(p.lr, warmup_steps=p.warmup, total_steps=steps, weight_decay=args.weight_decay)
    graphdef, state, opt_state = T.init_train_state(cfg, optimizer, mesh, seed=args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(state))

    resumed_from = None
    if args.resume and T.latest_checkpoint_step(ckpt_dir) is not None:
        state, opt_state, meta = T.restore_checkpoint(ckpt_dir, state, opt_state)
        if meta["config"] != cfg.to_hf_config() or meta["batch"] != p.batch:
            raise SystemExit(f"{ckpt_dir}: checkpoint was made with another model config or batch size")
        args.seed = meta["seed"]
        resumed_from = meta["step"]
        budgeted = False  # the horizon was fixed by the run that made the checkpoint
        if args.steps is not None:
            opt_state = T.set_total_steps(opt_state, args.steps)
        steps = T.total_steps_of(opt_state)
    log = JsonlLog(work / "log.jsonl", append=resumed_from is not None)

    train_step = T.make_train_step(optimizer, mesh, block=BLOCK_SIZE, alpha=args.alpha, compute_dtype=compute_dtype)
    eval_step = T.make_eval_step(mesh, block=BLOCK_SIZE, compute_dtype=compute_dtype)
    eval_batch = p.batch
    rng = jax.random.key(args.seed)

    def run_eval(st):
        batches = val_windows.sequential(eval_batch)
        if p.val_rows is not None:
            batches = itertools.islice(batches, -(-p.val_rows // eval_batch))
        return T.evaluate(eval_step, graphdef, st, batches, mesh, alpha=args.alpha)

    def checkpoint(step):
        T.save_checkpoint(ckpt_dir, state, opt_state, {
            "seed": args.seed, "data_step": step, "batch": p.batch, "seq_len": p.seq_len,
            "rng": [int(x) for x in np.asarray(jax.random.key_data(rng)).ravel()],
            "config": cfg.to_hf_config(), "preset": args.preset})

    print(f"[train_tiny] {args.preset}: {n_params / 1e6:.2f}M params ({2 * n_params / 1e6:.1f} MB bf16), "
          f"{len(train_windows.stream):,} train / {len(val_windows.stream):,} val tokens, batch {p.batch} x "
          f"{p.seq_len} (doubled to {2 * p.seq_len}), block {BLOCK_SIZE}, {mesh.size} "
          f"{jax.default_backend()} device(s), compute {compute_dtype.name}"
          + (f", resumed at step {resumed_from}" if resumed_from is not None else ""), flush=True)

    deadline = t0 + 60 * args.minutes if args.minutes is not None else float("inf")
    reserve = 20.0 if on_gpu else 5.0  # final eval + export + sample
    step = T.optimizer_step(opt_state)
    best = {"loss": float("inf"), "step": None, "state": None, "metrics": None}
    last_val = None
    pending, window_t, window_step = [], time.time(), step
    calib = None  # (step, time) once compiled and warm
    tokens_per_step = p.batch * p.seq_len
    tok_s = float("nan")

    while step < steps:
        batch = T.shard_batch(train_windows.sample(args.seed, step, p.batch), mesh)
        state, opt_state, metrics = train_step(graphdef, state, opt_state, batch, jax.random.fold_in(rng, step))
        step += 1
        pending.append(metrics)

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
                print(f"[train_tiny] {step_time * 1e3:.1f} ms/step -> horizon {steps} steps", flush=True)

        if step % p.log_every == 0 or step == steps:
            host = [_floats(jax.device_get(m)) for m in pending]
            avg = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
            now = time.time()
            tok_s = (step - window_step) * tokens_per_step / (now - window_t)
            log.write(split="train", step=step, tokens_per_s=tok_s, elapsed=now - t0, **avg)
            pending, window_t, window_step = [], now, step
            if step % (p.log_every * 4) == 0 or step == steps:
                print(f"step {step:6d}  loss {avg['loss']:.4f}  l_ar {avg['l_ar']:.4f}  l_diff {avg['l_diff']:.4f}"
                      f"  lr {avg['lr']:.2e}  {tok_s:,.0f} tok/s  {now - t0:.0f}s", flush=True)

        out_of_time = time.time() > deadline - reserve
        if step % p.eval_every == 0 or step == steps or out_of_time:
            t_eval = time.time()
            last_val = run_eval(state)
            log.write(split="val", step=step, elapsed=time.time() - t0, **last_val)
            print(f"  val {step:6d}  loss {last_val['loss']:.4f}  l_ar {last_val['l_ar']:.4f}  "
                  f"l_diff {last_val['l_diff']:.4f}  acc_ar {last_val['acc_ar']:.3f}  "
                  f"acc_diff {last_val['acc_diff']:.3f}  ({time.time() - t_eval:.1f}s)", flush=True)
            if last_val["loss"] < best["loss"]:
                best = {"loss": last_val["loss"], "step": step, "metrics": last_val,
                        "state": jax.tree.map(jnp.copy, state) if args.export == "best" else None}
            window_t += time.time() - t_eval  # evals do not count against throughput
        if step % p.ckpt_every == 0 or step == steps or out_of_time:
            checkpoint(step)
        if out_of_time:
            print(f"[train_tiny] time budget reached at step {step}", flush=True)
            break

    if last_val is None:  # nothing left to train (resumed at the end)
        last_val = run_eval(state)
        best = {"loss": last_val["loss"], "step": step, "metrics": last_val, "state": None}
    use_best = args.export == "best" and best["state"] is not None
    export_state, export_step, export_metrics = ((best["state"], best["step"], best["metrics"]) if use_best
                                                 else (state, step, last_val))
    hf_dir = T.export_hf(graphdef, export_state, out)
    size = (hf_dir / "model.safetensors").stat().st_size

    sample = None
    if args.sample_tokens:
        import nemodiff_jax  # load the export back: what we ship is what we sampled from

        gen = nemodiff_jax.load(hf_dir, dtype="float32", progress=False)
        prompt = gen.tokenizer.encode("ROMEO:\n")
        ids = gen.generate([prompt], mode="ar", max_new_tokens=args.sample_tokens)[0].tokens  # greedy
        sample = gen.tokenizer.decode(prompt[1:] + ids)

    summary = {
        "preset": args.preset, "step": step, "resumed_from": resumed_from, "params": int(n_params),
        "safetensors_bytes": size, "export_step": export_step, "val": export_metrics, "final_val": last_val,
        "tokens_per_s": tok_s, "wall_s": time.time() - t0, "hf_dir": str(hf_dir), "sample": sample,
        "device": f"{mesh.size}x {jax.devices()[0].device_kind}",
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.copy(work / "log.jsonl", hf_dir / "train_log.jsonl")
    shutil.copy(work / "summary.json", hf_dir / "train_summary.json")

    rows = [("steps", f"{step}" + (f" (resumed from {resumed_from})" if resumed_from is not None else "")),
            ("params", f"{n_params / 1e6:.2f}M"), ("model.safetensors", f"{size / 1e6:.2f} MB"),
            ("exported step", f"{export_step} ({args.export})"),
            ("val loss", f"{export_metrics['loss']:.4f}"), ("val L_AR", f"{export_metrics['l_ar']:.4f}"),
            ("val L_diff", f"{export_metrics['l_diff']:.4f}"),
            ("val acc AR / diff", f"{export_metrics['acc_ar']:.3f} / {export_metrics['acc_diff']:.3f}"),
            ("train tokens/s", f"{tok_s:,.0f}"), ("wall", f"{time.time() - t0:.0f} s"), ("export", str(hf_dir))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    if sample is not None:
        print(f"  sample: {sample!r}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
