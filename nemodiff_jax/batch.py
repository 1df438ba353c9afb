"""Batch generation jobs: JSONL in -> JSONL out, continuous batching, resumable, data parallel.

Input lines: {"id": ..., "prompt": str | [int] | "messages": [...], optional "mode", "max_new_tokens",
"temperature", "seed"}. Output lines: {"id", "text", "tokens", "stats"}, appended and flushed one result at a
time, so a killed job loses nothing it finished; on restart, ids already in the output are skipped and a torn
last line is cut off. Malformed input lines are reported with their line number and the job goes on.

Requests are grouped by program (mode, block size, policy: engine.Pool), each with B slots on device; every
row carries its own temperature, budget, seed and stop ids as traced values, so a new value never compiles.
The pools take turns, a segment each, so a mixed file runs as one job. When a row finishes, the segment
returns, the row's result is written, and its slot is refilled with the next request by a prefill of the
new rows alone, scattered into the shared cache (the other rows' K/V are untouched).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import jax
from tqdm.auto import tqdm

from nemodiff_jax.engine import Pool
from nemodiff_jax.generate import MODES, Generator, _round_up, buffer_sizes

REQUEST_KEYS = {"id", "prompt", "messages", "mode", "max_new_tokens", "temperature", "seed"}


class BadRequest(ValueError):
    pass


@dataclasses.dataclass
class Request:
    line: int
    id: str
    ids: list[int]
    mode: str
    max_new_tokens: int
    temperature: float
    seed: int


def parse_request(line_no: int, raw: str, gen: Generator, defaults) -> Request:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRequest(f"line {line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"line {line_no}: expected a JSON object")
    unknown = set(obj) - REQUEST_KEYS
    if unknown:
        raise BadRequest(f"line {line_no}: unknown field(s) {sorted(unknown)}")
    if "id" not in obj or not isinstance(obj["id"], (str, int)):
        raise BadRequest(f"line {line_no}: missing or invalid 'id'")
    if ("prompt" in obj) == ("messages" in obj):
        raise BadRequest(f"line {line_no}: give exactly one of 'prompt' or 'messages'")
    mode = obj.get("mode", defaults.mode)
    if mode not in MODES:
        raise BadRequest(f"line {line_no}: unknown mode {mode!r}")
    max_new = obj.get("max_new_tokens", defaults.max_new_tokens)
    if not isinstance(max_new, int) or not 1 <= max_new <= defaults.max_new_tokens_cap:
        raise BadRequest(f"line {line_no}: max_new_tokens must be an int in [1, {defaults.max_new_tokens_cap}]")
    temperature = obj.get("temperature", defaults.temperature)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest(f"line {line_no}: temperature must be a number >= 0")
    seed = obj.get("seed", defaults.seed)
    if not isinstance(seed, int):
        raise BadRequest(f"line {line_no}: seed must be an int")
    try:
        if "messages" in obj:
            if gen.tokenizer is None:
                raise ValueError("'messages' needs a tokenizer with a chat template")
            ids = gen.tokenizer.apply_chat_template(obj["messages"], tokenize=True)
        else:
            ids = gen.encode_prompts([obj["prompt"]])[0]
    except (ValueError, TypeError) as e:
        raise BadRequest(f"line {line_no}: {e}") from None
    if len(ids) > defaults.max_prompt_tokens:
        raise BadRequest(f"line {line_no}: prompt of {len(ids)} tokens exceeds the job's limit "
                         f"{defaults.max_prompt_tokens} (--max-prompt-tokens)")
    return Request(line_no, str(obj["id"]), ids, mode, max_new, float(temperature), seed)


def read_done_ids(path: Path, repair: bool = True) -> set[str]:
    """Ids already in an output file. A torn last line (killed mid-write) is cut off first when `repair`
    (this process's own file), else ignored (another process may be writing it right now)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(keep)
        data = data[:keep]
    done = set()
    for line in data.decode().splitlines():
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    return done


def shard_output(path: Path, index: int, count: int) -> Path:
    """Process `index` of `count` writes its own file: the output itself for one process, else
    `<stem>.part<index><suffix>` beside it."""
    return path if count == 1 else path.with_name(f"{path.stem}.part{index}{path.suffix}")


def done_ids(path: Path, mine: Path) -> set[str]:
    """Ids in every shard of the output (the plain file and all `.part<k>` files, whatever process count
    wrote them), so a restart with another process count neither redoes nor duplicates an id."""
    shards = [path] + sorted(path.parent.glob(f"{path.stem}.part*{path.suffix}"))
    return set().union(*(read_done_ids(p, repair=p == mine) for p in shards))


def run_batch_job(args) -> int:
    """The `nemodiff batch` command (see cli.py for the flags)."""
    from nemodiff_jax.cli import default_model, mesh_from_args
    from nemodiff_jax.generate import load

    if args.distributed:
        jax.distributed.initialize()  # multi-host: coordinator address etc. from the environment
    mesh = mesh_from_args(args.tensor_parallel_size, args.data_parallel)
    gen = load(args.model or default_model(), dtype=args.dtype, drafter=args.drafter, progress=False, mesh=mesh)
    in_path = Path(args.input)
    if not in_path.exists():
        raise FileNotFoundError(f"{in_path}: input file not found")
    shard, num_shards = jax.process_index(), jax.process_count()
    out_path = shard_output(Path(args.output), shard, num_shards)
    done = done_ids(Path(args.output), out_path)
    defaults = argparse_defaults(args, gen)

    pending: dict[object, list[Request]] = defaultdict(list)
    plans: dict[str, object] = {}
    seen: set[str] = set()
    errors = 0
    with open(in_path) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip() or (line_no - 1) % num_shards != shard:
                continue
            try:
                r = parse_request(line_no, raw, gen, defaults)
                if r.id in seen:
                    raise BadRequest(f"line {line_no}: duplicate id {r.id!r} (first seen earlier)")
                plan = request_plan(gen, r, defaults, args)
            except BadRequest as e:
                errors += 1
                print(f"nemodiff batch: skipped {e}", file=sys.stderr)
                continue
            seen.add(r.id)
            if r.id not in done:
                pending[plan.opts].append(r)
                plans[r.id] = plan
    check_flags_used(defaults.mode_options, {opts.mode for opts in pending})
    total = sum(len(v) for v in pending.values())
    batch = args.batch_size
    if mesh is not None:
        batch = _round_up(batch, mesh.shape["data"])
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="batch", unit="req", disable=args.no_progress)
    # one pool of slots per program (mode, block, policy); pools take turns, a segment each, so a mixed file
    # runs as one job and a new temperature or threshold is just another row's value
    pools = {}
    for opts, reqs in pending.items():
        reqs.reverse()  # pop() from the end keeps input order
        capacity, out_len = buffer_sizes(defaults.max_prompt_tokens, defaults.max_new_tokens_cap, opts.block)
        lora = gen.drafter if opts.mode == "linear_spec" else None
        pools[opts] = Pool(gen, opts, lora, batch if mesh is not None else min(batch, len(reqs)), capacity, out_len)
    with open(out_path, "a") as out:
        while any(pending.values()) or any(p.busy() for p in pools.values()):
            for opts, pool in pools.items():
                reqs = pending[opts]
                free = pool.free()
                if reqs and free:
                    pool.admit({i: (r, r.ids, r.seed, plans[r.id]) for i, r in
                                ((i, reqs.pop()) for i in free[: len(reqs)])})
                if not pool.busy():
                    continue
                host = pool.run()
                now = time.perf_counter()
                finished = [i for i, r in enumerate(pool.owner) if r is not None and bool(host.done[i])]
                for i in finished:
                    r = pool.owner[i]
                    res = gen.row_result(host, pool.opts, i, now - pool.started[i])
                    out.write(json.dumps({"id": r.id, "text": res.text, "tokens": res.tokens, "stats": res.stats})
                              + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    tokens += len(res.tokens)
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}")
                pool.release(finished)
    bar.close()
    wall = time.perf_counter() - t0
    print(f"nemodiff batch: {total} requests ({len(done)} already done, {errors} malformed lines skipped), "
          f"{tokens} tokens in {wall:.1f}s = {tokens / wall if wall else 0:.1f} tok/s -> {out_path}",
          file=sys.stderr)
    return 0


def request_plan(gen: Generator, r: Request, defaults, args):
    """The request's validated settings: the job's flags where its mode takes them (block size, threshold,
    policy), the line's own temperature, budget and seed."""
    from nemodiff_jax.generate import MODE_OPTIONS

    options = {k: v for k, v in defaults.mode_options.items() if k in MODE_OPTIONS[r.mode]}
    try:
        return gen.check_request(r.mode, r.max_new_tokens, len(r.ids), r.temperature, args.top_k, args.top_p,
                                 None, None, options)
    except ValueError as e:
        raise BadRequest(f"line {r.line}: {e}") from None


def check_flags_used(mode_options: dict, modes: set[str]) -> None:
    """A mode flag (--block-size, --threshold, --policy) that no request's mode takes is an error, not a
    silent no-op."""
    from nemodiff_jax.generate import MODE_OPTIONS

    unused = [k for k in mode_options if not any(k in MODE_OPTIONS[m] for m in modes)]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ValueError(f"{flags} given, but no request's mode ({', '.join(sorted(modes)) or 'none'}) takes it")


@dataclasses.dataclass
class _Defaults:
    mode: str
    max_new_tokens: int
    max_new_tokens_cap: int
    temperature: float
    seed: int
    max_prompt_tokens: int
    mode_options: dict


def argparse_defaults(args, gen: Generator) -> _Defaults:
    from nemodiff_jax.cli import flag_mode_options

    cap = max(args.max_new_tokens, args.max_new_tokens_cap or args.max_new_tokens)
    return _Defaults(mode=args.mode, max_new_tokens=args.max_new_tokens, max_new_tokens_cap=cap,
                     temperature=args.temperature, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
                     mode_options=flag_mode_options(args))
