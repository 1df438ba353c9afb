"""Parity fixtures for nemodiff-jax from an independent implementation: HF transformers `Ministral3ForCausalLM`.

NLD's backbone is a Ministral-3 decoder (spec /work/shared/spec/NLD_MODEL.md §3), so transformers'
`Ministral3ForCausalLM` with the same config and weights (renamed `model.*` -> `encoder.*`,
`lm_head` -> `diffusion_head`) must give the same logits as an NLD forward. Everything here runs on CPU, fp32.

Usage (needs torch + transformers>=5, which must NOT go into the project venv; use a separate one):

    ~/.pyenv/versions/3.11.7/bin/python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/tfenv/bin/pip install 'transformers>=5.0' safetensors numpy
    /tmp/tfenv/bin/python scripts/parity_reference.py --out tests/fixtures/parity

Writes, per case, `<out>/<case>/{config.json, model.safetensors, reference.npz, meta.json}`:
config.json is an NLD config, model.safetensors has NLD tensor names (fp32, PyTorch [out, in] layout),
reference.npz has `input_ids` int32 [B,T], `logits_causal` and `logits_bidir` float32 [B,T,V].
Tests: tests/test_parity_fixtures.py (committed fixtures, no torch) and tests/test_parity_live.py
(calls `build_case` live; skipped without torch/transformers).

What transformers 5.x (checked on 5.24.0, models/ministral3/modeling_ministral3.py and
modeling_rope_utils._compute_yarn_parameters) actually does:
  * YaRN: uses the EXPLICIT `rope_parameters["factor"]`; it is recomputed as
    max_position_embeddings / original_max_position_embeddings ONLY when factor is None (config validation
    merely warns when the two disagree). Our cases keep them equal, like the real checkpoints.
    low/high = floor/ceil of find_correction_dim(beta_fast/beta_slow, dim=head_dim, base=rope_theta,
    original_max_position_embeddings), clamped to [0, dim-1]; inv_freq = interp*(1-extrap_w) + extrap*extrap_w
    with extrap_w = 1 - clamp((i-low)/(high-low), 0, 1).
  * Attention factor (multiplies cos AND sin): attention_factor key if given, else, when mscale and
    mscale_all_dim are both truthy, get_mscale(factor, mscale)/get_mscale(factor, mscale_all_dim) = 1.0 for
    mscale = mscale_all_dim = 1.0 (a naive 0.1*ln(factor)+1 would be wrong).
  * RoPE layout: rotate-half (NeoX), emb = cat(freqs, freqs); q and k rotated.
  * Llama-4 query scale, applied to q only, AFTER RoPE, BEFORE the (optional) cache update / attention:
      q *= 1 + beta * log(1 + floor(position_ids / rope_parameters["original_max_position_embeddings"]))
    beta = rope_parameters["llama_4_scaling_beta"]. The position tensor is `position_ids` (the same one fed to
    RoPE; default arange(T) + past_seen_tokens), NOT cache_position; the divisor is
    original_max_position_embeddings (not max_position_embeddings, despite the helper's argument name).
  * Attention: eager path = softmax(q k^T * head_dim**-0.5 + mask) in fp32, GQA via repeat_kv (kv head j serves
    q heads j*g .. j*g+g-1). A 4-D attention_mask is returned as-is by masking_utils
    (_preprocess_mask_arguments: "If the mask is already 4D, simply return as-is") and added to the scores, so
    an all-zeros float [B,1,T,T] mask gives full bidirectional attention (verified below: bidir != causal at
    early positions, == causal at the last position after the first layer).
  * Ministral3Config defaults pad_token_id=11 (-> nn.Embedding padding_idx); we pass pad_token_id=None and
    overwrite every weight anyway.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

MASK_TOKEN_ID = 100


def _nld_config(*, hidden, inter, layers, heads, kv_heads, head_dim, theta, vocab=128, orig=16, factor=4.0,
                max_pos=64) -> dict:
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": max_pos,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": float(theta),
            "factor": float(factor),
            "original_max_position_embeddings": orig,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "mask_token_id": MASK_TOKEN_ID,
        "bos_token_id": 1,
        "eos_token_id": 11,
        "pad_token_id": None,
        "block_size": 32,
        "dlm_paradigm": "bidirectional",
        "torch_dtype": "float32",
    }


# T = 40 > original_max_position_embeddings = 16, so floor(pos/16) takes values 0, 1, 2 (llama-4 scale != 1)
# and positions run past the YaRN original context. head_dim != hidden/heads everywhere.
CASES: list[dict] = [
    dict(name="theta1e6_gqa", batch=1, seq_len=40, seed=0,
         config=_nld_config(hidden=32, inter=64, layers=2, heads=4, kv_heads=2, head_dim=16, theta=1e6)),
    dict(name="theta1e9_gqa", batch=1, seq_len=40, seed=1,
         config=_nld_config(hidden=32, inter=64, layers=2, heads=4, kv_heads=2, head_dim=16, theta=1e9)),
    # 1 kv head (MQA), 3 layers, batch 2; small theta so the YaRN ramp spans dims 0..4 of 8 (a real test of
    # the interpolation/extrapolation blend, which is nearly all-interpolated for large theta at orig=16).
    dict(name="theta10_mqa_3l_b2", batch=2, seq_len=40, seed=2,
         config=_nld_config(hidden=24, inter=48, layers=3, heads=4, kv_heads=1, head_dim=16, theta=10.0)),
]


def ministral3_config(nld: dict):
    """The transformers Ministral3Config equivalent to an NLD config.json dict."""
    from transformers import Ministral3Config

    return Ministral3Config(
        vocab_size=nld["vocab_size"],
        hidden_size=nld["hidden_size"],
        intermediate_size=nld["intermediate_size"],
        num_hidden_layers=nld["num_hidden_layers"],
        num_attention_heads=nld["num_attention_heads"],
        num_key_value_heads=nld["num_key_value_heads"],
        head_dim=nld["head_dim"],
        hidden_act=nld["hidden_act"],
        max_position_embeddings=nld["max_position_embeddings"],
        rms_norm_eps=nld["rms_norm_eps"],
        rope_parameters=copy.deepcopy(nld["rope_parameters"]),
        tie_word_embeddings=False,
        sliding_window=None,
        pad_token_id=None,
        bos_token_id=nld["bos_token_id"],
        eos_token_id=nld["eos_token_id"],
        use_cache=False,
        attn_implementation="eager",
    )


def hf_to_nld_name(name: str) -> str:
    if name == "lm_head.weight":
        return "diffusion_head.weight"
    if name.startswith("model."):
        return "encoder." + name[len("model."):]
    raise KeyError(name)


def build_case(case: dict, seed: int | None = None):
    """Builds one reference case with transformers.

    `case` is an entry of CASES ({name, batch, seq_len, seed, config}) or a bare NLD config dict
    (then batch=1, seq_len=40). Returns (nld_config_dict, {nld_name: float32 np.ndarray [out,in]},
    input_ids int32 [B,T], logits_causal float32 [B,T,V], logits_bidir float32 [B,T,V]).
    """
    import torch
    from transformers import Ministral3ForCausalLM

    if "config" in case:
        nld, batch, seq_len = case["config"], case.get("batch", 1), case.get("seq_len", 40)
        seed = case.get("seed", 0) if seed is None else seed
    else:
        nld, batch, seq_len, seed = case, 1, 40, 0 if seed is None else seed
    nld = copy.deepcopy(nld)

    torch.manual_seed(seed)
    model = Ministral3ForCausalLM(ministral3_config(nld)).eval().to(torch.float32)
    assert model.config._attn_implementation == "eager"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):   # RMSNorm weights around 1 so they matter but stay sane
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "head must be untied"

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, nld["vocab_size"], size=(batch, seq_len)).astype(np.int64)
    ids[:, rng.choice(seq_len, size=seq_len // 4, replace=False)] = nld["mask_token_id"]  # some [MASK]s
    input_ids = torch.from_numpy(ids)
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len)

    with torch.no_grad():
        out_c = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, output_hidden_states=True)
        zeros = torch.zeros(batch, 1, seq_len, seq_len, dtype=torch.float32)
        out_b = model(input_ids=input_ids, position_ids=position_ids, attention_mask=zeros, use_cache=False,
                      output_hidden_states=True)
        causal, bidir = out_c.logits, out_b.logits
        # Sanity: an explicit causal 4D mask reproduces the default forward (the 4D mask is really used) ...
        neg = torch.finfo(torch.float32).min
        causal4d = torch.triu(torch.full((seq_len, seq_len), neg), 1)[None, None].expand(batch, 1, -1, -1)
        causal_explicit = model(input_ids=input_ids, position_ids=position_ids, attention_mask=causal4d,
                                use_cache=False).logits
    assert torch.allclose(causal_explicit, causal, rtol=0, atol=1e-6), "explicit causal 4D mask != default"
    # ... and bidirectional differs from causal except at the last position, which sees everything either way.
    # That holds after the FIRST layer only: from layer 2 on the last position attends to earlier positions
    # whose hidden states already differ, so final logits differ everywhere when num_hidden_layers > 1.
    h1_c, h1_b = out_c.hidden_states[1], out_b.hidden_states[1]   # [0] = embeddings, [1] = after layer 0
    assert torch.allclose(h1_b[:, -1], h1_c[:, -1], rtol=1e-5, atol=1e-5), "last position should agree"
    assert (h1_b[:, 0] - h1_c[:, 0]).abs().max() > 1e-2, "bidirectional mask had no effect"
    assert (bidir[:, 0] - causal[:, 0]).abs().max() > 1e-2, "bidirectional mask had no effect"

    weights = {hf_to_nld_name(n): p.detach().cpu().numpy().astype(np.float32).copy()
               for n, p in model.state_dict().items() if "rotary_emb" not in n}
    return (nld, weights, ids.astype(np.int32), causal.numpy().astype(np.float32),
            bidir.numpy().astype(np.float32))


def write_hf_dir(path: Path, nld: dict, weights: dict) -> None:
    """config.json + model.safetensors (an NLD-format HF checkpoint directory)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(nld, indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in sorted(weights.items())}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def main(argv=None) -> None:
    import torch
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/parity")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for case in CASES:
        nld, weights, ids, lc, lb = build_case(case)
        d = out / case["name"]
        write_hf_dir(d, nld, weights)
        np.savez(d / "reference.npz", input_ids=ids, logits_causal=lc, logits_bidir=lb)
        meta = {"generator": "scripts/parity_reference.py", "reference": "transformers.Ministral3ForCausalLM",
                "attn_implementation": "eager", "device": "cpu", "dtype": "float32",
                "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
                "seed": case["seed"], "batch": case["batch"], "seq_len": case["seq_len"],
                "positions": f"0..{case['seq_len'] - 1}",
                "bidir_mask": "explicit all-zeros additive float mask [B,1,T,T]"}
        (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        rel = float(np.linalg.norm(lb - lc) / np.linalg.norm(lc))
        print(f"{case['name']}: ids {ids.shape} logits {lc.shape} |logits| std {lc.std():.3f} "
              f"||bidir-causal||/||causal|| = {rel:.3f} -> {d}")


if __name__ == "__main__":
    main()
