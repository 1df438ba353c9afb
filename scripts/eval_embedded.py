"""Per-mode statistics of the embedded model on held-out prompts (The Winter's Tale, never trained on).

    python scripts/eval_embedded.py --val data/val.txt --out docs/embedded/eval.json

Prompts: the first 12 speeches of the held-out play that are at least 3 lines long, cut after their first
line. Reports tokens per forward, mean accepted tokens per round (linear_spec), denoise steps per block
(diffusion), samples, and whether greedy linear_spec equals greedy ar on every prompt.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import nemodiff_jax
from nemodiff_jax.embedded import default_model

CONFIGS = [("ar", {}), ("diffusion", {"threshold": 0.9}), ("diffusion", {"threshold": 0.7}),
           ("diffusion", {"threshold": 0.5}), ("linear_spec", {}), ("linear_spec", {"threshold": 0.9})]


def held_out_prompts(val_text: str, n: int) -> list[str]:
    prompts = []
    for speech in re.split(r"\n\n+", val_text):
        lines = [ln for ln in speech.splitlines() if ln.strip()]
        # a speech: a speaker line in capitals ending with '.', then verse
        if len(lines) >= 3 and re.fullmatch(r"[A-Z][A-Z .']+\.", lines[0].strip()):
            prompts.append(lines[0] + "\n" + lines[1] + "\n")
        if len(prompts) == n:
            break
    return prompts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=Path, default=Path("data/val.txt"))
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=Path("docs/embedded/eval.json"))
    args = ap.parse_args(argv)
    gen = nemodiff_jax.load(default_model(), dtype=args.dtype, progress=False)
    prompts = held_out_prompts(args.val.read_text(), args.num_prompts)
    report = {"prompts": prompts, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "modes": []}
    tokens_by = {}
    for mode, opts in CONFIGS:
        res = gen.generate(prompts, mode=mode, max_new_tokens=args.max_new_tokens, **opts)
        toks = sum(r.stats["generated_tokens"] for r in res)
        fwd = sum(r.stats["forward_passes"] for r in res)
        row = {"mode": mode, "options": opts, "tokens": toks, "forward_passes": fwd, "tokens_per_forward": toks / fwd,
               "samples": [r.text for r in res[:3]]}
        if mode == "linear_spec":
            rounds = sum(r.stats["rounds"] for r in res)
            row["mean_accepted_per_round"] = sum(r.stats["mean_accepted_per_round"] * r.stats["rounds"]
                                                 for r in res) / rounds
        if mode == "diffusion":
            blocks = sum(r.stats["blocks"] for r in res)
            row["denoise_steps_per_block"] = sum(r.stats["denoise_steps_per_block"] * r.stats["blocks"]
                                                 for r in res) / blocks
        tokens_by[(mode, json.dumps(opts))] = [r.tokens for r in res]
        report["modes"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
    ar_tokens = tokens_by[("ar", "{}")]
    report["linear_spec_equals_ar"] = all(tokens_by[("linear_spec", json.dumps(o))] == ar_tokens
                                          for m, o in CONFIGS if m == "linear_spec")
    print("greedy linear_spec == greedy ar on all held-out prompts:", report["linear_spec_equals_ar"])
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
