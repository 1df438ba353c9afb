"""scripts/bench.py runs end to end on the CPU at the tiny shape (the GPU numbers come from the same code)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench  # noqa: E402


def test_bench_tiny_writes_report(tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    bench.main(["--sizes", "tiny", "--contexts", "64", "--batches", "1", "--new-tokens", "8", "--prompt-len", "16",
                "--attn", "xla", "--out", str(out), "--md", str(md)])
    report = json.loads(out.read_text())
    size = report["sizes"][0]
    assert size["size"] == "tiny" and size["weight_bytes"] > 0
    fwd = size["forward"][0]
    assert fwd["context"] == 64 and all(fwd[k] > 0 for k in ("t1_ms", "t32_causal_ms", "t32_bidir_ms"))
    e2e = size["e2e_ar"][0]
    assert e2e["batch"] == 1 and e2e["tokens_per_s"] > 0
    assert "| xla | 64 |" in md.read_text()
