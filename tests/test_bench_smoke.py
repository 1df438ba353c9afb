"""nemodiff_jax.bench (`nemodiff bench`) end to end on the CPU at the tiny shape (the GPU numbers come from the same
code), its HBM-limit probes and datasheet table, and benchmarks/tp_variants.py (loaded from its path)."""

import importlib.util
import json
from pathlib import Path

import pytest

from nemodiff_jax import bench, cli, embedded

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(sizes=["tiny"], contexts=[64], batches=[1, 2], new_tokens=8, prompt_len=16, mode_new_tokens=12,
            attn=["xla"], probe_bytes=1 << 20)


def check_report(report, md_text, mesh):
    assert report["mesh"] == (list(mesh) if mesh else None)
    hbm = report["hbm"]
    assert hbm["winner"] in hbm["probes_GBps"] and hbm["limit_GBps"] == max(hbm["probes_GBps"].values()) > 0
    assert {"xla_copy", "xla_read"} <= set(hbm["probes_GBps"]) and "pallas_tma" in hbm["skipped"]
    assert hbm["datasheet_GBps"] is None and report["bandwidth_GBps"] == hbm["limit_GBps"]
    size = report["sizes"][0]
    assert size["size"] == "tiny" and size["weight_bytes"] > 0
    fwd = size["forward"][0]
    assert fwd["context"] == 64 and all(fwd[k] > 0 for k in ("t1_ms", "t32_causal_ms", "t32_bidir_ms",
                                                              "quadratic_round_ms"))
    assert fwd["quadratic_round_in_ar_forwards"] == pytest.approx(fwd["quadratic_round_ms"] / fwd["t1_ms"])
    assert fwd["t1_roofline_pct"] > 0 and fwd["t1_roofline_pct_datasheet"] is None  # a CPU has no datasheet
    rows = {(r["mode"], r["batch"]): r for r in size["e2e"]}
    assert set(rows) == {(m, b) for m in ("ar", "diffusion", "linear_spec", "quadratic_spec") for b in (1, 2)}
    for (mode, b), r in rows.items():
        assert r["tokens_per_s"] > 0 and r["forwards"] > 0
        if mode == "ar":  # one token per forward, 7 decode steps after the prefill's token
            assert r["forwards"] == 7 and r["tokens_per_forward"] == 1.0
            assert r["roofline_pct"] > 0 and r["roofline_pct_datasheet"] is None
        if mode == "linear_spec":  # a draft and a verify pass per round
            assert r["forwards"] == 2 * r["rounds"]
        if mode == "quadratic_spec":  # one canvas forward per round
            assert r["forwards"] == r["rounds"]
    assert "| ar | xla | 1 |" in md_text and "| linear_spec | xla | 2 |" in md_text
    assert f"`{hbm['winner']}`" in md_text and "% / -" in md_text  # both roofline numbers, datasheet unknown


@pytest.mark.parametrize("mesh", [None, (1, 2)])  # (2, 1): test_cli_bench
def test_bench_tiny_writes_report(tmp_path, mesh):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    report = bench.run(bench.Settings(**TINY, mesh=mesh, out=str(out), md=str(md)))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    check_report(report, md.read_text(), mesh)


def test_cli_bench(tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["bench", "--sizes", "tiny", "--contexts", "64", "--batches", "1", "2", "--new-tokens", "8",
            "--prompt-len", "16", "--mode-new-tokens", "12", "--attn", "xla", "--mesh", "2", "1",
            "--out", str(out), "--md", str(md)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    check_report(report, md.read_text(), (2, 1))
    assert report["settings"]["prompt_len"] == 16 and report["settings"]["sizes"] == ["tiny"]


def test_cli_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--attn", "flash"])
    assert cli.main(["bench", "--sizes", "auto", "tiny", "--out", "/nonexistent/x.json"]) == 2
    assert "stands alone" in capsys.readouterr().err


def test_settings_defaults_per_platform():
    cpu = bench.Settings().resolved("cpu")
    assert cpu.sizes == [bench.EMBEDDED] and cpu.contexts == bench.CPU_DEFAULTS["contexts"]
    gpu = bench.Settings().resolved("gpu")
    assert gpu.sizes == ["8B"] and gpu.batches == bench.GPU_DEFAULTS["batches"]
    explicit = bench.Settings(sizes=["3B"], contexts=[], new_tokens=5).resolved("cpu")  # explicit: GPU defaults
    assert explicit.contexts == [] and explicit.new_tokens == 5
    assert explicit.batches == bench.GPU_DEFAULTS["batches"] and explicit.prompt_len == 512


def test_embedded_shape_is_the_assets_config():
    cfg = bench.size_config(bench.EMBEDDED)
    raw = json.loads((embedded.ASSETS / "config.json").read_text())
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (raw["hidden_size"], raw["num_hidden_layers"],
                                                                 raw["vocab_size"])


@pytest.mark.parametrize("kind,key,tbps", [
    ("NVIDIA H200", "H200", 4.8),
    ("NVIDIA H200 NVL", "H200", 4.8),
    ("NVIDIA H100 80GB HBM3", "H100", 3.35),
    ("NVIDIA H100 PCIe", "H100 PCIe", 2.0),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB", 2.039),
    ("NVIDIA A100-SXM4-40GB", "A100", 1.555),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 1.935),
    ("NVIDIA L40S", "L40S", 0.864),
    ("NVIDIA L40", "L40", 0.864),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 1.008),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", 0.936),
    ("NVIDIA B200", "B200", 8.0),
    ("NVIDIA GB200", "GB200", 8.0),
    ("NVIDIA GH200 480GB", "GH200", None),  # which memory is not in the name
    ("cpu", None, None),
    ("TPU v5 lite", None, None),
])
def test_datasheet_table(kind, key, tbps):
    got_key, bw = bench.datasheet_bandwidth(kind)
    assert got_key == key and bw == (None if tbps is None else pytest.approx(tbps * 1e12))


def test_copy_limit_on_cpu():
    hbm = bench.copy_limit(1 << 20)
    assert hbm.limit == max(hbm.probes.values()) and hbm.probes[hbm.winner] == hbm.limit
    assert set(hbm.probes) == {"xla_copy", "xla_scale", "xla_read", "xla_gemv"}
    assert "pallas_tma" in hbm.skipped and hbm.datasheet is None and hbm.probe_bytes == 1 << 20
    meas, sheet = hbm.pct(hbm.limit, 2.0)  # moving limit bytes in 2 s: half the measured rate
    assert meas == pytest.approx(50.0) and sheet is None
    with_sheet = bench.HbmLimit(**{**hbm.__dict__, "datasheet": 2 * hbm.limit})
    assert with_sheet.pct(hbm.limit, 1.0) == (pytest.approx(100.0), pytest.approx(50.0))
    with pytest.raises(ValueError, match="64 KiB"):
        bench.copy_limit(1000)


def _load_benchmark(name):
    """benchmarks/ is a folder of scripts, not a package: load one from its path."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tp_variants_compile_options_keep_logits(tmp_path):
    """benchmarks/tp_variants.py: every XLA-option variant of the forward loop compiles (the options are valid
    names for this XLA) and gives the default's summed logits, on 1 and 2 (fake) devices."""
    tp_variants = _load_benchmark("tp_variants")
    out = tmp_path / "v.json"
    rows = tp_variants.main(["--size", "tiny", "--tp", "1", "2", "--context", "64", "--out", str(out)])
    got = {(r["tp"], r["variant"]) for r in rows}
    assert got == {(1, "default"), (1, "no_cmd_buffer")} | {(2, v) for v in tp_variants.VARIANTS}
    assert all(r["same_logits"] and r["ms_per_forward"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows


def test_bench_ar_deterministic_row():
    """The deterministic option's bench row: ar's decoder with deterministic=True, one forward per token (each
    a block-size chunk: in bf16 its tokens may differ from ar's at near-ties, so they are not compared), and an
    unknown mode is refused before any work."""
    cfg = bench.size_config("tiny")
    model = bench.make_model(cfg)
    ar = bench.bench_e2e(model, cfg, 2, 16, 8, mode="ar", attn_impl="xla", reps=1)
    det = bench.bench_e2e(model, cfg, 2, 16, 8, mode="ar_deterministic", attn_impl="xla", reps=1)
    assert det["deterministic"] and not ar["deterministic"]
    assert det["mode"] == "ar_deterministic" and det["forwards"] == ar["forwards"] == 7
    with pytest.raises(ValueError, match="unknown mode 'ar_fast'"):
        bench.Settings(modes=["ar", "ar_fast"]).resolved("cpu")
