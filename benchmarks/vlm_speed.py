"""The VLM's speed (issue 16, item 6) on random bf16 weights of a real shape (default VLM-8B: NLD-8B's text model
with the Pixtral tower), through the programs the Generator and the engine run (slots.Pool):

1. Image prefill of one `--image-size` square image (preprocessed as the API does: 1024 -> 1036 x 1036 pixels,
   5476 patches, 1369 image tokens) followed by `--text-tokens` text tokens: the tower + projector alone (the
   jitted encoder, slots.encoder), and the whole prefill (that encoder, then the image admission program: the
   features placed in the prompt's embeddings, the LM prefill into the KV cache, the first token). Both
   compiled first, then the median of `--prefill-reps` runs, the inputs on the device before the clock starts.
2. Greedy `ar` and `linear_spec` decode tokens/s at batch 1 for `--new-tokens` tokens after that image prompt,
   and the same on the text-only model (the VLM's LM weights without the tower) after a text prompt of the same
   length: image / text should be ~1.0 (an image is prefix K/V like any other).
3. `--batch` image prompts (one image each, all different), `ar`: total decode tokens/s.

Decode is timed as Generator.generate runs it, without the prefill: the rows admitted once, then the pool's one
on-device loop until every row holds `--new-tokens` tokens (no stop ids), from a copy of the admitted state for
every run (the loop donates its state); the first run compiles, the median of `--reps` runs counts. Decode
tokens exclude each row's first token (the prefill's), as nemodiff_jax.bench.bench_e2e counts them. With random
weights linear_spec accepts about one token per round: its tokens/s is a floor; the ratio is what matters. The
JSON (`--out`) is rewritten after every measurement; the markdown tables are printed last.

    python3 -P benchmarks/vlm_speed.py --out $OUT/vlm.json
    python3 -P benchmarks/vlm_speed.py --preset tiny-vlm --image-size 32 --new-tokens 8   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from nemodiff_jax import bench, multimodal, slots, vision
from nemodiff_jax.config import VLM_PRESETS
from nemodiff_jax.generate import Generator
from nemodiff_jax.model import abstract_model


def random_picture(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def text_ids(n: int, vocab: int, seed: int) -> list[int]:
    """n random ordinary token ids (above the special ones)."""
    return np.random.default_rng(seed).integers(min(1000, vocab // 4), vocab, n).tolist()


def image_prompt(gen: Generator, size: int, text_tokens: int, seed: int) -> multimodal.Prompt:
    """BOS, one random picture's image block, then random text: as the API places an image before the text."""
    vcfg = gen.config.vision
    image = multimodal.prepare_image(random_picture(size, seed), vcfg, f"image {seed}")
    text = text_ids(text_tokens, gen.config.vocab_size, seed)
    ids = [gen.config.bos_token_id] + multimodal.block_ids(image, vcfg) + text
    return multimodal.Prompt(ids, (image,))


def text_model_of(model):
    """The text-only model holding the VLM's own LM arrays (not copies); its tower and projector dropped."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    text_state = {k: v for k, v in state.items() if k not in ("vision_tower", "multi_modal_projector")}
    graphdef, abstract = nnx.split(abstract_model(model.config.replace(vision=None), model.dtype))
    nnx.replace_by_pure_dict(abstract, text_state)
    return nnx.merge(graphdef, abstract)


def admitted_pool(gen: Generator, prompts, mode: str, new_tokens: int):
    """A pool of one row per prompt, every prompt admitted (prefilled), as Generator.generate starts one; greedy,
    no stop ids (every row runs to new_tokens). Returns the pool, the rows' plan and the longest prompt."""
    prepared = gen.prepare(prompts)
    longest = max(len(p.ids) for p in prepared)
    plan = gen.check_request(mode, new_tokens, longest, 0.0, None, None, [], None, {})
    pool = slots.Pool(gen.runtime, plan.opts, None, len(prepared), *slots.buffer_sizes(longest, new_tokens,
                                                                                       plan.block))
    pool.admit({i: (i, p if p.images else p.ids, 0, plan) for i, p in enumerate(prepared)})
    jax.block_until_ready(pool.st)
    return pool, plan, longest


def image_prefill(gen: Generator, prompt: multimodal.Prompt, new_tokens: int, reps: int) -> dict:
    """Tower + projector, and the whole image prefill (encoder, then the admission program), for one prompt:
    the inputs Pool.admit would make, built on the host and placed on the device once, outside the timing."""
    # compiles the encoder and the image admission of the ar decode's pool shape (the decode reuses both)
    pool, plan, _ = admitted_pool(gen, [prompt], "ar", new_tokens)
    rt, vcfg = pool.rt, gen.config.vision
    n_patches = prompt.num_image_tokens * vcfg.spatial_merge_size ** 2
    patches = vision.patchify([im.pixel_values for im in prompt.images], vcfg,
                              pad_to=slots.patch_bucket(n_patches))
    width = slots.bucket(len(prompt.ids), slots.ADMIT_MIN_WIDTH)
    tokens, lens, keys = rt.prompt_rows([prompt.ids], width, [0])
    rows = slots.row_settings([plan])
    index = np.full((1, width), -1, np.int32)
    where = np.flatnonzero(np.asarray(prompt.ids) == vcfg.image_token_id)
    index[0, where] = np.arange(len(where), dtype=np.int32)
    index, idx = jnp.asarray(index), np.zeros(1, np.int32)
    encode = slots.encoder(rt.graphdef)
    jax.block_until_ready((patches, tokens, lens, keys, rows, index))

    def tower():
        jax.block_until_ready(encode(rt.params, patches))

    def prefill():
        features = encode(rt.params, patches)
        pool.st = pool.programs.admit_images(rt.params, pool.st, idx, tokens, lens, keys, rows, features, index)
        jax.block_until_ready(pool.st)

    compiled = slots.compiled_programs()
    with jax.default_matmul_precision(rt.precision):
        tower_s = bench.timeit(tower, warmup=1, iters=reps)
        prefill_s = bench.timeit(prefill, warmup=1, iters=reps)
    assert slots.compiled_programs() == compiled, "the timed prefill compiled a program the pool had not"
    h, w = prompt.images[0].image_size
    return {"image_pixels": [h, w], "patches": n_patches, "patches_bucketed": int(patches.patches.shape[0]),
            "image_tokens": prompt.num_image_tokens, "prompt_tokens": len(prompt.ids), "admission_width": width,
            "tower_projector_ms": 1e3 * tower_s, "prefill_ms": 1e3 * prefill_s,
            "lm_prefill_ms": 1e3 * (prefill_s - tower_s)}


def decode(gen: Generator, prompts, mode: str, new_tokens: int, reps: int) -> dict:
    """Decode tokens/s of `mode` over one row per prompt, prefill excluded (see the module doc)."""
    t = time.perf_counter()
    pool, _, longest = admitted_pool(gen, prompts, mode, new_tokens)
    admission_s = time.perf_counter() - t
    admitted = pool.st

    def run():
        pool.st = jax.tree.map(jnp.copy, admitted)  # the loop donates its state: a fresh copy per run
        jax.block_until_ready(pool.st)
        t = time.perf_counter()
        pool.advance(until_all=True)
        jax.block_until_ready(pool.st)
        times.append(time.perf_counter() - t)

    times = []
    for _ in range(reps + 1):
        run()
    host = slots.host_rows(pool.st)
    counts = [len(slots.row_tokens(host, i)) for i in range(len(prompts))]
    assert counts == [new_tokens] * len(prompts), counts
    tokens = sum(c - 1 for c in counts)  # each row's first token came from the prefill
    dt = statistics.median(times[1:])
    rounds = int(np.max(host.rounds))
    return {"mode": mode, "batch": len(prompts), "prompt_tokens": longest, "decode_tokens": tokens,
            "decode_s": dt, "tokens_per_s": tokens / dt, "forwards": int(host.total_passes) - 1, "rounds": rounds,
            "ms_per_round": 1e3 * dt / max(rounds, 1), "first_run_s": times[0], "admission_s": admission_s}


def markdown(report: dict) -> str:
    p = report["prefill"]
    lines = [f"{report['preset']} (random bf16 weights) on {report['device']}", "",
             f"Image prefill, one {p['image_pixels'][0]}x{p['image_pixels'][1]} image ({p['patches']} patches, "
             f"{p['image_tokens']} image tokens, prompt {p['prompt_tokens']} tokens):", "",
             "| part | ms |", "|---|---|",
             f"| tower + projector | {p['tower_projector_ms']:.1f} |",
             f"| LM prefill (the rest) | {p['lm_prefill_ms']:.1f} |",
             f"| whole prefill | {p['prefill_ms']:.1f} |", "",
             f"Decode, greedy, {report['args']['new_tokens']} new tokens (prefill excluded):", "",
             "| mode | batch | image prompt tok/s | text prompt tok/s (text-only model) | image / text |",
             "|---|---|---|---|---|"]
    for r in report["decode"]:
        text = r.get("text")
        lines.append(f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     + (f"{text['tokens_per_s']:.1f} | {r['image_over_text']:.3f} |" if text else "- | - |"))
    return "\n".join(lines) + "\n"


def peak_gb() -> float | None:
    """The device allocator's peak so far (GB); None where it keeps no statistics (a CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="VLM-8B", choices=sorted(VLM_PRESETS))
    p.add_argument("--image-size", type=int, default=1024, help="pixels a side of the random square images")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens after the image")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="image prompts of the batched ar run")
    p.add_argument("--reps", type=int, default=2, help="timed decode runs (after one that compiles)")
    p.add_argument("--prefill-reps", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["linear_spec", "text", "batch"],
                   help="leave out linear_spec, the text-only runs or the batched run (each saves its compiles)")
    p.add_argument("--out", default=None, help="JSON report (rewritten after every measurement)")
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    report = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
              "preset": args.preset, "args": vars(args), "decode": []}

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))

    t0 = time.perf_counter()
    gen = Generator(bench.make_model(VLM_PRESETS[args.preset]))
    text_gen = Generator(text_model_of(gen.model))
    jax.block_until_ready(nnx.state(gen.model))
    report["init_s"] = time.perf_counter() - t0
    prompt = image_prompt(gen, args.image_size, args.text_tokens, seed=0)
    text_prompt = [gen.config.bos_token_id] + text_ids(len(prompt.ids) - 1, gen.config.vocab_size, seed=1)

    report["prefill"] = image_prefill(gen, prompt, args.new_tokens, args.prefill_reps)
    report["prefill"]["peak_device_GB"] = peak_gb()
    print(json.dumps({"prefill": report["prefill"]}), flush=True)
    save()
    for mode in [m for m in ("ar", "linear_spec") if m not in args.skip]:
        row = decode(gen, [prompt], mode, args.new_tokens, args.reps)
        if "text" not in args.skip:
            row["text"] = decode(text_gen, [text_prompt], mode, args.new_tokens, args.reps)
            row["image_over_text"] = row["tokens_per_s"] / row["text"]["tokens_per_s"]
        report["decode"].append(row)
        print(json.dumps({"decode": row}), flush=True)
        save()
    if "batch" not in args.skip:
        batch = [image_prompt(gen, args.image_size, args.text_tokens, seed=i) for i in range(args.batch)]
        row = decode(gen, batch, "ar", args.new_tokens, args.reps)
        row["peak_device_GB"] = peak_gb()  # the batch's images go through the tower in one pass
        report["decode"].append(row)
        print(json.dumps({"decode": row}), flush=True)
    report["total_s"] = time.perf_counter() - t0
    save()
    print("\n" + markdown(report))
    return report


if __name__ == "__main__":
    main()
