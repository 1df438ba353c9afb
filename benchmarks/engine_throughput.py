"""The serving engine against the bare on-device loop, and a mixed-mode batch job against the same requests run
as single-mode jobs, on random bf16 weights of a real NLD shape (default 8B; the embedded tokenizer's ids).

1. Engine vs bare loop (AR, every row `--new-tokens` tokens, no stop ids): the bare loop is
   `nemodiff_jax.bench.bench_e2e` (one `lax.while_loop` over a prefilled-shape cache, prefill excluded). The
   engine's decode time is wall(N tokens) - wall(1 token) over the same B requests, all queued before the
   engine starts (so the first admission takes them all): the difference is the N-1 decode steps, with every
   segment boundary, host read and stream hand-off in it. Both run twice; the second counts.
2. Mixed vs single-mode jobs: `nemodiff_jax.batch.run_batch_job` over `--per-mode` requests in each mode (varied
   prompt lengths, temperatures 0 / 0.7), once as three single-mode jobs one after another and once as one
   mixed file. Each job runs once to compile, then timed.

    python3 -P benchmarks/engine_throughput.py --out $OUT/engine.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import jax

from nemodiff_jax import bench
from nemodiff_jax.batch import Job, run_batch_job
from nemodiff_jax.embedded import ASSETS
from nemodiff_jax.engine import Engine, Request
from nemodiff_jax.generate import Generator
from nemodiff_jax.tokenizer import Tokenizer


def engine_wall(gen, prompts, new_tokens, segment_steps) -> float:
    e = Engine(gen, slots=len(prompts), max_queue=len(prompts), max_prompt_tokens=max(map(len, prompts)),
               max_new_tokens=new_tokens, segment_steps=segment_steps)
    handles = [e.submit(Request(p, max_new_tokens=new_tokens, stop_token_ids=[], seed=i))
               for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    with e:
        results = [h.wait() for h in handles]
    wall = time.perf_counter() - t0
    assert all(len(r.tokens) == new_tokens for r in results)
    return wall


def engine_vs_bare(gen, batches, prompt_len, new_tokens, segments) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for b in batches:
        prompts = [[rng.randrange(8192) for _ in range(prompt_len)] for _ in range(b)]
        bare = bench.bench_e2e(gen.model, gen.config, b, prompt_len, new_tokens, mode="ar")
        for seg in segments:
            walls = []
            for _ in range(2):  # the first run compiles
                full, one = engine_wall(gen, prompts, new_tokens, seg), engine_wall(gen, prompts, 1, seg)
                walls.append((full, one))
            full, one = walls[-1]
            ms_step = 1e3 * (full - one) / (new_tokens - 1)
            row = {"batch": b, "segment_steps": seg, "bare_ms_per_step": bare["ms_per_forward"],
                   "engine_ms_per_step": ms_step, "engine_over_bare": bare["ms_per_forward"] / ms_step,
                   "engine_wall_s": full, "admission_s": one, "bare_tok_s": bare["tokens_per_s"],
                   "engine_decode_tok_s": b * (new_tokens - 1) / (full - one)}
            rows.append(row)
            print(json.dumps({"engine_vs_bare": row}), flush=True)
    return rows


def job_lines(per_mode: int, new_tokens: int, modes) -> dict[str, list[str]]:
    rng = random.Random(1)
    lines = {m: [] for m in modes}
    for i in range(per_mode):
        for m in modes:
            prompt = [rng.randrange(8192) for _ in range(rng.choice([24, 48, 96, 120]))]
            lines[m].append(json.dumps({"id": f"{m}-{i}", "prompt": prompt, "mode": m, "max_new_tokens": new_tokens,
                                        "temperature": 0.7 if i % 2 else 0.0, "seed": i}))
    return lines


def timed_job(gen, lines: list[str], folder: Path, name: str, batch: int, new_tokens: int) -> tuple[float, int]:
    inp, out = folder / f"{name}.in.jsonl", folder / f"{name}.out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rc = run_batch_job(gen, Job(input=inp, output=out, batch_size=batch, max_new_tokens=new_tokens,
                                max_prompt_tokens=128, progress=False))
    wall = time.perf_counter() - t0
    assert rc == 0
    tokens = sum(len(json.loads(x)["tokens"]) for x in out.read_text().splitlines())
    return wall, tokens


def mixed_vs_single(gen, per_mode, new_tokens, batch) -> dict:
    modes = ("ar", "diffusion", "linear_spec")
    lines = job_lines(per_mode, new_tokens, modes)
    mixed = [x for group in zip(*lines.values()) for x in group]  # interleaved: ar, diffusion, linear_spec, ...
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for rep in range(2):  # the first pass compiles every program and admission shape the jobs use
            single = {m: timed_job(gen, lines[m], folder, m, batch, new_tokens) for m in modes}
            mix = timed_job(gen, mixed, folder, "mixed", batch, new_tokens)
    single_wall = sum(w for w, _ in single.values())
    single_tokens = sum(t for _, t in single.values())
    row = {"per_mode": per_mode, "new_tokens": new_tokens, "batch": batch,
           "single_s": {m: w for m, (w, _) in single.items()}, "single_total_s": single_wall,
           "single_tokens": single_tokens, "mixed_s": mix[0], "mixed_tokens": mix[1],
           "single_tok_s": single_tokens / single_wall, "mixed_tok_s": mix[1] / mix[0],
           "mixed_over_single": (mix[1] / mix[0]) / (single_tokens / single_wall)}
    print(json.dumps({"mixed_vs_single": row}), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8B")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--segments", nargs="+", type=int, default=[8, 1 << 30],
                   help="engine segment lengths (16: the engine's default; 2**30: a batch job's)")
    p.add_argument("--per-mode", type=int, default=32)
    p.add_argument("--job-new-tokens", type=int, default=64)
    p.add_argument("--job-batch", type=int, default=16)
    p.add_argument("--skip", nargs="*", default=[], choices=["engine", "jobs"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = bench.size_config(args.size)
    gen = Generator(bench.make_model(cfg), Tokenizer.from_dir(ASSETS))
    report = {"device": jax.devices()[0].device_kind, "size": args.size, "args": vars(args)}
    if "engine" not in args.skip:
        report["engine_vs_bare"] = engine_vs_bare(gen, args.batches, args.prompt_len, args.new_tokens,
                                                  args.segments)
    if "jobs" not in args.skip:
        report["mixed_vs_single"] = mixed_vs_single(gen, args.per_mode, args.job_new_tokens, args.job_batch)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{args.size} on {report['device']}")
    for r in report.get("engine_vs_bare", []):
        print(f"engine vs bare  batch {r['batch']:>3} segment {r['segment_steps']:>10}: bare "
              f"{r['bare_ms_per_step']:.2f} ms/step, engine {r['engine_ms_per_step']:.2f} ms/step = "
              f"{r['engine_over_bare']:.3f}x")
    if "mixed_vs_single" in report:
        r = report["mixed_vs_single"]
        print(f"mixed job {r['mixed_tok_s']:.1f} tok/s vs single-mode jobs {r['single_tok_s']:.1f} tok/s = "
              f"{r['mixed_over_single']:.3f}x ({3 * r['per_mode']} requests, batch {r['batch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
