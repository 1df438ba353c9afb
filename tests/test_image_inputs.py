"""Images in, all three modes out (issue 16, interfaces): a tiny random VLM saved in HF format with the package's
tokenizer, through the Python API, the engine, `nemodiff generate --image`, batch JSONL `images` and the server's
image_url parts (a real `nemodiff serve` subprocess and the official `openai` client).

The anchor is a plain greedy loop written directly over the model (tests/vlm_helpers.reference_greedy: encode the
images, splice them into the prompt's embeddings, prefill, argmax token by token): greedy `ar` with images must
equal it, so a wrong splice, a wrong feature order or a prefill that drops the images fails here. Then greedy
linear_spec == greedy ar with images, image-free prompts are exactly the text model's, and every bad input is a
clear error naming its request, failing only that request."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from vlm_helpers import (data_url, picture, png_bytes, reference_embeds, reference_greedy, reference_prefill,
                         text_model_of, tiny_vlm_with_tokenizer)

import nemodiff_jax
from nemodiff_jax import cli, multimodal, slots
from nemodiff_jax.engine import Engine, Request
from nemodiff_jax.image_processing import ImageError, preprocess
from nemodiff_jax.multimodal import IMAGE_MARKER, MarkerCountError, MediaPolicy, Prompt

MODES = ("ar", "diffusion", "linear_spec")
N = 6  # new tokens everywhere (one compiled output shape)
A = picture(20, 30, seed=1)  # -> 24 x 32 pixels: 3 x 4 merged cells, 12 placeholders
B = picture(40, 17, seed=2)  # -> 40 x 24 pixels: 5 x 3 cells, 15 placeholders
BIG = picture(64, 64, seed=3)  # 8 x 8 cells: 1 + 8 * 9 = 73 image tokens
CHAT = [{"role": "user", "content": [{"type": "text", "text": "What is in "},
                                     {"type": "image_url", "image_url": {"url": data_url(A)}},
                                     {"type": "text", "text": "?"}]}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_vlm_with_tokenizer(tmp_path_factory.mktemp("vlm"), seed=0)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    A.save(d / "a.png")
    (d / "broken.png").write_bytes(png_bytes(A)[:60])  # a truncated PNG
    return d


@pytest.fixture(scope="module")
def server(model_dir, media_dir):
    """Started first: it loads and compiles while the tests before it run."""
    pytest.importorskip("openai")
    from test_serve import Server

    s = Server("--model", str(model_dir), "--allowed-media-dir", str(media_dir), "--slots", "2",
               "--max-prompt-tokens", "128", "--max-new-tokens", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gen(model_dir, server):
    return nemodiff_jax.load(model_dir, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def text_gen(gen, tmp_path_factory):
    """The text model with the VLM's own LM weights, saved and loaded as a text checkpoint."""
    return nemodiff_jax.load(tiny_vlm_with_tokenizer(tmp_path_factory.mktemp("text"), model=text_model_of(gen.model)),
                             dtype="float32", progress=False)


def block(gen, image) -> list[int]:
    return multimodal.block_ids(multimodal.prepare_image(image, gen.config.vision, "test"), gen.config.vision)


PROMPTS = [{"text": f"Look {IMAGE_MARKER} and {IMAGE_MARKER} here", "images": [A, B]},
           "HAMLET:",  # an image-free row in the same batch
           {"text": "Describe it.", "images": [B]}]  # no marker: the image goes before the text


@pytest.fixture(scope="module")
def greedy(gen):
    return {mode: gen.generate(PROMPTS, mode=mode, max_new_tokens=N) for mode in MODES}


# ---------------------------------------------------------------------------------------------- placement


def test_images_are_placed_at_markers_or_before_the_text(gen):
    tok, vcfg = gen.tokenizer, gen.config.vision
    marked, plain, first = gen.prepare(PROMPTS)
    assert marked.ids == (tok.encode("Look ") + block(gen, A) + tok.encode(" and ", add_special_tokens=False)
                          + block(gen, B) + tok.encode(" here", add_special_tokens=False))
    assert first.ids == [tok.bos_token_id] + block(gen, B) + tok.encode("Describe it.", add_special_tokens=False)
    assert plain.ids == tok.encode("HAMLET:") and plain.images == ()
    assert [im.image_size for im in marked.images] == [(24, 32), (40, 24)]
    assert marked.num_image_tokens == 12 + 15 == marked.ids.count(vcfg.image_token_id)
    assert block(gen, A) == [18] + ([19] * 4 + [20]) * 2 + [19] * 4 + [21]
    # a chat: the image block where its part is, the rest as the template renders it
    chat = gen.encode_chat(CHAT)
    text = tok.apply_chat_template([{"role": "user", "content": "What is in <image>?"}], tokenize=False,
                                   add_generation_prompt=True)
    before, after = text.split(IMAGE_MARKER)
    assert chat.ids == (tok.encode(before, add_special_tokens=False) + block(gen, A)
                        + tok.encode(after, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------- the anchor


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_greedy_ar_with_images_equals_the_reference_loop(gen, greedy):
    """ar through the engine's slots (image admission program, bucketed tower, index splice) == a plain loop over
    the model, for each image prompt of a mixed batch. The prefill's K/V in the decode slots equal the loop's at
    every prompt position and layer (float32: 1e-5), so a feature in the wrong place fails here even where the
    tiny random model's tokens would not notice; and another image gives other tokens."""
    eos = gen.config.eos_token_ids
    prepared = gen.prepare(PROMPTS)
    longest = max(len(p.ids) for p in prepared)
    plan = gen.check_request("ar", N, longest, 0.0, None, None, None, None, {})
    pool = slots.Pool(gen.runtime, plan.opts, None, len(prepared), *slots.buffer_sizes(longest, N, plan.block))
    pool.admit({i: (i, p if p.images else p.ids, 0, plan) for i, p in enumerate(prepared)})
    for i in (0, 2):
        images = PROMPTS[i]["images"]
        assert greedy["ar"][i].tokens == reference_greedy(gen.model, prepared[i].ids, images, N, eos), i
        n = len(prepared[i].ids)
        _, cache = reference_prefill(gen.model, prepared[i].ids, images, n)
        for layer in range(gen.config.num_layers):
            for got, want in ((pool.st.cache.k, cache.k), (pool.st.cache.v, cache.v)):
                assert rel_err(got[layer][i, :n], want[layer][0, :n]) < 1e-5, (i, layer)
        if len(images) > 1:  # the same check sees misplaced features: B's spliced where A's placeholders are
            _, swapped = reference_prefill(gen.model, prepared[i].ids, images[::-1], n)
            assert rel_err(pool.st.cache.k[0][i, :n], swapped.k[0][0, :n]) > 1e-2
    assert int(pool.st.cache.lengths[1]) == len(prepared[1].ids)
    other = gen.generate([{"text": "Describe it.", "images": [A]}], mode="ar", max_new_tokens=N)[0]
    assert other.tokens != greedy["ar"][2].tokens


def test_linear_spec_equals_ar_and_diffusion_runs_with_images(gen, greedy):
    for i in range(len(PROMPTS)):
        assert greedy["linear_spec"][i].tokens == greedy["ar"][i].tokens, i
        d = greedy["diffusion"][i]
        assert 1 <= len(d.tokens) <= N and d.stats["mode"] == "diffusion" and d.stats["blocks"] >= 1
        assert d.tokens[0] == greedy["ar"][i].tokens[0]  # the first token comes from the (same) prefill
    # a stream of one image prompt gives the batch's tokens
    *chunks, result = gen.stream(PROMPTS[2], mode="linear_spec", max_new_tokens=N)
    assert sum(chunks, []) == result.tokens == greedy["ar"][2].tokens


def test_image_free_prompts_are_the_text_models(gen, text_gen, greedy):
    """Without images the VLM decodes exactly as the text checkpoint with its LM weights, in every mode, alone
    or beside image prompts; image-free batches never build the image programs."""
    def image_compiles():
        return (sum(p.admit_images._cache_size() for p in slots._PROGRAMS.values())
                + sum(f._cache_size() for f in slots._ENCODERS.values()))

    before = image_compiles()
    texts = ["HAMLET:", "To be, or not"]
    for mode in MODES:
        want = [r.tokens for r in text_gen.generate(texts, mode=mode, max_new_tokens=N)]
        assert [r.tokens for r in gen.generate(texts, mode=mode, max_new_tokens=N)] == want, mode
        assert greedy[mode][1].tokens == text_gen.generate(["HAMLET:"], mode=mode, max_new_tokens=N)[0].tokens
    assert image_compiles() == before  # text rows never ran the image programs


def test_engine_refills_slots_with_image_rows_and_a_bad_request_fails_alone(gen, greedy):
    """Three image requests and a text one arrive together on 4 slots (the image admission pads to 4 rows, a
    repeated row included); a request whose image cannot be read fails by itself."""
    reqs = [Request(prompt=PROMPTS[0], id="two"), Request(prompt=PROMPTS[2], id="first"),
            Request(prompt={"text": "Bad", "images": [b"not an image"]}, id="bad"),
            Request(prompt={"messages": CHAT}, id="chat"), Request(prompt="HAMLET:", id="text")]
    with Engine(gen, slots=4, max_prompt_tokens=64, max_new_tokens=16) as engine:
        handles = [engine.submit(Request(**{**r.__dict__, "max_new_tokens": N})) for r in reqs]
        results = {}
        for h in handles:
            try:
                results[h.id] = h.wait().tokens
            except Exception as e:  # noqa: BLE001
                results[h.id] = e
        assert engine.generate(Request(prompt=PROMPTS[2], max_new_tokens=N)).tokens == greedy["ar"][2].tokens
    assert results["two"] == greedy["ar"][0].tokens and results["first"] == greedy["ar"][2].tokens
    assert results["text"] == greedy["ar"][1].tokens
    assert results["chat"] == gen.generate([{"messages": CHAT}], max_new_tokens=N)[0].tokens
    assert isinstance(results["bad"], ImageError) and "request 'bad' image 0" in str(results["bad"])
    with Engine(gen, slots=1) as engine:  # a chat's image part is named after its request
        bad_chat = [{"role": "user", "content": [{"type": "image", "image": b"garbage"}]}]
        with pytest.raises(ImageError, match=r"request 'c' messages\[0\]\.content\[0\]: not an image"):
            engine.generate(Request(prompt={"messages": bad_chat}, id="c"))


def test_warm_up_compiles_the_image_path(gen, greedy):
    """On a VLM, Engine.warm_up (`nemodiff serve --warmup`) also compiles the tower at the smallest patch bucket
    and every program's image admission for one request at every prompt width: afterwards image requests of
    that bucket (A: 12 image tokens, 48 patches; B: 15, 60 patches; both within 64) in every mode, short and
    long prompts, compile nothing, and decode as without the warm-up."""
    engine = Engine(gen, slots=2, max_prompt_tokens=100, max_new_tokens=16)  # widths 64, 128; 1 or 2 rows
    per_mode = 2 * 2 + 2  # text: row counts x widths; images: one row at each width
    assert engine.warm_up([Request(prompt=[0], mode=m) for m in MODES]) == len(MODES) * per_mode
    compiled = slots.compiled_programs()
    long = {"text": "word " * 40, "images": [A]}
    assert len(gen.prepare([long])[0].ids) > 64  # the wider admission
    with engine:
        got = {mode: [engine.generate(Request(prompt=p, mode=mode, max_new_tokens=N)).tokens
                      for p in (PROMPTS[2], long)] for mode in MODES}
    assert slots.compiled_programs() == compiled
    for mode in MODES:
        assert got[mode] == [greedy[mode][2].tokens, gen.generate([long], mode=mode, max_new_tokens=N)[0].tokens]


def test_logits_with_images(gen, text_gen):
    """Generator.logits of prompts with images == one forward written over the model from the spliced embeddings
    (vlm_helpers.reference_embeds), at every position, causal and bidirectional; in a batch each row gets its
    own images (two same-sized images, an image-free row), as when scored alone; bad input names its prompt."""
    import jax.numpy as jnp

    a2 = picture(20, 30, seed=7)  # A's size: the same prompt length, other features
    rows = [{"text": f"Look {IMAGE_MARKER} here", "images": [A]}, {"text": f"Look {IMAGE_MARKER} here", "images": [a2]}]
    prompts = gen.prepare(rows)
    length = len(prompts[0].ids)
    text_ids = gen.tokenizer.encode("HAMLET: " * 40)[:length]
    assert len(prompts[1].ids) == len(text_ids) == length
    for causal in (True, False):
        batch = gen.logits(rows + [text_ids], causal=causal)
        assert batch.shape == (3, length, gen.config.vocab_size) and batch.dtype == np.float32
        for i, image in enumerate((A, a2)):
            embeds = reference_embeds(gen.model, prompts[i].ids, [image])
            want, _ = gen.model(None, jnp.arange(length)[None], None, causal=causal, embeds=embeds)
            np.testing.assert_allclose(batch[i], np.asarray(want[0]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(gen.logits(rows[i], causal=causal)[0], batch[i], rtol=1e-5, atol=1e-5)
        assert rel_err(batch[0], batch[1]) > 1e-2  # the rows did not share their images
        np.testing.assert_allclose(batch[2], gen.logits([text_ids], causal=causal)[0], rtol=1e-5, atol=1e-5)
    # a chat and a Prompt object score the same way; the ids come from encode_prompts
    chat = gen.encode_chat(CHAT)
    assert gen.encode_prompts([{"messages": CHAT}]) == [chat.ids]
    np.testing.assert_allclose(gen.logits({"messages": CHAT}), gen.logits(chat), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=rf"logits takes prompts of one length \(no padding is added\): prompt 1 "
                                         rf"has {length - 1} tokens, prompt 0 has {length}"):
        gen.logits([rows[0], text_ids[:-1]])
    with pytest.raises(ImageError, match="prompt 1 image 0: cannot decode"):
        gen.logits([rows[0], {"text": "Look <image> here", "images": [png_bytes(B)[:80]]}])
    with pytest.raises(ValueError, match=r"prompt 0: 1 image\(s\) given, but this checkpoint is text-only"):
        text_gen.logits(rows[:1])


def test_images_under_a_mesh_equal_one_device(model_dir, greedy):
    """Tensor and data parallel (CPU devices, mesh 2 x 2): the image rows' tokens are one device's; 3 prompts
    pad to 4 rows, so one image row is admitted twice."""
    from nemodiff_jax.sharding import make_mesh

    sharded = nemodiff_jax.load(model_dir, dtype="float32", progress=False, mesh=make_mesh(data=2, model=2))
    assert [r.tokens for r in sharded.generate(PROMPTS, mode="ar", max_new_tokens=N)] == [
        r.tokens for r in greedy["ar"]]


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_image_inputs_are_clear_errors_naming_the_item(gen, text_gen, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    x_ids = gen.tokenizer.encode("x", add_special_tokens=False)
    cases = [
        ([{"text": "x", "images": [A]}, {"text": "y", "images": [png_bytes(B)[:80]]}], ImageError,
         "prompt 1 image 0: cannot decode"),
        ([{"text": "y", "images": [A, tmp_path / "notes.txt"]}], ImageError, "prompt 0 image 1: not an image"),
        ([{"text": "y", "images": [tmp_path / "missing.png"]}], ImageError, "prompt 0 image 0: cannot read"),
        ([{"text": "y", "images": ["https://example.com/cat.png"]}], ImageError, "not fetched"),
        ([{"text": f"{IMAGE_MARKER} and {IMAGE_MARKER}", "images": [A]}], MarkerCountError,
         "prompt 0: the text has 2 image marker(s) '<image>' but 1 image(s)"),
        ([{"text": f"see {IMAGE_MARKER}"}], MarkerCountError, "1 image marker(s) '<image>' but 0 image(s)"),
        ([{"text": "<SPECIAL_19> typed", "images": [A]}], MarkerCountError,
         "prompt 0: the prompt holds 13 image placeholder token(s) (id 19) but its 1 image(s) fill 12"),
        (["<SPECIAL_19>"], MarkerCountError, "holds 1 image placeholder token(s)"),
        ([{"text": "x", "images": [BIG] * 4}], ValueError,
         f"prompt 0: {1 + 4 * 73 + len(x_ids)} tokens (292 of them the blocks of 4 image(s)) do not fit the "
         "model's max_position_embeddings 256"),
        ([{"text": "x", "images": A}], ValueError, "'images' must be a list"),
        ([{"text": "x", "image": [A]}], ValueError, "unknown key(s) ['image']"),
        ([{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}], ValueError,
         "messages[0].content[0]: an image_url part needs"),
        ([{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}], ValueError,
         "messages[0].content[0]: a content part must be"),
        ([{"text": "x", "images": [preprocess(A)]}], ImageError,  # made for VLM-8B's 14-pixel patches
         "prompt 0 image 0: preprocessed for patch 14 x merge 2, this model's tower takes 4 x 2"),
    ]
    for prompts, kind, message in cases:
        with pytest.raises(kind) as e:
            gen.generate(prompts, max_new_tokens=2)
        assert message in str(e.value), (message, str(e.value))
    with pytest.raises(ValueError, match=r"prompt 0: 1 image\(s\) given, but this checkpoint is text-only"):
        text_gen.generate([{"text": "x", "images": [A]}], max_new_tokens=2)
    with pytest.raises(ValueError, match="text-only"):
        text_gen.generate([Prompt(text_gen.tokenizer.encode("x"), (A,))], max_new_tokens=2)
    with pytest.raises(ValueError, match="text-only"):
        text_gen.generate([{"messages": CHAT}], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"block slack\) exceeds the model's max_position_embeddings"):
        gen.generate([{"text": "x", "images": [BIG] * 3}], mode="diffusion", max_new_tokens=40)


def test_media_policy(tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "secret"
    inside.mkdir()
    outside.mkdir()
    (outside / "key.png").write_bytes(png_bytes(A))
    (inside / "link.png").symlink_to(outside / "key.png")
    policy = MediaPolicy.of([inside])
    assert policy.resolve(data_url(A), "x") == data_url(A)
    (inside / "a.png").write_bytes(png_bytes(A))
    assert policy.resolve(str(inside / "a.png"), "x") == inside.resolve() / "a.png"
    assert policy.resolve((inside / "a.png").as_uri(), "x") == inside.resolve() / "a.png"
    for bad, why in ((str(outside / "key.png"), "not an absolute path inside"),
                     (str(inside / ".." / "secret" / "key.png"), "not an absolute path inside"),
                     (str(inside / "link.png"), "not an absolute path inside"),  # a symlink out
                     ("a.png", "not an absolute path inside"),
                     ("http://example.com/a.png", "http:// image URLs are not fetched"),
                     ("file://otherhost/a.png", "names another host")):
        with pytest.raises(ImageError, match=why):
            policy.resolve(bad, "messages[0].content[1]")
    with pytest.raises(ImageError, match="local image paths are not allowed on this server"):
        MediaPolicy().resolve(str(inside / "a.png"), "x")
    with pytest.raises(ValueError, match="not a directory"):
        MediaPolicy.of([tmp_path / "nope"])


# ---------------------------------------------------------------------------------------------- command line, batch


def test_cli_generate_with_images(gen, model_dir, media_dir, capsys):
    image = str(media_dir / "a.png")
    base = ["generate", "--model", str(model_dir), "--dtype", "float32", "--mode", "linear_spec",
            "--max-new-tokens", str(N), "--compact"]
    assert cli.main([*base, "--prompt", f"Look {IMAGE_MARKER} and {IMAGE_MARKER}", "--image", image,
                     "--image", image]) == 0
    want = gen.generate([{"text": f"Look {IMAGE_MARKER} and {IMAGE_MARKER}", "images": [A, A]}],
                        max_new_tokens=N)[0]
    out, err = capsys.readouterr()
    assert out.rstrip("\n") == want.text and json.loads(err.strip().splitlines()[-1])["generated_tokens"] == len(
        want.tokens)
    assert cli.main([*base, "--chat", "--prompt", "What is it?", "--image", image]) == 0
    want = gen.generate([{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(A)}}, {"type": "text", "text": "What is it?"}]}]}],
        max_new_tokens=N)[0]
    assert capsys.readouterr().out.rstrip("\n") == want.text
    assert cli.main([*base, "--prompt", "x", "--image", str(media_dir / "broken.png")]) == 2
    assert "prompt 0 image 0: cannot decode the image data" in capsys.readouterr().err
    assert cli.main([*base, "--prompt", f"{IMAGE_MARKER}{IMAGE_MARKER}", "--image", image]) == 2
    assert "2 image marker(s)" in capsys.readouterr().err


def test_cli_image_on_a_text_model_is_an_error(text_gen, media_dir, capsys):
    assert cli.main(["generate", "--model", str(text_gen.path), "--dtype", "float32", "--prompt", "x", "--image",
                     str(media_dir / "a.png"), "--max-new-tokens", "2"]) == 2
    assert "this checkpoint is text-only" in capsys.readouterr().err


def test_batch_job_images(gen, tmp_path, capsys):
    (tmp_path / "pics").mkdir()
    A.save(tmp_path / "pics" / "a.png")
    (tmp_path / "pics" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    b64 = base64.b64encode(png_bytes(B)).decode()
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "pics/a.png"}},
                                         {"type": "text", "text": "Describe."}]}]
    good = [{"id": "path", "prompt": f"Look {IMAGE_MARKER} and {IMAGE_MARKER}", "images": ["pics/a.png", b64],
             "mode": "linear_spec"},
            {"id": "url", "prompt": "Describe.", "images": [data_url(B)], "mode": "ar"},
            {"id": "chat", "messages": chat, "mode": "diffusion"},
            {"id": "text", "prompt": "HAMLET:", "mode": "ar"}]
    bad = [{"id": "corrupt", "prompt": "x", "images": ["pics/bad.png"]},
           {"id": "missing", "prompt": "x", "images": ["pics/nope.png"]},
           {"id": "remote", "prompt": "x", "images": ["https://example.com/a.png"]},
           {"id": "markers", "prompt": f"{IMAGE_MARKER}{IMAGE_MARKER}", "images": ["pics/a.png"]},
           {"id": "long", "prompt": "x", "images": [data_url(BIG)]},
           {"id": "both", "messages": chat, "images": ["pics/a.png"]},
           {"id": "chat_remote", "messages": [{"role": "user", "content": [
               {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}]
    lines = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3], bad[5], bad[6]]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = cli.main(["batch", "--model", str(gen.path), "--dtype", "float32", "--input", str(inp), "--output", str(out),
                   "--batch-size", "2", "--max-new-tokens", str(N), "--max-prompt-tokens", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    for needle in ("line 2 image 0: not an image Pillow can decode", "line 4 image 0: no such image file",
                   "line 5 image 0: https:// image URLs are not fetched",
                   "line 7: the text has 2 image marker(s) '<image>' but 1 image(s)",
                   f"line 8: prompt of {1 + 73 + len(gen.tokenizer.encode('x', add_special_tokens=False))} tokens "
                   "(73 of them the blocks of 1 image(s)) exceeds the job's limit 64",
                   "line 10: 'images' must be a list beside a 'prompt' string",
                   "line 11 messages[0].content[0]: https:// image URLs are not fetched",
                   "7 malformed lines skipped"):
        assert needle in err, (needle, err)
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(results) == sorted(g["id"] for g in good)
    wants = {"path": ({"text": good[0]["prompt"], "images": [A, B]}, "linear_spec"),
             "url": ({"text": "Describe.", "images": [B]}, "ar"),
             "chat": ({"messages": [{"role": "user", "content": [{"type": "image", "image": A},
                                                                  {"type": "text", "text": "Describe."}]}]},
                      "diffusion"),
             "text": ("HAMLET:", "ar")}
    for rid, (prompt, mode) in wants.items():
        assert results[rid]["tokens"] == gen.generate([prompt], mode=mode, max_new_tokens=N)[0].tokens, rid


# ---------------------------------------------------------------------------------------------- the server


def _chat(client, content, **kw):
    return client.chat.completions.create(model=str(kw.pop("model")), messages=[{"role": "user", "content": content}],
                                          max_tokens=N, **kw)


def test_server_image_url_parts(server, gen, model_dir, media_dir):
    import openai

    client = server.wait(timeout=300).client(timeout=300)
    name = str(model_dir)
    content = CHAT[0]["content"]
    for mode in ("ar", "linear_spec"):
        r = _chat(client, content, model=name, extra_body={"mode": mode})
        want = gen.generate([{"messages": CHAT}], mode=mode, max_new_tokens=N)[0]
        assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.tokens), mode
        assert r.usage.prompt_tokens == len(gen.encode_chat(CHAT).ids)
    inside = [{"type": "image_url", "image_url": {"url": str(media_dir / "a.png")}},
              {"type": "text", "text": "What is in ?"}]
    r = _chat(client, inside, model=name)
    want = gen.generate([{"messages": [{"role": "user", "content": [{"type": "image", "image": A},
                                                                    {"type": "text", "text": "What is in ?"}]}]}],
                        max_new_tokens=N)[0]
    assert r.choices[0].message.content == want.text
    stream = client.chat.completions.create(model=name, messages=CHAT, max_tokens=N, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == gen.generate(
        [{"messages": CHAT}], max_new_tokens=N)[0].text

    def image(url):
        return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]

    n_big = len(gen.encode_chat([{"role": "user", "content": image(data_url(BIG)) * 2}]).ids)
    bad = [(image("https://example.com/cat.png"), "messages[0].content[0]: https:// image URLs are not fetched"),
           (image("/etc/hostname"), "messages[0].content[0]: '/etc/hostname' is not an absolute path inside an "
                                    "allowed media directory"),
           (image(str(media_dir / ".." / "a.png")), "is not an absolute path inside"),
           (image(str(media_dir / "broken.png")), "messages[0].content[0]: cannot decode the image data"),
           (image("data:image/png;base64," + base64.b64encode(b"garbage bytes").decode()),
            "messages[0].content[0]: not an image Pillow can decode"),
           (image("data:image/png;base64,@@@"), "invalid base64"),
           (image(data_url(BIG)) * 2, f"the prompt has {n_big} tokens (146 of them the blocks of 2 image(s)); this "
                                      "server takes at most 128"),
           ([{"type": "text", "text": f"two {IMAGE_MARKER}"}, *image(data_url(A))], "2 image marker(s)"),
           ([{"type": "image_url"}], "messages[0].content[0]: an image_url part needs")]
    for content, message in bad:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, content, model=name)
        err = e.value.body
        assert e.value.status_code == 400 and message in err["message"] and err["param"] == "messages", (
            message, err)
    # still serving: the same image request again, and health
    r = _chat(client, content=CHAT[0]["content"], model=name)
    assert r.choices[0].message.content == gen.generate([{"messages": CHAT}], max_new_tokens=N)[0].text
    import urllib.request

    with urllib.request.urlopen(server.url + "/health") as h:
        assert h.status == 200


def test_server_completions_with_images(server, gen, model_dir, media_dir):
    """/v1/completions takes images as the extra body field `images` beside a string prompt (each at its <image>
    marker, or all before the text): the same tokens as generate with those images, in any mode, streamed or
    not. The sources and the rules are chat's: data: URLs, local paths inside --allowed-media-dir; a remote URL,
    a path outside, an image that does not decode, a marker count that does not match or a prompt too long is a
    400 naming the item, and the server keeps serving."""
    import openai

    client = server.wait(timeout=300).client(timeout=300)
    name = str(model_dir)

    def complete(prompt, images, **kw):
        return client.completions.create(model=name, prompt=prompt, max_tokens=N,
                                         extra_body={"images": images, **kw.pop("extra", {})}, **kw)

    text = f"Look {IMAGE_MARKER} and {IMAGE_MARKER} here"
    for mode in ("ar", "linear_spec"):
        r = complete(text, [data_url(B), str(media_dir / "a.png")], extra={"mode": mode})
        want = gen.generate([{"text": text, "images": [B, A]}], mode=mode, max_new_tokens=N)[0]
        assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.tokens), mode
        assert r.usage.prompt_tokens == len(gen.encode_prompts([{"text": text, "images": [B, A]}])[0])
    stream = complete("Describe it.", [data_url(B)], stream=True)  # no marker: the image before the text
    assert "".join(c.choices[0].text for c in stream if c.choices) == gen.generate(
        [{"text": "Describe it.", "images": [B]}], max_new_tokens=N)[0].text
    assert complete("HAMLET:", []).choices[0].text == gen.generate(["HAMLET:"], max_new_tokens=N)[0].text

    n_big = len(gen.encode_prompts([{"text": "x", "images": [BIG, BIG]}])[0])
    garbage = "data:image/png;base64," + base64.b64encode(b"garbage bytes").decode()
    bad = [("x", ["https://example.com/cat.png"], "images", "images[0]: https:// image URLs are not fetched"),
           ("x", [data_url(A), "/etc/hostname"], "images",
            "images[1]: '/etc/hostname' is not an absolute path inside an allowed media directory"),
           ("x", [str(media_dir / ".." / "a.png")], "images", "is not an absolute path inside"),
           ("x", [str(media_dir / "broken.png")], "images", "images[0]: cannot decode the image data"),
           ("x", [garbage], "images", "images[0]: not an image Pillow can decode"),
           ("x", [{"url": data_url(A)}], "images", "images[0]: an image must be given as a data: URL or a path"),
           ("x", data_url(A), "images", "'images' must be a list of images"),
           (f"two {IMAGE_MARKER}{IMAGE_MARKER}", [data_url(A)], "prompt",
            "prompt: the text has 2 image marker(s) '<image>' but 1 image(s) were given"),
           ([5, 6, 7], [data_url(A)], "prompt", "'images' needs a string 'prompt'"),
           ("x", [data_url(BIG)] * 2, "prompt",
            f"the prompt has {n_big} tokens (146 of them the blocks of 2 image(s)); this server takes at most 128")]
    for prompt, images, param, message in bad:
        with pytest.raises(openai.BadRequestError) as e:
            complete(prompt, images)
        err = e.value.body
        assert e.value.status_code == 400 and message in err["message"] and err["param"] == param, (message, err)
    r = complete(text, [data_url(B), data_url(A)])  # still serving
    assert r.choices[0].text == gen.generate([{"text": text, "images": [B, A]}], max_new_tokens=N)[0].text


def test_text_only_server_refuses_image_parts(text_gen):
    """The real app over a real (unstarted) engine of a text checkpoint: an image part, or a completion's
    `images`, is a 400 before any engine work."""
    import asyncio

    from nemodiff_jax import serve

    app = serve.create_app(serve.Server(text_gen, Engine(text_gen), "text"))

    async def call(path, body):
        body = json.dumps(body).encode()
        sent, out = [False], []

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)

        async def send(message):
            out.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
        return out[0]["status"], json.loads(b"".join(m.get("body", b"") for m in out[1:]))

    for path, body, param in (("/v1/chat/completions", {"messages": CHAT}, "messages[0].content"),
                              ("/v1/completions", {"prompt": "x", "images": [data_url(A)]}, "images")):
        status, err = asyncio.run(call(path, {**body, "max_tokens": 2}))
        assert status == 400 and "this model is text-only" in err["error"]["message"], err
        assert err["error"]["param"] == param, err
    with pytest.raises(ValueError, match="text-only"):
        serve.run(text_gen, "text", allowed_media_dirs=[Path(__file__).parent])
