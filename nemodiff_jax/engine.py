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
import itertools
import queue
import threading
import time
from collections.abc import Iterator, Sequence

from nemodiff_jax.generate import Generator, Result


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
