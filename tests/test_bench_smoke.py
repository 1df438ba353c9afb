"""scripts/bench.py runs end to end on the CPU at the tiny shape (the GPU numbers come from the same code)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench  # noqa: E402


@pytest.fixture(autouse=True)
def no_mesh_left(monkeypatch):
    """bench.MESH is module state that --mesh sets: put it back after each test, whatever happened."""
    monkeypatch.setattr(bench, "MESH", None)


@pytest.mark.parametrize("mesh", [None, ("1", "2"), ("2", "1")])
def test_bench_tiny_writes_report(tmp_path, mesh):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["--sizes", "tiny", "--contexts", "64", "--batches", "1", "2", "--new-tokens", "8", "--prompt-len", "16",
            "--mode-new-tokens", "12", "--attn", "xla", "--out", str(out), "--md", str(md)]
    bench.main(argv + (["--mesh", *mesh] if mesh else []))
    report = json.loads(out.read_text())
    assert report["mesh"] == ([int(m) for m in mesh] if mesh else None)
    size = report["sizes"][0]
    assert size["size"] == "tiny" and size["weight_bytes"] > 0
    fwd = size["forward"][0]
    assert fwd["context"] == 64 and all(fwd[k] > 0 for k in ("t1_ms", "t32_causal_ms", "t32_bidir_ms"))
    rows = {(r["mode"], r["batch"]): r for r in size["e2e"]}
    assert set(rows) == {(m, b) for m in ("ar", "diffusion", "linear_spec") for b in (1, 2)}
    for (mode, b), r in rows.items():
        assert r["tokens_per_s"] > 0 and r["forwards"] > 0
        if mode == "ar":  # one token per forward, 7 decode steps after the prefill's token
            assert r["forwards"] == 7 and r["tokens_per_forward"] == 1.0
        if mode == "linear_spec":  # a draft and a verify pass per round
            assert r["forwards"] == 2 * r["rounds"]
    text = md.read_text()
    assert "| ar | xla | 1 |" in text and "| linear_spec | xla | 2 |" in text


def test_tp_variants_compile_options_keep_logits(tmp_path):
    """scripts/tp_variants.py: every XLA-option variant of the forward loop compiles (the options are valid
    names for this XLA) and gives the default's summed logits, on 1 and 2 (fake) devices."""
    import tp_variants

    out = tmp_path / "v.json"
    rows = tp_variants.main(["--size", "tiny", "--tp", "1", "2", "--context", "64", "--out", str(out)])
    got = {(r["tp"], r["variant"]) for r in rows}
    assert got == {(1, "default"), (1, "no_cmd_buffer")} | {(2, v) for v in tp_variants.VARIANTS}
    assert all(r["same_logits"] and r["ms_per_forward"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
