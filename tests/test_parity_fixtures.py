"""JAX logits vs the committed HF-transformers reference fixtures (tests/fixtures/parity, made by
scripts/parity_reference.py from `Ministral3ForCausalLM`, CPU fp32). No torch needed."""

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").exists()) if FIXTURES.is_dir() else []
TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_logits_match_transformers(case, causal):
    import nemodiff_jax

    ref = np.load(FIXTURES / case / "reference.npz")
    model = nemodiff_jax.load(FIXTURES / case, dtype="float32")
    got = np.asarray(model.logits(ref["input_ids"], causal=causal))
    want = ref["logits_causal" if causal else "logits_bidir"]
    assert got.shape == want.shape and got.dtype == np.float32, (got.shape, got.dtype, want.shape)
    err = rel_err(got, want)
    print(f"[parity fixture] {case} causal={causal}: rel err {err:.3e}")
    assert err <= TOL, f"{case} causal={causal}: ||jax-hf||/||hf|| = {err:.3e} > {TOL:g}"


def test_fixtures_present():
    assert len(CASES) >= 3, f"missing parity fixtures in {FIXTURES}; run scripts/parity_reference.py"
