"""The serving engine: one loaded model, requests that arrive and leave at any time, each with its own mode,
sampling, budget, stop ids and mode options; per-request streaming of committed tokens; cancellation; a
bounded queue that says "busy" when full.

    engine = Engine(nemodiff_jax.load(path), max_queue=64).start()
    handle = engine.submit(Request(prompt="HAMLET:", mode="linear_spec", max_new_tokens=64))
    for item in handle.stream():   # lists of new token ids, then the final generate.Result
        ...
    handle.cancel()                # frees the request's place at once
    engine.stop()

Design: one pool of decode slots per program (mode, block size, policy; slots.Pool), because the modes'
steps are different programs (a 1-token causal step against 32-token denoise/draft/verify passes): one pool
for all would run AR rows through 32-token chunks. Every other request value (temperature, top-k, top-p,
seed, budget, stop ids, threshold, steps) is a traced per-row array (decoding.common.RowSettings), so a new
value never compiles. Pools take turns a segment each; a mixed load therefore costs about what its
single-mode parts cost run one after another, with each pool's rows batched.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from nemodiff_jax.config import VisionConfig
from nemodiff_jax.decoding.common import Options, State
from nemodiff_jax.generate import DRAFTING_MODES, MODES, Generator, Result
from nemodiff_jax.image_processing import ProcessedImage
from nemodiff_jax.multimodal import Prompt, block_ids
from nemodiff_jax.slots import Pool, RowPlan, buffer_sizes, chunk_width, round_up, row_tokens


def _smallest_image(vcfg: VisionConfig) -> ProcessedImage:
    """A blank image of one merged patch (one image token): what warm_up admits."""
    unit = vcfg.patch_size * vcfg.spatial_merge_size
    return ProcessedImage(np.zeros((vcfg.num_channels, unit, unit), np.float32), (unit, unit), vcfg.patch_size,
                          vcfg.spatial_merge_size)


class QueueFull(RuntimeError):
    """The engine's queue is full: try again later (a server answers 429 / "busy")."""


class Cancelled(RuntimeError):
    """The request was cancelled before it finished."""


@dataclasses.dataclass
class Request:
    """One generation request. `prompt`: a string (the model's tokenizer), token ids, or anything else
    Generator.prepare takes (a {"text", "images"} dict, a {"messages"} chat, a multimodal.Prompt: images for a
    VLM). `options`: the mode's options (diffusion: block_size, policy, threshold, steps; linear_spec:
    block_size, threshold)."""

    prompt: str | Sequence[int] | dict | Prompt
    mode: str = "ar"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_token_ids: Sequence[int] | None = None  # None: the model's EOS
    options: dict = dataclasses.field(default_factory=dict)
    max_thinking_tokens: int | None = None  # the thinking budget: </think> forced at this output position
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
        self.partial: Result | None = None  # a cancelled request: what it had committed, with its stats
        self.finished = False  # set once, by the engine, when its stream ends
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
    """Owns a loaded Generator and serves Requests from a bounded queue on a worker thread: continuous
    batching over pools of decode slots, one pool per program (mode, block, policy), each `slots` rows wide.
    Pools take turns, a segment each (at most `segment_steps` steps, or until a row finishes); after every
    segment each row's newly committed tokens go to its request's stream, finished or cancelled rows free
    their slots, and waiting requests are prefilled into them."""

    def __init__(self, generator: Generator, slots: int = 8, max_queue: int = 64, max_prompt_tokens: int = 1024,
                 max_new_tokens: int = 512, segment_steps: int = 16,
                 on_finish: Callable[[Handle], None] | None = None):
        for name, v in (("slots", slots), ("max_queue", max_queue), ("max_prompt_tokens", max_prompt_tokens),
                        ("max_new_tokens", max_new_tokens), ("segment_steps", segment_steps)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.gen = generator
        self.on_finish = on_finish  # called on the worker thread with each handle as it ends (any outcome)
        self.slots_per_pool, self.segment_steps, self.max_queue = slots, segment_steps, max_queue
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self._queue: queue.Queue = queue.Queue()  # bounded by submit: queued + waiting <= max_queue
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.pools: dict[Options, Pool] = {}
        self._waiting: dict[Options, list] = {}
        self._emitted: dict[tuple[Options, int], int] = {}
        self._host: dict[Options, State] = {}  # each pool's rows after its last segment (host copy)
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0,
                      "busy_seconds": 0.0, "per_mode": {}}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        if self._thread is not None and self._stopping.is_set():
            raise RuntimeError("the engine is still stopping (its worker has not finished its segment)")
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="nemodiff-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():  # kept while it runs: a later start() must not add a second worker
                self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def warm_up(self, requests: Sequence[Request] | None = None) -> int:
        """Compiles, before start(), the programs the given requests' pools run (default: one request per
        mode with its default options; a request with another block size or policy compiles its own program
        when it first comes) at every admission shape (Pool.admission_shapes: row counts x prompt widths up to
        max_prompt_tokens), so no client of those programs waits for a compile. Returns the admissions run.

        On a VLM also the image path of those programs for one image request at every prompt width, its images
        in the smallest patch bucket (slots.patch_bucket: up to 64 patches, 16 image tokens at a 2 x 2 merge):
        the tower encoder at that bucket and the image admission program. Larger images, and image requests
        admitted together, compile their bucket or row count when they first come."""
        if self._thread is not None:
            raise RuntimeError("warm_up runs before start()")
        if requests is None:
            requests = [Request(prompt=[0], mode=m, max_new_tokens=1) for m in sorted(MODES)]
        vcfg = self.gen.config.vision
        runs = 0
        for r in requests:
            _, plan = self.plan(dataclasses.replace(r, max_new_tokens=1))
            pool = self._pool(plan.opts)
            shapes = pool.admission_shapes(self.max_prompt_tokens)
            prompts = [(count, [0] * min(width, self.max_prompt_tokens)) for count, width in shapes]
            if vcfg is not None:  # the fewest rows (one request, or one per data device) with the smallest image
                image = _smallest_image(vcfg)
                block = block_ids(image, vcfg)
                prompts += [(count, Prompt(block + [0] * (min(width, self.max_prompt_tokens) - len(block)),
                                           (image,))) for count, width in shapes if count == shapes[0][0]]
            for count, prompt in prompts:
                pool.admit({i: (True, prompt, 0, plan) for i in range(count)})
                pool.run(until_all=True)
                pool.release(range(count))
                runs += 1
        return runs

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request) -> Handle:
        """Queues a request; raises QueueFull when the queue is full (nothing is queued then). A bad request
        fails its own stream (ValueError naming the field); the engine keeps serving."""
        if request.id is None:
            request = dataclasses.replace(request, id=next(self._ids))
        handle = Handle(request)
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the engine has stopped")
            if self.queue_depth >= self.max_queue:
                raise QueueFull(f"the engine's queue is full ({self.max_queue} requests waiting for a slot)")
            self._queue.put_nowait(handle)
            self.stats["requests"] += 1
        return handle

    def generate(self, request: Request) -> Result:
        """Submits and waits (the engine must be started)."""
        return self.submit(request).wait()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot (queued or assigned to a pool)."""
        return self._queue.qsize() + sum(len(w) for w in list(self._waiting.values()))

    @property
    def alive(self) -> bool:
        """The worker thread runs (a server's health check)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def slots(self) -> int:
        return sum(p.n for p in list(self.pools.values()))

    @property
    def slots_in_use(self) -> int:
        return sum(p.n - len(p.free()) for p in list(self.pools.values()))

    def plan(self, r: Request) -> tuple[list[int] | Prompt, RowPlan]:
        """The request's prompt (ids; a multimodal.Prompt when it has images) and validated settings, within
        the engine's limits. Images that are not preprocessed yet stay deferred (multimodal.ImageRef): their
        pixels are made when the request is admitted."""
        prompt = self.gen.prepare([r.prompt], deferred=True, names=[f"request {r.id!r}"])[0]
        ids = prompt.ids
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"prompt: {len(ids)} tokens{prompt.describe_images()} exceed the engine's "
                             f"max_prompt_tokens {self.max_prompt_tokens}")
        if isinstance(r.max_new_tokens, int) and r.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens {r.max_new_tokens} exceeds the engine's limit {self.max_new_tokens}")
        if not isinstance(r.seed, int) or isinstance(r.seed, bool) or not 0 <= r.seed < 2 ** 32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {r.seed!r}")
        plan = self.gen.check_request(r.mode, r.max_new_tokens, len(ids), r.temperature, r.top_k, r.top_p,
                                      r.stop_token_ids, None, dict(r.options), r.max_thinking_tokens)
        return (prompt if prompt.images else ids), self.gen.prompt_plan(plan, ids)

    # ------------------------------------------------------------------ the worker

    def _pool(self, opts: Options) -> Pool:
        if opts not in self.pools:
            capacity, out_len = buffer_sizes(self.max_prompt_tokens, self.max_new_tokens, chunk_width(opts))
            lora = self.gen.drafter if opts.mode in DRAFTING_MODES else None
            rt = self.gen.runtime
            self.pools[opts] = Pool(rt, opts, lora, round_up(self.slots_per_pool, rt.data_rows), capacity, out_len)
            self._waiting.setdefault(opts, [])
        return self.pools[opts]

    def _intake(self, block: bool) -> None:
        """Moves queued requests to their pool's waiting list; a bad one fails at once."""
        while True:
            try:
                h = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
            except queue.Empty:
                return
            block = False
            try:
                ids, plan = self.plan(h.request)
                self._pool(plan.opts)
                self._waiting[plan.opts].append((h, ids, plan))
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._finish(h, error=e)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                busy = any(p.busy() for p in self.pools.values()) or any(self._waiting.values())
                self._intake(block=not busy)
                for opts, pool in list(self.pools.items()):
                    try:
                        self._turn(opts, pool)
                    except Exception as e:  # noqa: BLE001 - a failing program fails its requests, not the engine
                        for h in [h for h in pool.owner if h is not None] + [w[0] for w in self._waiting.pop(opts, [])]:
                            self._finish(h, error=e)
                        self.pools.pop(opts)
                        self._host.pop(opts, None)
        finally:  # stopped, or the thread itself dies: no stream is left hanging
            with self._lock:
                self._stopping.set()  # submit refuses from now on
            self._shut_down()

    def _shut_down(self) -> None:
        """The engine stopped: every request not finished ends with Cancelled (no stream is left hanging)."""
        stopped = Cancelled("the engine stopped")
        handles = [h for p in self.pools.values() for h in p.owner if h is not None]
        handles += [w[0] for ws in self._waiting.values() for w in ws]
        while True:
            try:
                handles.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for h in handles:
            self._finish(h, error=stopped)
        self.pools.clear()
        self._waiting.clear()

    def _turn(self, opts: Options, pool: Pool) -> None:
        gone = [i for i, h in enumerate(pool.owner) if h is not None and h.cancelled]
        for i in gone:
            h, host = pool.owner[i], self._host.get(opts)
            if host is not None:  # what it had committed by the last segment, for its stats
                h.partial = self.gen.row_result(host, opts, i, time.perf_counter() - pool.started[i])
            self._finish(h, error=Cancelled(f"request {h.id!r} was cancelled"))
        pool.release(gone)
        waiting = self._waiting[opts]
        for h in [w[0] for w in waiting if w[0].cancelled]:
            self._finish(h, error=Cancelled(f"request {h.id!r} was cancelled"))
        waiting[:] = [w for w in waiting if not w[0].cancelled]
        free = pool.free()
        admit = {}
        while waiting and free:
            h, prompt, plan = waiting.pop(0)
            if isinstance(prompt, Prompt):
                try:  # the pixels of deferred images: a file that went bad fails its request alone
                    prompt = prompt.materialized()
                except Exception as e:  # noqa: BLE001
                    self._finish(h, error=e)
                    continue
            i = free.pop(0)
            admit[i] = (h, prompt, h.request.seed, plan)
            self._emitted[(opts, i)] = 0
        pool.admit(admit)
        if not pool.busy():
            return
        t0 = time.perf_counter()
        host = self._host[opts] = pool.run(self.segment_steps)
        now = time.perf_counter()
        with self._lock:
            self.stats["busy_seconds"] += now - t0
        finished = []
        for i, h in enumerate(pool.owner):
            if h is None:
                continue
            toks = row_tokens(host, i)
            new = toks[self._emitted[(opts, i)]:]
            if new:
                if h.first_token_s is None:
                    h.first_token_s = now - h.submitted
                h._items.put(new)
                self._emitted[(opts, i)] = len(toks)
            if bool(host.done[i]):
                self._finish(h, result=self.gen.row_result(host, opts, i, now - pool.started[i]))
                finished.append(i)
        pool.release(finished)

    def _finish(self, h: Handle, result: Result | None = None, error: BaseException | None = None) -> None:
        if h.finished:
            return
        h.finished = True
        h.result, h.error = result, error
        outcome = "finished" if error is None else "cancelled" if isinstance(error, Cancelled) else "failed"
        with self._lock:
            self.stats[outcome] += 1
            if result is not None:
                mode = h.request.mode
                m = self.stats["per_mode"].setdefault(mode, {"finished": 0, "tokens": 0, "rounds": 0, "accepted": 0})
                self.stats["tokens"] += len(result.tokens)
                m["finished"] += 1
                m["tokens"] += len(result.tokens)
                if "rounds" in result.stats:  # linear_spec: acceptance = accepted / rounds
                    m["rounds"] += result.stats["rounds"]
                    m["accepted"] += result.stats["mean_accepted_per_round"] * result.stats["rounds"]
        h._items.put(_DONE)
        if self.on_finish is not None:
            self.on_finish(h)
