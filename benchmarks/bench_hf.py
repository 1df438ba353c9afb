"""Baseline a user would otherwise reach for: transformers' `Ministral3ForCausalLM` (the NLD backbone) at a
real NLD shape, eager attention, bf16, batch 1, random weights on the GPU. Greedy AR decode tokens/s.

    python3 -P benchmarks/bench_hf.py --size 8B --out $OUT/hf.json      # needs torch + transformers (GPU machine)
"""

from __future__ import annotations

import argparse
import json
import time

SIZES = {  # spec §2.1
    "3B": dict(hidden_size=3072, num_hidden_layers=26, intermediate_size=9216, rope_theta=1e6),
    "8B": dict(hidden_size=4096, num_hidden_layers=34, intermediate_size=14336, rope_theta=1e6),
    "14B": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=16384, rope_theta=1e9),
}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="8B", choices=sorted(SIZES))
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="hf.json")
    args = p.parse_args(argv)
    import torch
    from transformers import Ministral3Config, Ministral3ForCausalLM

    s = SIZES[args.size]
    cfg = Ministral3Config(
        vocab_size=131072, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=262144, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=None,
        rope_parameters=dict(rope_type="yarn", rope_theta=s["rope_theta"], factor=16.0,
                             original_max_position_embeddings=16384, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                             mscale_all_dim=1.0, llama_4_scaling_beta=0.1),
        attn_implementation="eager")
    torch.manual_seed(0)
    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Ministral3ForCausalLM(cfg).eval()
    init_s = time.perf_counter() - t
    ids = torch.randint(200, 131000, (1, args.prompt_len), device="cuda")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    n = out.shape[1] - args.prompt_len
    res = {"size": args.size, "impl": "transformers Ministral3ForCausalLM eager bf16", "batch": 1,
           "prompt_len": args.prompt_len, "new_tokens": n, "tokens_per_s": n / dt, "ms_per_token": 1e3 * dt / n,
           "init_s": init_s, "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    print(json.dumps(res))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
