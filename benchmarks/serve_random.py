"""`nemodiff serve` over random bf16 weights of a real NLD shape (default 8B) with the embedded tokenizer: the
server that benchmarks/serve_load.py measures when no real checkpoint is at hand (the HTTP stack, the engine
and the decode programs are the real ones; only the weights are random).

    python3 -P benchmarks/serve_random.py --size 8B --port 8000 --slots 32 --warmup &
"""

from __future__ import annotations

import argparse
import sys

from nemodiff_jax import bench, serve
from nemodiff_jax.embedded import ASSETS
from nemodiff_jax.generate import Generator
from nemodiff_jax.tokenizer import Tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8B")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--warmup", action="store_true")
    args = p.parse_args(argv)
    gen = Generator(bench.make_model(bench.size_config(args.size)), Tokenizer.from_dir(ASSETS))
    serve.run(gen, f"random-{args.size}", port=args.port, max_queue=4 * args.slots, log_level="warning",
              warmup=args.warmup, slots=args.slots, max_prompt_tokens=args.max_prompt_tokens,
              max_new_tokens=args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
