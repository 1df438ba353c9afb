"""The serving engine: one loaded model, requests that arrive and leave at any time, each with its own mode,
sampling, budget, stop ids and mode options; per-request streaming of committed tokens; cancellation; a
bounded queue that says "busy" when full.

    engine = Engine(nemodiff_jax.load(path), max_queue=64).start()
    handle = engine.submit(Request(prompt="HAMLET:", mode="linear_spec", max_new_tokens=64))
    for item in handle.stream():   # lists of new token ids, then the final generate.Result
        ...
    handle.cancel()                # frees the request's place at once
    engine.stop()

Scheduling today: one worker thread runs one request at a time through `Generator.stream` (the on-device
step loop of its mode), so modes never wait on a recompile of each other and values such as temperature are
traced. Continuous batching over shared decode slots (rows of different requests in one loop) is the next
step of this file; the interface above stays.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemodiff_jax.cache import KVCache
from nemodiff_jax.decoding import ar
from nemodiff_jax.decoding.common import Options, RowSettings, State, initial_state, prefill
from nemodiff_jax.generate import (MODES, Generator, Result, RowPlan, _bucket, _prefill_fn, _round_up, host_rows,
                                   row_settings)


# ------------------------------------------------------------------ decode slots


ROW_FIELDS = ("out", "n_out", "done", "seed", "keys", "rows", "passes", "rounds", "work")  # State's per-row parts


def _set_rows(old, new, idx):
    """old[idx] = new along the leading (row) axis, for arrays and PRNG keys."""
    if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_set_rows(jax.random.key_data(old), jax.random.key_data(new), idx))
    return old.at[idx].set(new)


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=(2,))
def _admit_fn(graphdef, params, st: State, idx, prompt, lens, keys, rows: RowSettings, opts: Options) -> State:
    """Prefills only the new rows (idx [k], prompts [k, P]) through the model's attention path into a k-row
    cache of the prompt's width, then scatters their K/V (P slots per row) and per-row state into the shared
    state: the other rows' cache is not touched, nor copied."""
    model = nnx.merge(graphdef, params)
    k, width = prompt.shape
    small = KVCache.init(model.config, k, _round_up(width, 128), model.dtype)
    last, small = prefill(model, prompt, lens, small, opts)
    first = ar.first_token(last, small, keys, rows.sampling)
    new = initial_state(small, st.out.shape[1], keys, rows, st.lora, first)
    slots = jnp.arange(width)[None, :]
    cache = dataclasses.replace(
        st.cache, lengths=st.cache.lengths.at[idx].set(lens),
        k=tuple(big.at[idx[:, None], slots].set(s[:, :width]) for big, s in zip(st.cache.k, small.k)),
        v=tuple(big.at[idx[:, None], slots].set(s[:, :width]) for big, s in zip(st.cache.v, small.v)))
    fields = {f: jax.tree.map(lambda a, b: _set_rows(a, b, idx), getattr(st, f), getattr(new, f)) for f in ROW_FIELDS}
    return dataclasses.replace(st, cache=cache, total_passes=st.total_passes + 1, **fields)


@functools.partial(jax.jit, static_argnums=(0, 2, 3), donate_argnums=(4,))
def _segment_fn(graphdef, params, step_fn, opts: Options, st: State, max_steps) -> State:
    """Steps until a row that was running finishes, all are done, or `max_steps` (traced) steps ran."""
    model = nnx.merge(graphdef, params)
    done0 = st.done

    def cond(c):
        s, i = c
        return ~jnp.all(s.done) & ~jnp.any(s.done & ~done0) & (i < max_steps)

    st, _ = jax.lax.while_loop(cond, lambda c: (step_fn(model, c[0], opts), c[1] + 1), (st, jnp.int32(0)))
    return st


@jax.jit
def _stop_rows(st: State, stop) -> State:
    return dataclasses.replace(st, done=st.done | stop)


class Pool:
    """`slots` decode rows of one program (mode, block, policy, drafter): rows of different requests run in
    one on-device loop, each with its own RowSettings, prompt length and progress. A finished or cancelled
    row's slot takes the next request by a prefill of the new rows alone."""

    def __init__(self, gen: Generator, opts: Options, lora, slots: int, capacity: int, out_len: int):
        self.gen, self.opts, self.lora, self.n = gen, opts, lora, slots
        if gen.mesh is not None and slots % gen.mesh.shape["data"]:
            raise ValueError(f"{slots} slots must divide over the mesh's {gen.mesh.shape['data']} data rows")
        self.capacity, self.out_len = capacity, out_len
        self.step_fn = MODES[opts.mode].step
        self.st: State | None = None
        self.owner: list[object | None] = [None] * slots  # whatever the caller keeps per slot
        self.started = [0.0] * slots

    def free(self) -> list[int]:
        return [i for i, o in enumerate(self.owner) if o is None]

    def busy(self) -> bool:
        return any(o is not None for o in self.owner)

    def _initial(self) -> State:
        """An all-done state of `slots` rows (one-token prompts), so every admission is a row refill."""
        g, n = self.gen, self.n
        prompt, lens, keys = g.prompt_rows([[0]] * n, 16, [0] * n)
        rows = g.place_rows(RowSettings.make([1] * n, [0.0] * n, [None] * n, [None] * n, [()] * n, [0.0] * n,
                                             [self.opts.block] * n))[0]
        with jax.default_matmul_precision(g._precision):
            st = _prefill_fn(g._graphdef, g._params, prompt, lens, keys, rows, self.lora, self.capacity,
                             self.out_len, self.opts, g.cache_sharding(n))
        return dataclasses.replace(st, done=jnp.ones_like(st.done))

    def admit(self, items: dict[int, tuple[object, list[int], int, RowPlan]]) -> None:
        """items: slot -> (owner, prompt ids, seed, plan). The prompts are prefilled together, padded to a
        power-of-two count and width (a handful of shapes)."""
        if not items:
            return
        g = self.gen
        if self.st is None:
            self.st = self._initial()
        now = time.perf_counter()
        slots = sorted(items)
        for i in slots:
            self.owner[i], self.started[i] = items[i][0], now
        count = min(_bucket(len(slots), 1), self.n)
        if g.mesh is not None:  # rows split over "data": a whole number of rows per device
            count = min(_round_up(count, g.mesh.shape["data"]), self.n)
        pad = slots + [slots[0]] * (count - len(slots))  # repeats rewrite the same row with the same values
        ids = [items[i][1] for i in pad]
        prompt, lens, keys = g.prompt_rows(ids, _bucket(max(map(len, ids))), [items[i][2] for i in pad])
        rows = row_settings([items[i][3] for i in pad])
        with jax.default_matmul_precision(g._precision):
            self.st = _admit_fn(g._graphdef, g._params, self.st, jnp.asarray(pad, jnp.int32), prompt, lens, keys,
                                rows, self.opts)

    def run(self, max_steps: int = 1 << 30) -> State:
        """Advances until some row finishes (or max_steps); returns the rows' state on the host."""
        g = self.gen
        with jax.default_matmul_precision(g._precision):
            self.st = _segment_fn(g._graphdef, g._params, self.step_fn, self.opts, self.st, jnp.int32(max_steps))
        return host_rows(self.st)

    def release(self, slots: Sequence[int]) -> None:
        """Frees slots now (a cancelled or finished request): their rows stop at once."""
        if not slots:
            return
        stop = np.zeros(self.n, bool)
        stop[list(slots)] = True
        for i in slots:
            self.owner[i] = None
        self.st = _stop_rows(self.st, self.gen.place_rows(jnp.asarray(stop))[0])


class QueueFull(RuntimeError):
    """The engine's queue is full: try again later (a server answers 429 / "busy")."""


class Cancelled(RuntimeError):
    """The request was cancelled before it finished."""


@dataclasses.dataclass
class Request:
    """One generation request. `prompt`: a string (the model's tokenizer) or token ids. `options`: the mode's
    options (diffusion: block_size, policy, threshold, steps; linear_spec: block_size, threshold)."""

    prompt: str | Sequence[int]
    mode: str = "ar"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_token_ids: Sequence[int] | None = None  # None: the model's EOS
    options: dict = dataclasses.field(default_factory=dict)
    id: object = None  # the caller's name for it (default: a counter)


_DONE = object()


class Handle:
    """A submitted request: stream its tokens, wait for its result, or cancel it."""

    def __init__(self, request: Request):
        self.request = request
        self.id = request.id
        self._items: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None  # seconds from submit to the first streamed tokens

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def stream(self) -> Iterator[list[int] | Result]:
        """New token ids as they are committed, then the final Result. Raises the request's error (a bad
        request) or Cancelled."""
        while True:
            item = self._items.get()
            if item is _DONE:
                break
            yield item
        if self.error is not None:
            raise self.error
        yield self.result

    def wait(self) -> Result:
        for item in self.stream():
            if isinstance(item, Result):
                return item
        raise RuntimeError("stream ended without a result")  # pragma: no cover


class Engine:
    """Owns a loaded Generator and serves Requests from a bounded queue on a worker thread."""

    def __init__(self, generator: Generator, max_queue: int = 64):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.gen = generator
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.active: Handle | None = None
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0,
                      "busy_seconds": 0.0, "per_mode": {}}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nemodiff-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request) -> Handle:
        """Queues a request; raises QueueFull when the queue is full (nothing is queued then)."""
        if request.id is None:
            request = dataclasses.replace(request, id=next(self._ids))
        handle = Handle(request)
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"the engine's queue is full ({self._queue.maxsize} requests waiting)") from None
        with self._lock:
            self.stats["requests"] += 1
        return handle

    def generate(self, request: Request) -> Result:
        """Submits and waits (the engine must be started)."""
        return self.submit(request).wait()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def slots(self) -> int:
        return 1

    @property
    def slots_in_use(self) -> int:
        return int(self.active is not None)

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                handle = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            self._serve(handle)

    def _serve(self, h: Handle) -> None:
        r = h.request
        self.active = h
        t0 = time.perf_counter()
        try:
            if h.cancelled:
                raise Cancelled(f"request {h.id!r} was cancelled")
            for item in self.gen.stream(r.prompt, mode=r.mode, max_new_tokens=r.max_new_tokens,
                                        temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed,
                                        stop_token_ids=r.stop_token_ids, **r.options):
                if h.cancelled:
                    raise Cancelled(f"request {h.id!r} was cancelled")
                if isinstance(item, Result):
                    h.result = item
                else:
                    if h.first_token_s is None:
                        h.first_token_s = time.perf_counter() - h.submitted
                    h._items.put(item)
            self._count(r.mode, "finished", h.result)
        except Cancelled as e:
            h.error = e
            self._count(r.mode, "cancelled")
        except Exception as e:  # noqa: BLE001 - a bad request fails alone; the engine keeps serving
            h.error = e
            self._count(r.mode, "failed")
        finally:
            with self._lock:
                self.stats["busy_seconds"] += time.perf_counter() - t0
            self.active = None
            h._items.put(_DONE)

    def _count(self, mode: str, outcome: str, result: Result | None = None) -> None:
        with self._lock:
            self.stats[outcome] += 1
            if result is None:
                return
            m = self.stats["per_mode"].setdefault(mode, {"finished": 0, "tokens": 0, "rounds": 0, "accepted": 0})
            self.stats["tokens"] += len(result.tokens)
            m["finished"] += 1
            m["tokens"] += len(result.tokens)
            if "rounds" in result.stats:  # linear_spec: acceptance = accepted / rounds
                m["rounds"] += result.stats["rounds"]
                m["accepted"] += result.stats["mean_accepted_per_round"] * result.stats["rounds"]
