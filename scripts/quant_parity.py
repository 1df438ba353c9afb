"""Error of the weight-only formats (nemodiff_jax/quant.py) on the committed parity fixtures (tests/fixtures/parity).

    python scripts/quant_parity.py --out docs/embedded/quant_parity.json

Each fixture is a small random-weight model (hidden 24 or 32) with the HF reference's inputs
(`reference.npz["input_ids"]`). It is loaded in float32 and quantized through the real path: the model's
QWeight matmuls (quant.matmul, the XLA reference on a CPU), the head in model.HEAD_FORMAT (int8) as load() does.
int8 comes from `load(dir, dtype="float32", quantize="int8")`. int4 with the default group of 128 cannot
hold these weights (no contraction of 24..64 inputs divides by 128: check_quantizable's error is recorded);
int4 is measured with the largest group of 128, 64, 32, 16, 8 that divides every matmul's inputs, and with
groups of 8 on every fixture, the same group everywhere. Against the float32 model with 16-bit weights:
- per-tensor relative weight error ||W - dequantize(Q)|| / ||W|| (mean and max over the layers);
- logit error, causal and bidirectional: relative L2 ||dL|| / ||L||, and mean |dL| over std(L);
- top-1 agreement of the logits (share of positions whose argmax is the same), causal and bidirectional;
- greedy AR agreement: `--new-tokens` tokens after each fixture input (no stop tokens), the share of rows
  that are identical and the mean position of the first difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from flax import nnx

import nemodiff_jax
from nemodiff_jax import quant
from nemodiff_jax.generate import Generator
from nemodiff_jax.model import HEAD_FORMAT, QUANTIZABLE

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "parity"
GROUPS = (128, 64, 32, 16, 8)


def cases() -> list[Path]:
    return sorted(p for p in FIXTURES.iterdir() if (p / "reference.npz").exists())


def matmul_weights(gen: Generator) -> dict:
    """{path: float32 weight} for every QUANTIZABLE param."""
    flat = nnx.to_flat_state(nnx.state(gen.model, nnx.Param))
    return {"/".join(map(str, p)): v.get_value() for p, v in flat if p[-1] in QUANTIZABLE}


def largest_group(weights: dict) -> int | None:
    """The largest of GROUPS that divides every matmul's contracted inputs, or None."""
    ks = [math.prod(w.shape[:QUANTIZABLE[p.split("/")[-1]]]) for p, w in weights.items()
          if p.split("/")[-1] != "diffusion_head"]
    return next((g for g in GROUPS if all(k % g == 0 for k in ks)), None)


def quantized(master: Generator, fmt: str, group: int = quant.DEFAULT_GROUP) -> Generator:
    """`master` (float32) with its matmul weights as QWeight: `fmt` with `group`, the head in HEAD_FORMAT;
    raises check_quantizable's ValueError where a weight cannot be held."""
    graphdef, state = nnx.split(nnx.clone(master.model))
    for path, var in nnx.to_flat_state(state):
        name = path[-1]
        if name in QUANTIZABLE:
            f = HEAD_FORMAT if name == "diffusion_head" else fmt
            var.set_value(quant.quantize(var.get_value(), f, QUANTIZABLE[name], group,
                                         name="/".join(map(str, path))))
    return Generator(nnx.merge(graphdef, state), master.tokenizer)


def tensor_errors(gen: Generator, master_weights: dict) -> dict:
    by_kind: dict = {}
    flat = nnx.to_flat_state(nnx.state(gen.model, nnx.Param))
    for p, v in flat:
        qw = v.get_value()
        if not isinstance(qw, quant.QWeight):
            continue
        key = "/".join(map(str, p))
        w = np.asarray(master_weights[key], np.float64)
        deq = np.asarray(quant.dequantize(qw, np.float32), np.float64)
        by_kind.setdefault(p[-1], []).append(float(np.linalg.norm(w - deq) / np.linalg.norm(w)))
    return {k: {"mean": float(np.mean(v)), "max": float(np.max(v))} for k, v in by_kind.items()}


def logit_errors(got: np.ndarray, want: np.ndarray) -> dict:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    d = got - want
    return {"rel_l2": float(np.linalg.norm(d) / np.linalg.norm(want)),
            "mean_abs_over_std": float(np.abs(d).mean() / want.std()),
            "max_abs_over_std": float(np.abs(d).max() / want.std()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}


def greedy(gen: Generator, ids: np.ndarray, n: int) -> list[list[int]]:
    return [r.tokens for r in gen.generate([list(map(int, row)) for row in ids], mode="ar", max_new_tokens=n,
                                           stop_token_ids=[])]


def measure(gen: Generator, master_weights: dict, ids: np.ndarray, base: dict, n: int) -> dict:
    row = {"tensor_rel_error": tensor_errors(gen, master_weights)}
    for causal in (True, False):
        row["causal" if causal else "bidir"] = logit_errors(gen.logits(ids, causal=causal), base[causal])
    toks = greedy(gen, ids, n)
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
             for x, y in zip(toks, base["greedy"])]
    row["greedy_identical"] = sum(a == b for a, b in zip(toks, base["greedy"])) / len(toks)
    row["greedy_first_diff_mean"] = float(np.mean(first))
    return row


def run_case(case: Path, n: int) -> dict:
    ids = np.load(case / "reference.npz")["input_ids"]
    master = nemodiff_jax.load(case, dtype="float32", progress=False)
    weights = matmul_weights(master)
    base = {True: master.logits(ids, causal=True), False: master.logits(ids, causal=False),
            "greedy": greedy(master, ids, n)}
    cfg = master.config
    out = {"case": case.name, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
           "layers": cfg.num_layers, "batch": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
           "logit_std": {"causal": float(base[True].std()), "bidir": float(base[False].std())}, "rows": []}
    g = largest_group(weights)
    plans = [("int8", "int8", None), ("int4-g128", "int4", 128)]
    plans += [(f"int4-g{g}", "int4", g)] if g not in (None, 128) else []
    plans += [("int4-g8", "int4", 8)] if g != 8 else []
    for label, fmt, group in plans:
        row = {"format": label, "head": HEAD_FORMAT}
        try:
            if fmt == "int8":
                gen = nemodiff_jax.load(case, dtype="float32", progress=False, quantize="int8")
            else:
                gen = quantized(master, fmt, group)
        except ValueError as e:
            row["error"] = str(e)
            out["rows"].append(row)
            print(json.dumps({"case": case.name, **row}), flush=True)
            continue
        row.update(measure(gen, weights, ids, base, n))
        out["rows"].append(row)
        print(json.dumps({"case": case.name, **row}), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    report = {"fixtures": "tests/fixtures/parity", "dtype": "float32", "head": HEAD_FORMAT,
              "new_tokens": args.new_tokens, "cases": [run_case(c, args.new_tokens) for c in cases()]}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'case':<18} {'format':<10} {'causal rel':>10} {'|d|/std':>8} {'top1':>5} {'bidir rel':>10} "
          f"{'|d|/std':>8} {'top1':>5} {'greedy':>6} {'1st':>5}  tensor rel. error (mean)")
    for c in report["cases"]:
        for r in c["rows"]:
            if "error" in r:
                print(f"{c['case']:<18} {r['format']:<10} error: {r['error']}")
                continue
            errs = " ".join(f"{k}={v['mean']:.4f}" for k, v in r["tensor_rel_error"].items())
            a, b = r["causal"], r["bidir"]
            print(f"{c['case']:<18} {r['format']:<10} {a['rel_l2']:>10.5f} {a['mean_abs_over_std']:>8.5f} "
                  f"{a['top1_agreement']:>5.2f} {b['rel_l2']:>10.5f} {b['mean_abs_over_std']:>8.5f} "
                  f"{b['top1_agreement']:>5.2f} {r['greedy_identical']:>6.2f} {r['greedy_first_diff_mean']:>5.1f}  "
                  f"{errs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
