"""Batch generation jobs: JSONL in -> JSONL out, continuous batching, resumable, data parallel.

Input lines: {"id": ..., "prompt": str | [int] | "messages": [...], optional "mode", "max_new_tokens",
"temperature", "seed"}. Output lines: {"id", "text", "tokens", "stats"}, appended and flushed one result at a
time, so a killed job loses nothing it finished; on restart, ids already in the output are skipped and a torn
last line is cut off. Malformed input lines are reported with their line number and the job goes on.

Requests are grouped by (mode, temperature); each group runs B slots in lock-step on device. When a row
finishes, the segment loop returns, the row's result is written, and its slot is refilled with the next
request by a prefill into that row alone (the other rows' K/V are untouched: the refill writes past their
committed lengths).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nemodiff_jax.decoding import ar
from nemodiff_jax.decoding.common import Options, State, initial_state, prefill
from nemodiff_jax.generate import (MODE_OPTIONS, MODES, Generator, _bucket, _prefill_fn, _round_up, buffer_sizes,
                                   host_rows)
from nemodiff_jax.sampling import Sampling

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


def read_done_ids(path: Path) -> set[str]:
    """Ids already in the output; a torn last line (killed mid-write) is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for line in data.decode().splitlines():
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    return done


# ------------------------------------------------------------------ the on-device engine


ROW_FIELDS = ("out", "n_out", "done", "seed", "keys", "max_new", "passes", "rounds", "work")  # State's [B, ...]


def _merge_rows(mask, new: State, old: State) -> dict:
    """The per-row fields of `new` where `mask` is set, else of `old` (PRNG keys included)."""
    def pick(a, b):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(pick(jax.random.key_data(a), jax.random.key_data(b)))
        m = mask.reshape(mask.shape + (1,) * (a.ndim - 1))
        return jnp.where(m, a, b)

    return {f: pick(getattr(new, f), getattr(old, f)) for f in ROW_FIELDS}


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=(2,))
def _refill_fn(graphdef, params, st: State, refill, prompt, lens, keys, max_new, opts: Options) -> State:
    """Prefills `prompt` into the rows where `refill` is set; other rows keep their state and K/V."""
    model = nnx.merge(graphdef, params)
    cache = st.cache.crop(jnp.where(refill, 0, st.cache.lengths))
    # Rows not refilled also run this forward, at their own lengths, where length + prompt width can pass
    # the capacity: their writes are dropped, their cache is not advanced and their logits are unused. The
    # XLA attention path handles that; the Pallas kernel assumes length + T <= capacity, so the refill
    # prefill always uses XLA.
    last, cache = prefill(model, prompt, jnp.where(refill, lens, 0), cache,
                          dataclasses.replace(opts, attn_impl="xla"))
    first = ar.first_token(last, cache, keys, st.sampling)
    new = initial_state(cache, st.out.shape[1], keys, max_new, st.sampling, st.lora, first, opts)
    return dataclasses.replace(st, cache=cache, total_passes=st.total_passes + 1, **_merge_rows(refill, new, st))


@functools.partial(jax.jit, static_argnums=(0, 2, 3), donate_argnums=(4,))
def _segment_fn(graphdef, params, step_fn, opts: Options, st: State) -> State:
    """Steps until some row that was running finishes (or all are done)."""
    model = nnx.merge(graphdef, params)
    done0 = st.done
    return jax.lax.while_loop(lambda s: ~jnp.all(s.done) & ~jnp.any(s.done & ~done0),
                              lambda s: step_fn(model, s, opts), st)


class Engine:
    """B slots for one (mode, temperature) group."""

    def __init__(self, gen: Generator, mode: str, temperature: float, batch: int, max_prompt: int,
                 max_new: int, mode_options: dict, top_k: int | None = None, top_p: float | None = None):
        self.gen, self.mode, self.batch = gen, mode, batch
        # --threshold / --policy are diffusion settings; linear_spec drafts in one pass (its default)
        options = {k: v for k, v in mode_options.items() if k in MODE_OPTIONS[mode]}
        if mode == "linear_spec":
            options.pop("threshold", None)
        self.opts = gen.make_options(mode, options, gen.config.eos_token_ids)
        self.capacity, self.out_len = buffer_sizes(max_prompt, max_new, self.opts.block)
        self.sampling = Sampling.make(temperature, top_k, top_p)
        self.lora = gen.drafter if mode == "linear_spec" else None
        self.st: State | None = None
        self.slots: list[Request | None] = [None] * batch
        self.started = [0.0] * batch

    def _inputs(self, reqs: dict[int, Request]):
        """Placed inputs for all B rows; rows not in `reqs` get a 1-token zero prompt (their results unused)."""
        rows = [reqs.get(i) for i in range(self.batch)]
        return self.gen.prompt_rows([r.ids if r else [0] for r in rows], _bucket(max(len(r.ids) for r in reqs.values())),
                                    [r.seed if r else 0 for r in rows], [r.max_new_tokens if r else 1 for r in rows])

    def fill(self, reqs: dict[int, Request]) -> None:
        now = time.perf_counter()
        for i, r in reqs.items():
            self.slots[i], self.started[i] = r, now
        g = self.gen
        prompt, lens, keys, max_new = self._inputs(reqs)
        with jax.default_matmul_precision(g._precision):
            if self.st is None:
                st = _prefill_fn(g._graphdef, g._params, prompt, lens, keys, max_new, self.sampling, self.lora,
                                 self.capacity, self.out_len, self.opts, g.cache_sharding(self.batch))
                empty = np.array([i not in reqs for i in range(self.batch)])
                self.st = dataclasses.replace(st, done=st.done | jnp.asarray(empty))
            else:
                (refill,) = g.place_rows(jnp.asarray([i in reqs for i in range(self.batch)]))
                self.st = _refill_fn(g._graphdef, g._params, self.st, refill, prompt, lens, keys, max_new,
                                     self.opts)

    def run_segment(self) -> list[tuple[Request, dict]]:
        """Advances until a row finishes; returns the finished requests with their results."""
        g = self.gen
        with jax.default_matmul_precision(g._precision):
            self.st = _segment_fn(g._graphdef, g._params, MODES[self.mode].step, self.opts, self.st)
        host = host_rows(self.st)
        finished = []
        now = time.perf_counter()
        for i, r in enumerate(self.slots):
            if r is not None and bool(host.done[i]):
                res = g.row_result(host, self.opts, i, now - self.started[i])
                finished.append((r, {"id": r.id, "text": res.text, "tokens": res.tokens, "stats": res.stats}))
                self.slots[i] = None
        return finished

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.slots) if r is None]

    def busy(self) -> bool:
        return any(r is not None for r in self.slots)


def run_batch_job(args) -> int:
    """The `nemodiff batch` command (see cli.py for the flags)."""
    from nemodiff_jax.cli import default_model, mesh_from_args
    from nemodiff_jax.generate import load

    if args.distributed:
        jax.distributed.initialize()  # multi-host: coordinator address etc. from the environment
    mesh = mesh_from_args(args.tensor_parallel_size, args.data_parallel)
    gen = load(args.model or default_model(), dtype=args.dtype, drafter=args.drafter, progress=False, mesh=mesh)
    in_path, out_path = Path(args.input), Path(args.output)
    if not in_path.exists():
        raise FileNotFoundError(f"{in_path}: input file not found")
    done = read_done_ids(out_path)
    defaults = argparse_defaults(args, gen)
    shard, num_shards = jax.process_index(), jax.process_count()

    pending: dict[tuple, list[Request]] = defaultdict(list)
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
            except BadRequest as e:
                errors += 1
                print(f"nemodiff batch: skipped {e}", file=sys.stderr)
                continue
            seen.add(r.id)
            if r.id not in done:
                pending[(r.mode, r.temperature)].append(r)
    total = sum(len(v) for v in pending.values())
    batch = args.batch_size
    if mesh is not None:
        batch = _round_up(batch, mesh.shape["data"])
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="batch", unit="req", disable=args.no_progress)
    with open(out_path, "a") as out:
        for (mode, temperature), reqs in pending.items():
            reqs.reverse()  # pop() from the end keeps input order
            eng = Engine(gen, mode, temperature, batch if mesh is not None else min(batch, len(reqs)),
                         defaults.max_prompt_tokens, defaults.max_new_tokens_cap, defaults.mode_options,
                         args.top_k, args.top_p)
            eng.fill({i: reqs.pop() for i in range(min(eng.batch, len(reqs)))})
            while eng.busy():
                for r, res in eng.run_segment():
                    out.write(json.dumps(res) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    tokens += len(res["tokens"])
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}")
                free = eng.free_slots()
                if reqs and free:
                    eng.fill({i: reqs.pop() for i in free[: len(reqs)]})
    bar.close()
    wall = time.perf_counter() - t0
    print(f"nemodiff batch: {total} requests ({len(done)} already done, {errors} malformed lines skipped), "
          f"{tokens} tokens in {wall:.1f}s = {tokens / wall if wall else 0:.1f} tok/s -> {out_path}",
          file=sys.stderr)
    return 0


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
