"""`nemodiff` command line: convert, generate, demo (the `make run` job), batch, serve, train and bench (the
`make bench` job)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from nemodiff_jax.embedded import DEMO_PROMPTS, default_model

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
QUANTIZE_HELP = ("quantize the matmul weights as they load: int8 per channel, int4 in groups of 128, the head int8 "
                 "(docs/QUANTIZATION.md); a quantized checkpoint loads as it is")


def cmd_convert(args) -> int:
    from nemodiff_jax.convert.hf import save_hf
    from nemodiff_jax.convert.orbax_io import TOKENIZER_FILES, save_orbax
    from nemodiff_jax.generate import load

    gen = load(args.src, dtype=args.dtype, progress=True, quantize=args.quantize, drafter=False)
    if args.to == "orbax":
        out = save_orbax(gen.model, args.dst, copy_from=args.src)
    else:
        max_bytes = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
        extra = {name: (Path(args.src) / name).read_text() for name in TOKENIZER_FILES
                 if (Path(args.src) / name).exists()}  # the tokenizer travels with the weights, as for orbax
        out = save_hf(gen.model, args.dst, max_shard_bytes=max_bytes, progress=True, extra_files=extra)
    from nemodiff_jax.lora import DRAFTER_DIR

    drafter = Path(args.src) / DRAFTER_DIR
    if drafter.is_dir():  # the drafter travels with the weights (16-bit; load() attaches it from there)
        shutil.copytree(drafter, Path(out) / DRAFTER_DIR, dirs_exist_ok=True)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def drafter_arg(args):
    """load()'s `drafter` from --drafter DIR / --no-drafter (neither: the model directory's own, if any)."""
    return False if args.no_drafter else args.drafter


def flag_mode_options(args) -> dict:
    """The mode options given as flags (--block-size, --threshold, --policy, --deterministic), whatever the mode."""
    flags = {"block_size": args.block_size, "threshold": args.threshold, "policy": args.policy,
             "deterministic": True if args.deterministic else None}
    return {k: v for k, v in flags.items() if v is not None}


def _mode_options(args) -> dict:
    """The flag options for --mode; AR ignores block size and threshold (a --policy for AR stays an error)."""
    opts = flag_mode_options(args)
    if args.mode == "ar":
        opts.pop("block_size", None)
        opts.pop("threshold", None)
    return opts


def cmd_generate(args) -> int:
    from nemodiff_jax.generate import load

    gen = load(args.model or default_model(), dtype=args.dtype, drafter=drafter_arg(args), progress=False,
               mesh=mesh_from_args(args.tensor_parallel_size, data_parallel=False), quantize=args.quantize)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    images = args.image or []
    if args.chat:
        if gen.tokenizer is None:
            raise SystemExit("--chat needs a tokenizer in the model directory")
        # token ids, encoded without adding specials (as transformers and NVIDIA do: the template has no BOS);
        # images where the prompt's <image> markers are, or before its text
        from nemodiff_jax.multimodal import content_parts

        content = content_parts(prompt, images, "--prompt") if images else prompt
        prompt = gen.encode_chat([{"role": "user", "content": content}], add_generation_prompt=True,
                                 name="--prompt", enable_thinking=args.thinking)
    elif args.thinking:
        raise ValueError("--thinking turns on the chat template's thinking: it needs --chat")
    elif images:
        prompt = {"text": prompt, "images": images}
    stream_decoder = gen.tokenizer.stream_decoder() if gen.tokenizer is not None else None
    result = None
    for item in gen.stream(prompt, mode=args.mode, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           max_thinking_tokens=args.max_thinking_tokens, **_mode_options(args)):
        if isinstance(item, list):
            if stream_decoder is not None:
                sys.stdout.write("".join(stream_decoder.step(t) for t in item))
            else:
                sys.stdout.write(" ".join(map(str, item)) + " ")
            sys.stdout.flush()
        else:
            result = item
    if stream_decoder is not None:
        sys.stdout.write(stream_decoder.flush())
    print()
    print(json.dumps(result.stats, indent=None if args.compact else 2), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    """The main job: every mode on the embedded model, with a stats table."""
    from nemodiff_jax.generate import load

    path = Path(args.model) if args.model else default_model()
    gen = load(path, dtype=args.dtype, progress=False)
    prompts = DEMO_PROMPTS[: args.num_prompts]
    rows = []
    for mode in MODES:
        gen.generate(prompts, mode=mode, max_new_tokens=args.max_new_tokens)  # compile once, off the clock
        results = gen.generate(prompts, mode=mode, max_new_tokens=args.max_new_tokens)
        print(f"\n=== mode: {mode} ===")
        for p, r in zip(prompts, results):
            shown = r.text if r.text is not None else " ".join(map(str, r.tokens))
            print(f"--- {p!r}\n{shown.strip()}")
        toks = sum(r.stats["generated_tokens"] for r in results)
        fwd = sum(r.stats["forward_passes"] for r in results)
        row = {"mode": mode, "tokens": toks, "tokens/forward": toks / fwd,
               "batch tok/s": results[0].stats["batch_tokens_per_s"]}
        if mode in ("linear_spec", "quadratic_spec"):
            row["accepted/round"] = sum(r.stats["mean_accepted_per_round"] for r in results) / len(results)
        if mode == "diffusion":
            row["steps/block"] = sum(r.stats["denoise_steps_per_block"] for r in results) / len(results)
        rows.append(row)
    greedy = {m: [r.tokens for r in gen.generate(prompts, mode=m, max_new_tokens=args.max_new_tokens)]
              for m in ("ar", "linear_spec", "quadratic_spec")}
    from nemodiff_jax.attention import DeviceInfo, choose_impl

    device = DeviceInfo.of()
    chunk_path = choose_impl(device, gen.dtype, gen.config.head_dim, len(prompts), gen.config.block_size, 256, True)
    drafter = "its linear_spec_lora" if gen.drafter is not None else "none"
    print(f"\nmodel: {path}  drafter: {drafter}  batch {len(prompts)}  max_new_tokens {args.max_new_tokens}  "
          f"dtype {args.dtype}")
    print(f"device: {device}  attention: {chunk_path} (a {gen.config.block_size}-token chunk)")
    print(f"{'mode':<15} {'tokens':>7} {'tok/fwd':>8} {'tok/s':>8} {'acc/round':>10} {'steps/blk':>10}")
    for r in rows:  # a statistic a mode does not have is "-"
        acc, steps = (f"{r[k]:.2f}" if k in r else "-" for k in ("accepted/round", "steps/block"))
        print(f"{r['mode']:<15} {r['tokens']:>7} {r['tokens/forward']:>8.2f} {r['batch tok/s']:>8.1f} "
              f"{acc:>10} {steps:>10}")
    same = [greedy[m] == greedy["ar"] for m in ("linear_spec", "quadratic_spec")]
    print(f"greedy linear_spec == greedy ar: {same[0]}; greedy quadratic_spec == greedy ar: {same[1]}")
    return 0 if all(same) else 1


def mesh_from_args(tensor_parallel: int, data_parallel: bool):
    """None (one device), or a ("data", "model") mesh over this process's devices: `tensor_parallel` devices
    per model replica and, with `data_parallel`, as many replicas as the remaining devices allow (rows split
    over them). Local devices only: under `--distributed` every process runs its own share of the requests,
    so tensor parallelism stays inside a host and no collective crosses hosts."""
    import jax

    devices = jax.local_devices()
    n = len(devices)
    if tensor_parallel < 1 or n % tensor_parallel:
        if jax.process_count() == 1:
            raise ValueError(f"--tensor-parallel-size {tensor_parallel} must be >= 1 and divide the {n} devices")
        raise ValueError(
            f"--tensor-parallel-size {tensor_parallel} must be >= 1 and divide this process's {n} local devices "
            f"(process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices in all): "
            f"under --distributed the model is split over one host's devices only, hosts split the input lines "
            f"(under SLURM or Open MPI, JAX gives a process one GPU unless JAX_LOCAL_DEVICE_IDS lists them)")
    data = n // tensor_parallel if data_parallel else 1
    if data * tensor_parallel == 1:
        return None
    from nemodiff_jax.sharding import make_mesh

    return make_mesh(data=data, model=tensor_parallel, devices=devices)


# How long a process that finished its share waits at exit for the others (jax.distributed's shutdown barrier;
# JAX's default, 5 minutes, aborts every process, the slow ones mid-job, once the shares' run times differ by
# more). A process that dies is still noticed by the heartbeats (100 s) and ends the others.
SHUTDOWN_WAIT_S = 7 * 24 * 3600


def init_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize() with what was given; JAX finds the rest (JAX_COORDINATOR_ADDRESS, SLURM,
    Open MPI). Multi-host jobs here need no collective across hosts: the coordinator only connects the
    processes (process index and count, which lines are whose) and holds them together at exit."""
    import jax

    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, shutdown_timeout_seconds=SHUTDOWN_WAIT_S)
    except ValueError as e:
        raise ValueError(f"--distributed: {e} (give --coordinator-address HOST:PORT, --num-processes N and "
                         f"--process-id K, or run under SLURM or Open MPI, where JAX finds them)") from None


def describe_process_mesh(mesh) -> str:
    """This process's index and count, the mesh it runs on and the devices in all (the multi-host log line)."""
    import jax

    if mesh is None:
        shape, ids = "one device", [jax.local_devices()[0].id]
    else:
        shape, ids = f"mesh {dict(mesh.shape)}", [d.id for d in mesh.devices.flat]
    return (f"process {jax.process_index()} of {jax.process_count()}: {shape} over local devices {ids} "
            f"({len(jax.local_devices())} local, {jax.device_count()} in all)")


def cmd_batch(args) -> int:
    from nemodiff_jax.batch import Job, run_batch_job
    from nemodiff_jax.generate import load

    if args.distributed:
        init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    else:
        given = [flag for flag, v in (("--coordinator-address", args.coordinator_address),
                                      ("--num-processes", args.num_processes), ("--process-id", args.process_id))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given without --distributed")
    mesh = mesh_from_args(args.tensor_parallel_size, args.data_parallel)
    gen = load(args.model or default_model(), dtype=args.dtype, drafter=drafter_arg(args), progress=False, mesh=mesh,
               quantize=args.quantize)
    if args.distributed:
        print(f"nemodiff batch: {describe_process_mesh(gen.mesh)}", file=sys.stderr, flush=True)
    job = Job(input=Path(args.input), output=Path(args.output), batch_size=args.batch_size, mode=args.mode,
              max_new_tokens=args.max_new_tokens, max_new_tokens_cap=args.max_new_tokens_cap,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
              max_prompt_tokens=args.max_prompt_tokens, mode_options=flag_mode_options(args),
              progress=not args.no_progress)
    return run_batch_job(gen, job)


def cmd_bench(args) -> int:
    from nemodiff_jax import bench

    bench.run(bench.Settings(
        sizes=args.sizes, contexts=args.contexts, batches=args.batches, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, modes=args.modes, mode_new_tokens=args.mode_new_tokens, embedded=args.embedded,
        attn=args.attn, formats=args.formats, mesh=tuple(args.mesh) if args.mesh else None, out=args.out,
        md=args.md))
    return 0


def cmd_serve(args) -> int:
    """An OpenAI-compatible HTTP server (nemodiff_jax/serve.py) over the serving engine."""
    from nemodiff_jax import serve
    from nemodiff_jax.generate import load

    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    path = Path(args.model) if args.model else default_model()
    gen = load(path, dtype=args.dtype, drafter=drafter_arg(args), progress=False,
               mesh=mesh_from_args(args.tensor_parallel_size, data_parallel=False), quantize=args.quantize)
    name = args.served_model_name or (args.model if args.model else "nemodiff-embedded")
    serve.run(gen, name, host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue,
              log_level=args.log_level, warmup=args.warmup, allowed_media_dirs=args.allowed_media_dir or (),
              slots=args.slots,
              max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    return 0


def add_train_arguments(p: argparse.ArgumentParser, *, train: Path | None = None, val: Path | None = None,
                        out: Path | None = None) -> None:
    """`nemodiff train`'s flags, one per trainer.TrainJob field (scripts/train_tiny.py adds the same ones with
    its repository paths as defaults). Unset values are None: TrainJob's (or its preset's) default applies."""
    p.add_argument("--preset", default="default",
                   help="model geometry and schedule (nemodiff_jax/trainer.py PRESETS: default = the embedded "
                        "model's recipe, micro = a CPU smoke run); the flags below override it")
    p.add_argument("--train", type=Path, default=train, help="training text (documents split by 4 newlines)")
    p.add_argument("--val", type=Path, default=val, help="validation text")
    p.add_argument("--out", type=Path, default=out, help="HF export directory")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="directory with tokenizer.json (+ tokenizer_config.json, chat template); it sets the vocab "
                        "and special ids and is copied into the export (default: the package's tokenizer)")
    p.add_argument("--work-dir", type=Path, help="checkpoints, the live log and summary (default: <out>.work)")
    geometry = p.add_argument_group("model geometry (default: the preset's)")
    for flag in ("--hidden", "--layers", "--heads", "--kv-heads", "--head-dim", "--intermediate"):
        geometry.add_argument(flag, type=int)
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's; with --minutes: as many "
                                             "as fit, measured after warm-up)")
    p.add_argument("--minutes", type=float, help="wall-clock budget from start to export")
    p.add_argument("--batch", type=int, help="global batch (rows), sharded over the devices")
    p.add_argument("--seq-len", type=int, help="tokens per row (one half of the doubled sequence)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine decay")
    p.add_argument("--alpha", type=float, help="L = L_AR + alpha L_diff (default 0.3)")
    p.add_argument("--weight-decay", type=float, help="AdamW decay of the matrices (default 0.1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--devices", type=int, metavar="N", help="data parallel over the first N devices (default: all)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--val-rows", type=int, help="cap on validation rows (0: the whole val split)")
    p.add_argument("--no-eos", action="store_true", help="do not put EOS between documents")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"],
                   help="forward/backward dtype (params stay fp32); auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--export", choices=["best", "final"],
                   help="export the params of the best validation loss (default) or of the last step")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the latest checkpoint in <work-dir>/ckpt (if there is one)")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="end after STEP as a kill would (no checkpoint of its own, no export; the horizon stays); "
                        "--resume then continues from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    p.add_argument("--sample-prompt", help="prompt of the greedy AR sample from the export (default 'ROMEO:\\n')")
    p.add_argument("--sample-tokens", type=int, help="tokens of that sample (default 48; 0: none)")


def train_job_from_args(args):
    """The trainer.TrainJob that add_train_arguments' flags describe."""
    from nemodiff_jax.trainer import TrainJob

    missing = [f"--{name}" for name in ("train", "val", "out") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required")
    fields = {name: getattr(args, name) for name in (
        "train", "val", "out", "preset", "tokenizer", "work_dir", "hidden", "layers", "heads", "kv_heads",
        "head_dim", "intermediate", "steps", "minutes", "batch", "seq_len", "lr", "warmup", "alpha",
        "weight_decay", "seed", "devices", "eval_every", "ckpt_every", "log_every", "val_rows", "compute_dtype",
        "export", "stop_after", "sample_prompt", "sample_tokens")}
    return TrainJob(**{k: v for k, v in fields.items() if v is not None}, resume=args.resume,
                    progress=not args.no_progress, eos_between_docs=not args.no_eos)


# `nemodiff train` flags that mean something for one kind of run only: given to the other, they are errors.
MODEL_ONLY = ("minutes", "alpha", "weight_decay", "tokenizer", "hidden", "layers", "heads", "kv_heads", "head_dim",
              "intermediate", "eval_every", "ckpt_every", "log_every", "val_rows", "compute_dtype", "export",
              "stop_after", "sample_prompt", "sample_tokens", "devices")
DRAFTER_ONLY = ("model", "rollouts", "rank", "lora_alpha", "prompt_min", "prompt_max", "dtype")


def _refuse(args, names, kind: str) -> None:
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    given += [flag for flag, on in (("--resume", args.resume), ("--no-eos", args.no_eos)) if on and kind == "--drafter"]
    if given:
        raise ValueError(f"{', '.join(given)} {'do' if len(given) > 1 else 'does'} not apply to "
                         f"{'drafter' if kind == '--drafter' else 'model'} training")


def drafter_job_from_args(args):
    """The drafter.DrafterJob of `nemodiff train --drafter`: the shared flags (--train, --out, --work-dir,
    --steps, --batch, --seq-len, --lr, --warmup, --seed, --no-progress) mean the same for the adapter."""
    from nemodiff_jax.drafter import DrafterJob

    if args.model is None or args.train is None:
        raise ValueError("--drafter needs --model (the model to draft for) and --train (the prompts' text)")
    _refuse(args, MODEL_ONLY, "--drafter")
    fields = {"model": args.model, "train": args.train, "val": args.val, "out": args.out, "work_dir": args.work_dir,
              "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
              "warmup": args.warmup, "seed": args.seed, "rank": args.rank, "alpha": args.lora_alpha,
              "rollouts": args.rollouts, "prompt_min": args.prompt_min, "prompt_max": args.prompt_max,
              "dtype": args.dtype}
    return DrafterJob(**{k: v for k, v in fields.items() if v is not None}, progress=not args.no_progress)


def cmd_train(args) -> int:
    """Train an NLD model from text (nemodiff_jax/trainer.py) and export it in NLD HF format, or with
    --drafter its linear-spec drafter LoRA (nemodiff_jax/drafter.py) into <model>/linear_spec_lora."""
    if args.drafter:
        from nemodiff_jax import drafter

        summary = drafter.run(drafter_job_from_args(args))
        print(f"drafter saved to {summary['out']}: held-out draft loss {summary['before']['val_loss']:.3f} -> "
              f"{summary['after']['val_loss']:.3f}, accuracy {summary['before']['val_acc']:.3f} -> "
              f"{summary['after']['val_acc']:.3f} (slot 1: {summary['after']['val_acc_slot1']:.3f})")
        return 0
    from nemodiff_jax import trainer

    _refuse(args, DRAFTER_ONLY, "model")
    trainer.run(train_job_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nemodiff", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="HF NLD checkpoint -> orbax (fast restore) or re-exported HF")
    c.add_argument("src", help="HF model directory (config.json + safetensors)")
    c.add_argument("dst", help="output directory")
    c.add_argument("--to", choices=("orbax", "hf"), default="orbax")
    c.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    c.add_argument("--max-shard-gb", type=float, default=None, help="hf: split into shards + index")
    c.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="write the matmul weights quantized: int8 per channel, or int4 in groups of 128 (the head "
                        "int8); load() reads such a checkpoint as it is (docs/QUANTIZATION.md)")
    c.set_defaults(fn=cmd_convert)

    def sampling_args(q):
        q.add_argument("--model", default=None, help="model directory (default: the embedded model)")
        q.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
        q.add_argument("--mode", choices=MODES, default="linear_spec")
        q.add_argument("--max-new-tokens", type=int, default=128)
        q.add_argument("--temperature", type=float, default=0.0)
        q.add_argument("--top-k", type=int, default=None)
        q.add_argument("--top-p", type=float, default=None)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--block-size", type=int, default=None,
                       help="diffusion / linear_spec block (default: the config's); quadratic_spec: its chain "
                            "(default 8, at most 32; a canvas of J(J+1) tokens per forward)")
        q.add_argument("--threshold", type=float, default=None,
                       help="diffusion unmask threshold (default 0.9); linear_spec draft threshold (default 0)")
        q.add_argument("--policy", choices=("threshold", "low_confidence", "leftmost"), default=None)
        q.add_argument("--deterministic", action="store_true",
                       help="ar: run every step at linear_spec's verify shape (a block-size chunk), so that greedy "
                            "linear_spec can equal greedy ar in bf16 too (a 32-token chunk cost 1.08x a 1-token "
                            "step on an H200)")
        q.add_argument("--drafter", default=None,
                       help="PEFT LoRA drafter directory for linear_spec and quadratic_spec (default: the model's "
                            "linear_spec_lora/, when it has one)")
        q.add_argument("--no-drafter", action="store_true", help="no drafter: the speculative modes draft with the "
                                                                  "base model")
        q.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                       help="split each model replica over N devices (heads, MLP, vocab; e.g. 14B over 2 or 4 GPUs)")
        q.add_argument("--quantize", choices=("int8", "int4"), default=None, help=QUANTIZE_HELP)

    g = sub.add_parser("generate", help="generate for one prompt, streaming text, then print stats")
    sampling_args(g)
    g.add_argument("--prompt", required=True, help="prompt text, or - to read stdin")
    g.add_argument("--image", action="append", metavar="FILE",
                   help="an image for a VLM checkpoint (repeat for several): each goes where the prompt has an "
                        "'<image>' marker, in order, or before the prompt's text when it has none")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the chat template (one user turn, generation prompt added)")
    g.add_argument("--thinking", action="store_true",
                   help="with --chat: the template's enable_thinking (the answer starts inside <think>)")
    g.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="thinking budget: output position N holds </think> unless one came earlier")
    g.add_argument("--compact", action="store_true", help="stats on one line")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="every decoding mode on the embedded model with a stats table (make run)")
    d.add_argument("--model", default=None)
    d.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--num-prompts", type=int, default=4)
    d.set_defaults(fn=cmd_demo)

    bt = sub.add_parser("batch", help="batch generation job: JSONL in -> JSONL out (resumable)")
    sampling_args(bt)
    bt.add_argument("--input", required=True)
    bt.add_argument("--output", required=True)
    bt.add_argument("--batch-size", type=int, default=8)
    bt.add_argument("--data-parallel", action="store_true",
                    help="split the batch rows over model replicas: one per device, or per --tensor-parallel-size")
    bt.add_argument("--max-prompt-tokens", type=int, default=1024,
                    help="longest prompt accepted; longer lines are reported and skipped")
    bt.add_argument("--max-new-tokens-cap", type=int, default=None,
                    help="largest per-request max_new_tokens (default: --max-new-tokens)")
    bt.add_argument("--no-progress", action="store_true")
    bt.add_argument("--distributed", action="store_true",
                    help="multi-host: one process per host; calls jax.distributed.initialize(); process k of N "
                         "takes every N-th line and writes <output stem>.part<k><suffix>; restarts read every part; "
                         "--tensor-parallel-size splits the model over this host's devices only")
    bt.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                    help="with --distributed: process 0's host and a free port, the same on every process "
                         "(default: $JAX_COORDINATOR_ADDRESS, or SLURM / Open MPI's)")
    bt.add_argument("--num-processes", type=int, default=None, metavar="N",
                    help="with --distributed: the number of processes (default: SLURM / Open MPI's)")
    bt.add_argument("--process-id", type=int, default=None, metavar="K",
                    help="with --distributed: this process's index, 0 .. N-1 (default: SLURM / Open MPI's)")
    bt.set_defaults(fn=cmd_batch)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
                        description="Serves /v1/models, /v1/completions, /v1/chat/completions (mode and its "
                                    "options as extra body fields), /health and /metrics (Prometheus) on uvicorn.")
    sv.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    sv.add_argument("--drafter", default=None,
                    help="PEFT LoRA drafter directory for linear_spec (default: the model's linear_spec_lora/, when "
                         "it has one)")
    sv.add_argument("--no-drafter", action="store_true", help="no drafter: linear_spec drafts with the base model")
    sv.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                    help="split the model over N devices (heads, MLP, vocab)")
    sv.add_argument("--quantize", choices=("int8", "int4"), default=None, help=QUANTIZE_HELP)
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on every /v1 request (/health and /metrics stay open)")
    sv.add_argument("--max-queue", type=int, default=64, metavar="N",
                    help="requests waiting for the engine; beyond it a request gets HTTP 429 (busy)")
    sv.add_argument("--slots", type=int, default=None, metavar="N",
                    help="decode slots per program (mode, block, policy) of the engine (default: the engine's)")
    sv.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                    help="longest prompt taken (default: the engine's); slots are sized for it")
    sv.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                    help="largest max_tokens taken (default: the engine's); slots are sized for it")
    sv.add_argument("--allowed-media-dir", action="append", metavar="DIR",
                    help="VLM checkpoints: image parts may name local files (a path or file:// URL) inside DIR "
                         "(repeatable); without it only base64 data: URLs are taken. Remote URLs never are")
    sv.add_argument("--served-model-name", default=None,
                    help="the model's name in the API (default: --model as given, or nemodiff-embedded)")
    sv.add_argument("--warmup", action="store_true",
                    help="before serving, compile every mode's default program at every admission shape (row counts "
                         "up to --slots x prompt widths up to --max-prompt-tokens); set JAX_COMPILATION_CACHE_DIR "
                         "to keep the compiles across restarts")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    sv.set_defaults(fn=cmd_serve)

    tr = sub.add_parser("train", help="train an NLD model from text (joint AR + diffusion) and export it as HF",
                        description="Trains with the joint AR + block-diffusion objective (nemodiff_jax/trainer.py): "
                                    "evaluation, best-params export, exact-resume checkpoints, a JSONL log "
                                    "(<work-dir>/log.jsonl, copied into the export as train_log.jsonl).")
    add_train_arguments(tr)
    dr = tr.add_argument_group("--drafter: train the linear_spec drafter LoRA of --model by self-distillation "
                               "(nemodiff_jax/drafter.py); it is saved to --out (default <model>/linear_spec_lora, "
                               "which load() attaches by default)")
    dr.add_argument("--drafter", action="store_true", help="train the drafter instead of a model")
    dr.add_argument("--model", type=Path, help="the HF model directory the drafter drafts for")
    dr.add_argument("--rollouts", type=int, help="prompts rolled out greedily for the targets (default 512)")
    dr.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    dr.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 32)")
    dr.add_argument("--prompt-min", type=int, help="shortest rollout prompt (default 16 tokens)")
    dr.add_argument("--prompt-max", type=int, help="longest rollout prompt (default 128 tokens)")
    dr.add_argument("--dtype", choices=("float32", "bfloat16"), help="rollout and training dtype (default float32)")
    tr.set_defaults(fn=cmd_train)

    from nemodiff_jax.config import PRESETS

    bn = sub.add_parser(
        "bench", help="benchmark: HBM roofline probes, forward and end-to-end decode at real shapes (make bench)",
        description="Random bf16 weights of a real NLD shape made on the device (no checkpoint): the HBM limit "
                    "(best measured copy, with the datasheet figure), one forward at T=1 / T=32 per context, "
                    "end-to-end tokens/s per mode and batch. Unset sizes/contexts/batches/lengths: with --sizes "
                    "auto on a CPU, the embedded model's shape at small settings (about a minute on 2 cores); "
                    "otherwise contexts 1024 4096 16384, batches 1 8 32 64, prompt 512, 128 AR / 64 mode tokens.")
    bn.add_argument("--sizes", nargs="+", default=["auto"], choices=["auto", "embedded", *sorted(PRESETS)],
                    help="model shapes (auto: embedded on a CPU, 8B on a GPU; embedded: assets/config.json)")
    bn.add_argument("--contexts", nargs="*", type=int, default=None,
                    help="cache lengths of the forward table (the flag with no values: skip it)")
    bn.add_argument("--batches", nargs="+", type=int, default=None)
    bn.add_argument("--prompt-len", type=int, default=None)
    bn.add_argument("--new-tokens", type=int, default=None, help="new tokens per row for ar")
    bn.add_argument("--modes", nargs="+", default=list(MODES), choices=(*MODES, "ar_deterministic"),
                    help="decoding modes timed end to end (ar_deterministic, on request only: ar with "
                    "--deterministic; it takes --new-tokens as ar does)")
    bn.add_argument("--mode-new-tokens", type=int, default=None,
                    help="new tokens per row for diffusion / linear_spec (32-token forwards: costlier)")
    bn.add_argument("--embedded", action="store_true", help="also run the embedded model (real weights) per mode")
    bn.add_argument("--attn", nargs="+", default=["auto"], choices=["auto", "xla", "pallas", "cudnn"],
                    help="attention implementations to time (nemodiff_jax.attention.chunk_attention impl)")
    bn.add_argument("--formats", nargs="+", default=["bf16"], choices=["bf16", "int8", "int4"],
                    help="weight formats to time: bf16 as drawn, or quantized on the device (int4 keeps an int8 head)")
    bn.add_argument("--mesh", nargs=2, type=int, metavar=("DATA", "MODEL"), default=None,
                    help="run on a (data, model) mesh, e.g. --mesh 1 2 for tensor parallel over 2 GPUs")
    bn.add_argument("--out", default="bench.json", help="JSON report, rewritten after every measurement")
    bn.add_argument("--md", default=None, help="also write the markdown tables here")
    bn.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"nemodiff {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
