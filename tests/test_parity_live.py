"""JAX logits vs HF transformers `Ministral3ForCausalLM`, built live (CPU fp32) by scripts/parity_reference.py.
Skipped unless torch and transformers import (they are not project dependencies)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "parity_reference", Path(__file__).resolve().parents[1] / "scripts" / "parity_reference.py")
parity_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity_reference)

TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", parity_reference.CASES, ids=lambda c: c["name"])
def test_logits_match_transformers_live(case, tmp_path):
    import nemodiff_jax

    nld, weights, ids, want_causal, want_bidir = parity_reference.build_case(case, case["seed"] + 1000)
    parity_reference.write_hf_dir(tmp_path, nld, weights)
    model = nemodiff_jax.load(tmp_path, dtype="float32")
    for causal, want in ((True, want_causal), (False, want_bidir)):
        got = np.asarray(model.logits(ids, causal=causal))
        assert got.shape == want.shape and got.dtype == np.float32, (got.shape, got.dtype, want.shape)
        err = rel_err(got, want)
        print(f"[parity live] {case['name']} causal={causal}: rel err {err:.3e}")
        assert err <= TOL, f"{case['name']} causal={causal}: ||jax-hf||/||hf|| = {err:.3e} > {TOL:g}"
