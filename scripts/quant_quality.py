"""Quality of the weight-only formats (nemodiff_jax/quant.py) on the embedded model, on held-out text.

    python scripts/quant_quality.py --val data/code/val.txt --out docs/embedded/quant_quality.json

Every format runs through the real quantized path: `nemodiff_jax.load(default_model(), dtype="bfloat16",
quantize=fmt)`, whose matmul weights are quant.QWeight and whose matmuls are quant.matmul (on a CPU the XLA
reference: int8 (x @ q^T) * scale with the scale after the f32 sum, int4 x @ bf16(q * scale)^T). load() keeps
the head in model.HEAD_FORMAT (int8); the "head int4" row replaces it by quant.quantize(head, "int4"). The
checkpoint is bf16, so quantizing it in bf16 or from float32 gives the same values. The baseline is the same
model in bf16; the embedding table and the norms stay bf16. Reports:
- per-tensor relative error ||W - dequantize(Q)|| / ||W|| against the float32 weight;
- logit error against bf16 on held-out windows: mean and max |diff|, over the logits' standard deviation;
- held-out next-token perplexity;
- greedy agreement with bf16: the 12 held-out prompts of nemodiff_jax.embedded.PROMPTS, 64 AR tokens; the
  share of prompts whose tokens are
  identical, and the mean position of the first difference;
- the share of prompts where greedy linear_spec == greedy ar in each format. Exact in exact arithmetic for
  any weights; in bf16 a 32-token verify chunk and a 1-token step round differently, so near-ties can flip
  (README, "what holds exactly").

data/code/val.txt is the held-out modules of the embedded model's corpus (scripts/code_corpus.py makes it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nemodiff_jax
from nemodiff_jax import quant
from nemodiff_jax.embedded import PROMPTS, default_model
from nemodiff_jax.generate import Generator
from nemodiff_jax.model import HEAD_FORMAT, QUANTIZABLE

ROWS = [("bf16", None, None), ("int8", "int8", "int8"), ("int4-g128, head int8", "int4", "int8"),
        ("int4-g128, head int4", "int4", "int4")]


def quantized(bf16: Generator, layers: str, head: str) -> Generator:
    """The embedded model in bf16 with its matmul weights as load(quantize=layers) stores them, the head
    re-quantized from `bf16`'s to `head` where that is not model.HEAD_FORMAT."""
    gen = nemodiff_jax.load(default_model(), dtype="bfloat16", progress=False, quantize=layers)
    if head == HEAD_FORMAT:
        return gen
    w = bf16.model.diffusion_head.get_value()
    gen.model.diffusion_head.set_value(quant.quantize(w, head, QUANTIZABLE["diffusion_head"], name="diffusion_head"))
    return Generator(gen.model, gen.tokenizer)  # its runtime holds the params it was built with: rebuild it


def tensor_errors(gen: Generator, master: Generator) -> list[dict]:
    """||W - dequantize(Q)|| / ||W|| for every QWeight of `gen`, W the float32 weight."""
    src = dict(nnx.to_flat_state(nnx.split(master.model)[1]))
    errors = []
    for path, var in nnx.to_flat_state(nnx.state(gen.model, nnx.Param)):
        qw = var.get_value()
        if not isinstance(qw, quant.QWeight):
            continue
        w = src[path].get_value()
        deq = quant.dequantize(qw, jnp.float32)
        errors.append({"tensor": "/".join(map(str, path)), "format": qw.fmt,
                       "rel_error": float(jnp.linalg.norm(w - deq) / jnp.linalg.norm(w))})
    return errors


def windows(tok, text: str, n: int, length: int) -> np.ndarray:
    ids = tok.encode(text, add_special_tokens=False)
    step = (len(ids) - length) // n
    return np.stack([ids[i * step:i * step + length] for i in range(n)]).astype(np.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--val", type=Path, default=Path("data/code/val.txt"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    text = args.val.read_text(encoding="utf-8")
    master = nemodiff_jax.load(default_model(), dtype="float32", progress=False)
    bf16 = nemodiff_jax.load(default_model(), dtype="bfloat16", progress=False)
    win = windows(bf16.tokenizer, text, args.windows, args.length)
    prompts = PROMPTS[: args.prompts]
    base_logits = bf16.logits(win)
    base_tokens = [r.tokens for r in bf16.generate(prompts, mode="ar", max_new_tokens=args.new_tokens)]
    rows = []
    for label, layers, head in ROWS:
        gen = bf16 if layers is None else quantized(bf16, layers, head)
        errors = tensor_errors(gen, master)
        logits = gen.logits(win)
        logp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(win[:, 1:, None]), axis=-1).mean()
        diff = np.abs(logits - base_logits)
        ar = [r.tokens for r in gen.generate(prompts, mode="ar", max_new_tokens=args.new_tokens)]
        ls = [r.tokens for r in gen.generate(prompts, mode="linear_spec", max_new_tokens=args.new_tokens)]
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                 for x, y in zip(ar, base_tokens)]
        by_kind = {}
        for e in errors:
            kind = e["tensor"].split("/")[-1]
            by_kind.setdefault(kind, []).append(e["rel_error"])
        row = {"format": label, "perplexity": float(jnp.exp(nll)),
               "logit_mean_abs_diff": float(diff.mean()), "logit_max_abs_diff": float(diff.max()),
               "logit_std": float(base_logits.std()),
               "greedy_identical": sum(a == b for a, b in zip(ar, base_tokens)) / len(prompts),
               "greedy_first_diff_mean": float(np.mean(first)),
               "linear_spec_equals_ar": sum(a == b for a, b in zip(ls, ar)) / len(prompts),
               "tensor_rel_error": {k: {"mean": float(np.mean(v)), "max": float(np.max(v))}
                                    for k, v in by_kind.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"model": "embedded (nemodiff_jax/assets)", "windows": args.windows, "length": args.length,
              "prompts": len(prompts), "new_tokens": args.new_tokens, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'format':<24} {'ppl':>7} {'logit |d| mean':>14} {'max':>7} {'greedy same':>11} "
          f"{'1st diff':>8} {'ls==ar':>6}  tensor rel. error (mean)")
    for r in rows:
        errs = " ".join(f"{k}={v['mean']:.4f}" for k, v in r["tensor_rel_error"].items())
        print(f"{r['format']:<24} {r['perplexity']:>7.2f} {r['logit_mean_abs_diff']:>14.4f} "
              f"{r['logit_max_abs_diff']:>7.3f} {r['greedy_identical']:>11.2f} {r['greedy_first_diff_mean']:>8.1f} "
              f"{r['linear_spec_equals_ar']:>6.2f}  {errs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
