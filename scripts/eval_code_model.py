"""Per-mode statistics of a code model on held-out Python (issue 15's table), and its held-out quality.

    python scripts/eval_code_model.py --model out/code --val data/code/val.txt --out docs/embedded/code_eval.json

Prompts: --num-prompts functions of the held-out modules (scripts/code_corpus.py HELD_OUT), taken in turn from
each module (val.txt's order; in a module, file order), spanning at least 5 lines, cut after their first body
statement (the docstring when there is one) and kept only when something of the body is left after it. Every
mode runs greedy on the prompts, --batch at a time (default: all at once; 1 for the batch-1 speeds): ar,
diffusion (threshold 0.9), linear_spec with the model's drafter and without it. Reported per mode: tokens per
forward, mean accepted tokens per linear_spec round, denoise steps per diffusion block, tokens/s (all tokens
over the wall time of all batches, each mode compiled first, off the clock); then the AR next-token accuracy
and perplexity over the held-out text, the share of ar completions whose function parses with `ast`, and
whether greedy linear_spec equals greedy ar on every prompt (with and without the drafter).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import nemodiff_jax
from nemodiff_jax import training as T
from nemodiff_jax.sharding import make_mesh

RUNS = [("ar", {}, "ar"), ("diffusion", {"threshold": 0.9}, "diffusion (0.9)"),
        ("linear_spec", {}, "linear_spec + drafter"), ("linear_spec", {"lora": False}, "linear_spec, no drafter")]


def function_prompts(val_text: str, n: int) -> list[str]:
    """Prompts cut from the functions of the held-out modules (see the module docstring), taken in turn from
    each module: its first function, then every module's second, and so on."""
    per_module = []
    for doc in val_text.split(T.DOC_SEP):
        try:
            tree = ast.parse(doc)
        except SyntaxError:
            continue
        lines = doc.split("\n")  # ast's line numbers count "\n" only (not the other splitlines() breaks)
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        prompts = []
        for node in sorted(functions, key=lambda n: n.lineno):  # in file order
            if node.end_lineno - node.lineno < 4:
                continue
            cut = node.body[0].end_lineno  # the docstring, or the first statement when there is none
            if cut >= node.end_lineno:
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            prompts.append("\n".join(lines[first - 1:cut]) + "\n")
        per_module.append(prompts)
    turns = itertools.zip_longest(*per_module)
    return [p for turn in turns for p in turn if p is not None][:n]


def function_parses(prompt: str, completion: str) -> bool:
    """Whether the completion continues the prompt's function and the function then parses: its text runs
    until the first non-blank line indented no deeper than its `def`, or, when the token budget ends it
    first, to the completion's last whole line (a block opened on that line is given a `pass`). A completion
    that adds no line to the function counts as not parsing."""
    text = prompt + completion
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # the empty piece after the last newline
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "async def ", "@")))
    indent = len(lines[head]) - len(lines[head].lstrip())
    # the body starts after the prompt's own lines (its signature and first statement)
    body_start = min(prompt.count("\n"), len(lines))
    end = len(lines) if text.endswith("\n") else len(lines) - 1
    for i in range(body_start, len(lines)):
        if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent:
            end = i
            break
    if not any(line.strip() for line in lines[body_start:end]):
        return False  # the completion added nothing to the function (it ended at once, or wrote nothing)
    text = textwrap.dedent("\n".join(lines[head:end]) + "\n")
    last = text.rstrip("\n").splitlines()[-1]
    # a function cut off by the token budget right after a block opener gets that block's body as `pass`
    for candidate in (text, text + " " * (len(last) - len(last.lstrip()) + 4) + "pass\n"):
        try:
            ast.parse(candidate)
            return True
        except SyntaxError:
            pass
    return False


def heldout_quality(gen, val_path: Path, seq_len: int, rows: int) -> dict:
    """AR next-token accuracy and perplexity (and the diffusion loss) over held-out windows."""
    mesh = make_mesh(1, devices=jax.devices()[:1])
    windows = T.TokenWindows(T.tokenize_corpus(val_path, gen.tokenizer), seq_len, gen.config.bos_token_id)
    graphdef, state = nnx.split(gen.model)
    step = T.make_eval_step(mesh, block=gen.config.block_size)
    batches = list(windows.sequential(8))[: max(1, rows // 8)]
    m = T.evaluate(step, graphdef, state, batches, mesh)
    return {"ar_next_token_accuracy": m["acc_ar"], "ar_perplexity": math.exp(m["l_ar"]), "l_ar": m["l_ar"],
            "l_diff": m["l_diff"], "masked_token_accuracy": m["acc_diff"], "windows": len(batches) * 8,
            "seq_len": seq_len}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--val", type=Path, default=Path("data/code/val.txt"))
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=None, help="prompts per generate call (default: all)")
    ap.add_argument("--quality-rows", type=int, default=64, help="held-out windows for accuracy/perplexity")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    gen = nemodiff_jax.load(args.model, dtype=args.dtype, progress=False)
    prompts = function_prompts(args.val.read_text(encoding="utf-8"), args.num_prompts)
    if not prompts:
        raise SystemExit(f"{args.val}: no function with 4+ body lines to prompt with")
    report = {"model": str(args.model), "drafter": gen.drafter is not None, "prompts": prompts,
              "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "device": str(jax.devices()[0]),
              "batch": args.batch or len(prompts), "modes": []}
    size = args.batch or len(prompts)
    batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    tokens = {}
    for mode, opts, name in RUNS:
        for chunk in batches:  # compile every shape off the clock
            gen.generate(chunk, mode=mode, max_new_tokens=args.max_new_tokens, **opts)
        res, wall = [], 0.0
        for chunk in batches:
            t = time.perf_counter()
            res += gen.generate(chunk, mode=mode, max_new_tokens=args.max_new_tokens, **opts)
            wall += time.perf_counter() - t
        n_tok = sum(r.stats["generated_tokens"] for r in res)
        row = {"mode": name, "tokens": n_tok, "forward_passes": sum(r.stats["forward_passes"] for r in res),
               "batch_tokens_per_s": n_tok / wall}
        row["tokens_per_forward"] = n_tok / row["forward_passes"]
        if mode == "linear_spec":
            rounds = sum(r.stats["rounds"] for r in res)
            row["accepted_per_round"] = sum(r.stats["mean_accepted_per_round"] * r.stats["rounds"] for r in res) / rounds
        if mode == "diffusion":
            blocks = sum(r.stats["blocks"] for r in res)
            row["denoise_steps_per_block"] = sum(r.stats["denoise_steps_per_block"] * r.stats["blocks"]
                                                 for r in res) / blocks
        tokens[name] = [r.tokens for r in res]
        if mode == "ar":
            report["parse_share"] = float(np.mean([function_parses(p, r.text) for p, r in zip(prompts, res)]))
            report["samples"] = [p + r.text for p, r in zip(prompts[:3], res)]
        report["modes"].append(row)
    report["linear_spec_equals_ar"] = all(tokens[n] == tokens["ar"] for _, _, n in RUNS if n.startswith("linear"))
    report["heldout"] = heldout_quality(gen, args.val, 256, args.quality_rows)

    print(f"{'mode':<26} {'tokens':>7} {'tok/fwd':>8} {'tok/s':>9} {'acc/round':>10} {'steps/blk':>10}")
    for r in report["modes"]:
        acc, steps = (f"{r[k]:.2f}" if k in r else "-" for k in ("accepted_per_round", "denoise_steps_per_block"))
        print(f"{r['mode']:<26} {r['tokens']:>7} {r['tokens_per_forward']:>8.2f} {r['batch_tokens_per_s']:>9.1f} "
              f"{acc:>10} {steps:>10}")
    h = report["heldout"]
    print(f"held out: AR next-token accuracy {h['ar_next_token_accuracy']:.3f}, perplexity {h['ar_perplexity']:.2f}; "
          f"ar completions that parse: {report['parse_share']:.2f}")
    print(f"greedy linear_spec == greedy ar (with and without the drafter): {report['linear_spec_equals_ar']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["linear_spec_equals_ar"] else 1)
