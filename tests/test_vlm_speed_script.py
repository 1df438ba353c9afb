"""benchmarks/vlm_speed.py (issue 16, item 6) end to end on the CPU at tiny-vlm: every measurement runs and lands in
its JSON with positive numbers (the GPU numbers come from the same code at VLM-8B)."""

import json

from test_bench_smoke import _load_benchmark


def test_vlm_speed_tiny_writes_report(tmp_path, capsys):
    vlm_speed = _load_benchmark("vlm_speed")
    out = tmp_path / "vlm.json"
    new = 6
    report = vlm_speed.main(["--preset", "tiny-vlm", "--image-size", "32", "--text-tokens", "4", "--new-tokens",
                             str(new), "--batch", "2", "--reps", "1", "--prefill-reps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    p = report["prefill"]
    # 32 x 32 pixels, 4-pixel patches, 2 x 2 merge: 64 patches, 16 image tokens in a block of 1 + 4 * 5; BOS, text
    assert (p["image_pixels"], p["patches"], p["image_tokens"], p["prompt_tokens"]) == ([32, 32], 64, 16, 26)
    # one timed call each on a shared CPU: both positive, the LM share their difference (their order is noise
    # here: CI once timed the tower at 8.0 ms and the whole prefill at 2.1 ms)
    assert p["tower_projector_ms"] > 0 and p["prefill_ms"] > 0
    assert abs(p["lm_prefill_ms"] - (p["prefill_ms"] - p["tower_projector_ms"])) < 1e-9
    rows = {(r["mode"], r["batch"]): r for r in report["decode"]}
    assert set(rows) == {("ar", 1), ("linear_spec", 1), ("ar", 2)}
    for (mode, batch), r in rows.items():
        assert r["decode_tokens"] == batch * (new - 1) and r["tokens_per_s"] > 0 and r["decode_s"] > 0
        assert r["forwards"] == (r["rounds"] if mode == "ar" else 2 * r["rounds"])  # linear_spec: draft + verify
        assert r["rounds"] == new - 1 if mode == "ar" else 1 <= r["rounds"] <= new - 1
        if batch == 1:  # the text-only model after a text prompt of the same length
            t = r["text"]
            assert t["mode"] == mode and t["prompt_tokens"] == r["prompt_tokens"] == 26 and t["tokens_per_s"] > 0
            assert r["image_over_text"] == r["tokens_per_s"] / t["tokens_per_s"] > 0
    md = capsys.readouterr().out.split("tiny-vlm (random bf16 weights)")[-1]
    assert "| tower + projector |" in md and "| linear_spec | 1 |" in md and "| ar | 2 |" in md
