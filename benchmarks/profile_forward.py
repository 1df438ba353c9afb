"""Per-kernel device time of n forwards (random weights), from a jax.profiler trace read back in-process.

    python3 -P benchmarks/profile_forward.py --size 14B --mesh 1 2 --t 1 --out $OUT/prof_tp2.txt --hlo-out $OUT/tp2.hlo.gz
    python3 -P benchmarks/profile_forward.py --size 8B --format int4 --out $OUT/prof_int4.txt

Prints the busiest GPU ops per device (total us per forward, count per forward) and the step time, so a
forward's time can be split into GEMV / attention / collectives / small kernels without external tools.
`--hlo-out` also saves the forward loop's optimized HLO, which names every fusion the kernel table lists.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import os
import re
import shutil
import sys
import tempfile

DUMP_DIR = None
if "--hlo-out" in sys.argv:  # XLA reads its flags once, when the backend starts: set the dump before jax loads
    DUMP_DIR = tempfile.mkdtemp(prefix="xla_dump_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR}"
                               " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*loop.*").strip()

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from nemodiff_jax import bench, quant  # noqa: E402
from nemodiff_jax.config import PRESETS  # noqa: E402
from nemodiff_jax.pallas_kernels.qlayout import rows  # noqa: E402
from nemodiff_jax.sharding import make_mesh  # noqa: E402


def _table(events, n_forwards: int, top: int, title: str) -> list[str]:
    per = collections.defaultdict(lambda: [0.0, 0])
    for name, dur in events:
        per[name][0] += dur / 1e3
        per[name][1] += 1
    total = sum(us for us, _ in per.values())
    out = [f"   -- {title}: {total / n_forwards:.0f} us/forward, {sum(c for _, c in per.values()) / n_forwards:.0f} events/forward"]
    for name, (us, cnt) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        out.append(f"   {us / n_forwards:9.1f} us  x{cnt / n_forwards:6.1f}  {name[:120]}")
    return out


def _kind(name: str) -> str:
    low = name.lower()
    for key, subs in (("collective", ("all-reduce", "all_reduce", "allreduce", "all-gather", "nccl", "collective",
                                      "reduce-scatter")),
                      ("qmatmul", ("qmatmul",)),  # the Pallas kernels' kernel_name
                      ("attention", ("chunk_attention", "attention", "flash", "cudnn")),
                      ("pallas", ("mosaic", "pallas")),
                      ("gemm", ("gemm", "gemv", "cublas", "cutlass", "xmma", "nvjet", "dot", "triton"))):
        if any(s in low for s in subs):
            return key
    return "other"


def _family(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def _gaps(kernels, n_forwards: int, top: int) -> list[str]:
    """Busy (union of kernel intervals) against wall time, and which kernels follow the idle gaps: a GPU that
    idles before the same op every layer waits for its launch or for a dependency on another stream/device."""
    kernels = sorted(kernels)
    if not kernels:
        return []
    wall = kernels[-1][1] - kernels[0][0]
    busy, end = 0, kernels[0][0]
    after = collections.defaultdict(lambda: [0.0, 0])
    for start, stop, name in kernels:
        if start > end:
            after[_family(name)][0] += (start - end) / 1e3
            after[_family(name)][1] += 1
        busy += max(0, stop - max(start, end))
        end = max(end, stop)
    out = [f"   busy {busy / 1e3 / n_forwards:.0f} us/forward of {wall / 1e3 / n_forwards:.0f} (first to last "
           f"kernel); idle gaps before:"]
    for name, (us, cnt) in sorted(after.items(), key=lambda kv: -kv[1][0])[:top]:
        out.append(f"   {us / n_forwards:9.1f} us  x{cnt / n_forwards:6.1f}  {name[:120]}")
    return out


def _host(plane, n_forwards: int, top: int) -> list[str]:
    """Host threads that did work during the traced loops (the launch side of each device)."""
    out = []
    for line in plane.lines:
        per = collections.defaultdict(float)
        for ev in line.events:
            per[_family(ev.name)] += ev.duration_ns / 1e3
        total = sum(per.values())
        if total / n_forwards < 50:
            continue
        out.append(f"   host thread {line.name[:60]}: {total / n_forwards:.0f} us/forward (nested events count twice)")
        for name, us in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"   {us / n_forwards:9.1f} us  {name[:110]}")
    return out


def summarize(xspace_path: str, n_forwards: int, top: int) -> str:
    data = jax.profiler.ProfileData.from_file(xspace_path)
    lines, host = [], []
    for plane in data.planes:
        if plane.name == "/host:CPU":
            host = _host(plane, n_forwards, 8)
            continue
        if not plane.name.startswith("/device:GPU"):
            continue
        ops, kernels, modules, spans = [], [], [], []
        for line in plane.lines:
            evs = [(ev.name, ev.duration_ns) for ev in line.events]
            if line.name == "XLA Ops":
                ops += evs
            elif line.name == "XLA Modules":
                modules += evs
            elif "stream" in line.name.lower():
                kernels += evs
                spans += [(ev.start_ns, ev.end_ns, ev.name) for ev in line.events]
        if not (ops or kernels):
            continue
        lines.append(f"== {plane.name}")
        if modules:
            lines.append("   modules: " + "; ".join(f"{n[:60]} {d / 1e3:.0f} us" for n, d in modules[-3:]))
        kinds = collections.defaultdict(float)
        for name, dur in kernels:
            kinds[_kind(name)] += dur / 1e3
        lines.append("   kernels by kind (us/forward): " + ", ".join(f"{k} {v / n_forwards:.0f}" for k, v in sorted(kinds.items())))
        lines += _gaps(spans, n_forwards, 6)
        if plane.name.endswith(":0") or plane.name.endswith("GPU:0"):
            lines += _table(ops, n_forwards, top, "XLA ops")
            lines += _table(kernels, n_forwards, top, "kernels")
            lines += _table([(_family(n), d) for n, d in kernels], n_forwards, top, "kernels, digits merged")
    return "\n".join(lines + host)


def untile_quantized(model) -> None:
    """Every tiled quantized weight back in rows (the inverse of model.tile_quantized), in place."""
    untile = jax.jit(lambda w: dataclasses.replace(w, q=rows(w.q), tiled=False))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        w = var.get_value()
        if isinstance(w, quant.QWeight) and w.tiled:
            var.set_value(untile(w))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="14B", choices=sorted(PRESETS))
    p.add_argument("--mesh", nargs=2, type=int, default=None)
    p.add_argument("--format", default="bf16", choices=["bf16", "int8", "int4"], help="weights (quantized on the device)")
    p.add_argument("--t", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--attn", default="auto")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    p.add_argument("--hlo-out", default=None, help="write the forward loop's optimized HLO text here (gzipped if "
                   "the name ends in .gz)")
    p.add_argument("--trace-out", default=None, help="save the trace (xplane.pb, gzipped) here")
    p.add_argument("--untiled", action="store_true", help="quantized weights in rows, not in the 128 x 128 tiles "
                   "the model holds them in on Hopper (model.tile_quantized): the layouts' A/B")
    a = p.parse_args()
    mesh = make_mesh(*a.mesh) if a.mesh else None
    cfg = PRESETS[a.size]
    model = bench.make_model(cfg, mesh, a.format)
    if a.untiled:
        untile_quantized(model)
    n, traced_loops = 16, 3
    impl = bench.resolve_attn(a.attn, cfg, mesh)
    dt = bench.bench_forward(model, cfg, a.batch, a.context, a.t, True, attn_impl=impl, n=n, mesh=mesh)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):  # the same compiled loop (bench caches it): 1 warmup + 2 timed loops
            bench.bench_forward(model, cfg, a.batch, a.context, a.t, True, attn_impl=impl, n=n,
                                warmup=1, iters=traced_loops - 1, mesh=mesh)
        path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        if a.trace_out:
            with open(path, "rb") as src, gzip.open(a.trace_out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        layout = " untiled" if a.untiled else ""
        text = (f"{a.size} {a.format}{layout} mesh={a.mesh} T={a.t} B={a.batch} ctx={a.context} attn={a.attn}: "
                f"{1e3 * dt:.2f} ms/forward (untraced)\n" + summarize(path, traced_loops * n, a.top))
    print(text)
    if a.hlo_out:
        dumps = glob.glob(os.path.join(DUMP_DIR, "*loop*after_optimizations.txt"))
        if not dumps:
            raise SystemExit(f"no optimized HLO of the forward loop in {DUMP_DIR}")
        opener = gzip.open if a.hlo_out.endswith(".gz") else open  # the 8B loop's text is > 16 MiB
        with open(max(dumps, key=os.path.getsize), "rb") as src, opener(a.hlo_out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
