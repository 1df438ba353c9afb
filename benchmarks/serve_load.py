"""Load generator for `nemodiff serve`: C concurrent streaming clients (asyncio + the official AsyncOpenAI client),
each sending R requests one after another, for each mode and each C. Prints per (mode, clients): time to first
token p50 / p99, tokens/s per client (p50 and mean) and in total, and the server's mean stats (tokens per forward,
linear_spec accepted per round, diffusion denoise steps per block) from the final chunks.

Start a server, then run the load against it (one warm-up request per mode first, off the clock):

    nemodiff serve --model DIR --port 8000 &
    python3 -P benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --clients 1 8 32 --max-tokens 128 \
        --out $OUT/serve_load.json

Time to first token is from sending the request to the first chunk with text; a client's tokens/s is its
completion tokens (usage of the final chunk) over its wall time; total is all tokens over the wall time of the
(mode, clients) run. `--ignore-eos` (default on) makes every request generate exactly --max-tokens tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time

from nemodiff_jax import embedded

PROMPTS = embedded.PROMPTS[:7] + embedded.PROMPTS[-1:]  # the eight this load has always sent


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no samples."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


async def one_request(client, model: str, prompt: str, args, mode: str) -> dict:
    extra = {"mode": mode, "ignore_eos": args.ignore_eos}
    t0 = time.perf_counter()
    ttft, tokens, stats = None, 0, {}
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                             temperature=args.temperature, stream=True, extra_body=extra)
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        extra_fields = getattr(chunk, "model_extra", None) or {}
        if "stats" in extra_fields:
            stats = extra_fields["stats"]
    return {"ttft_s": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0, "stats": stats}


async def one_client(client, model: str, k: int, args, mode: str) -> dict:
    t0 = time.perf_counter()
    reqs = []
    for r in range(args.requests_per_client):
        reqs.append(await one_request(client, model, PROMPTS[(k + r) % len(PROMPTS)], args, mode))
    wall = time.perf_counter() - t0
    toks = sum(q["tokens"] for q in reqs)
    return {"requests": reqs, "seconds": wall, "tokens": toks, "tokens_per_s": toks / wall if wall > 0 else math.nan}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else math.nan


async def run(args) -> list[dict]:
    import openai

    # the client's default connection pool (1000 connections) has room for every client
    client = openai.AsyncOpenAI(base_url=args.url, api_key=args.api_key or "none", timeout=args.timeout, max_retries=0)
    model = args.model or (await client.models.list()).data[0].id
    rows = []
    for mode in args.modes:
        for prompt in PROMPTS:  # warm-up: every prompt's shapes compiled, off the clock
            await one_request(client, model, prompt, args, mode)
        for c in args.clients:
            t0 = time.perf_counter()
            clients = await asyncio.gather(*(one_client(client, model, k, args, mode) for k in range(c)))
            wall = time.perf_counter() - t0
            reqs = [q for cl in clients for q in cl["requests"]]
            ttft = [q["ttft_s"] for q in reqs if q["ttft_s"] is not None]
            per_client = [cl["tokens_per_s"] for cl in clients]
            total = sum(cl["tokens"] for cl in clients)
            st = [q["stats"] for q in reqs]
            row = {"mode": mode, "clients": c, "requests": len(reqs), "tokens": total, "wall_s": wall,
                   "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                   "client_tok_s_p50": percentile(per_client, 50), "client_tok_s_mean": _mean(per_client),
                   "total_tok_s": total / wall if wall > 0 else math.nan,
                   "tokens_per_forward": _mean([s.get("tokens_per_forward") for s in st]),
                   "accepted_per_round": _mean([s.get("mean_accepted_per_round") for s in st]),
                   "steps_per_block": _mean([s.get("denoise_steps_per_block") for s in st])}
            rows.append(row)
            print(_fmt(row), flush=True)
    await client.close()
    return rows


HEADER = (f"{'mode':<12} {'clients':>7} {'reqs':>5} {'ttft p50':>9} {'ttft p99':>9} {'tok/s/client':>12} "
          f"{'(mean)':>8} {'total tok/s':>11} {'tok/fwd':>8} {'acc/round':>9} {'steps/blk':>9}")


def _fmt(r: dict) -> str:
    def f(x, w, d=2):
        return f"{'-':>{w}}" if math.isnan(x) else f"{x:>{w}.{d}f}"

    return (f"{r['mode']:<12} {r['clients']:>7} {r['requests']:>5} {f(r['ttft_p50_s'], 8, 3)}s "
            f"{f(r['ttft_p99_s'], 8, 3)}s {f(r['client_tok_s_p50'], 12, 1)} {f(r['client_tok_s_mean'], 8, 1)} "
            f"{f(r['total_tok_s'], 11, 1)} {f(r['tokens_per_forward'], 8)} {f(r['accepted_per_round'], 9)} "
            f"{f(r['steps_per_block'], 9)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base URL")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32], help="concurrent clients per run")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=["ar", "diffusion", "linear_spec"],
                   choices=["ar", "diffusion", "linear_spec"])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens per request (default on)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    print(f"{args.url}: clients {args.clients} x {args.requests_per_client} requests, max_tokens {args.max_tokens}, "
          f"modes {args.modes}", flush=True)
    print(HEADER, flush=True)
    rows = asyncio.run(run(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"url": args.url, "args": vars(args), "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
