"""Latency of one small all-reduce over the "model" axis, as tensor-parallel decode issues them (2 per layer).

    python3 -P benchmarks/allreduce_latency.py --tp 2 --sizes 5120 163840

Times a chain of dependent psums (each feeds the next, so none can merge or overlap) inside one jit, with
XLA's default all-reduce and with the one-shot kernel option (xla_gpu_unsupported_use_all_reduce_one_shot_kernel:
peer-to-peer loads, no NVLink multicast), and checks that both give the same sums. The chain runs in a
fori_loop, whose per-iteration cost is part of each link: for the all-reduce kernel alone read the profile
(profile_forward.py). The first H200 run (docs/tp/h200_allreduce_latency.txt) labelled the default "nccl";
its own profile shows XLA's Triton one-shot kernel there.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nemodiff_jax.sharding import make_mesh

# XLA compiler option: small single-host all-reduces as XLA's one-shot kernel (peer-to-peer loads, no NVLink
# multicast). Measured on H200s: the default already emits that kernel, so this changes nothing there.
ONE_SHOT = {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True}


def chain(mesh, n: int, options: dict):
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(None, "model"), out_specs=P(None, "model"),
                       check_vma=False)
    def body(x):
        def step(_, y):  # the reduced value, scaled so it stays finite, feeds the next all-reduce
            return jax.lax.psum(y, "model") * jnp.asarray(1.0 / mesh.shape["model"], y.dtype)
        return jax.lax.fori_loop(0, n, step, x[:, 0])[:, None]

    return jax.jit(body, compiler_options=options or None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[5120, 32 * 5120])
    p.add_argument("--n", type=int, default=400)
    a = p.parse_args()
    mesh = make_mesh(1, a.tp)
    rows = []
    for size in a.sizes:
        x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((size, a.tp)), jnp.bfloat16),
                           jax.NamedSharding(mesh, P(None, "model")))
        outs = {}
        for name, opts in (("default", {}), ("one-shot", ONE_SHOT)):
            f = chain(mesh, a.n, opts)
            outs[name] = np.asarray(jax.block_until_ready(f(x)), np.float32)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(f(x))
                best = min(best, time.perf_counter() - t0)
            rows.append((size, name, 1e6 * best / a.n))
        same = np.array_equal(outs["default"], outs["one-shot"])
        print(f"size {size}: one-shot result {'identical to' if same else 'DIFFERS from'} the default")
    print(f"\n{a.tp} devices: {jax.devices()[0].device_kind}")
    print("| elements (bf16) | all-reduce | us each |\n| --- | --- | --- |")
    for size, name, us in rows:
        print(f"| {size} | {name} | {us:.2f} |")


if __name__ == "__main__":
    main()
