"""The serving engine (nemodiff_jax/engine.py) on the embedded model, float32 (CPU).

- mixed-mode requests in shared slots give exactly the offline `generate` tokens, and a request's streamed
  chunks concatenate to its result;
- request values (temperature, top-k, top-p, seed, stop ids, threshold, budget) are traced: once a program is
  compiled, new values compile nothing (jit cache sizes counted);
- a segment length does not change any row's tokens (1 step per segment is the Python-loop twin of the
  on-device segment loop);
- cancellation frees the slot at once, a full queue says so, a bad request fails alone.
"""

import pytest

import nemodiff_jax
from nemodiff_jax import slots as eng
from nemodiff_jax.embedded import DEMO_PROMPTS, default_model
from nemodiff_jax.engine import Cancelled, Engine, QueueFull, Request
from nemodiff_jax.generate import MODES

MIXED = [("ar", 12, {}), ("linear_spec", 14, {}), ("diffusion", 10, {"threshold": 0.9})]


@pytest.fixture(scope="module")
def gen():
    return nemodiff_jax.load(default_model(), dtype="float32", progress=False)


def small_engine(gen, **kw):
    return Engine(gen, **{"slots": 2, "max_queue": 32, "max_prompt_tokens": 48, "max_new_tokens": 16, **kw})


def collect(handle):
    chunks, result = [], None
    for item in handle.stream():
        if isinstance(item, list):
            chunks += item
        else:
            result = item
    return chunks, result


def test_mixed_modes_in_shared_slots_equal_offline_generate(gen):
    reqs = [Request(p, mode=m, max_new_tokens=n, options=o, seed=i)
            for i, p in enumerate(DEMO_PROMPTS[:3]) for m, n, o in MIXED]
    with small_engine(gen) as e:  # 2 slots per pool: rows come and go while others run
        handles = [e.submit(r) for r in reqs]
        got = [collect(h) for h in handles]
        assert e.stats["finished"] == len(reqs) and e.slots_in_use == 0
        assert set(p.opts.mode for p in e.pools.values()) == {"ar", "linear_spec", "diffusion"}
    for r, (chunks, res) in zip(reqs, got):
        want = gen.generate([r.prompt], mode=r.mode, max_new_tokens=r.max_new_tokens, seed=r.seed, **r.options)[0]
        assert res.tokens == want.tokens and res.text == want.text, (r.mode, r.prompt)
        assert chunks == res.tokens
        assert res.stats["mode"] == r.mode and res.stats["generated_tokens"] == len(res.tokens)


def test_new_values_never_compile(gen):
    """After one request per program, requests with other temperatures, top-k/top-p, seeds, stop ids,
    thresholds and budgets reuse the compiled admission and segment programs."""
    base = [Request("HAMLET:", mode=m, max_new_tokens=8, options=dict(o)) for m, _, o in MIXED]
    varied = [Request("ROMEO:", mode="ar", max_new_tokens=5, temperature=0.7, top_k=20, top_p=0.9, seed=11),
              Request("KING:", mode="ar", max_new_tokens=7, temperature=1.3, stop_token_ids=[5, 9, 11]),
              Request("HAMLET: To", mode="linear_spec", max_new_tokens=9, options={"threshold": 0.5},
                      temperature=0.5),
              Request("LEAR:", mode="diffusion", max_new_tokens=6, options={"threshold": 0.3, "steps": 4},
                      temperature=0.9, top_p=0.8, seed=4)]
    with small_engine(gen) as e:
        for r in base:
            e.generate(r)
        sizes = eng.compiled_programs()
        for r in varied:
            res = e.generate(r)
            assert 1 <= len(res.tokens) <= r.max_new_tokens
        assert eng.compiled_programs() == sizes
        assert len(e.pools) == 3  # one per program, whatever the values


def test_segment_length_does_not_change_tokens(gen):
    """One step per segment (a host round-trip every step: the Python-loop twin of the segment's on-device
    while loop) gives the same tokens as long segments, sampled rows included."""
    reqs = [Request(p, mode=m, max_new_tokens=n, options=o, temperature=0.8, seed=7)
            for p in DEMO_PROMPTS[:2] for m, n, o in MIXED]
    results = []
    for steps in (1, 64):
        with small_engine(gen, segment_steps=steps) as e:
            results.append([e.submit(r) for r in reqs])
            results[-1] = [h.wait().tokens for h in results[-1]]
    assert results[0] == results[1]


def test_cancel_frees_the_slot_and_serving_goes_on(gen):
    with small_engine(gen, slots=1, max_new_tokens=16, segment_steps=1) as e:  # 16 segments for 16 tokens
        long = e.submit(Request("ROMEO:", mode="ar", max_new_tokens=16))
        stream = long.stream()
        first = next(stream)
        assert isinstance(first, list) and first
        long.cancel()
        with pytest.raises(Cancelled):
            list(stream)
        res = e.generate(Request("HAMLET:", mode="ar", max_new_tokens=4))  # the one slot is free again
        assert len(res.tokens) == 4
        assert e.stats["cancelled"] == 1 and e.stats["finished"] == 1


def test_full_queue_and_bad_requests(gen):
    e = small_engine(gen, max_queue=2)  # not started: nothing drains the queue
    e.submit(Request("a", max_new_tokens=4))
    e.submit(Request("b", max_new_tokens=4))
    with pytest.raises(QueueFull, match="queue is full"):
        e.submit(Request("c", max_new_tokens=4))
    with small_engine(gen) as e:
        bad = [(Request("x", mode="bogus", max_new_tokens=4), "unknown mode"),
               (Request("x", max_new_tokens=17), "max_new_tokens 17 exceeds"),
               (Request([5] * 50, max_new_tokens=4), "prompt: 50 tokens exceed"),
               (Request("x", mode="ar", max_new_tokens=4, options={"threshold": 0.5}), "unknown option"),
               (Request("x", mode="diffusion", max_new_tokens=4, options={"threshold": 2}), "threshold"),
               (Request("x", max_new_tokens=4, temperature=-1), "temperature"),
               (Request("x", max_new_tokens=4, seed=-1), "seed"),
               (Request("", max_new_tokens=4), "empty"),
               (Request("x", max_new_tokens=4, stop_token_ids=list(range(17))), "at most 16"),
               (Request("x", max_new_tokens=4, stop_token_ids=[2 ** 40]), "stop_token_ids")]
        for r, msg in bad:
            with pytest.raises(ValueError, match=msg):
                e.generate(r)
        assert len(e.generate(Request("HAMLET:", max_new_tokens=3)).tokens) == 3
        assert e.stats["failed"] == len(bad)


def test_queue_bound_counts_requests_waiting_for_a_slot(gen):
    """max_queue bounds the requests not yet in a slot; a running one does not count."""
    with small_engine(gen, slots=1, max_queue=1, max_new_tokens=16, segment_steps=1) as e:
        running = e.submit(Request("ROMEO:", mode="ar", max_new_tokens=16))
        stream = running.stream()
        next(stream)  # it holds the only slot now
        waiting = e.submit(Request("HAMLET:", mode="ar", max_new_tokens=4))
        with pytest.raises(QueueFull):
            e.submit(Request("KING:", mode="ar", max_new_tokens=4))
        running.cancel()
        assert len(waiting.wait().tokens) == 4  # it got the slot the cancel freed
        assert running.partial is not None and running.partial.stats["mode"] == "ar"  # stats of what it had
        assert e.alive
    assert not e.alive


def test_many_stop_ids_and_stopping_leave_no_stream_hanging(gen):
    """Rows with 16 stop ids share a pool with rows of one; stopping the engine ends every open stream."""
    with small_engine(gen) as e:
        few = e.submit(Request("HAMLET:", max_new_tokens=6, stop_token_ids=[11]))
        v = gen.config.vocab_size
        many = e.submit(Request("HAMLET:", max_new_tokens=6, stop_token_ids=list(range(v - 16, v))))
        assert few.wait().tokens == many.wait().tokens  # none of those ids occurs here
    e = small_engine(gen, slots=1, max_new_tokens=16, segment_steps=1).start()
    running = e.submit(Request("ROMEO:", max_new_tokens=16))
    waiting = e.submit(Request("KING:", max_new_tokens=4))
    next(running.stream())
    e.stop()
    for h in (running, waiting):
        with pytest.raises(Cancelled):
            h.wait()
    with pytest.raises(RuntimeError, match="stopped"):
        e.submit(Request("x", max_new_tokens=4))


def test_warm_up_compiles_every_admission_shape(gen):
    """After warm_up, requests of any prompt length up to the limit, arriving alone or together, in every
    mode, compile nothing."""
    e = small_engine(gen, max_prompt_tokens=100)  # widths 64, 128; row counts 1, 2
    assert e.warm_up() == len(MODES) * 4  # one request per mode
    sizes = eng.compiled_programs()
    with e:
        for mode in MODES:
            for n in (1, 2):
                for length in (1, 63, 64, 65, 100):
                    hs = [e.submit(Request([5 + i] * length, mode=mode, max_new_tokens=3)) for i in range(n)]
                    assert all(len(h.wait().tokens) >= 1 for h in hs)
    assert eng.compiled_programs() == sizes
    with pytest.raises(RuntimeError, match="before start"), small_engine(gen) as started:
        started.warm_up()
