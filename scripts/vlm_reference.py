"""Parity fixtures for the nemodiff-jax VLM (spec §12) from an independent implementation: HF transformers
`Mistral3ForConditionalGeneration` = Pixtral vision tower + Mistral3 projector + a Ministral3 text model.

NLD-VLM is NLD's text model (a Ministral-3 decoder, checked against `Ministral3ForCausalLM` by
scripts/parity_reference.py) with a Pixtral tower and a Mistral3 projector whose features replace the
`<|image_pad|>` (id 19) embeddings of the prompt. transformers' Mistral3 model is exactly that composition, so
with the same config and weights (renamed: `model.language_model.*` -> `encoder.*`, `model.vision_tower.*` ->
`encoder.vision_tower.*`, `model.multi_modal_projector.*` -> `encoder.multi_modal_projector.*`, `lm_head` ->
`diffusion_head`) it must give the same logits as an NLD-VLM prefill. Everything runs on CPU in float32.

Usage (needs torch + transformers>=5, which must NOT go into the project venv; use a separate one):

    ~/.pyenv/versions/3.11.7/bin/python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/tfenv/bin/pip install 'transformers==5.17.*' safetensors numpy
    /tmp/tfenv/bin/python scripts/vlm_reference.py --out tests/fixtures/vlm

Writes, per case, `<out>/<case>/{config.json, model.safetensors, reference.npz, meta.json}`: config.json is an
NLD-VLM config, model.safetensors has NLD-VLM tensor names (fp32, PyTorch layout), reference.npz holds the inputs
(`input_ids` int32 [B,T], `pixel_values` float32 [N,C,Hmax,Wmax] padded with noise (see below), `image_sizes`
int32 [N,2] as (height, width)) and the outputs: `vision_features` [P,E] (the tower's last hidden state, all images
in one sequence), `image_features` [M,D] (the projector's output, the rows that replace the placeholders),
`logits_causal` and `logits_bidir` [B,T,V]. Tests: tests/test_vision.py (committed fixture, no torch; and a live
variant, skipped without torch/transformers).

What transformers 5.x (checked on 5.17.0: models/pixtral/modeling_pixtral.py, models/mistral3/
modeling_mistral3.py) does, and what this fixture pins:
  * All images' patches run as one sequence through the tower with a block-diagonal additive mask
    (generate_block_attention_mask): a patch attends only to its own image. Several images of different sizes
    in one pass are tested here (three images, two in one prompt row).
  * pixel_values is a padded batch; the conv output of image i is cropped to image_sizes[i] // patch_size, so
    whatever the padding holds is ignored. The padding here is random noise, not zeros, so a port that
    forgets to crop fails.
  * 2-D RoPE: inv_freq = 1/theta^(arange(0, H, 2)/H); the even-indexed ones turn with the patch row, the
    odd-indexed ones with the column; cos/sin = cat([rows*even | cols*odd]) duplicated (rotate-half).
    Positions restart at 0 in every image. A small theta (100) keeps every frequency visible on tiny grids.
  * Tower norms use eps 1e-5 (hard-coded in PixtralAttentionLayer / ln_pre); the projector norm uses the text
    rms_norm_eps. The MLP is gated (silu here, as the VLM's config); projector_hidden_act "gelu" is ACT2FN's
    exact erf GELU.
  * Patch merger: per image, the [h, w, E] grid goes through torch unfold (kernel = stride = 2): merged tokens
    in raster order, each the concatenation channel-major (index e*4 + dy*2 + dx) of its 2x2 patches.
  * Features are scattered into the id-19 positions in row-major order over [B, T] (masked_scatter).
  * The text model is Ministral3 with YaRN and the Llama-4 query scale, T = 48 > original context 16 (see
    scripts/parity_reference.py). A 4-D all-zeros additive mask passed as attention_mask reaches the text model
    as is and gives bidirectional attention (checked below, as in parity_reference.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parity_reference  # noqa: E402  (the text model's config and weight handling, shared)

IMAGE_START, IMAGE_PAD, IMAGE_BREAK, IMAGE_END = 18, 19, 20, 21  # spec §12

VISION = {
    "model_type": "pixtral",
    "hidden_size": 24,  # != the text width (32): a swapped projector axis cannot pass as a square matrix
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "head_dim": 12,
    "patch_size": 4,
    "num_channels": 3,
    "image_size": 64,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
}


def nld_vlm_config(vision: dict = VISION, **text) -> dict:
    """An NLD-VLM config.json dict: the text keys at the root (as NLD's), a Pixtral vision_config, the VLM keys."""
    nld = parity_reference._nld_config(**text)
    nld.update({
        "architectures": ["NemotronLabsDiffusionVLMModel"],
        "model_type": "nemotron_labs_diffusion_vlm",
        "vision_config": copy.deepcopy(vision),
        "spatial_merge_size": 2,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False,
        "vision_feature_layer": -1,
        "image_token_id": IMAGE_PAD,
    })
    return nld


# Three images of three sizes (H, W pixels, multiples of patch 4 * merge 2): two in row 0, one in row 1.
# `rows` lays out each prompt row as text runs (ints: that many random text tokens) and images (str: index).
CASES: list[dict] = [
    dict(name="two_rows_three_images", seed=0, seq_len=48,
         image_sizes=[(16, 24), (24, 8), (16, 16)], rows=[[6, "0", 8, "1"], [10, "2"]],
         config=nld_vlm_config(hidden=32, inter=64, layers=2, heads=4, kv_heads=2, head_dim=16, theta=1e6)),
]


def image_tokens(height: int, width: int, vision: dict, merge: int = 2) -> list[int]:
    """`<|image_start|>`, then per row of merged cells that many `<|image_pad|>` and `<|image_break|>`, the last
    row ending in `<|image_end|>` instead (spec §12)."""
    cell = vision["patch_size"] * merge
    rows, cols = height // cell, width // cell
    out = [IMAGE_START]
    for r in range(rows):
        out += [IMAGE_PAD] * cols + [IMAGE_END if r == rows - 1 else IMAGE_BREAK]
    return out


def prompt_ids(case: dict, rng: np.random.Generator, vocab: int, mask_id: int) -> np.ndarray:
    """int64 [B, T]: each row's layout, filled up to T with text; text ids avoid the image ids 18..21, and about
    a quarter of them are the [MASK] id (as in the text parity fixtures)."""
    vision = case["config"]["vision_config"]
    rows = []
    for layout in case["rows"]:
        ids: list[int] = []
        for part in layout:
            ids += image_tokens(*case["image_sizes"][int(part)], vision) if isinstance(part, str) else [-1] * part
        if len(ids) > case["seq_len"]:
            raise ValueError(f"{case['name']}: a row needs {len(ids)} > seq_len tokens")
        ids += [-1] * (case["seq_len"] - len(ids))
        rows.append(ids)
    ids = np.array(rows, np.int64)
    text = ids == -1
    ids[text] = rng.integers(IMAGE_END + 1, vocab, size=int(text.sum()))
    ids[text & (rng.random(ids.shape) < 0.25)] = mask_id
    return ids


def mistral3_config(nld: dict):
    """The transformers Mistral3Config equivalent to an NLD-VLM config.json dict."""
    from transformers import Mistral3Config, PixtralVisionConfig

    v = dict(nld["vision_config"])
    vision = PixtralVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        num_channels=v["num_channels"], image_size=v["image_size"], patch_size=v["patch_size"],
        hidden_act=v["hidden_act"], attention_dropout=0.0, rope_parameters=copy.deepcopy(v["rope_parameters"]))
    assert vision.head_dim == v["head_dim"]
    return Mistral3Config(
        vision_config=vision, text_config=parity_reference.ministral3_config(nld),
        image_token_index=nld["image_token_id"], projector_hidden_act=nld["projector_hidden_act"],
        vision_feature_layer=nld["vision_feature_layer"], multimodal_projector_bias=False,
        spatial_merge_size=nld["spatial_merge_size"], tie_word_embeddings=False, attn_implementation="eager")


def hf_to_nld_name(name: str) -> str:
    if name == "lm_head.weight":
        return "diffusion_head.weight"
    for hf, nld in (("model.language_model.", "encoder."), ("model.vision_tower.", "encoder.vision_tower."),
                    ("model.multi_modal_projector.", "encoder.multi_modal_projector.")):
        if name.startswith(hf):
            return nld + name[len(hf):]
    raise KeyError(name)


def build_case(case: dict, seed: int | None = None):
    """Builds one reference case with transformers. Returns (nld_config_dict, {nld_name: float32 [out, in]},
    inputs {input_ids, pixel_values, image_sizes}, outputs {vision_features, image_features, logits_causal,
    logits_bidir})."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    nld = copy.deepcopy(case["config"])
    seed = case["seed"] if seed is None else seed
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(mistral3_config(nld)).eval().to(torch.float32)
    for c in (model.config, model.config.vision_config, model.config.text_config):
        assert c._attn_implementation == "eager", c._attn_implementation
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()

    rng = np.random.default_rng(seed)
    v = nld["vision_config"]
    sizes = np.array(case["image_sizes"], np.int64)
    h_max, w_max = sizes.max(axis=0)
    pixels = rng.standard_normal((len(sizes), v["num_channels"], h_max, w_max)).astype(np.float32)  # noise pad
    ids = prompt_ids(case, rng, nld["vocab_size"], nld["mask_token_id"])
    batch, seq_len = ids.shape
    input_ids, pixel_values, image_sizes = map(torch.from_numpy, (ids, pixels, sizes))
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len)

    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values, image_sizes=image_sizes).last_hidden_state[0]
        image_features = torch.cat(model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes).pooler_output, dim=0)
        kw = dict(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                  position_ids=position_ids, use_cache=False)
        out_c = model(**kw, output_hidden_states=True)
        zeros = torch.zeros(batch, 1, seq_len, seq_len, dtype=torch.float32)
        out_b = model(**kw, attention_mask=zeros, output_hidden_states=True)
        neg = torch.finfo(torch.float32).min
        causal4d = torch.triu(torch.full((seq_len, seq_len), neg), 1)[None, None].expand(batch, 1, -1, -1)
        causal_explicit = model(**kw, attention_mask=causal4d).logits
    causal, bidir = out_c.logits, out_b.logits
    # The 4-D mask really reaches the text model: an explicit causal one reproduces the default forward, and the
    # all-zeros one changes the first position (after layer 0 the last position sees everything either way).
    assert torch.allclose(causal_explicit, causal, rtol=0, atol=1e-6), "explicit causal 4D mask != default"
    h1_c, h1_b = out_c.hidden_states[1], out_b.hidden_states[1]
    assert torch.allclose(h1_b[:, -1], h1_c[:, -1], rtol=1e-5, atol=1e-5), "last position should agree"
    assert (bidir[:, 0] - causal[:, 0]).abs().max() > 1e-2, "bidirectional mask had no effect"
    # The features really are in the prompt: the embeddings after splicing differ from the plain lookup exactly
    # at the placeholders, and hold the projector's rows there, in order.
    embeds = out_c.hidden_states[0]
    plain = model.model.language_model.embed_tokens(input_ids)
    is_pad = input_ids == nld["image_token_id"]
    assert int(is_pad.sum()) == image_features.shape[0]
    assert torch.equal(embeds[~is_pad], plain[~is_pad])
    assert torch.equal(embeds[is_pad], image_features)
    n_patches = int(((sizes // v["patch_size"]).prod(axis=1)).sum())
    assert tower.shape == (n_patches, v["hidden_size"]), tower.shape

    weights = {hf_to_nld_name(n): p.detach().cpu().numpy().astype(np.float32).copy()
               for n, p in model.state_dict().items() if "rotary_emb" not in n and "positional_embedding" not in n}
    inputs = {"input_ids": ids.astype(np.int32), "pixel_values": pixels, "image_sizes": sizes.astype(np.int32)}
    outputs = {"vision_features": tower.numpy().astype(np.float32),
               "image_features": image_features.numpy().astype(np.float32),
               "logits_causal": causal.numpy().astype(np.float32), "logits_bidir": bidir.numpy().astype(np.float32)}
    return nld, weights, inputs, outputs


def main(argv=None) -> None:
    import torch
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/vlm")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for case in CASES:
        nld, weights, inputs, outputs = build_case(case)
        d = out / case["name"]
        parity_reference.write_hf_dir(d, nld, weights)
        np.savez(d / "reference.npz", **inputs, **outputs)
        meta = {"generator": "scripts/vlm_reference.py",
                "reference": "transformers.Mistral3ForConditionalGeneration (PixtralVisionModel + "
                             "Mistral3MultiModalProjector + Ministral3Model)",
                "attn_implementation": "eager", "device": "cpu", "dtype": "float32",
                "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
                "seed": case["seed"], "seq_len": case["seq_len"], "image_sizes": case["image_sizes"],
                "rows": case["rows"], "positions": f"0..{case['seq_len'] - 1}",
                "bidir_mask": "explicit all-zeros additive float mask [B,1,T,T]"}
        (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        lc, lb = outputs["logits_causal"], outputs["logits_bidir"]
        rel = float(np.linalg.norm(lb - lc) / np.linalg.norm(lc))
        print(f"{case['name']}: ids {inputs['input_ids'].shape} images {case['image_sizes']} "
              f"patches {outputs['vision_features'].shape} features {outputs['image_features'].shape} "
              f"||bidir-causal||/||causal|| = {rel:.3f} -> {d}")


if __name__ == "__main__":
    main()
